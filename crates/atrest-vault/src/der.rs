//! Just enough DER to read the public modulus and exponent out of an
//! `RSAPublicKey`, and to walk PKCS#8/PKCS#12 containers on import. Only
//! definite lengths; anything else is rejected as malformed input.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    pub tag: u8,
    pub value: &'a [u8],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed DER")]
pub struct DerError;

/// Reads one TLV from the front of `input`; returns it and the rest.
pub fn read_tlv(input: &[u8]) -> Result<(Tlv<'_>, &[u8]), DerError> {
    let (&tag, rest) = input.split_first().ok_or(DerError)?;
    let (&first, mut rest) = rest.split_first().ok_or(DerError)?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return Err(DerError);
        }
        let mut len = 0usize;
        for &b in &rest[..n] {
            len = (len << 8) | b as usize;
        }
        rest = &rest[n..];
        len
    };
    if rest.len() < len {
        return Err(DerError);
    }
    Ok((
        Tlv {
            tag,
            value: &rest[..len],
        },
        &rest[len..],
    ))
}

/// Splits the contents of a constructed value into its children.
pub fn children(value: &[u8]) -> Result<Vec<Tlv<'_>>, DerError> {
    let mut out = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let (tlv, r) = read_tlv(rest)?;
        out.push(tlv);
        rest = r;
    }
    Ok(out)
}

/// Reads a single element that must be the whole input with the given tag.
pub fn expect(input: &[u8], tag: u8) -> Result<&[u8], DerError> {
    let (tlv, rest) = read_tlv(input)?;
    if tlv.tag != tag || !rest.is_empty() {
        return Err(DerError);
    }
    Ok(tlv.value)
}

/// An unsigned big-endian integer without leading zero bytes.
pub fn unsigned(int: &[u8]) -> &[u8] {
    let mut i = int;
    while i.len() > 1 && i[0] == 0 {
        i = &i[1..];
    }
    i
}

/// `(n, e)` of a PKCS#1 `RSAPublicKey`.
pub fn rsa_public_components(der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), DerError> {
    let seq = children(expect(der, 0x30)?)?;
    if seq.len() != 2 || seq[0].tag != 0x02 || seq[1].tag != 0x02 {
        return Err(DerError);
    }
    Ok((
        unsigned(seq[0].value).to_vec(),
        unsigned(seq[1].value).to_vec(),
    ))
}

pub fn encode(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = (len as u32).to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (4 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_long_length() {
        let v = vec![7u8; 300];
        let enc = encode(0x04, &v);
        let (tlv, rest) = read_tlv(&enc).unwrap();
        assert_eq!(tlv.tag, 0x04);
        assert_eq!(tlv.value, &v[..]);
        assert!(rest.is_empty());
    }

    #[test]
    fn truncated_is_error() {
        let enc = encode(0x04, &[1, 2, 3]);
        assert_eq!(read_tlv(&enc[..4]), Err(DerError));
        assert_eq!(read_tlv(&[0x30, 0x85, 1, 1, 1, 1, 1]), Err(DerError));
        assert_eq!(read_tlv(&[]), Err(DerError));
    }

    #[test]
    fn public_components() {
        let n = encode(0x02, &[0x00, 0xc1, 0x02]);
        let e = encode(0x02, &[0x01, 0x00, 0x01]);
        let seq = encode(0x30, &[n, e].concat());
        let (n, e) = rsa_public_components(&seq).unwrap();
        assert_eq!(n, vec![0xc1, 0x02]);
        assert_eq!(e, vec![1, 0, 1]);
        assert!(rsa_public_components(&seq[..seq.len() - 1]).is_err());
    }
}
