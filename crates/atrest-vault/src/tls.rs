//! TLS: a vault-local CA and server certificate generated on first start
//! (or operator-supplied files), served with rustls on the aws-lc-rs
//! provider. The CA private key is not kept: it signs the server
//! certificate once and is dropped, so a stolen data directory cannot mint
//! new certificates clients would trust.

use std::path::{Path, PathBuf};
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

pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), VaultError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()?;
    Ok(())
}

/// Creates `dir/tls/{ca.pem,server.pem,server.key}` unless they exist.
pub fn ensure_generated(dir: &Path, hostnames: &[String]) -> Result<TlsFiles, VaultError> {
    let tls = dir.join("tls");
    let files = TlsFiles {
        ca: tls.join("ca.pem"),
        cert: tls.join("server.pem"),
        key: tls.join("server.key"),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(&tls)?;
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(tls_err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(tls_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "atrest vault local CA");
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
    dn.push(DnType::CommonName, "atrest vault");
    params.distinguished_name = dn;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&server_key, &issuer).map_err(tls_err)?;

    std::fs::write(&files.ca, ca_cert.pem())?;
    std::fs::write(&files.cert, format!("{}{}", cert.pem(), ca_cert.pem()))?;
    write_private(&files.key, server_key.serialize_pem().as_bytes())?;
    Ok(files)
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

pub fn server_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, VaultError> {
    let certs = load_certs(cert)?;
    let pem = std::fs::read(key)?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(tls_err)?
        .ok_or_else(|| VaultError::Tls(format!("no private key in {}", key.display())))?;
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
    fn generates_once_and_loads() {
        let d = tempfile::tempdir().unwrap();
        let f = ensure_generated(d.path(), &["vault.example".into()]).unwrap();
        let before = std::fs::read(&f.cert).unwrap();
        let f2 = ensure_generated(d.path(), &[]).unwrap();
        assert_eq!(before, std::fs::read(&f2.cert).unwrap());
        server_config(&f.cert, &f.key).unwrap();
        client_config(&std::fs::read(&f.ca).unwrap()).unwrap();
        assert!(client_config(b"").is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&f.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0);
    }
}
