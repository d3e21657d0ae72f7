//! `atrest bench replication`: a real read replica (`atrest server replica
//! create`, a separate process) following a real source under the real
//! `pgbench`, both scenario 1 (service key), on this machine.
//!
//! Measured in one run, rounds alternating the order of two kinds of run:
//!
//! * **with replica**: pgbench on the source while the replica follows.
//!   A probe commits a row on the source every 100 ms and polls the
//!   replica until it is visible: the *visibility lag* a client sees, from
//!   the source's commit returning to the row being readable on the
//!   replica. The replica's apply throughput comes from its own count of
//!   applied transactions; the *drain* time is how long after pgbench ends
//!   the replica has every transaction.
//! * **replica stopped**: the same pgbench with the replica down; then the
//!   replica starts and the *catch-up* time (and rate) to the source's
//!   last transaction is measured.
//!
//! The source's TPS in the two kinds of run gives the cost of having a
//! replica, which on one machine is mostly the replica's share of the CPU
//! (both processes run on the same cores), not the shipping itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::cli_bench_cmk::PASSWORD;
use crate::cli_bench_pgbench::{
    pgbench_command, pgbench_tps, prepare, start, Server, Side, SCRIPT,
};

#[derive(clap::Args)]
pub struct ReplicationBench {
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Rounds; each has one run with the replica following and one with
    /// it stopped, in alternating order.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// pgbench clients (-c); pgbench uses 2 threads (-j 2).
    #[arg(long, default_value_t = 4)]
    pub clients: u32,
    /// Rows in `accounts` (about 100 bytes each).
    #[arg(long, default_value_t = 10_000)]
    pub accounts: u64,
    /// Scratch directory (default: a new temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

fn connect(rt: &tokio::runtime::Runtime, port: u16) -> Result<tokio_postgres::Client> {
    rt.block_on(async {
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={port} user=atrest password='{PASSWORD}' dbname=postgres"
            ),
            tokio_postgres::NoTls,
        )
        .await
        .with_context(|| format!("connecting to port {port}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    })
}

fn history_count(rt: &tokio::runtime::Runtime, c: &tokio_postgres::Client) -> Result<i64> {
    Ok(rt
        .block_on(c.query_one("SELECT count(*) FROM history", &[]))?
        .get(0))
}

fn applied(dir: &Path) -> u64 {
    atrest_server::resource::load_lag(dir)
        .get("postgres")
        .map_or(0, |l| l.transactions_applied)
}

/// Waits until the replica has as many history rows as the source.
fn catch_up(
    rt: &tokio::runtime::Runtime,
    replica: &tokio_postgres::Client,
    want: i64,
    limit: Duration,
) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if history_count(rt, replica)? >= want {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            bail!("the replica did not catch up with {want} history rows in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn spawn_pgbench(b: &ReplicationBench, port: u16, script: &Path) -> Result<std::process::Child> {
    pgbench_command(
        port,
        script,
        b.clients,
        b.seconds,
        &[format!("accounts={}", b.accounts)],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .context("running pgbench (Debian: apt-get install postgresql-client)")
}

fn wait_tps(child: std::process::Child) -> Result<f64> {
    pgbench_tps(&child.wait_with_output()?)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub fn run(b: ReplicationBench) -> Result<std::process::ExitCode> {
    let tmp;
    let root = match &b.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    eprintln!("bench: preparing the source (scenario 1) and its replica");
    let (sdir, _) = prepare(&root, Side::S1, b.accounts)?;
    let source = start(Side::S1, sdir.clone(), None)?;
    let src = connect(&rt, source.port)?;
    rt.block_on(src.batch_execute("CREATE TABLE probe (id INT PRIMARY KEY, t TEXT)"))?;
    let rdir = root.join("replica").join("server");
    let out = Command::new(std::env::current_exe()?)
        .args(["server", "replica", "create", "--source"])
        .arg(&sdir)
        .args(["--name", "bench-replica", "--data"])
        .arg(&rdir)
        .args(["--listen", "127.0.0.1:0"])
        .output()?;
    if !out.status.success() {
        bail!(
            "replica create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut replica: Option<Server> = Some(start(Side::S1, rdir.clone(), None)?);
    let mut rep = connect(&rt, replica.as_ref().expect("started").port)?;
    catch_up(
        &rt,
        &rep,
        history_count(&rt, &src)?,
        Duration::from_secs(60),
    )?;
    let script = root.join("bench.sql");
    std::fs::write(&script, SCRIPT)?;

    let mut tps_with = vec![];
    let mut tps_without = vec![];
    let mut lags_ms = vec![];
    let mut apply_tps = vec![];
    let mut drain_ms = vec![];
    let mut catch_up_runs = vec![];
    let mut probe_id = 0i32;
    for round in 0..b.repeat {
        for with in [round % 2 == 0, round % 2 != 0] {
            if with {
                let applied_before = applied(&rdir);
                let t0 = Instant::now();
                let bench = spawn_pgbench(&b, source.port, &script)?;
                // Probe until pgbench is done.
                let deadline = t0 + Duration::from_secs(b.seconds);
                while Instant::now() + Duration::from_millis(200) < deadline {
                    probe_id += 1;
                    rt.block_on(
                        src.execute("INSERT INTO probe VALUES ($1, 'probe')", &[&probe_id]),
                    )?;
                    let committed = Instant::now();
                    loop {
                        let seen = rt
                            .block_on(
                                rep.query_opt("SELECT 1 FROM probe WHERE id = $1", &[&probe_id]),
                            )?
                            .is_some();
                        if seen {
                            lags_ms.push(committed.elapsed().as_secs_f64() * 1e3);
                            break;
                        }
                        if committed.elapsed() > Duration::from_secs(60) {
                            bail!("probe {probe_id} not visible on the replica after 60 s");
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let tps = wait_tps(bench)?;
                let ran = t0.elapsed();
                let drain = catch_up(
                    &rt,
                    &rep,
                    history_count(&rt, &src)?,
                    Duration::from_secs(120),
                )?;
                let applied_n = applied(&rdir).saturating_sub(applied_before);
                apply_tps.push(applied_n as f64 / (ran + drain).as_secs_f64());
                drain_ms.push(drain.as_secs_f64() * 1e3);
                eprintln!(
                    "bench: round {} with replica: {tps:.1} tps; drained {:.0} ms after the load",
                    round + 1,
                    drain.as_secs_f64() * 1e3
                );
                tps_with.push(tps);
            } else {
                drop(replica.take());
                let before = history_count(&rt, &src)?;
                let tps = wait_tps(spawn_pgbench(&b, source.port, &script)?)?;
                let behind = history_count(&rt, &src)? - before;
                let t0 = Instant::now();
                replica = Some(start(Side::S1, rdir.clone(), None)?);
                rep = connect(&rt, replica.as_ref().expect("started").port)?;
                let want = history_count(&rt, &src)?;
                catch_up(&rt, &rep, want, Duration::from_secs(300))?;
                let took = t0.elapsed().as_secs_f64();
                eprintln!(
                    "bench: round {} replica stopped: {tps:.1} tps; {behind} transactions caught up in {took:.2} s (from process start)",
                    round + 1
                );
                catch_up_runs.push(json!({"transactions": behind, "seconds": took,
                    "transactions_per_second": behind as f64 / took}));
                tps_without.push(tps);
            }
        }
    }
    // The replica ends with the source's data.
    let sum = "SELECT count(*) || ' ' || sum(abalance) FROM accounts";
    let a: String = rt.block_on(src.query_one(sum, &[]))?.get(0);
    let bsum: String = rt.block_on(rep.query_one(sum, &[]))?.get(0);
    if a != bsum {
        bail!("the replica's accounts ({bsum}) differ from the source's ({a})");
    }
    let median = |v: &[f64]| percentile(v, 0.5);
    let (tw, two) = (median(&tps_with), median(&tps_without));
    let overhead = 100.0 * (two / tw - 1.0);
    let doc = json!({
        "benchmark": "replication",
        "pgbench": format!(
            "-n -M prepared -c {} -j 2 -T {}, custom TPC-B-like script, {} accounts",
            b.clients, b.seconds, b.accounts
        ),
        "rounds": b.repeat,
        "setup": "source and replica: atrest server processes on this machine (scenario 1), the replica following over TLS through the source's PostgreSQL port",
        "source_tps_with_replica": tps_with,
        "source_tps_replica_stopped": tps_without,
        "source_overhead_with_replica_pct": overhead,
        "visibility_lag_ms": {
            "probes": lags_ms.len(),
            "p50": percentile(&lags_ms, 0.5),
            "p95": percentile(&lags_ms, 0.95),
            "max": percentile(&lags_ms, 1.0),
            "definition": "from the source's commit returning to the row being visible to a query on the replica; one probe every ~100 ms under load",
        },
        "replica_apply_tps_under_load": apply_tps,
        "drain_after_load_ms": drain_ms,
        "catch_up_after_a_stopped_run": catch_up_runs,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    println!(
        "summary: replication under pgbench: source {tw:.0} tps with replica, {two:.0} stopped ({overhead:+.1}% time per transaction); visibility lag p50 {:.0} ms p95 {:.0} ms max {:.0} ms ({} probes); replica applies {:.0} tps; drains {:.0} ms after load; catches up {:.0} tps after a stopped run",
        percentile(&lags_ms, 0.5),
        percentile(&lags_ms, 0.95),
        percentile(&lags_ms, 1.0),
        lags_ms.len(),
        median(&apply_tps),
        median(&drain_ms),
        median(
            &catch_up_runs
                .iter()
                .map(|r| r["transactions_per_second"].as_f64().unwrap_or(0.0))
                .collect::<Vec<_>>()
        ),
    );
    drop(replica);
    drop(source);
    Ok(std::process::ExitCode::SUCCESS)
}
