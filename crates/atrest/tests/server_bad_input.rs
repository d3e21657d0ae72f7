//! Bad input: garbage on the socket, truncated and oversized packets, a
//! megabyte of SQL, errors inside transactions. Each gets a clear error or
//! a closed connection; the server keeps serving and loses nothing.

mod server_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use server_common::*;

/// Sends `bytes`, then reads until the server closes (or 5 s pass).
fn send_raw(port: u16, bytes: &[u8], close_write: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    if close_write {
        s.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut out = vec![];
    let _ = s.read_to_end(&mut out);
    out
}

fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = vec![];
    body.extend_from_slice(&196608u32.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

fn error_fields(reply: &[u8]) -> String {
    // 'E' len fields...: return the message text for assertions.
    assert_eq!(
        reply.first(),
        Some(&b'E'),
        "expected an ErrorResponse, got {reply:?}"
    );
    String::from_utf8_lossy(&reply[5..]).replace('\0', "|")
}

fn assert_still_serving(s: &TestServer) {
    assert_eq!(s.sql("postgres", "SELECT count(*) FROM kept"), "3");
    assert!(!s.log_text().contains("panicked"), "{}", s.log_text());
}

fn server() -> TestServer {
    let mut s = TestServer::create(&[]);
    s.start(&["--max-message-bytes", "2000000"]);
    s.sql(
        "postgres",
        "CREATE TABLE kept (x int); INSERT INTO kept VALUES (1), (2), (3)",
    );
    s
}

#[test]
fn garbage_and_malformed_packets_are_refused_cleanly() {
    let mut s = server();
    // An HTTP request on the PostgreSQL port.
    let reply = send_raw(s.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", true);
    assert!(reply.is_empty() || reply[0] == b'E', "{reply:?}");
    // Random bytes.
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let reply = send_raw(s.port, &noise, true);
    assert!(reply.is_empty() || reply[0] == b'E');
    // A truncated startup packet (claims 100 bytes, sends 10, hangs up).
    let mut p = 100u32.to_be_bytes().to_vec();
    p.extend_from_slice(&196608u32.to_be_bytes());
    p.extend_from_slice(b"us");
    let reply = send_raw(s.port, &p, true);
    assert!(
        reply.is_empty() || error_fields(&reply).contains("08P01"),
        "{reply:?}"
    );
    // A startup packet claiming 2 GB.
    let reply = send_raw(s.port, &0x7fff_fff0u32.to_be_bytes(), false);
    let text = error_fields(&reply);
    assert!(text.contains("54000") || text.contains("08P01"), "{text}");
    // Lengths below 4 are invalid, not "too large", and 2^31 is named as
    // itself (not 0).
    for len in [0u32, 3] {
        let text = error_fields(&send_raw(s.port, &len.to_be_bytes(), false));
        assert!(
            text.contains("08P01") && text.contains(&format!("invalid message length {len}")),
            "{len}: {text}"
        );
    }
    let text = error_fields(&send_raw(s.port, &0x8000_0000u32.to_be_bytes(), false));
    assert!(
        text.contains("54000") && text.contains("message of 2147483648 bytes exceeds"),
        "{text}"
    );
    // Protocol 2.0 and an unknown user.
    let mut p = startup_packet(&[("user", "atrest")]);
    p[4..8].copy_from_slice(&131072u32.to_be_bytes());
    let reply = send_raw(s.port, &p, false);
    assert!(reply.is_empty() || reply[0] == b'E');
    // No user at all.
    let reply = send_raw(s.port, &startup_packet(&[("database", "postgres")]), false);
    assert!(error_fields(&reply).contains("no PostgreSQL user name"));
    // A replication connection.
    let reply = send_raw(
        s.port,
        &startup_packet(&[("user", "atrest"), ("replication", "true")]),
        false,
    );
    assert!(error_fields(&reply).contains("replication"));
    // A SASL response that is not SCRAM.
    let mut p = startup_packet(&[("user", "atrest"), ("database", "postgres")]);
    let mut resp = vec![b'p'];
    let body = b"SCRAM-SHA-256\0\xff\xff\xff\xffgarbage";
    resp.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    resp.extend_from_slice(body);
    p.extend(resp);
    let reply = send_raw(s.port, &p, false);
    assert!(!reply.is_empty());
    // A cancel request with a wrong secret for a session that does not exist.
    let mut c = 16u32.to_be_bytes().to_vec();
    c.extend_from_slice(&80877102u32.to_be_bytes());
    c.extend_from_slice(&1000i32.to_be_bytes());
    c.extend_from_slice(&12345i32.to_be_bytes());
    assert!(send_raw(s.port, &c, false).is_empty());
    assert_still_serving(&s);
    assert!(s.stop().success());
}

#[test]
fn a_megabyte_of_sql_works_and_too_much_is_refused() {
    let mut s = server();
    let big = "x".repeat(1 << 20);
    let file = s.tmp.path().join("big.sql");
    std::fs::write(
        &file,
        format!("CREATE TABLE big (v text); INSERT INTO big VALUES ('{big}'); SELECT length(v) FROM big;"),
    )
    .unwrap();
    let out = s.psql("postgres", &["-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");
    // Over the configured limit (2 MB here): the connection is closed
    // with a clear error, and nothing else is affected.
    let huge = "y".repeat(3 << 20);
    std::fs::write(&file, format!("SELECT length('{huge}');")).unwrap();
    let out = s.psql("postgres", &["-f", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exceeds the server's limit"), "{err}");
    assert_eq!(s.sql("postgres", "SELECT length(v) FROM big"), "1048576");
    assert_still_serving(&s);
    assert!(s.stop().success());
}

#[test]
fn syntax_error_inside_a_transaction_rolls_it_back() {
    let mut s = server();
    let file = s.tmp.path().join("tx.sql");
    std::fs::write(
        &file,
        "BEGIN;\nINSERT INTO kept VALUES (100);\nSELEC oops;\nINSERT INTO kept VALUES (101);\nCOMMIT;\nSELECT count(*) FROM kept;\n",
    )
    .unwrap();
    let out = Command::new(tool("psql"))
        .arg(s.conninfo("postgres", "require"))
        .args(["-X", "-A", "-t", "-f", file.to_str().unwrap()])
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stderr.contains("syntax error"), "{stderr}");
    assert!(
        stderr.contains(
            "current transaction is aborted, commands ignored until end of transaction block"
        ),
        "{stderr}"
    );
    assert!(
        stdout.contains("ROLLBACK") || stdout.trim().ends_with('3'),
        "{stdout}"
    );
    assert_eq!(
        s.sql("postgres", "SELECT count(*) FROM kept WHERE x >= 100"),
        "0"
    );
    // Multi-statement simple queries are one implicit transaction.
    let out = s.psql(
        "postgres",
        &[
            "-c",
            "INSERT INTO kept VALUES (200); INSERT INTO nope VALUES (1)",
        ],
    );
    assert!(!out.status.success());
    assert_eq!(
        s.sql("postgres", "SELECT count(*) FROM kept WHERE x = 200"),
        "0"
    );
    assert_still_serving(&s);
    assert!(s.stop().success());
}

#[test]
fn a_killed_server_keeps_every_committed_transaction() {
    let mut s = server();
    for i in 0..20 {
        s.sql(
            "postgres",
            &format!("INSERT INTO kept VALUES ({})", 1000 + i),
        );
    }
    s.kill9();
    s.start(&[]);
    assert_eq!(
        s.sql("postgres", "SELECT count(*) FROM kept WHERE x >= 1000"),
        "20"
    );
    assert_eq!(s.sql("postgres", "PRAGMA integrity_check"), "ok");
    assert!(s.stop().success());
}

#[test]
fn a_damaged_page_is_named_to_the_client_by_its_database_file_not_the_server_path() {
    let mut s = TestServer::create(&[]);
    s.start(&[]);
    s.sql(
        "postgres",
        "CREATE TABLE t (v text); INSERT INTO t SELECT printf('%0200d', value) FROM generate_series(1, 30000)",
    );
    // Damaged while the server runs, in the database file and in its WAL
    // (which may hold the newest version of any page): a new session
    // reads from both.
    for f in ["data/postgres.db", "data/postgres.db-wal"] {
        let path = s.dir.join(f);
        let mut bytes = std::fs::read(&path).unwrap();
        let len = bytes.len();
        assert!(len > 200_000, "{f}: {len}");
        // A bit in every 4 KiB past the headers.
        for at in (16_384 + 100..len - 8192).step_by(4096) {
            bytes[at] ^= 0x01;
        }
        std::fs::write(&path, &bytes).unwrap();
    }
    let out = s.psql(
        "postgres",
        &["-c", "SELECT count(*), sum(length(v)) FROM t"],
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "a damaged page must not read: {err}");
    assert!(
        err.contains("postgres.db") && err.contains("failed authentication"),
        "{err}"
    );
    let dir = s.dir.canonicalize().unwrap();
    assert!(
        !err.contains(dir.to_str().unwrap()) && !err.contains("/data/"),
        "the server's path went to the client: {err}"
    );
    // The server log keeps the whole path for the operator.
    assert!(
        s.log_text().contains(dir.to_str().unwrap()),
        "{}",
        s.log_text()
    );
    s.kill9();
}

#[test]
fn a_database_file_swapped_in_from_another_database_is_refused_not_served() {
    let mut s = TestServer::create(&[]);
    s.start(&[]);
    s.sql("postgres", "CREATE DATABASE tamp");
    s.sql("postgres", "CREATE DATABASE other");
    s.sql(
        "tamp",
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('tamp row')",
    );
    s.sql(
        "other",
        "CREATE TABLE t (v text); INSERT INTO t VALUES ('other row')",
    );
    assert!(s.stop().success());
    let data = s.dir.join("data");
    let saved: Vec<(String, Vec<u8>)> = ["tamp.db", "tamp.db-wal"]
        .iter()
        .filter_map(|f| Some((f.to_string(), std::fs::read(data.join(f)).ok()?)))
        .collect();
    // other's files copied over tamp's (both valid, same service key).
    for f in ["db", "db-wal"] {
        let from = data.join(format!("other.{f}"));
        if from.exists() {
            std::fs::copy(&from, data.join(format!("tamp.{f}"))).unwrap();
        } else {
            let _ = std::fs::remove_file(data.join(format!("tamp.{f}")));
        }
    }
    // A start that serves would run on: give it 30 s to refuse.
    let mut child = Command::new(bin())
        .args(["server", "start", "--data", s.dir.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the server started on a swapped database file (it serves other's rows as tamp)"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "a swapped database must not be served");
    assert!(
        err.contains("tamp.db") && err.contains("other.db") && err.contains("swapped"),
        "{err}"
    );
    // Put tamp's own files back: it serves its own rows again.
    for f in ["tamp.db", "tamp.db-wal"] {
        let _ = std::fs::remove_file(data.join(f));
    }
    for (f, b) in &saved {
        std::fs::write(data.join(f), b).unwrap();
    }
    s.start(&[]);
    assert_eq!(s.sql("tamp", "SELECT v FROM t"), "tamp row");
    assert_eq!(s.sql("other", "SELECT v FROM t"), "other row");
    assert!(s.stop().success());
}

/// Files whose name starts with `core` in `dir`.
fn cores_in(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("core"))
        .collect()
}

/// Runs `program ARGS` under `sh` with core dumps allowed (`ulimit -c
/// unlimited`) in `cwd`; `exec` keeps the process id.
fn spawn_with_cores(cwd: &std::path::Path, program: &str, args: &[&str]) -> std::process::Child {
    Command::new("sh")
        .arg("-c")
        .arg("ulimit -c unlimited; exec \"$@\"")
        .arg("sh")
        .arg(program)
        .args(args)
        .current_dir(cwd)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_server_killed_with_sigabrt_leaves_no_core_dump_of_keys_or_rows() {
    // The machine writes core files where a process runs (a control
    // process shows it): otherwise this test could not tell.
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
    assert!(
        !pattern.starts_with('|'),
        "this test needs core files written to disk (kernel.core_pattern is {pattern:?})"
    );
    let control_dir = tempfile::tempdir().unwrap();
    let mut control = spawn_with_cores(control_dir.path(), "sleep", &["60"]);
    std::thread::sleep(Duration::from_millis(200));
    signal_pid(control.id(), 6).unwrap();
    let _ = control.wait();
    assert!(
        !cores_in(control_dir.path()).is_empty(),
        "the control process left no core: the machine does not write core files here"
    );

    let mut s = TestServer::create(&[]);
    s.start(&[]);
    let marker = "core-dump-marker-7f3a";
    s.sql(
        "postgres",
        &format!("CREATE TABLE secret (v text); INSERT INTO secret SELECT '{marker}' FROM generate_series(1, 500)"),
    );
    assert!(s.stop().success());
    let cwd = tempfile::tempdir().unwrap();
    let dir = s.dir.to_str().unwrap().to_string();
    let mut server = spawn_with_cores(
        cwd.path(),
        server_common::bin().to_str().unwrap(),
        &["server", "start", "--data", &dir],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let port = loop {
        let st = s.state();
        if st["state"] == "Ready" && st["pid"] == server.id() {
            break st["listen"]
                .as_str()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse::<u16>()
                .unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "not Ready: {st}");
        std::thread::sleep(Duration::from_millis(50));
    };
    s.port = port;
    // Pages, rows and keys are in memory now.
    assert_eq!(
        s.sql(
            "postgres",
            &format!("SELECT count(*) FROM secret WHERE v = '{marker}'")
        ),
        "500"
    );
    signal_pid(server.id(), 6).unwrap();
    let status = server.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(6), "{status:?}");
    let cores = cores_in(cwd.path());
    for c in &cores {
        let bytes = std::fs::read(c).unwrap();
        assert!(
            !contains(&bytes, marker.as_bytes()),
            "{} holds plaintext rows",
            c.display()
        );
    }
    assert!(cores.is_empty(), "the server left a core dump: {cores:?}");
    // Nothing lost: it starts again and serves the rows.
    s.start(&[]);
    assert_eq!(s.sql("postgres", "SELECT count(*) FROM secret"), "500");
    assert!(s.stop().success());
}
