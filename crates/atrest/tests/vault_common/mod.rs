//! Shared helpers for the vault integration tests: they start the real
//! `atrest vault serve` binary and talk to it over HTTPS, verifying its
//! certificate against the CA it generated.
#![allow(dead_code, unused_imports)]

pub use atrest_vault::testkit::reqwest::Method;
pub use atrest_vault::testkit::{block_on, TestVault};
pub use serde_json::{json, Value};

pub fn start() -> TestVault {
    TestVault::start(std::path::Path::new(env!("CARGO_BIN_EXE_atrest")), &[])
}

pub fn start_with(args: &[&str]) -> TestVault {
    TestVault::start(std::path::Path::new(env!("CARGO_BIN_EXE_atrest")), args)
}

/// A token for `client_id`/`secret` straight from the token endpoint.
pub fn token(v: &TestVault, client_id: &str, secret: &str) -> String {
    let c = atrest_vault::VaultClient::new(&v.url, &v.ca, &v.tenant, client_id, secret).unwrap();
    block_on(c.token()).unwrap()
}

pub fn body(v: &Value) -> Option<Vec<u8>> {
    Some(serde_json::to_vec(v).unwrap())
}

/// Asserts Azure's error envelope with the given status and code.
pub fn assert_error(r: &atrest_vault::client::RawResponse, status: u16, code: &str) {
    assert_eq!(r.status, status, "body: {}", r.body);
    assert_eq!(r.error_code(), Some(code), "body: {}", r.body);
    assert!(!r.message().is_empty(), "error without message: {}", r.body);
}

/// `atrest vault audit verify --data DIR` must succeed.
pub fn assert_audit_verifies(data: &std::path::Path) {
    let out = run_cli(&["vault", "audit", "verify", "--data", data.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

pub fn run_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_atrest"))
        .args(args)
        .output()
        .expect("run atrest")
}
