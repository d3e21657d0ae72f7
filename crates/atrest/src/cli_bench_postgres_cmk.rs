//! `atrest bench postgres-cmk`: what customer-managed keys and DEK rotation
//! cost the postgres engine, with a real vault process and a real server
//! process (this binary) running PostgreSQL on atrest-fs:
//!
//! 1. the TPS cost of the key monitor: pgbench with the key checked every
//!    100 ms against every 10 minutes, rounds interleaved, the order
//!    alternating;
//! 2. the time from revoking the key (under pgbench) to Inaccessible, and
//!    to the port answering 57P03;
//! 3. the time from `revalidate` to Ready (mount, PostgreSQL's crash
//!    recovery) and to the first query answered;
//! 4. DEK rotation throughput, idle and under pgbench, and pgbench's TPS
//!    during the rotation against a run without one.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use atrest_vault::testkit::reqwest::Method;
use atrest_vault::testkit::{block_on, TestVault};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct PgCmkBench {
    /// pgbench scale of the database.
    #[arg(long, default_value_t = 10)]
    scale: u32,
    /// Seconds per timed pgbench run.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Rounds of (monitor every 100 ms, every 10 min), interleaved.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// Working directory (on the disk to measure).
    #[arg(long, default_value = "/var/tmp/atrest-bench-postgres-cmk")]
    dir: PathBuf,
}

const PASSWORD: &str = "atrest-bench-password";

struct Bench {
    exe: PathBuf,
    data: PathBuf,
    port: u16,
    log: PathBuf,
    server: Option<Child>,
    vault: TestVault,
    client_id: String,
    clients: u32,
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

impl Bench {
    fn atrest(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.exe).args(args).output()?;
        if !out.status.success() {
            bail!(
                "atrest {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    fn dir(&self) -> &str {
        self.data.to_str().expect("a UTF-8 path")
    }

    fn state(&self) -> Value {
        std::fs::read_to_string(self.data.join("state.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn wait_state(&self, want: &str, limit: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            let st = self.state();
            let mine = self.server.as_ref().is_some_and(|c| st["pid"] == c.id());
            if mine && st["state"] == want {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > limit {
                bail!("the server is not {want} after {limit:?}: {st}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.exe)
            .args(["server", "start", "--data", self.dir()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.server = Some(child);
        self.wait_state("Ready", Duration::from_secs(600))?;
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.server.take() {
            rustix::process::kill_process(
                rustix::process::Pid::from_child(&c),
                rustix::process::Signal::TERM,
            )?;
            let st = c.wait()?;
            if !st.success() {
                bail!("the server stopped with {st}; see {}", self.log.display());
            }
        }
        Ok(())
    }

    fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=atrest dbname=postgres sslmode=require connect_timeout=5",
            self.port
        )
    }

    fn pgbench(&self, extra: &[&str]) -> Command {
        let mut c = Command::new("pgbench");
        c.args(extra)
            .arg(self.conninfo())
            .env("PGPASSWORD", PASSWORD);
        c
    }

    /// pgbench TPC-B-like for `seconds`: its TPS.
    fn tps(&self, seconds: u64) -> Result<f64> {
        let out = self
            .pgbench(&[
                "-n",
                "-c",
                &self.clients.to_string(),
                "-j",
                "2",
                "-T",
                &seconds.to_string(),
            ])
            .output()?;
        if !out.status.success() {
            bail!("pgbench: {}", String::from_utf8_lossy(&out.stderr));
        }
        parse_tps(&String::from_utf8_lossy(&out.stdout))
    }

    fn psql_ok(&self, sql: &str) -> bool {
        Command::new("psql")
            .args(["-X", "-A", "-t", "-c", sql, &self.conninfo()])
            .env("PGPASSWORD", PASSWORD)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn policy(&self, perms: &[&str]) -> Result<()> {
        self.vault
            .admin_call(
                Method::PUT,
                &format!("/identities/{}/policy", self.client_id),
                Some(json!({"permissions": {"keys": perms}})),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }

    /// A DEK rotation of the cluster at full speed: seconds and units.
    fn rotate(&self) -> Result<(Duration, u64)> {
        let t0 = Instant::now();
        self.atrest(&[
            "server",
            "rotate-dek",
            "--data",
            self.dir(),
            "--pages-per-second",
            "1000000000",
            "--wait",
        ])?;
        let took = t0.elapsed();
        let st: Value = serde_json::from_str(&self.atrest(&[
            "server",
            "status",
            "--data",
            self.dir(),
            "--json",
        ])?)?;
        let units = st["dek_rotation"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["database"] == "cluster"))
            .and_then(|p| p["pages_total"].as_u64())
            .context("no rotation progress in status")?;
        Ok((took, units))
    }
}

fn parse_tps(out: &str) -> Result<f64> {
    out.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .with_context(|| format!("no tps in pgbench's output: {out}"))
}

/// The mean of pgbench's `-P 1` progress lines ("progress: 3.0 s, 812.4 tps, ...").
fn progress_tps(text: &str) -> Option<f64> {
    let v: Vec<f64> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("progress: ")?;
            let tps = rest.split(", ").nth(1)?.strip_suffix(" tps")?;
            tps.parse().ok()
        })
        .collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(b: PgCmkBench) -> Result<std::process::ExitCode> {
    let exe = std::env::current_exe()?;
    let _ = std::fs::remove_dir_all(&b.dir);
    std::fs::create_dir_all(&b.dir)?;
    // PostgreSQL's OS user must reach the mount below.
    std::fs::set_permissions(&b.dir, std::fs::Permissions::from_mode(0o711))?;
    let vault = TestVault::start(&exe, &[]);
    vault
        .admin_call(
            Method::PATCH,
            "/vault",
            Some(json!({"purgeProtection": true})),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (admin, _, _) = vault.identity("key-admin", &["all"]);
    block_on(admin.call(
        Method::POST,
        "/keys/tde/create",
        Some(json!({"kty": "RSA", "key_size": 2048})),
    ))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let data = b.dir.join("server");
    let pw = b.dir.join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut bench = Bench {
        exe,
        data: data.clone(),
        port,
        log: b.dir.join("server.log"),
        server: None,
        vault,
        client_id: String::new(),
        clients: b.clients,
    };
    bench.atrest(&[
        "server",
        "create",
        "--engine",
        "postgres",
        "--name",
        "bench-pg-cmk",
        "--data",
        bench.dir(),
        "--keystore",
        b.dir.join("keystore").to_str().expect("UTF-8"),
        "--admin-password-file",
        pw.to_str().expect("UTF-8"),
        "--listen",
        &format!("127.0.0.1:{port}"),
    ])?;
    let config: Value = serde_json::from_str(&std::fs::read_to_string(data.join("server.json"))?)?;
    bench.client_id = config["identity"]["client_id"]
        .as_str()
        .context("no identity")?
        .to_string();
    let cert = std::fs::read_to_string(data.join("identity/identity.crt"))?;
    bench
        .vault
        .admin_call(
            Method::POST,
            "/identities",
            Some(json!({
                "name": "atrest-server", "kind": "managedIdentity", "clientId": bench.client_id,
                "certificate": cert, "permissions": {"keys": ["get", "wrapKey", "unwrapKey"]},
            })),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let ca = b.dir.join("vault-ca.pem");
    std::fs::write(&ca, &bench.vault.ca)?;
    let key_url = format!("{}/keys/tde", bench.vault.url);
    bench.atrest(&[
        "server",
        "set-key",
        "--data",
        bench.dir(),
        "--key",
        &key_url,
        "--tenant",
        &bench.vault.tenant.clone(),
        "--vault-ca",
        ca.to_str().expect("UTF-8"),
    ])?;
    bench.start()?;
    eprintln!("pgbench -i -s {}", b.scale);
    let out = bench
        .pgbench(&["-i", "-q", "-s", &b.scale.to_string()])
        .output()?;
    if !out.status.success() {
        bail!("pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    }

    // 1. The key monitor's TPS cost.
    let mut fast = vec![];
    let mut slow = vec![];
    for round in 0..b.rounds {
        let order: [u64; 2] = if round % 2 == 0 {
            [100, 600_000]
        } else {
            [600_000, 100]
        };
        for interval in order {
            bench.stop()?;
            bench.atrest(&[
                "server",
                "configure",
                "--data",
                bench.dir(),
                "--key-check-interval-ms",
                &interval.to_string(),
            ])?;
            bench.start()?;
            let tps = bench.tps(b.seconds)?;
            eprintln!("round {round}: key check every {interval} ms: {tps:.1} tps");
            if interval == 100 {
                fast.push(tps);
            } else {
                slow.push(tps);
            }
        }
    }
    let ratios: Vec<f64> = fast.iter().zip(&slow).map(|(f, s)| f / s).collect();

    // 2. Revocation under pgbench: to Inaccessible, and to 57P03.
    bench.stop()?;
    let interval_ms = 1000u64;
    bench.atrest(&[
        "server",
        "configure",
        "--data",
        bench.dir(),
        "--key-check-interval-ms",
        &interval_ms.to_string(),
    ])?;
    bench.start()?;
    let mut load = bench
        .pgbench(&["-n", "-c", &b.clients.to_string(), "-T", "120"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(3));
    let t0 = Instant::now();
    bench.policy(&["get", "wrapKey"])?;
    let to_inaccessible = bench.wait_state("Inaccessible", Duration::from_secs(60))?;
    let to_refused = loop {
        let out = Command::new("psql")
            .args(["-X", "-c", "select 1", &bench.conninfo()])
            .env("PGPASSWORD", PASSWORD)
            .output()?;
        if String::from_utf8_lossy(&out.stderr).contains("customer-managed key") {
            break t0.elapsed();
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("the port does not answer 57P03");
        }
    };
    let _ = load.wait();
    eprintln!("revoked: Inaccessible after {to_inaccessible:?}, 57P03 after {to_refused:?}");

    // 3. Revalidate to Ready (scale-N database, crash recovery).
    bench.policy(&["get", "wrapKey", "unwrapKey"])?;
    let t0 = Instant::now();
    bench.atrest(&["server", "revalidate", "--data", bench.dir()])?;
    let to_ready = bench.wait_state("Ready", Duration::from_secs(600))?;
    let to_ready = to_ready.max(t0.elapsed());
    while !bench.psql_ok("select count(*) from pgbench_branches") {
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("no query answered after revalidation");
        }
    }
    let to_query = t0.elapsed();
    eprintln!("revalidated: Ready after {to_ready:?}, first query after {to_query:?}");

    // 4. DEK rotation: idle, then under pgbench, against pgbench alone.
    bench.psql_ok("checkpoint");
    let (idle_time, idle_units) = bench.rotate()?;
    eprintln!("rotation idle: {idle_units} units in {idle_time:?}");
    let before = bench.tps(b.seconds)?;
    let progress = b.dir.join("pgbench-progress.txt");
    let mut load = bench
        .pgbench(&[
            "-n",
            "-c",
            &b.clients.to_string(),
            "-j",
            "2",
            "-T",
            "3600",
            "-P",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&progress)?)
        .spawn()?;
    std::thread::sleep(Duration::from_secs(3));
    let (load_time, load_units) = bench.rotate()?;
    load.kill()?;
    let _ = load.wait();
    let during = progress_tps(&std::fs::read_to_string(&progress)?)
        .context("no pgbench progress during the rotation")?;
    let after = bench.tps(b.seconds)?;
    eprintln!("rotation under pgbench: {load_units} units in {load_time:?}, {during:.1} tps");
    bench.stop()?;

    let per_s = |units: u64, d: Duration| (units as f64 / d.as_secs_f64()).round();
    let mib_s = |units: u64, d: Duration| {
        ((units * atrest_fs::layout::UNIT as u64) as f64 / d.as_secs_f64() / 1048576.0 * 10.0)
            .round()
            / 10.0
    };
    let doc = json!({
        "scale": b.scale,
        "clients": b.clients,
        "seconds": b.seconds,
        "monitor": {
            "tps_check_every_100ms": fast,
            "tps_check_every_10min": slow,
            "ratio_per_round": ratios,
            "ratio_median": median(ratios.clone()),
        },
        "revocation": {
            "key_check_interval_ms": interval_ms,
            "to_inaccessible_s": secs(to_inaccessible),
            "to_57p03_s": secs(to_refused),
        },
        "revalidation": {"to_ready_s": secs(to_ready), "to_first_query_s": secs(to_query)},
        "dek_rotation": {
            "idle": {"units": idle_units, "seconds": secs(idle_time),
                     "units_per_s": per_s(idle_units, idle_time), "mib_per_s": mib_s(idle_units, idle_time)},
            "under_pgbench": {"units": load_units, "seconds": secs(load_time),
                     "units_per_s": per_s(load_units, load_time), "mib_per_s": mib_s(load_units, load_time),
                     "tps_during": (during * 10.0).round() / 10.0,
                     "tps_before": before, "tps_after": after,
                     "tps_ratio_during_vs_without": (during / ((before + after) / 2.0) * 1000.0).round() / 1000.0},
        },
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    println!(
        "summary: postgres engine, scale {}: key monitor every 100 ms costs {:.1}% TPS (median of {} interleaved rounds); revocation to Inaccessible {:.2} s (check every {} ms), to 57P03 {:.2} s; revalidate to Ready {:.2} s; DEK rotation {} units/s idle, {} units/s under pgbench at {:.0}% of its TPS",
        b.scale,
        (1.0 - median(ratios)) * 100.0,
        b.rounds,
        to_inaccessible.as_secs_f64(),
        interval_ms,
        to_refused.as_secs_f64(),
        to_ready.as_secs_f64(),
        per_s(idle_units, idle_time),
        per_s(load_units, load_time),
        during / ((before + after) / 2.0) * 100.0
    );
    let _ = std::fs::remove_dir_all(&b.dir);
    Ok(std::process::ExitCode::SUCCESS)
}
