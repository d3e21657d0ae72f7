//! `atrest bench postgres`: real PostgreSQL on the plain disk against the
//! postgres engine (scenario 1: PostgreSQL on atrest-fs; scenario 2: with the
//! infrastructure layer too) and, when it is
//! installed, gocryptfs (Debian's AES-256-GCM FUSE filesystem), all with
//! the postgresql.conf `server create` writes (checksums on). pgbench
//! TPC-B-like and select-only, rounds interleaved, the side order rotating
//! every round; medians and per-round ratios to plain.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use atrest_server::config::PostgresConfig;
use atrest_server::postgres::tuned_settings;

const PASSWORD: &str = "atrest-bench-password";

#[derive(clap::Args)]
pub struct PostgresBench {
    /// pgbench scales, comma separated.
    #[arg(long, default_value = "10,100", value_delimiter = ',')]
    scales: Vec<u32>,
    /// Seconds per timed run.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Interleaved rounds per workload.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// Working directory (on the disk to measure; reachable by the OS user).
    #[arg(long, default_value = "/var/tmp/atrest-bench-postgres")]
    dir: PathBuf,
    /// Seconds of untimed warm-up per side before each workload's rounds.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    /// Leave gocryptfs out even if it is installed.
    #[arg(long)]
    no_gocryptfs: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Plain,
    S1,
    /// Scenario 2: the infrastructure layer too.
    S2,
    Gocryptfs,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Plain => "plain",
            Side::S1 => "s1",
            Side::S2 => "s2",
            Side::Gocryptfs => "gocryptfs",
        }
    }
}

struct Running {
    side: Side,
    port: u16,
    child: Child,
    /// gocryptfs: its mount, unmounted at the end.
    mount: Option<PathBuf>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn ids(user: &str) -> Result<(u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd")?;
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
        .with_context(|| format!("no OS user {user}"))
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| what.to_string())?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

fn conninfo(port: u16) -> String {
    format!("host=127.0.0.1 port={port} user=atrest dbname=postgres sslmode=disable")
}

fn wait_accepting(port: u16, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ok = Command::new("psql")
            .args(["-X", "-A", "-t", "-c", "select 1", &conninfo(port)])
            .env("PGPASSWORD", PASSWORD)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if ok {
            return Ok(());
        }
        if let Some(st) = child.try_wait()? {
            bail!("the server exited ({st}) before accepting connections");
        }
        if Instant::now() > deadline {
            bail!("the server did not accept connections in 120 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// initdb and start a PostgreSQL in `pgdata` (plain disk or gocryptfs).
fn start_cluster(pg: &PostgresConfig, pgdata: &Path, run: &Path, port: u16) -> Result<Child> {
    let (uid, gid) = ids(&pg.os_user)?;
    let pw = run.join("pw");
    std::fs::write(&pw, format!("{PASSWORD}\n"))?;
    std::os::unix::fs::chown(&pw, Some(uid), Some(gid))?;
    if !pgdata.join("PG_VERSION").exists() {
        run_ok(
            Command::new(pg.bin_dir.join("initdb"))
                .arg("-D")
                .arg(pgdata)
                .args([
                    "--data-checksums",
                    "-U",
                    "atrest",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ])
                .arg(format!("--pwfile={}", pw.display()))
                .uid(uid)
                .gid(gid)
                .current_dir(run),
            "initdb",
        )?;
        let conf = pgdata.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str(&tuned_settings());
        std::fs::write(&conf, text)?;
    }
    let mut child = Command::new(pg.bin_dir.join("postgres"))
        .arg("-D")
        .arg(pgdata)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            &format!("port={port}"),
        ])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", run.display()))
        .uid(uid)
        .gid(gid)
        .current_dir(run)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait_accepting(port, &mut child)?;
    Ok(child)
}

fn start_side(side: Side, b: &PostgresBench, pg: &PostgresConfig) -> Result<Running> {
    let (uid, gid) = ids(&pg.os_user)?;
    let base = b.dir.join(side.name());
    let run = base.join("run");
    std::fs::create_dir_all(&run)?;
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o711))?;
    std::os::unix::fs::chown(&run, Some(uid), Some(gid))?;
    let port = free_port()?;
    match side {
        Side::Plain => {
            let pgdata = base.join("pgdata");
            std::fs::create_dir_all(&pgdata)?;
            std::fs::set_permissions(&pgdata, std::fs::Permissions::from_mode(0o700))?;
            std::os::unix::fs::chown(&pgdata, Some(uid), Some(gid))?;
            let child = start_cluster(pg, &pgdata, &run, port)?;
            Ok(Running {
                side,
                port,
                child,
                mount: None,
            })
        }
        Side::Gocryptfs => {
            let cipher = base.join("cipher");
            let mnt = base.join("mnt");
            std::fs::create_dir_all(&cipher)?;
            std::fs::create_dir_all(&mnt)?;
            let pw = base.join("gocryptfs-pw");
            std::fs::write(&pw, "bench\n")?;
            if !cipher.join("gocryptfs.conf").exists() {
                run_ok(
                    Command::new("gocryptfs")
                        .args(["-init", "-q", "-passfile"])
                        .arg(&pw)
                        .arg(&cipher),
                    "gocryptfs -init",
                )?;
            }
            run_ok(
                Command::new("gocryptfs")
                    .args(["-q", "-allow_other", "-passfile"])
                    .arg(&pw)
                    .arg(&cipher)
                    .arg(&mnt),
                "gocryptfs mount",
            )?;
            std::fs::set_permissions(&mnt, std::fs::Permissions::from_mode(0o700))?;
            std::os::unix::fs::chown(&mnt, Some(uid), Some(gid))?;
            let pgdata = mnt.join("pgdata");
            if !pgdata.exists() {
                std::fs::create_dir(&pgdata)?;
                std::fs::set_permissions(&pgdata, std::fs::Permissions::from_mode(0o700))?;
                std::os::unix::fs::chown(&pgdata, Some(uid), Some(gid))?;
            }
            let child = start_cluster(pg, &pgdata, &run, port)?;
            Ok(Running {
                side,
                port,
                child,
                mount: Some(mnt),
            })
        }
        Side::S1 | Side::S2 => {
            let data = base.join("server");
            let exe = std::env::current_exe()?;
            if !data.exists() {
                let pw = base.join("admin-pw");
                std::fs::write(&pw, format!("{PASSWORD}\n"))?;
                let mut create = Command::new(&exe);
                create
                    .args(["server", "create", "--engine", "postgres", "--name"])
                    .arg(format!("bench-{}", side.name()))
                    .arg("--data")
                    .arg(&data);
                if side == Side::S2 {
                    create
                        .arg("--infrastructure-encryption")
                        .arg("--infra-keystore")
                        .arg(base.join("infra-keystore"));
                }
                run_ok(
                    create
                        .arg("--keystore")
                        .arg(base.join("keystore"))
                        .arg("--admin-password-file")
                        .arg(&pw)
                        .arg("--postgres-bin")
                        .arg(&pg.bin_dir)
                        .args(["--listen", &format!("127.0.0.1:{port}")]),
                    "atrest server create --engine postgres",
                )?;
            }
            let mut child = Command::new(&exe)
                .args(["server", "start", "--data"])
                .arg(&data)
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(base.join("server.log"))?)
                .spawn()?;
            wait_accepting(port, &mut child)?;
            Ok(Running {
                side,
                port,
                child,
                mount: None,
            })
        }
    }
}

fn stop(mut r: Running) {
    let sig = if matches!(r.side, Side::S1 | Side::S2) {
        15
    } else {
        2
    };
    if let Some(pid) = rustix::process::Pid::from_raw(r.child.id() as i32) {
        if let Some(s) = rustix::process::Signal::from_named_raw(sig) {
            let _ = rustix::process::kill_process(pid, s);
        }
    }
    let _ = r.child.wait();
    if let Some(m) = r.mount {
        // PostgreSQL's backends may still be closing their files.
        for _ in 0..50 {
            if Command::new("fusermount3")
                .arg("-u")
                .arg(&m)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("fusermount3").arg("-uz").arg(&m).status();
    }
}

fn pgbench(port: u16, args: &[&str]) -> Result<f64> {
    let out = Command::new("pgbench")
        .args(args)
        .arg(conninfo(port))
        .env("PGPASSWORD", PASSWORD)
        .output()
        .context("running pgbench")?;
    crate::cli_bench_pgbench::pgbench_tps(&out)
}

/// pgbench's arguments for one timed (or warm-up) run.
fn run_args(clients: u32, seconds: u64, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["-c", &clients.to_string(), "-j", "2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend([
        "-T".into(),
        seconds.to_string(),
        "-M".into(),
        "prepared".into(),
    ]);
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn run(b: PostgresBench) -> Result<std::process::ExitCode> {
    let pg = PostgresConfig::find(None, "postgres")?;
    let mut sides = vec![Side::Plain, Side::S1, Side::S2];
    let have_gocryptfs = Command::new("gocryptfs").arg("-version").output().is_ok();
    if have_gocryptfs && !b.no_gocryptfs {
        sides.push(Side::Gocryptfs);
    } else {
        eprintln!(
            "gocryptfs is not installed (apt-get install gocryptfs): measuring plain, s1 and s2 only"
        );
    }
    if b.dir.exists() {
        bail!(
            "{} exists: give a new --dir (the benchmark makes its clusters there)",
            b.dir.display()
        );
    }
    std::fs::create_dir_all(&b.dir)?;
    std::fs::set_permissions(&b.dir, std::fs::Permissions::from_mode(0o711))?;
    let mut running = vec![];
    for &s in &sides {
        eprintln!("starting {}", s.name());
        running.push(start_side(s, &b, &pg)?);
    }
    let mut results = serde_json::Map::new();
    let mut summary = vec![];
    for &scale in &b.scales {
        for r in &running {
            eprintln!("pgbench -i -s {scale} on {}", r.side.name());
            run_ok(
                Command::new("pgbench")
                    .args(["-i", "-q", "-s", &scale.to_string(), &conninfo(r.port)])
                    .env("PGPASSWORD", PASSWORD),
                "pgbench -i",
            )?;
        }
        for (wname, extra) in [("tpcb", &[][..]), ("select", &["-S"][..])] {
            let mut tps: Vec<Vec<f64>> = vec![vec![]; running.len()];
            for r in &running {
                if b.warmup > 0 {
                    let args = run_args(b.clients, b.warmup, extra);
                    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                    pgbench(r.port, &refs)?;
                }
            }
            for round in 0..b.rounds {
                for k in 0..running.len() {
                    let i = (k + round as usize) % running.len();
                    let args = run_args(b.clients, b.seconds, extra);
                    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                    let t = pgbench(running[i].port, &refs)?;
                    eprintln!(
                        "scale {scale} {wname} round {round} {}: {t:.1} tps",
                        running[i].side.name()
                    );
                    tps[i].push(t);
                }
            }
            let mut w = serde_json::Map::new();
            let mut line = format!("scale={scale} {wname}:");
            for (i, r) in running.iter().enumerate() {
                let ratios: Vec<f64> = tps[i].iter().zip(&tps[0]).map(|(a, p)| a / p).collect();
                w.insert(
                    r.side.name().into(),
                    serde_json::json!({
                        "tps": tps[i],
                        "tps_median": median(&tps[i]),
                        "ratio_to_plain_per_round": ratios,
                        "ratio_to_plain_median": median(&ratios),
                    }),
                );
                if i > 0 {
                    line.push_str(&format!(" {}/plain={:.3}", r.side.name(), median(&ratios)));
                }
            }
            if let Some(g) = running.iter().position(|r| r.side == Side::Gocryptfs) {
                let s1_wins = tps[1].iter().zip(&tps[g]).filter(|(a, c)| a > c).count();
                line.push_str(&format!(" s1>gocryptfs in {s1_wins}/{} rounds", b.rounds));
            }
            results.insert(
                format!("scale{scale}_{wname}"),
                serde_json::Value::Object(w),
            );
            summary.push(line);
        }
    }
    for r in running {
        stop(r);
    }
    let out = serde_json::json!({
        "benchmark": "postgres",
        "clients": b.clients,
        "seconds": b.seconds,
        "rounds": b.rounds,
        "postgres_bin": pg.bin_dir,
        "settings": tuned_settings(),
        "results": results,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    println!("summary: postgres {}", summary.join("; "));
    Ok(std::process::ExitCode::SUCCESS)
}
