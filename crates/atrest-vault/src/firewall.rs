//! Network rules: a default action and IPv4/IPv6 addresses or CIDR ranges
//! that are allowed when the default is Deny.

use std::net::IpAddr;

use crate::store::Firewall;

/// Parses `a.b.c.d`, `a.b.c.d/n` or the IPv6 equivalents.
pub fn parse_rule(rule: &str) -> Result<(IpAddr, u8), String> {
    let (addr, len) = match rule.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (rule, None),
    };
    let ip: IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("'{rule}' is not an IP address or CIDR range"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("'{rule}' has an invalid prefix length"))?,
    };
    Ok((ip, len))
}

fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn in_range(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (normalize(ip), normalize(net)) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            (u32::from(a) & mask) == (u32::from(b) & mask)
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            (u128::from(a) & mask) == (u128::from(b) & mask)
        }
        _ => false,
    }
}

/// Whether `ip` may reach the data plane (before any bypass).
pub fn allows(fw: &Firewall, ip: IpAddr) -> bool {
    if fw.default_action.eq_ignore_ascii_case("allow") {
        return true;
    }
    fw.ip_rules.iter().any(|r| match parse_rule(r) {
        Ok((net, len)) => in_range(ip, net, len),
        Err(_) => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fw(default: &str, rules: &[&str]) -> Firewall {
        Firewall {
            default_action: default.into(),
            ip_rules: rules.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn rules() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(allows(&fw("Allow", &[]), ip("8.8.8.8")));
        assert!(!allows(&fw("Deny", &[]), ip("127.0.0.1")));
        let f = fw("Deny", &["127.0.0.2/32", "10.1.0.0/16", "::1"]);
        assert!(allows(&f, ip("127.0.0.2")));
        assert!(!allows(&f, ip("127.0.0.1")));
        assert!(allows(&f, ip("10.1.200.3")));
        assert!(!allows(&f, ip("10.2.0.1")));
        assert!(allows(&f, ip("::1")));
        assert!(allows(&f, ip("::ffff:127.0.0.2")));
        assert!(parse_rule("10.0.0.0/33").is_err());
        assert!(parse_rule("nope").is_err());
        assert!(allows(&fw("Deny", &["0.0.0.0/0"]), ip("1.2.3.4")));
    }
}
