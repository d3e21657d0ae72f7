//! TLS: a vault-local CA and server certificate generated on first start
//! (or operator-supplied files), served with rustls on the aws-lc-rs
//! provider. The CA private key is not kept: it signs the server
//! certificate once and is dropped, so a stolen data directory cannot mint
//! new certificates clients would trust.

use std::path::Path;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::VaultError;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn tls_err(e: impl std::fmt::Display) -> VaultError {
    VaultError::Tls(e.to_string())
}

/// A freshly generated CA and server certificate.
pub struct Generated {
    pub ca_pem: String,
    /// Server certificate followed by the CA certificate.
    pub chain_pem: String,
    pub key_pem: zeroize::Zeroizing<String>,
}

/// Generates a CA (ECDSA P-256, path length 0) and a server certificate
/// for localhost, 127.0.0.1, ::1 and `hostnames`. The CA key is dropped.
pub fn generate(hostnames: &[String]) -> Result<Generated, VaultError> {
    generate_named("atrest vault", hostnames)
}

/// As [`generate`], for a server called `common_name` (its CA is
/// "`common_name` local CA").
pub fn generate_named(common_name: &str, hostnames: &[String]) -> Result<Generated, VaultError> {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(tls_err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{common_name} local CA"));
    ca_params.distinguished_name = dn;
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(tls_err)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for h in hostnames {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(tls_err)?;
    let mut params = CertificateParams::new(names).map_err(tls_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&server_key, &issuer).map_err(tls_err)?;
    Ok(Generated {
        ca_pem: ca_cert.pem(),
        chain_pem: format!("{}{}", cert.pem(), ca_cert.pem()),
        key_pem: zeroize::Zeroizing::new(server_key.serialize_pem()),
    })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, VaultError> {
    let pem = std::fs::read(path)?;
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut pem.as_slice()).collect();
    let certs = certs.map_err(tls_err)?;
    if certs.is_empty() {
        return Err(VaultError::Tls(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

/// Server configuration from operator-supplied PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, VaultError> {
    let chain = std::fs::read(cert)?;
    let key = zeroize::Zeroizing::new(std::fs::read(key)?);
    server_config_pem(&chain, &key)
}

/// Server configuration from a PEM chain and a PEM private key.
pub fn server_config_pem(
    chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<rustls::ServerConfig, VaultError> {
    let certs: Result<Vec<CertificateDer<'static>>, _> =
        rustls_pemfile::certs(&mut &chain_pem[..]).collect();
    let certs = certs.map_err(tls_err)?;
    if certs.is_empty() {
        return Err(VaultError::Tls(
            "no certificate in the certificate chain".into(),
        ));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(tls_err)?
        .ok_or_else(|| VaultError::Tls("no private key in the key file".into()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A client configuration trusting only the given CA bundle (PEM).
pub fn client_config(ca_pem: &[u8]) -> Result<rustls::ClientConfig, VaultError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(c.map_err(tls_err)?).map_err(tls_err)?;
    }
    if roots.is_empty() {
        return Err(VaultError::Tls("the CA bundle holds no certificate".into()));
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_chain_verifies_and_loads() {
        let g = generate(&["vault.example".into()]).unwrap();
        server_config_pem(g.chain_pem.as_bytes(), g.key_pem.as_bytes()).unwrap();
        client_config(g.ca_pem.as_bytes()).unwrap();
        assert!(client_config(b"").is_err());
        assert!(server_config_pem(g.chain_pem.as_bytes(), b"").is_err());
        assert!(g.chain_pem.matches("BEGIN CERTIFICATE").count() == 2);
    }
}
