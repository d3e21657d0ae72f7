//! The `atrest` command.
//!
//! One binary, one subcommand per job. Each subcommand lives in its own
//! module (or crate) and this file only dispatches.

#![forbid(unsafe_code)]

mod cli_bench;
mod cli_bench_cmk;
mod cli_bench_pgbench;
mod cli_bench_postgres;
mod cli_bench_postgres_cmk;
mod cli_bench_replication;
mod cli_inspect;
mod cli_server;
mod cli_sql;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "atrest",
    version,
    about = "Encryption at rest for database servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run SQL against the encrypted database in a data directory.
    Sql(cli_sql::SqlArgs),
    /// Print an atrest file's header as JSON (no key material).
    Inspect(cli_inspect::InspectArgs),
    /// Benchmarks (JSON plus summary lines on standard output).
    Bench(cli_bench::BenchArgs),
    /// Run and administer the key vault (Azure Key Vault-compatible keys API).
    Vault(atrest_vault::cli::VaultArgs),
    /// Create, run and delete a database server (PostgreSQL protocol).
    Server(cli_server::ServerArgs),
}

/// Keys, and plaintext pages and rows, live in this process's memory: no
/// core dump may hold them. The process is made non-dumpable (the kernel
/// writes no core for it, and other users cannot attach to it), and its
/// core size limit is 0, soft and hard, which every program it starts
/// inherits (PostgreSQL's backends hold plaintext pages too).
fn no_core_dumps() {
    use rustix::process::{set_dumpable_behavior, setrlimit, DumpableBehavior, Resource, Rlimit};
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        eprintln!(
            "warning: cannot make this process non-dumpable ({e}): a core dump could hold keys"
        );
    }
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = setrlimit(Resource::Core, none) {
        eprintln!("warning: cannot set the core size limit to 0 ({e})");
    }
}

fn main() -> std::process::ExitCode {
    no_core_dumps();
    let cli = Cli::parse();
    // A server says what it does (where it listens, state changes) by default.
    init_logging(if matches!(cli.command, Command::Server(_)) {
        "info"
    } else {
        "warn"
    });
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<std::process::ExitCode> {
    match cli.command {
        Command::Sql(args) => cli_sql::run(args),
        Command::Vault(args) => Ok(atrest_vault::cli::run(args)?),
        Command::Inspect(args) => cli_inspect::run(args),
        Command::Bench(args) => cli_bench::run(args),
        Command::Server(args) => cli_server::run(args),
    }
}

/// Logs go to stderr, filtered by `ATREST_LOG` (default: `default`).
fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("ATREST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
