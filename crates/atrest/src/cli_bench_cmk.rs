//! `atrest bench cmk`: what customer-managed keys cost.
//!
//! Starts a real vault process (this binary), makes a server with many
//! databases, and measures (1) the time to move every DEK from the service
//! key to a customer key, and from one key version to the next (one
//! wrapKey per database plus synced header writes; no page is touched),
//! and (2) the TPS cost of the key monitor: pgbench against the running
//! server with the monitor checking every 100 ms versus every 10 minutes,
//! interleaved.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use atrest_server::cmk::{KeyUrl, VaultLogin};
use atrest_server::databases::Databases;
use atrest_server::keys::{self, Target};
use atrest_server::listener::{self, StartOptions};
use atrest_server::resource::{self, CreateOptions};
use atrest_vault::testkit::reqwest::Method;
use atrest_vault::testkit::{block_on, TestVault};
use serde_json::json;

#[derive(clap::Args)]
pub struct CmkBench {
    /// Databases (each its own DEK) to rewrap.
    #[arg(long, default_value_t = 1000)]
    pub databases: usize,
    /// Seconds of pgbench per monitor setting and round.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Rounds of (monitor slow, monitor fast), interleaved.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
}

pub(crate) const PASSWORD: &str = "bench password";

/// A vault process with key "tde" (RSA-2048) and a server resource whose
/// identity may use it.
pub(crate) struct Env {
    pub(crate) vault: TestVault,
    _tmp: tempfile::TempDir,
    pub(crate) dir: PathBuf,
    pub(crate) login: VaultLogin,
    pub(crate) key: KeyUrl,
}

fn setup(tmp_parent: &Path, name: &str) -> Result<Env> {
    setup_with(tmp_parent, name, false)
}

/// [`setup`], optionally with infrastructure double encryption.
pub(crate) fn setup_with(tmp_parent: &Path, name: &str, infra: bool) -> Result<Env> {
    let exe = std::env::current_exe()?;
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
    let tmp = tempfile::tempdir_in(tmp_parent)?;
    let dir = tmp.path().join("server");
    let pw = zeroize::Zeroizing::new(PASSWORD.to_string());
    atrest_server::provision::create(&CreateOptions {
        name: name.into(),
        dir: dir.clone(),
        admin_user: "atrest".into(),
        admin_password: Some(pw),
        keystore_dir: Some(tmp.path().join("keystore")),
        default_listen: Some("127.0.0.1:0".into()),
        infrastructure_encryption: infra,
        infra_keystore_dir: infra.then(|| tmp.path().join("infra-keystore")),
        engine: Default::default(),
        postgres: None,
        ..Default::default()
    })?;
    let config = resource::load_config(&dir)?;
    let cert = std::fs::read_to_string(dir.join("identity/identity.crt"))?;
    vault
        .admin_call(
            Method::POST,
            "/identities",
            Some(json!({
                "name": name, "kind": "managedIdentity", "clientId": config.identity.client_id,
                "certificate": cert, "permissions": {"keys": ["get", "wrapKey", "unwrapKey"]},
            })),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(dir.join("vault-ca.pem"), &vault.ca)?;
    let login = VaultLogin {
        tenant: vault.tenant.clone(),
        ca: "vault-ca.pem".into(),
    };
    let key = KeyUrl::parse(&format!("{}/keys/tde", vault.url)).map_err(|e| anyhow::anyhow!(e))?;
    Ok(Env {
        vault,
        _tmp: tmp,
        dir,
        login,
        key,
    })
}

pub(crate) fn open_databases(
    dir: &Path,
    config: &atrest_server::config::ServerConfig,
) -> Result<Databases> {
    atrest_server::backup::open_databases(dir, config).map_err(|e| anyhow::anyhow!(e))
}

fn rewrap_bench(b: &CmkBench, parent: &Path) -> Result<serde_json::Value> {
    let env = setup(parent, "bench-rewrap")?;
    let mut config = resource::load_config(&env.dir)?;
    {
        let dbs = open_databases(&env.dir, &config)?;
        for i in 0..b.databases {
            let name = format!("db{i:04}");
            dbs.create(&name).map_err(|e| anyhow::anyhow!(e.message))?;
        }
    }
    let dbs = open_databases(&env.dir, &config)?;
    let target = Target::Customer {
        key: env.key.clone(),
        login: env.login.clone(),
    };
    let t = Instant::now();
    let (to_cmk, _) =
        keys::switch(&env.dir, &mut config, &dbs, target).map_err(|e| anyhow::anyhow!(e))?;
    let to_cmk_ms = t.elapsed().as_secs_f64() * 1000.0;
    drop(dbs);
    // A rotation: a new key version, then every DEK to it.
    let (admin, _, _) = env.vault.identity("rotator", &["all"]);
    block_on(admin.call(
        Method::POST,
        "/keys/tde/create",
        Some(json!({"kty": "RSA", "key_size": 2048})),
    ))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let dbs = open_databases(&env.dir, &config)?;
    // Unwrap every DEK first (what a running server has done at start), so
    // the rotation time is the rewrap alone.
    for name in dbs.names() {
        let (_l, c) = dbs.connect(&name).map_err(|e| anyhow::anyhow!(e.message))?;
        c.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
            r.get::<_, i64>(0)
        })?;
    }
    let t = Instant::now();
    let (rotation, _) = keys::switch(
        &env.dir,
        &mut config,
        &dbs,
        Target::Customer {
            key: env.key.clone(),
            login: env.login.clone(),
        },
    )
    .map_err(|e| anyhow::anyhow!(e))?;
    let rotation_ms = t.elapsed().as_secs_f64() * 1000.0;
    let n = to_cmk.databases;
    Ok(json!({
        "databases": n,
        "files_rewrapped": n,
        "service_to_customer_key_ms": to_cmk_ms,
        "service_to_customer_key_per_database_ms": to_cmk_ms / n as f64,
        "rotation_ms": rotation_ms,
        "rotation_per_database_ms": rotation_ms / rotation.databases as f64,
        "note": "per database: one wrapKey (RSA-OAEP-256, HTTPS), two synced header writes, and two more for its WAL header when the WAL is open; no page re-encrypted",
    }))
}

const SCRIPT: &str = r#"\set aid random(1, 1000)
\set delta random(-5000, 5000)
BEGIN;
UPDATE accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM accounts WHERE aid = :aid;
INSERT INTO history (aid, delta) VALUES (:aid, :delta);
END;
"#;

fn tps_run(env: &Env, interval_ms: u64, seconds: u64, script: &Path) -> Result<f64> {
    let mut config = resource::load_config(&env.dir)?;
    config.monitor.interval_ms = interval_ms;
    config.save(&env.dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let running = rt.block_on(listener::start(StartOptions {
        dir: env.dir.clone(),
        listen: Some("127.0.0.1:0".into()),
        metrics_listen: None,
        limits: None,
    }))?;
    let port = running.listen.port();
    let out = crate::cli_bench_pgbench::pgbench_command(port, script, 4, seconds, &[])
        .output()
        .context("running pgbench (apt-get install postgresql)")?;
    rt.block_on(running.stop("bench round done"));
    crate::cli_bench_pgbench::pgbench_tps(&out)
}

fn monitor_bench(b: &CmkBench, parent: &Path) -> Result<serde_json::Value> {
    let env = setup(parent, "bench-monitor")?;
    let mut config = resource::load_config(&env.dir)?;
    {
        let dbs = open_databases(&env.dir, &config)?;
        let (_l, c) = dbs
            .connect("postgres")
            .map_err(|e| anyhow::anyhow!(e.message))?;
        c.execute_batch(
            "CREATE TABLE accounts (aid INT PRIMARY KEY, abalance INT NOT NULL, filler TEXT);
             CREATE TABLE history (aid INT, delta INT);",
        )?;
        let tx = c.unchecked_transaction()?;
        for i in 1..=1000 {
            tx.execute("INSERT INTO accounts VALUES (?1, 0, 'x')", [i])?;
        }
        tx.commit()?;
        drop(c);
        keys::switch(
            &env.dir,
            &mut config,
            &dbs,
            Target::Customer {
                key: env.key.clone(),
                login: env.login.clone(),
            },
        )
        .map_err(|e| anyhow::anyhow!(e))?;
    }
    let script = env.dir.join("bench.sql");
    std::fs::write(&script, SCRIPT)?;
    let (mut slow, mut fast) = (vec![], vec![]);
    for _ in 0..b.rounds {
        slow.push(tps_run(&env, 600_000, b.seconds, &script)?);
        fast.push(tps_run(&env, 100, b.seconds, &script)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let (ms, mf) = (median(&mut slow.clone()), median(&mut fast.clone()));
    Ok(json!({
        "pgbench": "-M prepared -c 4 -j 2, read-write, customer-managed key",
        "tps_monitor_every_10_min": slow,
        "tps_monitor_every_100_ms": fast,
        "median_ratio_fast_over_slow": mf / ms,
    }))
}

pub fn run(b: CmkBench) -> Result<std::process::ExitCode> {
    let tmp = tempfile::tempdir()?;
    let rewrap = rewrap_bench(&b, tmp.path())?;
    let monitor = monitor_bench(&b, tmp.path())?;
    let doc = json!({"rewrap": rewrap, "monitor": monitor});
    println!("{}", serde_json::to_string_pretty(&doc)?);
    println!(
        "summary: rewrap {} databases service->customer key {:.0} ms ({:.2} ms each), rotation {:.0} ms; key monitor every 100 ms costs {:+.1}% TPS (median of {} rounds)",
        rewrap["databases"],
        rewrap["service_to_customer_key_ms"].as_f64().unwrap_or(0.0),
        rewrap["service_to_customer_key_per_database_ms"].as_f64().unwrap_or(0.0),
        rewrap["rotation_ms"].as_f64().unwrap_or(0.0),
        (monitor["median_ratio_fast_over_slow"].as_f64().unwrap_or(1.0) - 1.0) * 100.0,
        b.rounds
    );
    Ok(std::process::ExitCode::SUCCESS)
}
