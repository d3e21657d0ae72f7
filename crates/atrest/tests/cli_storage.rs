//! Drives the real `atrest` binary: sql, inspect and bench.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn atrest(keystore: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_atrest"));
    cmd.args(args)
        .env("ATREST_KEYSTORE", keystore)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn sql_prints_rows_like_the_sqlite_shell_and_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let ks = tmp.path().join("ks");
    let data = tmp.path().join("data");
    let d = data.to_str().unwrap();

    let out = atrest(&ks, &["sql", "--data", d, "-c",
        "CREATE TABLE t(a, b, c); INSERT INTO t VALUES (1, 'x', NULL), (2.5, 'y|z', 3); SELECT * FROM t ORDER BY a;"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "1|x|\n2.5|y|z|3\n");

    // Standard input, and the data persists between runs.
    let out = atrest(
        &ks,
        &["sql", "--data", d],
        Some("SELECT count(*) FROM t;\nSELECT 1.0 + 1;\n"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "2\n2.0\n");

    // Errors: stderr, non-zero exit, nothing on stdout.
    let out = atrest(
        &ks,
        &["sql", "--data", d, "-c", "SELECT nosuch FROM t"],
        None,
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no such column: nosuch"),
        "{}",
        text(&out.stderr)
    );
    assert!(out.stdout.is_empty());

    // The database on disk holds none of it in clear.
    let raw = std::fs::read(data.join("main.db")).unwrap();
    assert!(!raw.windows(3).any(|w| w == b"y|z"));
    assert!(!raw.windows(15).any(|w| w == b"SQLite format 3"));

    // Without the keystore: a clear error, exit 1, data untouched.
    let out = atrest(
        &tmp.path().join("elsewhere"),
        &["sql", "--data", d, "-c", "SELECT 1"],
        None,
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("was not found in keystore") && err.contains("--keystore"),
        "{err}"
    );
    assert_eq!(std::fs::read(data.join("main.db")).unwrap(), raw);
}

#[test]
fn inspect_shows_the_header_and_never_key_material() {
    let tmp = tempfile::tempdir().unwrap();
    let ks = tmp.path().join("ks");
    let data = tmp.path().join("data");
    let d = data.to_str().unwrap();
    let out = atrest(
        &ks,
        &[
            "sql",
            "--data",
            d,
            "-c",
            "CREATE TABLE t(x); INSERT INTO t VALUES (1);",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let db = data.join("main.db");
    let out = atrest(&ks, &["inspect", db.to_str().unwrap(), "--data", d], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "database");
    assert_eq!(v["cipher"], "AES-256-GCM");
    assert_eq!(v["format_version"], 1);
    assert_eq!(v["header_verified"], true);
    assert_eq!(v["key"]["wrapped_dek"]["kek_kind"], "service-managed");
    assert!(v["key"]["wrapped_dek"]["kek_id"]
        .as_str()
        .unwrap()
        .starts_with("service:"));

    // No byte string of the service key appears in the output.
    let key_file = std::fs::read_dir(&ks)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let key = std::fs::read(key_file).unwrap()[24..56].to_vec();
    let shown = text(&out.stdout);
    assert!(!shown.contains(&hex::encode(&key)));

    // Without keys it still describes the file, unverified.
    let out = atrest(&ks, &["inspect", db.to_str().unwrap()], None);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["header_verified"], serde_json::Value::Null);

    // A file that is not atrest's: clear error.
    let other = tmp.path().join("other");
    std::fs::write(&other, b"SQLite format 3\0 not ours").unwrap();
    let out = atrest(&ks, &["inspect", other.to_str().unwrap()], None);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not an atrest file"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn bench_prints_json_and_a_summary_per_workload() {
    let tmp = tempfile::tempdir().unwrap();
    let out = atrest(
        &tmp.path().join("ks"),
        &[
            "bench",
            "storage",
            "--starved-rows",
            "3000",
            "--sized-rows",
            "2000",
            "--ops",
            "200",
            "--repeat",
            "2",
            "--no-openssl",
            "--dir",
            tmp.path().join("b").to_str().unwrap(),
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let json_end = stdout.find("\nsummary:").unwrap();
    let v: serde_json::Value = serde_json::from_str(&stdout[..json_end]).unwrap();
    let workloads = v["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 12);
    for w in workloads {
        assert!(w["plain_seconds"].as_f64().unwrap() > 0.0);
        assert!(w["atrest_seconds"].as_f64().unwrap() > 0.0);
    }
    // Writes went through the cipher: bulk insert sealed pages.
    let bulk = workloads
        .iter()
        .find(|w| w["workload"] == "bulk_insert")
        .unwrap();
    assert!(bulk["units_sealed"].as_u64().unwrap() > 10);
    assert!(v["page_crypto"]["seal_mb_per_s"].as_f64().unwrap() > 0.0);
    // Scenario 2 ran too, through both layers.
    assert!(v["page_crypto"]["infra_seal_mb_per_s"].as_f64().unwrap() > 0.0);
    assert!(bulk["scenario2_seconds"].as_f64().unwrap() > 0.0);
    assert!(bulk["infra_units_sealed"].as_u64().unwrap() > 10);
    assert_eq!(
        bulk["infra_units_sealed"], bulk["scenario2_units_sealed"],
        "every unit of scenario 2 went through both layers"
    );
    // And scenario 4 (customer key + infrastructure layer): the same units.
    assert!(bulk["scenario4_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(
        bulk["scenario4_infra_units_sealed"],
        bulk["scenario4_units_sealed"]
    );
    assert!(bulk["scenario4_units_sealed"].as_u64().unwrap() > 10);
    // Every round ran each side in its own process and was compared
    // with the same round's scenario 1.
    for w in workloads {
        for key in [
            "scenario2_vs_scenario1_per_round_pct",
            "scenario4_vs_scenario1_per_round_pct",
        ] {
            assert_eq!(w[key].as_array().unwrap().len(), 2, "{key}: {w}");
        }
        for side in ["plain", "scenario1", "scenario2", "scenario4"] {
            let runs = w["cpu"]["runs_seconds"][side].as_array().unwrap();
            assert_eq!(runs.len(), 2);
            assert!(runs.iter().all(|t| t.as_f64().unwrap() > 0.0), "{w}");
        }
    }
    assert_eq!(stdout.matches(" s2_vs_s1=").count(), 12);
    assert_eq!(stdout.matches(" paired_s4_vs_s1=").count(), 12);
    assert_eq!(stdout.matches(" cpu_s2_vs_s1=").count(), 12);
    assert_eq!(stdout.matches(" cpu_s2_overhead/crypto=").count(), 12);
    // Writes moved pages: their overhead over the ciphers' cost is there
    // in CPU time too.
    assert!(
        bulk["cpu"]["scenario2_overhead_over_crypto"].is_f64(),
        "{bulk}"
    );
    assert_eq!(stdout.matches(" s4_vs_s1=").count(), 12);
    assert_eq!(stdout.matches("summary: regime=").count(), 12);
}
