//! Interop: the official Azure SDK for Python (azure-keyvault-keys with
//! azure-identity's ClientSecretCredential) runs a full key lifecycle
//! against a real vault process.

mod vault_common;
use vault_common::*;

#[test]
fn azure_python_sdk_full_lifecycle() {
    let python = match std::env::var("ATREST_TEST_PYTHON") {
        Ok(p) if std::path::Path::new(&p).exists() => p,
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "ATREST_TEST_PYTHON is not set in CI: run scripts/setup-test-deps.sh (scripts/test.sh does)"
            );
            eprintln!("SKIPPED azure_python_sdk_full_lifecycle: set ATREST_TEST_PYTHON (scripts/test.sh does)");
            return;
        }
    };
    let v = start();
    let (_, full_id, full_secret) = v.identity("sdk-full", &["all"]);
    let (_, wrap_id, wrap_secret) = v.identity("sdk-wrap-only", &["wrapKey", "unwrapKey"]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../atrest-vault/tests/azure_sdk_lifecycle.py"
    );
    let out = std::process::Command::new(python)
        .arg(script)
        .env("VAULT_URL", &v.url)
        .env("TENANT_ID", &v.tenant)
        .env("REQUESTS_CA_BUNDLE", v.data_dir().join("tls/ca.pem"))
        .env("FULL_ID", &full_id)
        .env("FULL_SECRET", &full_secret)
        .env("WRAP_ID", &wrap_id)
        .env("WRAP_SECRET", &wrap_secret)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("PY-LIFECYCLE-OK"), "{stdout}");

    // The SDK wrapped locally with the identity that has 'get': only the
    // wrap-only identity's wrap reached the vault.
    let audit = std::fs::read_to_string(v.audit_path()).unwrap();
    let wraps: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["operationName"] == "KeyWrap" && r["resultType"] == "Success")
        .collect();
    assert_eq!(wraps.len(), 1, "server-side wraps: {wraps:?}");
    assert_eq!(wraps[0]["identity"]["claim"]["appid"], wrap_id.as_str());
    assert!(audit.contains("\"operationName\":\"KeyUnwrap\""));
    assert!(audit.contains("\"operationName\":\"TokenIssue\""));
    assert_audit_verifies(v.data_dir());
}
