//! psql (the real client) against the real server: a scripted session,
//! no plaintext at rest afterwards, TLS and SCRAM, the server lifecycle.

mod server_common;

use std::process::Command;

use server_common::*;

const MARKER: &str = "ATREST-PLAINTEXT-MARKER-4b1d";

/// A psql script that puts the marker everywhere SQLite keeps data:
/// tables, indexes, a second database, a temp table, a sort, a large
/// value spanning overflow pages, an uncommitted transaction's WAL frames.
fn script() -> String {
    format!(
        r#"
CREATE TABLE notes (id serial PRIMARY KEY, body text, blobby bytea);
CREATE INDEX notes_body ON notes (body);
INSERT INTO notes (body, blobby)
  SELECT '{MARKER}-' || value, CAST('{MARKER}' AS BLOB) FROM generate_series(1, 2000);
INSERT INTO notes (body) VALUES (printf('%.*c', 100000, 'x') || '{MARKER}');
CREATE TEMP TABLE scratch AS SELECT body FROM notes;
SELECT count(*) FROM (SELECT body FROM notes ORDER BY body DESC);
BEGIN;
UPDATE notes SET body = body || '{MARKER}' WHERE id % 7 = 0;
COMMIT;
CREATE DATABASE second;
\c second
CREATE TABLE t2 AS SELECT '{MARKER}' AS m;
SELECT m FROM t2;
"#
    )
}

fn assert_no_marker(dir: &std::path::Path) {
    let files = files_under(dir);
    assert!(files
        .iter()
        .any(|(p, _)| p.extension().is_some_and(|e| e == "db")));
    for (path, bytes) in &files {
        for needle in [MARKER.as_bytes(), PASSWORD.as_bytes()] {
            assert!(
                !contains(bytes, needle),
                "{} holds plaintext {:?}",
                path.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }
}

#[test]
fn psql_session_leaves_no_plaintext_at_rest() {
    let mut s = TestServer::create(&[]);
    s.start(&[]);
    let file = s.tmp.path().join("script.sql");
    std::fs::write(&file, script()).unwrap();
    let out = s.psql("postgres", &["-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.log_text()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2001"), "{stdout}");
    assert!(stdout.contains(MARKER), "the data reads back: {stdout}");
    // While running (WAL not checkpointed) and after a clean stop.
    assert_no_marker(&s.dir);
    assert!(s.stop().success());
    assert_no_marker(&s.dir);
    // And the data is all there after a restart.
    s.start(&[]);
    assert_eq!(
        s.sql(
            "postgres",
            &format!("SELECT count(*) FROM notes WHERE body LIKE '{MARKER}%'")
        ),
        "2000"
    );
    assert_eq!(s.sql("second", "SELECT m FROM t2"), MARKER);
    assert!(s.stop().success());
}

#[test]
fn tls_with_channel_binding_and_plaintext_policy() {
    let mut s = TestServer::create(&[]);
    s.start(&[]);
    let psql = |conninfo: String| {
        Command::new(tool("psql"))
            .arg(conninfo)
            .args(["-X", "-A", "-t", "-c", "SELECT 42"])
            .env("PGPASSWORD", PASSWORD)
            .output()
            .unwrap()
    };
    // Verified TLS with SCRAM-SHA-256-PLUS required: the server proves it
    // holds the certificate the client checked.
    let out = psql(format!(
        "{} channel_binding=require",
        s.conninfo("postgres", "verify-full")
            .replace("host=127.0.0.1", "host=localhost")
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
    // Loopback may use plaintext under the default policy.
    let out = psql(s.conninfo("postgres", "disable"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Channel binding cannot be had without TLS.
    let out = psql(format!(
        "{} channel_binding=require",
        s.conninfo("postgres", "disable")
    ));
    assert!(!out.status.success());
    // Wrong password and unknown user: the same refusal.
    for user in ["atrest", "nobody"] {
        let out = Command::new(tool("psql"))
            .arg(
                s.conninfo("postgres", "require")
                    .replace("user=atrest", &format!("user={user}")),
            )
            .args(["-X", "-c", "SELECT 1"])
            .env("PGPASSWORD", "wrong password")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "password authentication failed for user \"{user}\""
            )),
            "{err}"
        );
    }
    // Unknown database.
    let out = s.psql("nosuchdb", &["-c", "SELECT 1"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("database \"nosuchdb\" does not exist"));
    // The server kept serving through all of that.
    assert_eq!(s.sql("postgres", "SELECT 1"), "1");
    assert_eq!(s.metric("atrest_auth_failures_total"), 2.0);
    assert!(s.stop().success());

    // A server that requires TLS refuses plaintext even on loopback.
    let mut strict = TestServer::create(&["--allow-plaintext", "never"]);
    strict.start(&[]);
    let out = psql(strict.conninfo("postgres", "disable"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("requires TLS"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(strict.sql("postgres", "SELECT 7"), "7");
}

#[test]
fn lifecycle_status_metrics_and_delete() {
    let mut s = TestServer::create(&[]);
    let dir = s.dir.to_str().unwrap().to_string();
    let status = |json: bool| {
        let mut args = vec!["server", "status", "--data", dir.as_str()];
        if json {
            args.push("--json");
        }
        let out = atrest(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let st: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(st["state"], "Stopped");
    assert_eq!(st["encryption"]["scenario"], "service-managed");
    assert!(st["encryption"]["service_key"]
        .as_str()
        .unwrap()
        .starts_with("service:"));
    assert!(st["identity"]["client_id"].as_str().unwrap().len() == 36);

    s.start(&[]);
    let st: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(st["state"], "Ready");
    assert_eq!(st["listen"], format!("127.0.0.1:{}", s.port));
    assert!(status(false).contains("state:       Ready"));
    // A second server process on the same directory is refused.
    let out = atrest(&["server", "start", "--data", &dir, "--listen", "127.0.0.1:0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is running"));
    // Delete refuses while running, and without --yes.
    assert!(!atrest(&["server", "delete", "--data", &dir, "--yes"])
        .status
        .success());
    // Metrics count what happened.
    s.sql("postgres", "CREATE TABLE m (x text)");
    s.sql(
        "postgres",
        "INSERT INTO m SELECT printf('%.*c', 1000, 'y') FROM generate_series(1, 100)",
    );
    assert!(s.metric("atrest_queries_total") >= 2.0);
    assert!(s.metric("atrest_connections_total") >= 2.0);
    assert!(s.metric("atrest_bytes_encrypted_total") >= 100_000.0);
    assert!(s.http_get("/status").contains("\"state\":\"Ready\""));

    // SIGTERM: clean exit and a recorded reason.
    assert!(s.stop().success());
    let st: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(st["state"], "Stopped");
    assert_eq!(st["reason"], "shutdown (SIGTERM)");
    let states: Vec<String> = st["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        &states[states.len() - 4..],
        ["Starting", "Ready", "Stopping", "Stopped"]
    );
    let activity = std::fs::read_to_string(s.dir.join("activity.log")).unwrap();
    assert!(activity.lines().count() >= 5);

    // kill -9: status says so instead of claiming Ready.
    s.start(&[]);
    s.kill9();
    let st: serde_json::Value = serde_json::from_str(&status(true)).unwrap();
    assert_eq!(st["state"], "Stopped");
    assert!(st["note"]
        .as_str()
        .unwrap()
        .contains("without a clean shutdown"));
    // ...and it starts again with the data intact.
    s.start(&[]);
    assert_eq!(s.sql("postgres", "SELECT count(*) FROM m"), "100");
    assert!(s.stop().success());

    assert!(!atrest(&["server", "delete", "--data", &dir])
        .status
        .success());
    let keys_before = std::fs::read_dir(&s.keystore).unwrap().count();
    assert_eq!(keys_before, 1);
    let out = atrest(&["server", "delete", "--data", &dir, "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!s.dir.exists());
    assert_eq!(
        std::fs::read_dir(&s.keystore).unwrap().count(),
        0,
        "the service key is destroyed with the server"
    );
}

#[test]
fn create_refuses_bad_input_and_changes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("srv");
    let ks = t.path().join("ks");
    let base = |name: &str| {
        atrest(&[
            "server",
            "create",
            "--name",
            name,
            "--data",
            dir.to_str().unwrap(),
            "--keystore",
            ks.to_str().unwrap(),
        ])
    };
    let out = base("Bad_Name");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid server name"));
    assert!(!dir.exists());
    let out = atrest(&[
        "server",
        "create",
        "--name",
        "ok-name",
        "--data",
        dir.to_str().unwrap(),
        "--keystore",
        dir.join("ks").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("keystore must not be inside"));
    assert!(!dir.exists());
    // A generated password is stored where the output says, mode 0600.
    let out = base("ok-name");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let pw_file = dir.join("initial-admin-password");
    assert!(stdout.contains(pw_file.to_str().unwrap()), "{stdout}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&pw_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// A supervisor may send SIGTERM the moment state.json says Ready. The
/// server must already be catching it and close cleanly, not die by the
/// signal with its databases open.
#[test]
fn sigterm_the_moment_it_is_ready_stops_cleanly() {
    let s = TestServer::create(&[]);
    let dir = s.dir.to_str().unwrap().to_string();
    for round in 0..20 {
        let log = std::fs::File::create(s.tmp.path().join("race.log")).unwrap();
        let mut child = Command::new(bin())
            .args(["server", "start", "--data", &dir, "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        // No sleep between reads: the point is to signal as early as a
        // supervisor could.
        loop {
            let text = std::fs::read_to_string(s.dir.join("state.json")).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if v["state"] == "Ready" && v["pid"] == child.id() {
                break;
            }
            assert!(child.try_wait().unwrap().is_none(), "exited during start");
            assert!(std::time::Instant::now() < deadline, "not Ready in 30 s");
        }
        signal_pid(child.id(), 15).unwrap();
        let st = child.wait().unwrap();
        let log = std::fs::read_to_string(s.tmp.path().join("race.log")).unwrap();
        assert!(st.success(), "round {round}: {st}\n{log}");
        assert!(log.contains("stopped"), "round {round}: {log}");
    }
    let st: serde_json::Value =
        serde_json::from_slice(&atrest(&["server", "status", "--data", &dir, "--json"]).stdout)
            .unwrap();
    assert_eq!(st["state"], "Stopped");
    assert_eq!(st["reason"], "shutdown (SIGTERM)");
}

#[test]
fn infrastructure_encryption_is_chosen_at_create_and_covers_everything() {
    let t = tempfile::tempdir().unwrap();
    let infra_ks = t.path().join("infra-keystore");
    let mut s = TestServer::create(&[
        "--infrastructure-encryption",
        "--infra-keystore",
        infra_ks.to_str().unwrap(),
    ]);
    let dir = s.dir.to_str().unwrap().to_string();
    let st: serde_json::Value =
        serde_json::from_slice(&atrest(&["server", "status", "--data", &dir, "--json"]).stdout)
            .unwrap();
    assert_eq!(st["encryption"]["infrastructure_encryption"], true);
    assert!(
        st["encryption"]["layers"].to_string().contains("AEGIS-256"),
        "{st}"
    );
    assert!(
        std::fs::read_dir(&infra_ks).unwrap().count() >= 1,
        "the infra key lives in its own keystore"
    );
    s.start(&[]);
    let file = s.tmp.path().join("script.sql");
    std::fs::write(&file, script()).unwrap();
    let out = s.psql("postgres", &["-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_marker(&s.dir);
    // Every database file says both layers protect it.
    let out = atrest(&["inspect", &format!("{dir}/data/postgres.db")]);
    let inspected = String::from_utf8_lossy(&out.stdout);
    assert!(inspected.contains("infrastructure"), "{inspected}");
    assert!(s.stop().success());
    // It cannot be turned off later (nor on for a server without it).
    let out = atrest(&[
        "server",
        "configure",
        "--data",
        &dir,
        "--infrastructure-encryption",
        "false",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fixed at create"));
    let mut plain = TestServer::create(&[]);
    let pdir = plain.dir.to_str().unwrap().to_string();
    let out = atrest(&[
        "server",
        "configure",
        "--data",
        &pdir,
        "--infrastructure-encryption",
        "true",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("fixed at create"));
    // The data is all there after a restart.
    s.start(&[]);
    assert_eq!(s.sql("second", "SELECT m FROM t2"), MARKER);
    assert!(s.stop().success());
    plain.start(&[]);
    assert!(plain.stop().success());
    // Delete destroys the infrastructure master key with the server.
    let out = atrest(&["server", "delete", "--data", &dir, "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_dir(&infra_ks).unwrap().count(),
        0,
        "the infra key is destroyed too"
    );
}

#[test]
fn roles_are_managed_while_the_server_runs() {
    let mut s = TestServer::create(&[]);
    s.start(&[]);
    let dir = s.dir.to_str().unwrap().to_string();
    let pw = s.tmp.path().join("alice.pw");
    std::fs::write(&pw, "alice's secret\n").unwrap();
    let out = atrest(&[
        "server",
        "role",
        "set",
        "--data",
        &dir,
        "--user",
        "alice",
        "--password-file",
        pw.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let login = |user: &str, password: &str| {
        Command::new(tool("psql"))
            .arg(
                s.conninfo("postgres", "require")
                    .replace("user=atrest", &format!("user={user}")),
            )
            .args(["-X", "-A", "-t", "-c", "SELECT current_user"])
            .env("PGPASSWORD", password)
            .output()
            .unwrap()
    };
    let out = login("alice", "alice's secret");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alice");
    assert!(!login("alice", "wrong").status.success());
    let roles =
        String::from_utf8(atrest(&["server", "role", "list", "--data", &dir]).stdout).unwrap();
    assert!(
        roles.contains("alice") && roles.contains("atrest (superuser)"),
        "{roles}"
    );
    assert!(!std::fs::read_to_string(s.dir.join("roles.json"))
        .unwrap()
        .contains("alice's secret"));
    assert!(
        atrest(&["server", "role", "delete", "--data", &dir, "--user", "alice"])
            .status
            .success()
    );
    let out = login("alice", "alice's secret");
    assert!(String::from_utf8_lossy(&out.stderr).contains("password authentication failed"));
    let out = atrest(&[
        "server", "role", "delete", "--data", &dir, "--user", "atrest",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("last superuser"));
    assert_eq!(s.sql("postgres", "SELECT current_user"), "atrest");
    assert!(s.stop().success());
}
