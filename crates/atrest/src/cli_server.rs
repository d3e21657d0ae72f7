//! `atrest server ...`: create, start, inspect and delete a database server.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use atrest_server::config::{EngineKind, Limits, PlaintextPolicy};
use atrest_server::listener::{self, StartOptions};
use atrest_server::resource::{self, CreateOptions};
use clap::{Args, Subcommand, ValueEnum};

#[derive(Args)]
pub struct ServerArgs {
    #[command(subcommand)]
    command: ServerCommand,
}

#[derive(Clone, Copy, ValueEnum)]
enum Plaintext {
    Loopback,
    Never,
    Always,
}

#[derive(Subcommand)]
enum ServerCommand {
    /// Create a server: its directory, identity, TLS certificate, first
    /// role, service key and default database "postgres".
    Create {
        /// Server name: 3-63 lowercase letters, digits and hyphens.
        #[arg(long)]
        name: String,
        /// The server directory (new or empty).
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "atrest")]
        admin_user: String,
        /// File holding the admin password; generated if omitted.
        #[arg(long)]
        admin_password_file: Option<PathBuf>,
        /// Keystore for the service key (default: $ATREST_KEYSTORE or
        /// ~/.local/share/atrest/keystore); must be outside --data.
        #[arg(long, env = "ATREST_KEYSTORE")]
        keystore: Option<PathBuf>,
        /// TLS certificate chain (PEM); a certificate and local CA are
        /// generated if omitted.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Extra host names for a generated certificate.
        #[arg(long = "hostname")]
        hostnames: Vec<String>,
        /// Who may connect without TLS.
        #[arg(long, value_enum, default_value = "loopback")]
        allow_plaintext: Plaintext,
        /// Default listen address for `start`.
        #[arg(long, default_value = "127.0.0.1:5432")]
        listen: String,
        #[arg(long, default_value_t = 100)]
        max_connections: usize,
        /// Infrastructure double encryption: a second, independent layer
        /// (AEGIS-256 from libaegis, its own keystore). Fixed for the server's life.
        #[arg(long)]
        infrastructure_encryption: bool,
        /// The infrastructure layer's keystore (default: $ATREST_INFRA_KEYSTORE
        /// or next to the service keystore).
        #[arg(long, env = "ATREST_INFRA_KEYSTORE")]
        infra_keystore: Option<PathBuf>,
        /// The database engine: `sqlite` (atrest's own, embedded) or
        /// `postgres` (Debian's PostgreSQL on an encrypting filesystem).
        #[arg(long, value_enum, default_value = "sqlite")]
        engine: EngineArg,
        /// The postgres engine's binaries (default: the newest
        /// /usr/lib/postgresql/N/bin).
        #[arg(long)]
        postgres_bin: Option<PathBuf>,
        /// The unprivileged OS user PostgreSQL runs as.
        #[arg(long, default_value = "postgres")]
        os_user: String,
    },
    /// Serve a server until SIGTERM or SIGINT.
    Start {
        #[arg(long)]
        data: PathBuf,
        /// Listen address (default: the one given at create).
        #[arg(long)]
        listen: Option<String>,
        /// Serve /metrics (Prometheus), /status and /healthz here.
        #[arg(long)]
        metrics_listen: Option<String>,
        #[arg(long)]
        max_connections: Option<usize>,
        /// Statement timeout in ms (0: none).
        #[arg(long)]
        statement_timeout_ms: Option<u64>,
        #[arg(long)]
        idle_session_timeout_ms: Option<u64>,
        #[arg(long)]
        idle_in_transaction_timeout_ms: Option<u64>,
        #[arg(long)]
        lock_timeout_ms: Option<u64>,
        /// On SIGTERM, how long open transactions may run before rollback.
        #[arg(long)]
        shutdown_grace_ms: Option<u64>,
        #[arg(long)]
        max_message_bytes: Option<usize>,
    },
    /// Show name, state, encryption scenario, keys and last state change.
    Status {
        #[arg(long)]
        data: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Protect the DEKs with a customer-managed key in the key vault (or,
    /// with --service, with the service key again). Validates the key
    /// first; rewraps every database online; works on a running server.
    SetKey {
        #[arg(long)]
        data: PathBuf,
        /// https://VAULT/keys/NAME[/VERSION] (latest version if omitted).
        #[arg(long, required_unless_present = "service")]
        key: Option<String>,
        /// The vault's tenant (directory) id.
        #[arg(long, required_unless_present = "service")]
        tenant: Option<String>,
        /// The vault's CA certificate (PEM); copied into the server directory.
        #[arg(long, required_unless_present = "service")]
        vault_ca: Option<PathBuf>,
        /// Go back to the service-managed key.
        #[arg(long, conflicts_with_all = ["key", "tenant", "vault_ca"])]
        service: bool,
    },
    /// Rewrap every DEK under the latest version of the current customer key.
    RotateKey {
        #[arg(long)]
        data: PathBuf,
    },
    /// Re-encrypt databases under new DEKs (both layers) while the server
    /// serves: throttled, resumable after a crash, the old DEKs in no
    /// header afterwards. Progress is in `status`, /status and /metrics.
    RotateDek {
        #[arg(long)]
        data: PathBuf,
        /// One database (default: all).
        #[arg(long)]
        database: Option<String>,
        /// Throttle for this rotation (default: dek_rotation.pages_per_second).
        #[arg(long)]
        pages_per_second: Option<u64>,
        /// Wait until the rotation is done, printing its progress.
        #[arg(long)]
        wait: bool,
    },
    /// Re-check the customer key of a running server and, if it is
    /// accessible again, return the server from Inaccessible to Ready.
    Revalidate {
        #[arg(long)]
        data: PathBuf,
    },
    /// Change the key monitor and alert settings (applied at next start).
    Configure {
        #[arg(long)]
        data: PathBuf,
        /// How often the key is checked (ms; at most 600000).
        #[arg(long)]
        key_check_interval_ms: Option<u64>,
        /// How long the vault may be unreachable before Inaccessible (ms).
        #[arg(long)]
        outage_grace_ms: Option<u64>,
        /// Return to Ready by itself once the key is accessible again.
        #[arg(long)]
        auto_revalidate: Option<bool>,
        /// Add a webhook URL (HTTP POST, JSON, on every state change).
        #[arg(long = "webhook")]
        webhooks: Vec<String>,
        /// Remove every webhook first.
        #[arg(long)]
        clear_webhooks: bool,
        /// Refused: infrastructure encryption is chosen at create only.
        #[arg(long)]
        infrastructure_encryption: Option<bool>,
    },
    /// Manage the roles that may log in (SCRAM-SHA-256 verifiers in
    /// roles.json; a running server sees changes at the next login).
    Role {
        #[command(subcommand)]
        command: RoleCommand,
    },
    /// Take an online, consistent backup of every database (ciphertext
    /// only; the WAL is archived continuously), or list / verify backups.
    Backup(BackupArgs),
    /// Read replicas: create one, allow one on its source, promote one.
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Make a new server from a backup, optionally at a point in time.
    Restore {
        /// The backup: REPO/backups/ID (see `atrest server backup list`).
        #[arg(long)]
        from: PathBuf,
        /// Restore the transactions committed up to this time (RFC 3339
        /// or unix seconds), replaying the WAL archive.
        #[arg(long)]
        to_time: Option<String>,
        /// The new server's name.
        #[arg(long)]
        name: String,
        /// The new server's directory (new or empty).
        #[arg(long)]
        data: PathBuf,
        /// Default listen address (default: the source's).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Delete a server: its databases, directory and service key.
    Delete {
        #[arg(long)]
        data: PathBuf,
        /// Confirm: the data is unrecoverable afterwards.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct BackupArgs {
    #[command(subcommand)]
    command: Option<BackupCommand>,
    /// The server directory (running or stopped).
    #[arg(long)]
    data: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ReplicaCommand {
    /// Create a read replica of a running source: a base backup restored
    /// into a new server (new identity; the same customer key, and then
    /// Inaccessible until revalidated), which then follows the source's
    /// WAL, shipped sealed over TLS.
    Create {
        /// The source: its server directory on this machine, or its
        /// PostgreSQL address HOST:PORT (with --source-ca and --token-file).
        #[arg(long)]
        source: String,
        /// The CA of the source's TLS certificate (a source at an address).
        #[arg(long)]
        source_ca: Option<PathBuf>,
        /// The token from `replica allow` on the source (a source at an address).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The replica's name.
        #[arg(long)]
        name: String,
        /// The replica's directory (new).
        #[arg(long)]
        data: PathBuf,
        /// The replica's listen address.
        #[arg(long)]
        listen: Option<String>,
    },
    /// On the source: allow a replica named NAME to follow; writes its
    /// token (0600) to --token-out.
    Allow {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        token_out: PathBuf,
    },
    /// On the source: stop a replica from following (its token is no
    /// longer accepted) and release the archive segments it held.
    Disallow {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// Turn a replica into an independent, writable server (running or not).
    Promote {
        #[arg(long)]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum BackupCommand {
    /// List the backups in the server's repository.
    List {
        #[arg(long)]
        data: PathBuf,
    },
    /// Check that every page and frame of a backup (and of the archive a
    /// restore from it replays) authenticates, without restoring.
    Verify {
        #[arg(long)]
        data: PathBuf,
        /// One backup (default: all).
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Subcommand)]
enum RoleCommand {
    /// Create a role or change its password.
    Set {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        user: String,
        /// File holding the password.
        #[arg(long)]
        password_file: PathBuf,
        #[arg(long)]
        superuser: bool,
    },
    /// Remove a role (it can no longer log in; open sessions continue).
    Delete {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        user: String,
    },
    /// List the roles (names only).
    List {
        #[arg(long)]
        data: PathBuf,
    },
}

fn run_role(cmd: RoleCommand) -> Result<std::process::ExitCode> {
    match cmd {
        RoleCommand::Set {
            data,
            user,
            password_file,
            superuser,
        } => {
            resource::validate_database_name(&user).map_err(|_| {
                anyhow::anyhow!("invalid role name {user:?}: use letters, digits and '_'")
            })?;
            let pw = zeroize::Zeroizing::new(
                std::fs::read_to_string(&password_file)
                    .with_context(|| format!("reading {}", password_file.display()))?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            );
            if pw.is_empty() {
                bail!("the password file is empty");
            }
            let mut roles = resource::Roles::load(&data)?;
            let existed = roles.roles.contains_key(&user);
            roles.set_password(&user, &pw);
            if superuser {
                roles.roles.get_mut(&user).expect("just set").superuser = true;
            }
            roles.save(&data)?;
            println!(
                "{} role {user}",
                if existed { "updated" } else { "created" }
            );
        }
        RoleCommand::Delete { data, user } => {
            let mut roles = resource::Roles::load(&data)?;
            if roles.roles.remove(&user).is_none() {
                bail!("role {user:?} does not exist");
            }
            if !roles.roles.values().any(|r| r.superuser) {
                bail!("refusing to remove the last superuser role; create another first");
            }
            roles.save(&data)?;
            println!("deleted role {user}");
        }
        RoleCommand::List { data } => {
            for (name, r) in resource::Roles::load(&data)?.roles {
                println!("{name}{}", if r.superuser { " (superuser)" } else { "" });
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum EngineArg {
    Sqlite,
    Postgres,
}

/// `server start` for the postgres engine: a private mount namespace (before
/// any thread starts: the namespace is per thread, and threads inherit it),
/// then PostgreSQL supervised under the server's one lifecycle.
fn start_postgres(
    data: &std::path::Path,
    listen: Option<String>,
    metrics_listen: Option<String>,
    limits: Limits,
    name: &str,
) -> Result<std::process::ExitCode> {
    atrest_fs::private_mount_namespace()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        // Signals are taken before the server says Ready (see the sqlite
        // engine's start).
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        eprintln!("atrest server {name} (postgres engine) starting");
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            }
        };
        atrest_server::postgres::serve(
            data.to_path_buf(),
            listen,
            metrics_listen,
            Some(limits),
            shutdown,
        )
        .await?;
        eprintln!("atrest server {name}: stopped");
        anyhow::Ok(())
    })?;
    Ok(std::process::ExitCode::SUCCESS)
}

pub fn run(args: ServerArgs) -> Result<std::process::ExitCode> {
    match args.command {
        ServerCommand::Create {
            name,
            data,
            admin_user,
            admin_password_file,
            keystore,
            tls_cert,
            tls_key,
            hostnames,
            allow_plaintext,
            listen,
            max_connections,
            infrastructure_encryption,
            infra_keystore,
            engine,
            postgres_bin,
            os_user,
        } => {
            let (engine, postgres) = match engine {
                EngineArg::Sqlite => (EngineKind::Sqlite, None),
                EngineArg::Postgres => {
                    let pg = atrest_server::config::PostgresConfig::find(
                        postgres_bin.as_deref(),
                        &os_user,
                    )?;
                    // initdb runs on a mount seen by this process only.
                    atrest_fs::private_mount_namespace()?;
                    (EngineKind::Postgres, Some(pg))
                }
            };
            let admin_password = match admin_password_file {
                Some(p) => {
                    let text = std::fs::read_to_string(&p).with_context(|| {
                        format!("reading the admin password from {}", p.display())
                    })?;
                    Some(zeroize::Zeroizing::new(
                        text.trim_end_matches(['\n', '\r']).to_string(),
                    ))
                }
                None => None,
            };
            let created = atrest_server::provision::create(&CreateOptions {
                name,
                dir: data,
                admin_user: admin_user.clone(),
                admin_password,
                keystore_dir: keystore,
                tls_cert,
                tls_key,
                hostnames,
                allow_plaintext: match allow_plaintext {
                    Plaintext::Loopback => PlaintextPolicy::Loopback,
                    Plaintext::Never => PlaintextPolicy::Never,
                    Plaintext::Always => PlaintextPolicy::Always,
                },
                limits: Limits {
                    max_connections,
                    ..Limits::default()
                },
                default_listen: Some(listen),
                infrastructure_encryption,
                infra_keystore_dir: infra_keystore,
                engine,
                postgres,
            })?;
            let c = &created.config;
            println!(
                "created server {} ({}, engine {})",
                c.name, c.server_id, c.engine
            );
            println!(
                "  encryption: {} ({})",
                c.encryption.scenario, c.encryption.service_key
            );
            println!("  keystore:   {}", c.encryption.keystore_dir.display());
            if let Some(ik) = &c.encryption.infra_keystore_dir {
                println!(
                    "  infrastructure encryption: on (keystore {})",
                    ik.display()
                );
            }
            println!(
                "  identity:   {} (certificate sha256 {})",
                c.identity.client_id, c.identity.thumbprint_sha256
            );
            println!("  admin user: {admin_user}");
            if let Some(p) = &created.admin_password_file {
                println!(
                    "  admin password stored in {} (mode 0600); delete it once you have it",
                    p.display()
                );
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        ServerCommand::Start {
            data,
            listen,
            metrics_listen,
            max_connections,
            statement_timeout_ms,
            idle_session_timeout_ms,
            idle_in_transaction_timeout_ms,
            lock_timeout_ms,
            shutdown_grace_ms,
            max_message_bytes,
        } => {
            let config = resource::load_config(&data)?;
            let mut limits = config.limits.clone();
            if let Some(v) = max_connections {
                limits.max_connections = v;
            }
            if let Some(v) = statement_timeout_ms {
                limits.statement_timeout_ms = v;
            }
            if let Some(v) = idle_session_timeout_ms {
                limits.idle_session_timeout_ms = v;
            }
            if let Some(v) = idle_in_transaction_timeout_ms {
                limits.idle_in_transaction_session_timeout_ms = v;
            }
            if let Some(v) = lock_timeout_ms {
                limits.lock_timeout_ms = v;
            }
            if let Some(v) = shutdown_grace_ms {
                limits.shutdown_grace_ms = v;
            }
            if let Some(v) = max_message_bytes {
                limits.max_message_bytes = v;
            }
            if config.engine == EngineKind::Postgres {
                return start_postgres(&data, listen, metrics_listen, limits, &config.name);
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(async move {
                // Take SIGTERM and SIGINT before the server says Ready in
                // state.json: a supervisor may stop it the moment it sees
                // Ready, and an uncaught signal would kill the process
                // instead of closing the databases cleanly.
                use tokio::signal::unix::{signal, SignalKind};
                let mut term = signal(SignalKind::terminate())?;
                let mut int = signal(SignalKind::interrupt())?;
                let running = listener::start(StartOptions {
                    dir: data,
                    listen,
                    metrics_listen,
                    limits: Some(limits),
                })
                .await?;
                eprintln!(
                    "atrest server {} listening on {}{}",
                    config.name,
                    running.listen,
                    running
                        .metrics
                        .map(|m| format!(", metrics on http://{m}/metrics"))
                        .unwrap_or_default()
                );
                let ctx = std::sync::Arc::clone(running.ctx());
                let signal = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                    _ = ctx.control.stop_requested.notified() => "delete requested while Inaccessible",
                };
                eprintln!("atrest server {}: {signal}, shutting down", config.name);
                running.stop(&format!("shutdown ({signal})")).await;
                eprintln!("atrest server {}: stopped", config.name);
                anyhow::Ok(())
            })?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        ServerCommand::Status { data, json } => {
            let st = resource::status(&data)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                let s = |k: &str| st[k].as_str().unwrap_or("-").to_string();
                println!("name:        {}", s("name"));
                println!(
                    "state:       {} since {} ({})",
                    s("state"),
                    s("since"),
                    s("reason")
                );
                if let Some(note) = st["note"].as_str() {
                    println!("note:        {note}");
                }
                if let Some(l) = st["listen"].as_str() {
                    println!("listening:   {l}");
                }
                println!(
                    "encryption:  {}",
                    st["encryption"]["scenario"].as_str().unwrap_or("-")
                );
                println!(
                    "service key: {}",
                    st["encryption"]["service_key"].as_str().unwrap_or("-")
                );
                println!(
                    "infrastructure encryption: {}",
                    st["encryption"]["infrastructure_encryption"]
                );
                if let Some(r) = st["replica"].as_object() {
                    println!(
                        "replica of: {} at {}",
                        r["source_name"].as_str().unwrap_or("-"),
                        r["source"].as_str().unwrap_or("-")
                    );
                    if let Some(e) = r["source_error"].as_str() {
                        println!("replica: {e}");
                    }
                    for (db, l) in r["databases"].as_object().into_iter().flatten() {
                        println!(
                            "replication: {db} lag {} bytes, {:.1} s, {} transactions applied{}",
                            l["lag_bytes"],
                            l["lag_seconds"].as_f64().unwrap_or(0.0),
                            l["transactions_applied"],
                            l["last_error"]
                                .as_str()
                                .map(|e| format!("; last error: {e}"))
                                .unwrap_or_default()
                        );
                    }
                }
                for p in st["dek_rotation"].as_array().into_iter().flatten() {
                    println!(
                        "dek rotation: {} {} {}% ({} of {} pages, {} pages/s, {} s left; {})",
                        p["database"].as_str().unwrap_or("-"),
                        p["state"].as_str().unwrap_or("-"),
                        p["percent"],
                        p["pages_done"],
                        p["pages_total"],
                        p["pages_per_second"],
                        p["eta_seconds"],
                        p["reason"].as_str().unwrap_or("-")
                    );
                }
                println!(
                    "identity:    {}",
                    st["identity"]["client_id"].as_str().unwrap_or("-")
                );
                if let Some(dbs) = st["databases"].as_array() {
                    let names: Vec<&str> = dbs.iter().filter_map(|d| d["name"].as_str()).collect();
                    println!("databases:   {}", names.join(", "));
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        ServerCommand::SetKey {
            data,
            key,
            tenant,
            vault_ca,
            service,
        } => {
            let req = if service {
                serde_json::json!({"op": "set-key", "service": true})
            } else {
                let ca_src = vault_ca.expect("required");
                let dir = data
                    .canonicalize()
                    .with_context(|| format!("{}", data.display()))?;
                let ca = std::fs::read(&ca_src)
                    .with_context(|| format!("reading {}", ca_src.display()))?;
                resource::write_atomic(&dir.join("vault-ca.pem"), &ca, 0o644)?;
                serde_json::json!({"op": "set-key", "key": key, "tenant": tenant, "ca": "vault-ca.pem"})
            };
            let report = key_op(&data, req)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        ServerCommand::RotateKey { data } => {
            let config = resource::load_config(&data)?;
            let Some(ck) = config.encryption.customer_key else {
                bail!("the server uses the service-managed key; set a customer key first (atrest server set-key)");
            };
            let latest = atrest_server::cmk::KeyUrl {
                version: None,
                ..ck.key.clone()
            };
            let req = serde_json::json!({"op": "set-key", "key": latest.kid(), "tenant": ck.login.tenant, "ca": ck.login.ca});
            let report = key_op(&data, req)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(std::process::ExitCode::SUCCESS)
        }
        ServerCommand::RotateDek {
            data,
            database,
            pages_per_second,
            wait,
        } => {
            let req = serde_json::json!({"op": "rotate-dek", "database": database,
                "pages_per_second": pages_per_second});
            let queued = match atrest_server::control::admin_request(&data, &req) {
                None => bail!(
                    "the server in {} is not running; DEK rotation runs online: start it first",
                    data.display()
                ),
                Some(Err(e)) => bail!("{e}"),
                Some(Ok(v)) => v["queued"].clone(),
            };
            let names: Vec<String> = serde_json::from_value(queued).unwrap_or_default();
            println!("DEK rotation queued for: {}", names.join(", "));
            if !wait {
                return Ok(std::process::ExitCode::SUCCESS);
            }
            let mut last_print = std::time::Instant::now();
            loop {
                std::thread::sleep(std::time::Duration::from_millis(100));
                let st = atrest_server::control::admin_request(
                    &data,
                    &serde_json::json!({"op": "rotation-status"}),
                )
                .ok_or_else(|| {
                    anyhow::anyhow!("the server stopped; the rotation resumes at its next start")
                })?
                .map_err(|e| anyhow::anyhow!(e))?;
                let all = st["databases"].as_array().cloned().unwrap_or_default();
                let mine: Vec<_> = all
                    .iter()
                    .filter(|p| names.iter().any(|n| p["database"] == n.as_str()))
                    .collect();
                let mut pending = false;
                let print = last_print.elapsed() >= std::time::Duration::from_secs(1);
                if print {
                    last_print = std::time::Instant::now();
                }
                for p in &mine {
                    let state = p["state"].as_str().unwrap_or("");
                    if state == "failed" {
                        bail!("DEK rotation of {} failed: {}", p["database"], p["error"]);
                    }
                    pending |= state != "done";
                    if !print {
                        continue;
                    }
                    eprintln!(
                        "{}: {} {}% ({} of {} pages, {} pages/s, {} s left)",
                        p["database"].as_str().unwrap_or(""),
                        state,
                        p["percent"],
                        p["pages_done"],
                        p["pages_total"],
                        p["pages_per_second"],
                        p["eta_seconds"]
                    );
                }
                if !pending {
                    println!("DEK rotation done: {}", names.join(", "));
                    return Ok(std::process::ExitCode::SUCCESS);
                }
            }
        }
        ServerCommand::Revalidate { data } => {
            match atrest_server::control::admin_request(
                &data,
                &serde_json::json!({"op": "revalidate"}),
            ) {
                None => bail!(
                    "the server in {} is not running; start it (it checks its key at start)",
                    data.display()
                ),
                Some(Err(e)) => bail!("{e}"),
                Some(Ok(_)) => {
                    println!("revalidated: the server is Ready");
                    Ok(std::process::ExitCode::SUCCESS)
                }
            }
        }
        ServerCommand::Configure {
            data,
            key_check_interval_ms,
            outage_grace_ms,
            auto_revalidate,
            webhooks,
            clear_webhooks,
            infrastructure_encryption,
        } => {
            let mut config = resource::load_config(&data)?;
            if let Some(want) = infrastructure_encryption {
                let have = config.encryption.infrastructure_encryption;
                bail!(
                    "infrastructure double encryption is fixed at create: this server was created {}, and that cannot be changed{}",
                    if have { "with it" } else { "without it" },
                    if want == have { " (it already is as asked)" } else { "; create a new server and move the data" }
                );
            }
            let _lock = resource::lock(&data)?;
            if let Some(v) = key_check_interval_ms {
                if v == 0 || v > 600_000 {
                    bail!("--key-check-interval-ms must be between 1 and 600000 (Azure checks at least every 10 minutes)");
                }
                config.monitor.interval_ms = v;
            }
            if let Some(v) = outage_grace_ms {
                config.monitor.outage_grace_ms = v;
            }
            if let Some(v) = auto_revalidate {
                config.monitor.auto_revalidate = v;
            }
            if clear_webhooks {
                config.webhooks.clear();
            }
            for w in webhooks {
                if !w.starts_with("http://") && !w.starts_with("https://") {
                    bail!("webhook {w:?} is not an http(s) URL");
                }
                config.webhooks.push(w);
            }
            let dir = data.canonicalize()?;
            config.save(&dir)?;
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"monitor": config.monitor, "webhooks": config.webhooks})
                )?
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        ServerCommand::Role { command } => run_role(command),
        ServerCommand::Backup(args) => run_backup(args),
        ServerCommand::Replica(cmd) => run_replica(cmd),
        ServerCommand::Restore {
            from,
            to_time,
            name,
            data,
            listen,
        } => {
            let to_time_us = to_time
                .as_deref()
                .map(atrest_server::backup::parse_time)
                .transpose()
                .map_err(|e| anyhow::anyhow!(e))?;
            let r = atrest_server::backup::restore(&atrest_server::backup::RestoreOptions {
                from,
                to_time_us,
                name,
                dir: data,
                listen,
            })
            .map_err(|e| anyhow::anyhow!(e))?;
            println!(
                "restored server {} ({}), state {}",
                r.config.name, r.config.server_id, r.state
            );
            println!(
                "  identity:   {} (certificate sha256 {})",
                r.config.identity.client_id, r.config.identity.thumbprint_sha256
            );
            if let Some(step) = r.next_step {
                println!("  next: {step}");
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        ServerCommand::Delete { data, yes } => {
            if !yes {
                bail!("deleting a server destroys its data and service key; repeat with --yes to confirm");
            }
            let name = resource::load_config(&data)?.name;
            if resource::running_pid(&data).is_some() {
                // A running server allows delete only while Inaccessible.
                match atrest_server::control::admin_request(
                    &data,
                    &serde_json::json!({"op": "stop-for-delete"}),
                ) {
                    Some(Ok(_)) => {
                        let deadline =
                            std::time::Instant::now() + std::time::Duration::from_secs(60);
                        while resource::running_pid(&data).is_some() {
                            if std::time::Instant::now() > deadline {
                                bail!("the server did not stop within 60 s");
                            }
                            std::thread::sleep(std::time::Duration::from_millis(50));
                        }
                    }
                    Some(Err(e)) => bail!("{e}"),
                    None => bail!(
                        "the server in {} is running; stop it first (SIGTERM)",
                        data.display()
                    ),
                }
            }
            resource::delete(&data)?;
            println!("deleted server {name}");
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn run_replica(cmd: ReplicaCommand) -> Result<std::process::ExitCode> {
    use atrest_server::replication;
    match cmd {
        ReplicaCommand::Create {
            source,
            source_ca,
            token_file,
            name,
            data,
            listen,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let r = rt
                .block_on(replication::create(&replication::CreateOptions {
                    source,
                    source_ca,
                    token_file,
                    name,
                    dir: data,
                    listen,
                }))
                .map_err(|e| anyhow::anyhow!(e))?;
            let rc = r.config.replica.as_ref().expect("a replica");
            println!(
                "created replica {} ({}) of {} at {}, state {}",
                r.config.name, r.config.server_id, rc.source_name, rc.source, r.state
            );
            if let Some(step) = &r.next_step {
                println!("  next step: {step}");
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        ReplicaCommand::Allow {
            data,
            name,
            token_out,
        } => {
            let token =
                atrest_server::replicas::allow(&data, &name).map_err(|e| anyhow::anyhow!(e))?;
            resource::write_atomic(&token_out, token.as_bytes(), 0o600)?;
            println!(
                "replica {name} may follow {}; its token is in {} (give it to `replica create --token-file`)",
                data.display(),
                token_out.display()
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        ReplicaCommand::Disallow { data, name } => {
            if !atrest_server::replicas::disallow(&data, &name).map_err(|e| anyhow::anyhow!(e))? {
                bail!("no replica named {name} may follow {}", data.display());
            }
            println!(
                "replica {name} may no longer follow {}; the archive segments it held go at the next backup's retention",
                data.display()
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        ReplicaCommand::Promote { data } => {
            match atrest_server::control::admin_request(
                &data,
                &serde_json::json!({"op": "promote"}),
            ) {
                Some(Ok(_)) => println!("promoted {}: it takes writes now", data.display()),
                Some(Err(e)) => bail!("{e}"),
                None => {
                    replication::promote(&data).map_err(|e| anyhow::anyhow!(e))?;
                    println!(
                        "promoted {}: it takes writes from its next start",
                        data.display()
                    );
                }
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
    }
}

fn run_backup(args: BackupArgs) -> Result<std::process::ExitCode> {
    use atrest_server::backup;
    let offline = |data: &std::path::Path| -> Result<_> {
        let dir = data
            .canonicalize()
            .with_context(|| format!("{}", data.display()))?;
        let lock = resource::lock(&dir)?;
        let config = resource::load_config(&dir)?;
        if config.engine == EngineKind::Postgres {
            bail!(
                "the server in {} is not running: a postgres-engine backup is taken online \
                 (PostgreSQL's pg_backup_start); start it first",
                dir.display()
            );
        }
        let databases =
            atrest_server::backup::open_databases(&dir, &config).map_err(|e| anyhow::anyhow!(e))?;
        backup::recover_all(&databases).map_err(|e| anyhow::anyhow!(e))?;
        Ok((dir, lock, config, databases))
    };
    match args.command {
        None => {
            let Some(data) = args.data else {
                bail!("give --data DIR (the server), or a subcommand: list, verify");
            };
            let req = serde_json::json!({"op": "backup"});
            let entry = match atrest_server::control::admin_request(&data, &req) {
                Some(r) => r.map_err(|e| anyhow::anyhow!(e))?["backup"].clone(),
                None => {
                    let (dir, _lock, config, databases) = offline(&data)?;
                    serde_json::to_value(
                        backup::take_backup(&dir, &config, &databases)
                            .map_err(|e| anyhow::anyhow!(e))?,
                    )?
                }
            };
            println!("{}", serde_json::to_string_pretty(&entry)?);
        }
        Some(BackupCommand::List { data }) => {
            let config = resource::load_config(&data)?;
            let dir = data.canonicalize()?;
            let repo = backup::repository(&dir, &config);
            let catalog = backup::load_catalog(&repo).map_err(|e| anyhow::anyhow!(e))?;
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "repository": repo, "backups": catalog
                }))?
            );
        }
        Some(BackupCommand::Verify { data, id }) => {
            let req = serde_json::json!({"op": "backup-verify", "id": id});
            let out = match atrest_server::control::admin_request(&data, &req) {
                Some(r) => r.map_err(|e| anyhow::anyhow!(e))?["verified"].clone(),
                None if resource::load_config(&data)?.engine == EngineKind::Postgres => {
                    let dir = data.canonicalize()?;
                    let _lock = resource::lock(&dir)?;
                    let config = resource::load_config(&dir)?;
                    let tree = atrest_server::postgres::offline_tree(&dir, &config)
                        .map_err(|e| anyhow::anyhow!(e))?;
                    let repo = backup::repository(&dir, &config);
                    serde_json::to_value(
                        atrest_server::postgres::backup::verify_all(&tree, &repo, id.as_deref())
                            .map_err(|e| anyhow::anyhow!(e))?,
                    )?
                }
                None => {
                    let (dir, _lock, config, databases) = offline(&data)?;
                    let repo = backup::repository(&dir, &config);
                    serde_json::to_value(
                        backup::verify_all(databases.engine(), &repo, id.as_deref())
                            .map_err(|e| anyhow::anyhow!(e))?,
                    )?
                }
            };
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs a key operation on the running server (admin socket), or, when
/// none runs, on the stopped server directly.
fn key_op(data: &std::path::Path, req: serde_json::Value) -> Result<serde_json::Value> {
    if let Some(r) = atrest_server::control::admin_request(data, &req) {
        return r.map_err(|e| anyhow::anyhow!(e));
    }
    let dir = data
        .canonicalize()
        .with_context(|| format!("{}", data.display()))?;
    let _lock = resource::lock(&dir)?;
    let mut config = resource::load_config(&dir)?;
    let target = atrest_server::control::parse_target(&req).map_err(|e| anyhow::anyhow!(e))?;
    let (report, _) = match config.engine {
        EngineKind::Postgres => {
            let tree = atrest_server::postgres::StoppedTree::open(&dir, &config)
                .map_err(|e| anyhow::anyhow!(e))?;
            atrest_server::keys::switch(&dir, &mut config, &tree, target)
        }
        EngineKind::Sqlite => {
            let databases = atrest_server::backup::open_databases(&dir, &config)
                .map_err(|e| anyhow::anyhow!(e))?;
            atrest_server::keys::switch(&dir, &mut config, &databases, target)
        }
    }
    .map_err(|e| anyhow::anyhow!(e))?;
    Ok(serde_json::json!({"ok": true, "report": report}))
}
