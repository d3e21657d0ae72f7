//! `atrest sql`: run SQL against an encrypted database, sqlite3-shell style.

use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use atrest_storage::{Engine, EngineOptions, StorageError};
use fallible_iterator::FallibleIterator;
use rusqlite::types::ValueRef;

#[derive(clap::Args)]
pub struct SqlArgs {
    /// Data directory (created, with its service key, on first use).
    #[arg(long)]
    pub data: PathBuf,
    /// Keystore holding the service key [default: $ATREST_KEYSTORE or ~/.local/share/atrest/keystore].
    #[arg(long, env = "ATREST_KEYSTORE")]
    pub keystore: Option<PathBuf>,
    /// Infrastructure keystore (infrastructure double encryption) [default: $ATREST_INFRA_KEYSTORE or ~/.local/share/atrest/infra-keystore].
    #[arg(long, env = "ATREST_INFRA_KEYSTORE")]
    pub infra_keystore: Option<PathBuf>,
    /// Create the data directory with infrastructure double encryption (a
    /// second, independent layer). Fixed at create: refused for an existing
    /// data directory created without it.
    #[arg(long)]
    pub infrastructure_encryption: bool,
    /// Database name inside the data directory.
    #[arg(long, default_value = "main")]
    pub database: String,
    /// SQL to run; read from standard input when absent.
    #[arg(short = 'c')]
    pub command: Option<String>,
}

pub fn run(args: SqlArgs) -> Result<std::process::ExitCode> {
    let sql = match args.command {
        Some(sql) => sql,
        None => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading SQL from standard input")?;
            s
        }
    };
    let engine = Engine::open(&EngineOptions {
        data_dir: args.data,
        keystore_dir: args.keystore,
        infrastructure_encryption: args.infrastructure_encryption.then_some(true),
        infra_keystore_dir: args.infra_keystore,
    })?;
    let conn = engine.connect(&args.database)?;
    // New databases start in WAL mode: readers never block the writer.
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(StorageError::from_sqlite)?;
    if mode != "wal" && is_empty(&conn)? {
        conn.pragma_update(None, "journal_mode", "wal")
            .map_err(StorageError::from_sqlite)?;
    }
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = run_batch(&conn, &sql, &mut out);
    out.flush()?;
    result?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn is_empty(conn: &rusqlite::Connection) -> Result<bool> {
    let n: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
        .map_err(StorageError::from_sqlite)?;
    Ok(n == 0)
}

/// Runs every statement of `sql`, printing rows as `a|b|c` lines.
fn run_batch(conn: &rusqlite::Connection, sql: &str, out: &mut impl Write) -> Result<()> {
    let mut batch = rusqlite::Batch::new(conn, sql);
    while let Some(mut stmt) = batch.next().map_err(StorageError::from_sqlite)? {
        let columns = stmt.column_count();
        let mut rows = stmt.raw_query();
        while let Some(row) = rows.next().map_err(StorageError::from_sqlite)? {
            for i in 0..columns {
                if i > 0 {
                    out.write_all(b"|")?;
                }
                match row.get_ref(i).map_err(StorageError::from_sqlite)? {
                    ValueRef::Null => {}
                    ValueRef::Integer(v) => write!(out, "{v}")?,
                    ValueRef::Real(v) => write!(out, "{}", format_real(v))?,
                    ValueRef::Text(t) => out.write_all(t)?,
                    ValueRef::Blob(b) => out.write_all(b)?,
                }
            }
            out.write_all(b"\n")?;
        }
    }
    Ok(())
}

/// Reals as the sqlite3 shell prints them: integral values keep ".0".
fn format_real(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::format_real;

    #[test]
    fn reals_print_like_the_sqlite_shell() {
        assert_eq!(format_real(1.0), "1.0");
        assert_eq!(format_real(2.5), "2.5");
        assert_eq!(format_real(-0.125), "-0.125");
    }
}
