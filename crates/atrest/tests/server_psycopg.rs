//! psycopg 3 (the real client, from the test venv) against the real server.

mod server_common;

use std::process::Command;

use server_common::*;

fn run_case(server: &TestServer, case: &str) -> String {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/server_py/psycopg_suite.py"
    );
    let out = Command::new(python())
        .args([script, case])
        .env("ATREST_PORT", server.port.to_string())
        .env("ATREST_PASSWORD", PASSWORD)
        .env("ATREST_CA", server.ca())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && stdout.contains(&format!("ok {case}")),
        "case {case} failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    stdout
}

fn case(case: &str, start: &[&str]) {
    let mut s = TestServer::create(&[]);
    s.start(start);
    run_case(&s, case);
    assert!(s.stop().success(), "unclean exit:\n{}", s.log_text());
}

#[test]
fn types_round_trip_in_text_and_binary() {
    case("types", &[]);
}

#[test]
fn prepared_statements_and_pipelines() {
    case("prepared", &[]);
}

#[test]
fn transactions_errors_and_sqlstates() {
    case("transactions", &[]);
}

#[test]
fn large_results_stream() {
    case("large_results", &[]);
}

#[test]
fn concurrent_writers_and_readers() {
    case("concurrency", &[]);
}

#[test]
fn cancel_requests_and_statement_timeout() {
    let mut s = TestServer::create(&[]);
    s.start(&[]);
    run_case(&s, "cancel_and_timeout");
    assert!(s.metric("atrest_cancel_requests_total") >= 2.0);
    assert!(s.stop().success());
}

#[test]
fn session_surface_and_databases() {
    case("session_surface", &[]);
}

#[test]
fn connection_limit_is_a_clear_error() {
    let mut s = TestServer::create(&[]);
    s.start(&["--max-connections", "3"]);
    run_case(&s, "connection_limit");
    let m = s.http_get("/metrics");
    assert!(
        m.contains("atrest_connections_rejected_total{reason=\"too_many_connections\"} 1"),
        "{m}"
    );
    assert!(s.stop().success());
}

#[test]
fn client_disconnecting_mid_query_loses_only_its_transaction() {
    case("disconnect_mid_query", &[]);
}

#[test]
fn idle_in_transaction_sessions_are_ended() {
    case(
        "idle_in_transaction_timeout",
        &["--idle-in-transaction-timeout-ms", "300"],
    );
}

#[test]
fn sigterm_rolls_back_open_transactions_and_keeps_committed_data() {
    let mut s = TestServer::create(&[]);
    s.start(&["--shutdown-grace-ms", "500"]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/server_py/psycopg_suite.py"
    );
    let mut child = Command::new(python())
        .args([script, "sigterm_open_transaction"])
        .env("ATREST_PORT", s.port.to_string())
        .env("ATREST_PASSWORD", PASSWORD)
        .env("ATREST_CA", s.ca())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 6];
    std::io::Read::read_exact(&mut stdout, &mut buf).unwrap();
    assert_eq!(&buf, b"READY\n");
    let t0 = std::time::Instant::now();
    assert!(s.stop().success(), "unclean exit:\n{}", s.log_text());
    assert!(t0.elapsed() < std::time::Duration::from_secs(15));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "{rest}");
    assert!(rest.contains("TERMINATED 57P01"), "{rest}");
    let st = s.state();
    assert_eq!(st["state"], "Stopped");
    assert_eq!(st["reason"], "shutdown (SIGTERM)");
    // Committed data survived; the open transaction did not.
    s.start(&[]);
    run_case(&s, "after_sigterm");
    assert!(s.stop().success());
}

#[test]
fn writers_wait_in_line_time_out_clearly_and_snapshot_conflicts_are_retryable() {
    case("write_lock_wait_and_snapshot_conflicts", &[]);
}

#[test]
fn idle_sessions_are_ended() {
    case(
        "idle_session_timeout",
        &["--idle-session-timeout-ms", "300"],
    );
}
