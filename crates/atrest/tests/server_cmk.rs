//! Customer-managed keys end to end, with a real vault process and a real
//! server process: switch, every loss cause to Inaccessible and back,
//! rotation with kills during the rewrap, crypto-shredding, webhooks.

mod server_common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use atrest_vault::testkit::reqwest::Method;
use atrest_vault::testkit::{block_on, TestVault};
use serde_json::{json, Value};
use server_common::*;

struct Setup {
    vault: TestVault,
    server: TestServer,
    /// Key administrator (all permissions) on the vault.
    admin: atrest_vault::VaultClient,
    client_id: String,
    cert_pem: String,
    key_url: String,
    ca_file: std::path::PathBuf,
}

fn vault() -> TestVault {
    let v = TestVault::start(std::path::Path::new(env!("CARGO_BIN_EXE_atrest")), &[]);
    v.admin_call(
        Method::PATCH,
        "/vault",
        Some(json!({"purgeProtection": true})),
    )
    .expect("purge protection on");
    v
}

fn register_server_identity(v: &TestVault, client_id: &str, cert_pem: &str, perms: &[&str]) {
    v.admin_call(
        Method::POST,
        "/identities",
        Some(json!({
            "name": "atrest-server", "kind": "managedIdentity", "clientId": client_id,
            "certificate": cert_pem, "permissions": {"keys": perms},
        })),
    )
    .expect("register the server's identity");
}

fn set_perms(v: &TestVault, client_id: &str, perms: &[&str]) {
    v.admin_call(
        Method::PUT,
        &format!("/identities/{client_id}/policy"),
        Some(json!({"permissions": {"keys": perms}})),
    )
    .expect("set policy");
}

fn setup(server_args: &[&str]) -> Setup {
    let vault = vault();
    let (admin, _, _) = vault.identity("key-admin", &["all"]);
    block_on(admin.call(
        Method::POST,
        "/keys/tde/create",
        Some(json!({"kty": "RSA", "key_size": 2048, "key_ops": ["wrapKey", "unwrapKey"]})),
    ))
    .expect("create key");
    let server = TestServer::create(server_args);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(server.dir.join("server.json")).unwrap())
            .unwrap();
    let client_id = config["identity"]["client_id"]
        .as_str()
        .unwrap()
        .to_string();
    let cert_pem = std::fs::read_to_string(server.dir.join("identity/identity.crt")).unwrap();
    register_server_identity(
        &vault,
        &client_id,
        &cert_pem,
        &["get", "wrapKey", "unwrapKey"],
    );
    let ca_file = server.tmp.path().join("vault-ca.pem");
    std::fs::write(&ca_file, &vault.ca).unwrap();
    let key_url = format!("{}/keys/tde", vault.url);
    Setup {
        vault,
        server,
        admin,
        client_id,
        cert_pem,
        key_url,
        ca_file,
    }
}

impl Setup {
    fn set_key(&self, key: &str) -> std::process::Output {
        atrest(&[
            "server",
            "set-key",
            "--data",
            self.server.dir.to_str().unwrap(),
            "--key",
            key,
            "--tenant",
            &self.vault.tenant,
            "--vault-ca",
            self.ca_file.to_str().unwrap(),
        ])
    }

    /// `set_key`, which must succeed.
    fn set_key_ok(&self, key: &str) {
        let out = self.set_key(key);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `atrest server configure --data DIR ARGS`, which must succeed.
    fn configure(&self, args: &[&str]) {
        let dir = self.server.dir.to_str().unwrap();
        let mut all = vec!["server", "configure", "--data", dir];
        all.extend_from_slice(args);
        let out = atrest(&all);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Sends `sig` (STOP, CONT) to the vault process.
    fn signal_vault(&self, sig: &str) {
        let pid = self.vault.child.as_ref().expect("vault running").id();
        assert!(Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .unwrap()
            .success());
    }

    /// Creates a new version of the key in the vault and returns its id.
    fn new_key_version(&self, key_size: u32) -> String {
        block_on(self.admin.call(
            Method::POST,
            "/keys/tde/create",
            Some(json!({"kty": "RSA", "key_size": key_size})),
        ))
        .expect("create a key version");
        self.latest_version()
    }

    fn latest_version(&self) -> String {
        let k = block_on(self.admin.get_key("tde", None)).unwrap();
        k["key"]["kid"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_string()
    }
}

/// Header bytes (both slots) of every atrest file of the server: the
/// sqlite engine's database files, or every file of the postgres engine's
/// ciphertext tree (its root file included).
fn headers(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let under = |sub: &str| match dir.join(sub).exists() {
        true => files_under(&dir.join(sub)),
        false => Vec::new(),
    };
    let db = under("data")
        .into_iter()
        .filter(|(p, b)| b.len() >= 8192 && !p.ends_with("atrest.json"));
    db.chain(under("pgfs"))
        .map(|(p, b)| {
            let n = b.len().min(8192);
            (p, b[..n].to_vec())
        })
        .collect()
}

fn wait_state(s: &TestServer, want: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let st = s.state();
        if st["state"] == want {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "server not {want} within {limit:?}: {st}\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn python_case(s: &TestServer, case: &str) -> std::process::Child {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/server_py/psycopg_suite.py"
    );
    Command::new(python())
        .args([script, case])
        .env("ATREST_PORT", s.port.to_string())
        .env("ATREST_PASSWORD", PASSWORD)
        .env("ATREST_CA", s.ca())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A new connection's SQLSTATE and message, through tokio-postgres.
fn connect_error(port: u16) -> (String, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={port} user=atrest password='{PASSWORD}' dbname=postgres"
            ),
            tokio_postgres::NoTls,
        )
        .await;
        let e = r.err().expect("the connection must be refused");
        let db = e
            .as_db_error()
            .expect("a server error, not a transport error");
        (db.code().code().to_string(), db.message().to_string())
    })
}

#[test]
fn switch_to_customer_key_then_every_loss_cause_goes_inaccessible_and_back() {
    every_loss_cause(Engine::Sqlite);
}

/// The same suite against real PostgreSQL on atrest-fs: the one control
/// plane locks the engine (immediate shutdown, every DEK zeroized with the
/// unmount) and the port answers 57P03 until revalidation.
#[test]
fn postgres_engine_every_loss_cause_goes_inaccessible_and_back() {
    every_loss_cause(Engine::Postgres);
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Engine {
    Sqlite,
    Postgres,
}

fn every_loss_cause(engine: Engine) {
    let mut st = setup(engine_args(engine));
    // Validation refuses bad keys and changes nothing.
    let before = std::fs::read(st.server.dir.join("server.json")).unwrap();
    for (bad, why) in [
        (format!("{}/keys/nope", st.vault.url), "does not exist"),
        ("https://not-a-key".to_string(), "not a key URL"),
    ] {
        let out = st.set_key(&bad);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{err}");
    }
    block_on(st.admin.call(
        Method::POST,
        "/keys/small/create",
        Some(json!({"kty": "RSA", "key_size": 4096})),
    ))
    .unwrap();
    let out = st.set_key(&format!("{}/keys/small", st.vault.url));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("RSA 2048 or 3072"),
        "{:?}",
        out
    );
    set_perms(&st.vault, &st.client_id, &["get", "wrapKey"]);
    let out = st.set_key(&st.key_url);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unwrapKey"),
        "{:?}",
        out
    );
    set_perms(&st.vault, &st.client_id, &["get", "wrapKey", "unwrapKey"]);
    assert_eq!(
        std::fs::read(st.server.dir.join("server.json")).unwrap(),
        before
    );

    // Data under the service key, then the switch.
    st.server.start(&[]);
    st.server.sql(
        "postgres",
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('before')",
    );
    st.server.sql("postgres", "CREATE DATABASE other");
    st.server
        .sql("other", "CREATE TABLE o (x int); INSERT INTO o VALUES (7)");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(st.server.dir.join("server.json")).unwrap())
            .unwrap();
    let service_hex = cfg["encryption"]["service_key"]
        .as_str()
        .unwrap()
        .strip_prefix("service:")
        .unwrap()
        .to_string();
    // Online: the running server switches.
    st.set_key_ok(&st.key_url);
    let version = st.latest_version();
    let after = headers(&st.server.dir);
    assert!(!after.is_empty(), "{engine:?}: no file headers found");
    for (path, h) in after {
        assert!(
            !contains(&h, service_hex.as_bytes()),
            "{} still holds a DEK wrapped by the service key",
            path.display()
        );
        assert!(
            contains(&h, version.as_bytes()),
            "{} does not name the customer key",
            path.display()
        );
    }
    assert_eq!(st.server.sql("postgres", "SELECT v FROM t"), "before");
    st.server.sql("postgres", "INSERT INTO t VALUES ('after')");
    // The vault knows the server depends on this key version: disabling
    // it without force is refused, naming the server.
    let e = block_on(st.admin.call(
        Method::PATCH,
        &format!("/keys/tde/{version}"),
        Some(json!({"attributes": {"enabled": false}})),
    ))
    .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("test-server"), "{e}");
    assert!(st.server.stop().success());

    // A short check interval for the loss tests.
    let dir = st.server.dir.to_str().unwrap().to_string();
    st.configure(&["--key-check-interval-ms", "300"]);
    st.server.start(&[]);
    assert_eq!(st.server.sql("postgres", "SELECT count(*) FROM t"), "2");
    let kid = format!("{}/{version}", st.key_url);

    type Step = Box<dyn Fn(&Setup)>;
    let causes: Vec<(&str, &str, Step, Step)> = vec![
        (
            "unwrapKey revoked",
            "permission",
            Box::new(|s: &Setup| set_perms(&s.vault, &s.client_id, &["get", "wrapKey"])),
            Box::new(|s: &Setup| {
                set_perms(&s.vault, &s.client_id, &["get", "wrapKey", "unwrapKey"])
            }),
        ),
        (
            "get revoked",
            "permission",
            Box::new(|s: &Setup| set_perms(&s.vault, &s.client_id, &["wrapKey", "unwrapKey"])),
            Box::new(|s: &Setup| {
                set_perms(&s.vault, &s.client_id, &["get", "wrapKey", "unwrapKey"])
            }),
        ),
        (
            "key disabled",
            "disabled",
            Box::new(move |s: &Setup| {
                let v = s.latest_version();
                block_on(s.admin.call(
                    Method::PATCH,
                    &format!("/keys/tde/{v}?force=true"),
                    Some(json!({"attributes": {"enabled": false}})),
                ))
                .unwrap();
            }),
            Box::new(|s: &Setup| {
                let v = s.latest_version();
                block_on(s.admin.call(
                    Method::PATCH,
                    &format!("/keys/tde/{v}"),
                    Some(json!({"attributes": {"enabled": true}})),
                ))
                .unwrap();
            }),
        ),
        (
            "key expired",
            "expired",
            Box::new(|s: &Setup| {
                let v = s.latest_version();
                let past = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
                    - 60;
                block_on(s.admin.call(
                    Method::PATCH,
                    &format!("/keys/tde/{v}?force=true"),
                    Some(json!({"attributes": {"exp": past}})),
                ))
                .unwrap();
            }),
            Box::new(|s: &Setup| {
                let v = s.latest_version();
                let future = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
                    + 86_400 * 365;
                block_on(s.admin.call(
                    Method::PATCH,
                    &format!("/keys/tde/{v}"),
                    Some(json!({"attributes": {"exp": future}})),
                ))
                .unwrap();
            }),
        ),
        (
            "key deleted",
            "does not exist",
            Box::new(|s: &Setup| {
                block_on(s.admin.call(Method::DELETE, "/keys/tde", None)).unwrap();
            }),
            Box::new(|s: &Setup| {
                block_on(s.admin.call(Method::POST, "/deletedkeys/tde/recover", None)).unwrap();
                // Recovery completes asynchronously in Azure; ours at once.
            }),
        ),
        (
            "identity deleted",
            "identity",
            Box::new(|s: &Setup| {
                s.vault
                    .admin_call(
                        Method::DELETE,
                        &format!("/identities/{}", s.client_id),
                        None,
                    )
                    .unwrap();
            }),
            Box::new(|s: &Setup| {
                register_server_identity(
                    &s.vault,
                    &s.client_id,
                    &s.cert_pem,
                    &["get", "wrapKey", "unwrapKey"],
                )
            }),
        ),
        (
            "firewall deny",
            "firewall",
            Box::new(|s: &Setup| {
                s.vault
                    .admin_call(
                        Method::PUT,
                        "/firewall",
                        Some(json!({"defaultAction": "Deny", "ipRules": ["10.9.9.9"]})),
                    )
                    .unwrap();
            }),
            Box::new(|s: &Setup| {
                s.vault
                    .admin_call(
                        Method::PUT,
                        "/firewall",
                        Some(json!({"defaultAction": "Allow", "ipRules": []})),
                    )
                    .unwrap();
            }),
        ),
    ];
    for (i, (name, why, cause, fix)) in causes.iter().enumerate() {
        // An open session, holding a transaction.
        let mut held = python_case(&st.server, "hold_until_ended");
        let mut out = held.stdout.take().unwrap();
        let mut ready = [0u8; 6];
        out.read_exact(&mut ready).unwrap();
        assert_eq!(&ready, b"READY\n");

        cause(&st);
        let t0 = Instant::now();
        let state = wait_state(
            &st.server,
            "Inaccessible",
            Duration::from_millis(300 + 5000),
        );
        let took = t0.elapsed();
        let reason = state["reason"].as_str().unwrap().to_lowercase();
        assert!(
            reason.contains(why),
            "{name}: the reason names the cause ({why}): {reason}"
        );

        // The open session was ended with the key's error.
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        assert!(held.wait().unwrap().success(), "{name}: {rest}");
        match engine {
            Engine::Sqlite => {
                assert!(
                    rest.contains("ENDED 57P03") || rest.contains("ENDED None"),
                    "{name}: {rest}"
                );
                assert!(rest.contains("Inaccessible"), "{name}: {rest}");
            }
            // PostgreSQL's immediate shutdown ends the session with its
            // own message (57P01 or the socket closed); the reason is
            // what the next connection is told.
            Engine::Postgres => assert!(rest.contains("ENDED"), "{name}: {rest}"),
        }
        // New connections get the documented SQLSTATE and message.
        let (code, msg) = connect_error(st.server.port);
        assert_eq!(code, "57P03", "{name}: {msg}");
        assert!(
            msg.contains("customer-managed key is not accessible"),
            "{name}: {msg}"
        );
        // Sent before authentication: the cause, but no key URL, vault
        // address or identity.
        let public = if *why == "does not exist" {
            "deleted"
        } else {
            why
        };
        assert!(msg.contains(public), "{name}: the cause ({public}): {msg}");
        let vault_host = st.key_url.split("/keys/").next().unwrap();
        for secret in [st.key_url.as_str(), vault_host, st.client_id.as_str()] {
            assert!(
                !msg.contains(secret),
                "{name}: {secret} before authentication: {msg}"
            );
        }
        // Status shows the cause.
        let status = atrest(&["server", "status", "--data", &dir, "--json"]);
        let status: Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(status["state"], "Inaccessible");
        assert_eq!(status["health"]["available"], false);
        assert!(status["health"]["summary"]
            .as_str()
            .unwrap()
            .contains("customer-managed key is inaccessible"));
        let check = &status["health"]["last_failed_key_check"];
        assert_eq!(check["key"], kid, "{status}");
        assert!(
            check["reason"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .contains(why),
            "{status}"
        );
        // Revalidation before the fix fails and keeps it Inaccessible.
        let out = atrest(&["server", "revalidate", "--data", &dir]);
        assert!(
            !out.status.success(),
            "{name}: revalidation succeeded before the fix"
        );
        fix(&st);
        let out = atrest(&["server", "revalidate", "--data", &dir]);
        assert!(
            out.status.success(),
            "{name}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            st.server.log_text()
        );
        assert_eq!(st.server.state()["state"], "Ready");
        // Same data, readable and writable.
        st.server
            .sql("postgres", &format!("INSERT INTO t VALUES ('after {i}')"));
        assert_eq!(
            st.server.sql("postgres", "SELECT count(*) FROM t"),
            (3 + i).to_string()
        );
        assert_eq!(st.server.sql("other", "SELECT x FROM o"), "7");
        eprintln!("{engine:?} {name}: Inaccessible after {took:?}");
    }
    let activity = std::fs::read_to_string(st.server.dir.join("activity.log")).unwrap();
    assert!(
        activity.contains("key_check_failed") && activity.contains(&kid),
        "{activity}"
    );
    assert!(st.server.stop().success());
}

fn rand_below(n: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (t.wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        >> 33)
        % n.max(1)
}

#[test]
fn rotation_rewraps_every_header_and_survives_kill9_during_the_rewrap() {
    let mut st = setup(&[]);
    let dir = st.server.dir.to_str().unwrap().to_string();
    st.server.start(&[]);
    let dbs = 25;
    let mut script = String::new();
    for i in 0..dbs {
        script.push_str(&format!(
            "CREATE DATABASE db{i};\n\\c db{i}\nCREATE TABLE t (x int); INSERT INTO t SELECT value FROM generate_series(1, {});\n",
            i + 1
        ));
    }
    let file = st.server.tmp.path().join("dbs.sql");
    std::fs::write(&file, script).unwrap();
    let out = st.server.psql("postgres", &["-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    st.set_key_ok(&st.key_url);
    let v1 = st.latest_version();
    assert!(st.server.stop().success());

    // Rotate the key in the vault: a new version.
    let v2 = st.new_key_version(3072);
    assert_ne!(v1, v2);
    // Rewrap, killed at random moments, over and over.
    let mut completed = 0;
    for _ in 0..20 {
        let mut child = Command::new(bin())
            .args(["server", "rotate-key", "--data", &dir])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rand_below(800)));
        let _ = child.kill();
        if child.wait().unwrap().success() {
            completed += 1;
        }
    }
    eprintln!("{completed} of 20 rotations completed before the kill");
    // The server finishes whatever rewrap was interrupted, and everything
    // reads back.
    st.server.start(&[]);
    assert_eq!(
        st.server.state()["state"],
        "Ready",
        "{}",
        st.server.log_text()
    );
    for i in 0..dbs {
        assert_eq!(
            st.server.sql(&format!("db{i}"), "SELECT count(*) FROM t"),
            (i + 1).to_string()
        );
    }
    let out = atrest(&["server", "rotate-key", "--data", &dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (path, h) in headers(&st.server.dir) {
        assert!(
            contains(&h, v2.as_bytes()),
            "{} is not wrapped by the new version",
            path.display()
        );
        assert!(
            !contains(&h, v1.as_bytes()),
            "{} still holds the old version's wrapping",
            path.display()
        );
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(st.server.dir.join("server.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["encryption"]["rewrap_from"], json!([]));
    // The old version can go: the server does not notice.
    block_on(st.admin.call(
        Method::PATCH,
        &format!("/keys/tde/{v1}"),
        Some(json!({"attributes": {"enabled": false}})),
    ))
    .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(st.server.state()["state"], "Ready");
    assert_eq!(st.server.sql("db3", "SELECT count(*) FROM t"), "4");
    assert!(st.server.stop().success());
    st.server.start(&[]);
    assert_eq!(st.server.state()["state"], "Ready");
    assert_eq!(st.server.sql("db24", "SELECT count(*) FROM t"), "25");
    assert!(st.server.stop().success());
}

#[test]
fn purging_the_key_shreds_the_data_and_says_why() {
    shredding(Engine::Sqlite);
}

#[test]
fn postgres_engine_purging_the_key_shreds_the_data_and_says_why() {
    shredding(Engine::Postgres);
}

fn engine_args(engine: Engine) -> &'static [&'static str] {
    match engine {
        Engine::Sqlite => &[],
        Engine::Postgres => &["--engine", "postgres"],
    }
}

fn shredding(engine: Engine) {
    let mut st = setup(engine_args(engine));
    let dir = st.server.dir.to_str().unwrap().to_string();
    st.server.start(&[]);
    st.server.sql(
        "postgres",
        "CREATE TABLE secrets (s text); INSERT INTO secrets VALUES ('crown jewels')",
    );
    assert!(st.set_key(&st.key_url).status.success());
    assert!(st.server.stop().success());
    // The key administrator deletes and purges the key (purge protection
    // makes that wait out the retention period; the test clock skips it).
    block_on(st.admin.call(Method::DELETE, "/keys/tde", None)).unwrap();
    st.vault.advance_clock(91 * 86_400);
    // After the retention period the vault purges it by itself, or we do.
    match block_on(
        st.admin
            .call(Method::DELETE, "/deletedkeys/tde?force=true", None),
    ) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.status(), Some(404), "{e}"),
    }
    let gone = block_on(st.admin.call(Method::GET, "/deletedkeys/tde", None)).unwrap_err();
    assert_eq!(gone.status(), Some(404), "the key is purged");
    st.vault.advance_clock(-91 * 86_400);
    // The server starts Inaccessible and says why.
    st.server.start(&[]);
    let state = st.server.state();
    assert_eq!(state["state"], "Inaccessible");
    assert!(
        state["reason"].as_str().unwrap().contains("does not exist"),
        "{state}"
    );
    let (code, msg) = connect_error(st.server.port);
    assert_eq!(code, "57P03");
    assert!(
        msg.contains("customer-managed key is not accessible"),
        "{msg}"
    );
    assert!(st.server.stop().success());
    // No other way in. Offline, the key operation that would move the
    // data back under the service key cannot unwrap it, and says why.
    let out = atrest(&["server", "set-key", "--data", &dir, "--service"]);
    assert!(!out.status.success(), "{engine:?}: set-key offline");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist"), "{engine:?}: {err}");
    // The sqlite engine opened directly with the service keystore cannot
    // unwrap either, and the error names the key that is needed.
    if engine == Engine::Sqlite {
        sql_with_service_keystore_is_refused(&st, &dir);
    }
    for (path, bytes) in files_under(&st.server.dir) {
        assert!(!contains(&bytes, b"crown jewels"), "{}", path.display());
    }
    // While Inaccessible the one operation a running server allows is delete.
    st.server.start(&[]);
    assert_eq!(st.server.state()["state"], "Inaccessible");
    let out = atrest(&["server", "set-key", "--data", &dir, "--service"]);
    assert!(
        !out.status.success(),
        "an Inaccessible server refuses key changes"
    );
    let out = atrest(&["server", "delete", "--data", &dir, "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(st.server.wait(Duration::from_secs(30)).success());
    assert!(!st.server.dir.exists());
}

fn sql_with_service_keystore_is_refused(st: &Setup, dir: &str) {
    let out = atrest(&[
        "sql",
        "--data",
        &format!("{dir}/data"),
        "--database",
        "postgres",
        "--keystore",
        st.server.keystore.to_str().unwrap(),
        "-c",
        "SELECT * FROM secrets",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("customer-managed key") && err.contains("/keys/tde/"),
        "{err}"
    );
}

#[test]
fn webhooks_get_one_alert_per_state_change() {
    let mut st = setup(&[]);
    let dir = st.server.dir.to_str().unwrap().to_string();
    assert!(st.set_key(&st.key_url).status.success());
    let (port, got) = webhook_receiver();
    st.configure(&[
        "--webhook",
        &format!("http://127.0.0.1:{port}/alerts"),
        "--key-check-interval-ms",
        "200",
    ]);
    let history_before = st.server.state()["history"].as_array().unwrap().len();
    st.server.start(&[]);
    set_perms(&st.vault, &st.client_id, &["get"]);
    wait_state(&st.server, "Inaccessible", Duration::from_secs(5));
    set_perms(&st.vault, &st.client_id, &["get", "wrapKey", "unwrapKey"]);
    assert!(atrest(&["server", "revalidate", "--data", &dir])
        .status
        .success());
    assert!(st.server.stop().success());
    let history: Vec<Value> =
        st.server.state()["history"].as_array().unwrap()[history_before..].to_vec();
    let states: Vec<&str> = history
        .iter()
        .map(|h| h["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        [
            "Starting",
            "Ready",
            "Inaccessible",
            "Ready",
            "Stopping",
            "Stopped"
        ]
    );
    let got = got.lock().unwrap().clone();
    let alert_states: Vec<&str> = got.iter().map(|a| a["state"].as_str().unwrap()).collect();
    let mut sorted_alerts = alert_states.clone();
    let mut sorted_states = states.clone();
    sorted_alerts.sort();
    sorted_states.sort();
    assert_eq!(
        sorted_alerts, sorted_states,
        "one alert per state change: {got:?}"
    );
    for a in &got {
        assert_eq!(a["server"], "test-server");
        assert!(a["time"].as_str().unwrap().ends_with('Z'));
        assert!(!a["reason"].as_str().unwrap().is_empty());
    }
    let inacc = got.iter().find(|a| a["state"] == "Inaccessible").unwrap();
    assert!(
        inacc["reason"].as_str().unwrap().contains("permission"),
        "{inacc}"
    );
}

#[test]
fn with_both_layers_revocation_goes_inaccessible_the_same_way() {
    both_layers(Engine::Sqlite);
}

/// Scenario 4 on real PostgreSQL: the infrastructure layer and a customer
/// key together.
#[test]
fn postgres_engine_with_both_layers_revocation_goes_inaccessible_the_same_way() {
    both_layers(Engine::Postgres);
}

fn both_layers(engine: Engine) {
    let infra = tempfile::tempdir().unwrap();
    let infra_ks = infra.path().join("infra-keystore");
    let mut args = engine_args(engine).to_vec();
    args.extend([
        "--infrastructure-encryption",
        "--infra-keystore",
        infra_ks.to_str().unwrap(),
    ]);
    let mut st = setup(&args);
    let dir = st.server.dir.to_str().unwrap().to_string();
    st.configure(&["--key-check-interval-ms", "200"]);
    st.server.start(&[]);
    st.server.sql(
        "postgres",
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('both layers')",
    );
    st.set_key_ok(&st.key_url);
    let status: Value =
        serde_json::from_slice(&atrest(&["server", "status", "--data", &dir, "--json"]).stdout)
            .unwrap();
    assert_eq!(status["encryption"]["scenario"], "customer-managed");
    assert_eq!(status["encryption"]["infrastructure_encryption"], true);
    set_perms(&st.vault, &st.client_id, &["get", "wrapKey"]);
    let state = wait_state(&st.server, "Inaccessible", Duration::from_secs(5));
    assert!(state["reason"].as_str().unwrap().contains("permission"));
    let (code, msg) = connect_error(st.server.port);
    assert_eq!(code, "57P03");
    assert!(msg.contains("customer-managed key is not accessible"));
    set_perms(&st.vault, &st.client_id, &["get", "wrapKey", "unwrapKey"]);
    assert!(atrest(&["server", "revalidate", "--data", &dir])
        .status
        .success());
    assert_eq!(st.server.sql("postgres", "SELECT v FROM t"), "both layers");
    for (path, bytes) in files_under(&st.server.dir) {
        assert!(!contains(&bytes, b"both layers"), "{}", path.display());
    }
    assert!(st.server.stop().success());
}

#[test]
fn an_outage_gets_its_grace_period_and_the_server_comes_back_by_itself() {
    outage(Engine::Sqlite);
}

#[test]
fn postgres_engine_an_outage_gets_its_grace_period_and_the_server_comes_back_by_itself() {
    outage(Engine::Postgres);
}

fn outage(engine: Engine) {
    let mut st = setup(engine_args(engine));
    assert!(st.set_key(&st.key_url).status.success());
    st.configure(&[
        "--key-check-interval-ms",
        "300",
        "--outage-grace-ms",
        "4000",
    ]);
    st.server.start(&[]);
    st.server.sql(
        "postgres",
        "CREATE TABLE t (x int); INSERT INTO t VALUES (1)",
    );
    // The vault stops answering (paused, so it comes back at the same address).
    st.signal_vault("STOP");
    let t0 = Instant::now();
    // Within the grace period it keeps serving.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(st.server.state()["state"], "Ready");
    assert_eq!(st.server.sql("postgres", "SELECT count(*) FROM t"), "1");
    let state = wait_state(&st.server, "Inaccessible", Duration::from_secs(30));
    assert!(
        t0.elapsed() >= Duration::from_millis(4000),
        "Inaccessible before the grace period ended"
    );
    assert!(
        state["reason"].as_str().unwrap().contains("unreachable"),
        "{state}"
    );
    let activity = std::fs::read_to_string(st.server.dir.join("activity.log")).unwrap();
    assert!(activity.contains("\"outage\":true"), "{activity}");
    // The vault answers again: the server revalidates by itself.
    st.signal_vault("CONT");
    wait_state(&st.server, "Ready", Duration::from_secs(30));
    assert_eq!(st.server.sql("postgres", "SELECT count(*) FROM t"), "1");
    assert!(st.server.stop().success());
}

#[test]
fn auto_revalidation_brings_the_server_back_after_a_refusal_is_fixed() {
    auto_revalidation(Engine::Sqlite);
}

#[test]
fn postgres_engine_auto_revalidation_brings_the_server_back_after_a_refusal_is_fixed() {
    auto_revalidation(Engine::Postgres);
}

fn auto_revalidation(engine: Engine) {
    let mut st = setup(engine_args(engine));
    assert!(st.set_key(&st.key_url).status.success());
    st.configure(&[
        "--key-check-interval-ms",
        "200",
        "--auto-revalidate",
        "true",
    ]);
    st.server.start(&[]);
    set_perms(&st.vault, &st.client_id, &["get"]);
    wait_state(&st.server, "Inaccessible", Duration::from_secs(5));
    set_perms(&st.vault, &st.client_id, &["get", "wrapKey", "unwrapKey"]);
    let state = wait_state(&st.server, "Ready", Duration::from_secs(10));
    assert!(
        state["reason"].as_str().unwrap().contains("automatically"),
        "{state}"
    );
    // Serving again (the postgres engine mounted and started PostgreSQL
    // before it said Ready).
    assert_eq!(st.server.sql("postgres", "SELECT 1"), "1");
    assert!(st.server.stop().success());
}

#[test]
fn switching_back_to_the_service_key_leaves_no_customer_wrapping() {
    let mut st = setup(&[]);
    let dir = st.server.dir.to_str().unwrap().to_string();
    st.server.start(&[]);
    st.server.sql(
        "postgres",
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('round trip')",
    );
    assert!(st.set_key(&st.key_url).status.success());
    let version = st.latest_version();
    let out = atrest(&["server", "set-key", "--data", &dir, "--service"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(st.server.dir.join("server.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["encryption"]["scenario"], "service-managed");
    assert_eq!(cfg["encryption"]["customer_key"], Value::Null);
    let service_hex = cfg["encryption"]["service_key"]
        .as_str()
        .unwrap()
        .strip_prefix("service:")
        .unwrap()
        .to_string();
    for (path, h) in headers(&st.server.dir) {
        assert!(
            !contains(&h, version.as_bytes()),
            "{} still names the customer key",
            path.display()
        );
        assert!(contains(&h, service_hex.as_bytes()), "{}", path.display());
    }
    // The vault no longer counts the server as a dependent: disabling works.
    block_on(st.admin.call(
        Method::PATCH,
        &format!("/keys/tde/{version}"),
        Some(json!({"attributes": {"enabled": false}})),
    ))
    .unwrap();
    assert_eq!(st.server.sql("postgres", "SELECT v FROM t"), "round trip");
    assert!(st.server.stop().success());
    st.server.start(&[]);
    assert_eq!(st.server.state()["state"], "Ready");
    assert_eq!(st.server.sql("postgres", "SELECT v FROM t"), "round trip");
    assert!(st.server.stop().success());
}

/// Runs `atrest ARGS`, which must succeed; returns stdout.
#[test]
fn backups_follow_a_key_rotation_and_a_restore_waits_for_its_new_identity() {
    let mut st = setup(&[]);
    let dir = st.server.dir.to_str().unwrap().to_string();
    st.server.start(&[]);
    st.set_key_ok(&st.key_url);
    let v1 = st.latest_version();
    st.server.sql(
        "postgres",
        "CREATE TABLE t (n int, note text); INSERT INTO t SELECT value, 'CMKMARKER' FROM generate_series(1, 300);",
    );
    let first: Value =
        serde_json::from_str(&atrest_ok(&["server", "backup", "--data", &dir])).unwrap();
    let backup = st
        .server
        .dir
        .join("backups/backups")
        .join(first["id"].as_str().unwrap());
    assert!(first["data_key"].as_str().unwrap().contains(&v1), "{first}");

    // Rotate to a new version; the backup and the archive move with the
    // server, so the old version can then be disabled.
    let v2 = st.new_key_version(2048);
    atrest_ok(&["server", "rotate-key", "--data", &dir]);
    st.server
        .sql("postgres", "INSERT INTO t VALUES (301, 'after rotation')");
    block_on(st.admin.call(
        Method::PATCH,
        &format!("/keys/tde/{v1}"),
        Some(json!({"attributes": {"enabled": false}})),
    ))
    .expect("disabling the old version (nothing depends on it any more)");
    for (p, bytes) in files_under(&st.server.dir.join("backups")) {
        assert!(
            !contains(&bytes, b"CMKMARKER"),
            "plaintext in {}",
            p.display()
        );
        if bytes.len() >= 8192 && !p.to_string_lossy().ends_with(".json") {
            let hdr = &bytes[..8192];
            assert!(
                !contains(hdr, v1.as_bytes()),
                "{} still names {v1}",
                p.display()
            );
        }
    }
    // verify works with the new version only.
    atrest_ok(&["server", "backup", "verify", "--data", &dir]);

    // Restore the first backup: a new identity, the same key, Inaccessible.
    let rdir = st.server.tmp.path().join("restored");
    let out = atrest_ok(&[
        "server",
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--name",
        "restored",
        "--data",
        rdir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(
        out.contains("Inaccessible") && out.contains("revalidate"),
        "{out}"
    );
    let rcfg: Value =
        serde_json::from_str(&std::fs::read_to_string(rdir.join("server.json")).unwrap()).unwrap();
    let new_id = rcfg["identity"]["client_id"].as_str().unwrap().to_string();
    assert_ne!(new_id, st.client_id);
    let key = rcfg["encryption"]["customer_key"]["key"].to_string();
    assert!(key.contains("tde"), "{key}");
    let mut r = TestServer::existing(rdir.clone(), st.server.keystore.clone());
    r.start(&[]);
    assert_eq!(r.state()["state"], "Inaccessible", "{}", r.log_text());
    let (code, message) = connect_error(r.port);
    assert_eq!(code, "57P03");
    assert!(message.contains("Inaccessible"), "{message}");
    // Revalidation before the grant fails and says so.
    let out = atrest(&["server", "revalidate", "--data", rdir.to_str().unwrap()]);
    assert!(!out.status.success());
    // Grant the new identity, revalidate: Ready, with the backup's data.
    let cert = std::fs::read_to_string(rdir.join("identity/identity.crt")).unwrap();
    register_server_identity(&st.vault, &new_id, &cert, &["get", "wrapKey", "unwrapKey"]);
    atrest_ok(&["server", "revalidate", "--data", rdir.to_str().unwrap()]);
    assert_eq!(r.state()["state"], "Ready");
    // The restore replays the archive: the row written after the rotation
    // is there too, and everything is under v2 now.
    assert_eq!(r.sql("postgres", "SELECT count(*) FROM t"), "301");
    assert_eq!(r.sql("postgres", "PRAGMA integrity_check"), "ok");
    for (p, bytes) in files_under(&rdir.join("data")) {
        if bytes.len() >= 8192 && !p.to_string_lossy().ends_with(".json") {
            assert!(!contains(&bytes[..8192], v1.as_bytes()), "{}", p.display());
            assert!(contains(&bytes[..8192], v2.as_bytes()), "{}", p.display());
        }
    }
    r.stop();
    st.server.stop();
}

#[test]
fn a_replica_has_its_own_identity_follows_key_rotation_and_loses_the_key_with_its_source() {
    let mut st = setup(&[]);
    let dir = st.server.dir.to_str().unwrap().to_string();
    st.configure(&["--key-check-interval-ms", "300"]);
    st.server.start(&[]);
    st.set_key_ok(&st.key_url);
    let v1 = st.latest_version();
    st.server.sql(
        "postgres",
        "CREATE TABLE t (n int, note text); INSERT INTO t SELECT value, 'CMKMARKER' FROM generate_series(1, 200);",
    );

    // The replica: a new identity, the same key, Inaccessible until that
    // identity is granted the key and revalidated.
    let rdir = st.server.tmp.path().join("replica");
    let out = atrest_ok(&[
        "server",
        "replica",
        "create",
        "--source",
        &dir,
        "--name",
        "replica-1",
        "--data",
        rdir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert!(
        out.contains("Inaccessible") && out.contains("revalidate"),
        "{out}"
    );
    let rd = rdir.to_str().unwrap().to_string();
    let rcfg: Value =
        serde_json::from_str(&std::fs::read_to_string(rdir.join("server.json")).unwrap()).unwrap();
    let replica_id = rcfg["identity"]["client_id"].as_str().unwrap().to_string();
    assert_ne!(replica_id, st.client_id);
    let key = rcfg["encryption"]["customer_key"]["key"].to_string();
    assert!(key.contains("tde") && key.contains(&v1), "{key}");
    atrest_ok(&[
        "server",
        "configure",
        "--data",
        &rd,
        "--key-check-interval-ms",
        "300",
    ]);
    let mut r = TestServer::existing(rdir.clone(), st.server.keystore.clone());
    r.start(&[]);
    assert_eq!(r.state()["state"], "Inaccessible", "{}", r.log_text());
    let (code, message) = connect_error(r.port);
    assert_eq!(code, "57P03");
    assert!(message.contains("Inaccessible"), "{message}");
    let out = atrest(&["server", "revalidate", "--data", &rd]);
    assert!(!out.status.success(), "revalidated before the grant");
    let cert = std::fs::read_to_string(rdir.join("identity/identity.crt")).unwrap();
    register_server_identity(
        &st.vault,
        &replica_id,
        &cert,
        &["get", "wrapKey", "unwrapKey"],
    );
    atrest_ok(&["server", "revalidate", "--data", &rd]);
    st.server
        .sql("postgres", "INSERT INTO t VALUES (201, 'after the grant')");
    r.wait_sql("SELECT count(*) FROM t", "201", Duration::from_secs(20));

    // The source rotates its key: the replica follows (its own files move
    // to v2), so v1 can be disabled and both go on.
    let v2 = st.new_key_version(2048);
    atrest_ok(&["server", "rotate-key", "--data", &dir]);
    st.server
        .sql("postgres", "INSERT INTO t VALUES (202, 'after rotation')");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s: Value =
            serde_json::from_str(&atrest_ok(&["server", "status", "--data", &rd, "--json"]))
                .unwrap();
        let key = s["encryption"]["customer_key"]["key"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if key.ends_with(&v2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not follow the rotation: {s}\n{}",
            r.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (p, hdr) in headers(&rdir) {
        assert!(
            !contains(&hdr, v1.as_bytes()),
            "{} still names {v1}",
            p.display()
        );
        assert!(
            contains(&hdr, v2.as_bytes()),
            "{} does not name {v2}",
            p.display()
        );
    }
    block_on(st.admin.call(
        Method::PATCH,
        &format!("/keys/tde/{v1}"),
        Some(json!({"attributes": {"enabled": false}})),
    ))
    .unwrap();
    st.server
        .sql("postgres", "INSERT INTO t VALUES (203, 'v1 disabled')");
    r.wait_sql("SELECT count(*) FROM t", "203", Duration::from_secs(20));
    for (p, bytes) in files_under(&rdir) {
        assert!(
            !contains(&bytes, b"CMKMARKER"),
            "plaintext in {}",
            p.display()
        );
    }

    // Revocation: disabling the key takes both down. The vault knows both
    // depend on it and names them when asked without force.
    let refused = block_on(st.admin.call(
        Method::PATCH,
        &format!("/keys/tde/{v2}"),
        Some(json!({"attributes": {"enabled": false}})),
    ))
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("replica-1") && refused.contains("test-server"),
        "{refused}"
    );
    block_on(st.admin.call(
        Method::PATCH,
        &format!("/keys/tde/{v2}?force=true"),
        Some(json!({"attributes": {"enabled": false}})),
    ))
    .unwrap();
    wait_state(&st.server, "Inaccessible", Duration::from_secs(10));
    let state = wait_state(&r, "Inaccessible", Duration::from_secs(10));
    assert!(state.to_string().contains("disabled"), "{state}");
    let (code, _) = connect_error(r.port);
    assert_eq!(code, "57P03");
    // Revalidation while the key is still disabled fails on both.
    assert!(!atrest(&["server", "revalidate", "--data", &rd])
        .status
        .success());
    // Enabled again and revalidated, both come back, and the replica
    // catches up with what the source takes next.
    block_on(st.admin.call(
        Method::PATCH,
        &format!("/keys/tde/{v2}"),
        Some(json!({"attributes": {"enabled": true}})),
    ))
    .unwrap();
    atrest_ok(&["server", "revalidate", "--data", &dir]);
    atrest_ok(&["server", "revalidate", "--data", &rd]);
    assert_eq!(r.state()["state"], "Ready");
    st.server.sql(
        "postgres",
        "INSERT INTO t VALUES (204, 'after revalidation')",
    );
    r.wait_sql(
        "SELECT count(*) || ' ' || max(n) FROM t",
        "204 204",
        Duration::from_secs(20),
    );
    assert_eq!(r.sql("postgres", "PRAGMA integrity_check"), "ok");
    r.stop();
    st.server.stop();
}
