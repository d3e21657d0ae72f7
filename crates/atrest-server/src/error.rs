//! Errors as clients see them: a PostgreSQL SQLSTATE, a message that says
//! what failed, and where useful a hint that says how to fix it.

use atrest_storage::StorageError;
use pgwire::messages::response::ErrorResponse;
use rusqlite::ffi;

/// An error sent to a client (ErrorResponse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// ERROR or FATAL.
    pub severity: &'static str,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl PgError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity: "ERROR",
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            severity: "FATAL",
            ..PgError::new(code, message)
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn is_fatal(&self) -> bool {
        self.severity == "FATAL"
    }

    pub fn to_response(&self) -> ErrorResponse {
        let mut fields = vec![
            (b'S', self.severity.to_string()),
            (b'V', self.severity.to_string()),
            (b'C', self.code.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(d) = &self.detail {
            fields.push((b'D', d.clone()));
        }
        if let Some(h) = &self.hint {
            fields.push((b'H', h.clone()));
        }
        ErrorResponse::new(fields)
    }

    /// The SQLSTATE class (first two characters), for metrics.
    pub fn class(&self) -> &'static str {
        &self.code[..2]
    }

    pub fn syntax(msg: impl Into<String>) -> Self {
        PgError::new("42601", msg)
    }

    pub fn protocol(msg: impl Into<String>) -> Self {
        PgError::new("08P01", msg)
    }

    pub fn in_failed_transaction() -> Self {
        PgError::new(
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block",
        )
        .hint("Send ROLLBACK (or ROLLBACK TO SAVEPOINT) to continue.")
    }
}

impl From<crate::types::TypeError> for PgError {
    fn from(e: crate::types::TypeError) -> Self {
        PgError::new(e.code, e.message)
    }
}

impl From<crate::sql::LexError> for PgError {
    fn from(e: crate::sql::LexError) -> Self {
        PgError::syntax(e.to_string())
    }
}

/// Maps a SQLite failure (through the engine, which adds what the
/// encryption layer knows) to a SQLSTATE.
pub fn from_sqlite(err: rusqlite::Error) -> PgError {
    storage_error(StorageError::from_sqlite(err))
}

/// Maps an engine error to a SQLSTATE, keeping its message (which names
/// the file and what to do, never key material).
pub fn storage_error(e: StorageError) -> PgError {
    let e = match e {
        StorageError::Sqlite(inner) => return from_plain_sqlite(inner),
        other => other,
    };
    let code = match &e {
        StorageError::Sqlite(_) => "XX000",
        StorageError::Tampered { .. }
        | StorageError::Replayed { .. }
        | StorageError::Header { .. }
        | StorageError::Layers { .. } => "XX001",
        StorageError::InfraFixedAtCreate { .. } => "55000",
        StorageError::Key { .. } | StorageError::InfraKey { .. } | StorageError::Keystore(_) => {
            "58000"
        }
        StorageError::Crypto { .. } => "XX000",
        StorageError::Reserve { .. } | StorageError::Unsupported { .. } => "0A000",
        StorageError::Io { .. } => "58030",
        StorageError::DataDir { .. } => "58P01",
    };
    // The whole story (paths included) for the operator; the client gets
    // the file's name only.
    tracing::warn!(error = %e, "storage error");
    let err = PgError::new(code, e.redacted().to_string());
    if code == "58000" {
        err.hint(
            "The server cannot get a data encryption key; its log names the keystore or key vault.",
        )
    } else {
        err
    }
}

fn from_plain_sqlite(e: rusqlite::Error) -> PgError {
    let (code, extended, text) = match &e {
        rusqlite::Error::SqliteFailure(f, msg) => (
            f.code,
            f.extended_code,
            msg.clone().unwrap_or_else(|| f.to_string()),
        ),
        rusqlite::Error::SqlInputError {
            error, msg, offset, ..
        } => (
            error.code,
            error.extended_code,
            format!("{msg} (at byte {offset} of the statement)"),
        ),
        rusqlite::Error::InvalidParameterCount(got, want) => {
            return PgError::protocol(format!(
                "bind message supplies {got} parameters, but the statement requires {want}"
            ))
        }
        rusqlite::Error::MultipleStatement => {
            return PgError::syntax("cannot insert multiple commands into a prepared statement")
        }
        other => return PgError::new("XX000", other.to_string()),
    };
    use rusqlite::ErrorCode as C;
    let pg = match code {
        C::ConstraintViolation => match extended {
            ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY => {
                PgError::new("23505", format!("duplicate key value violates unique constraint: {text}"))
            }
            ffi::SQLITE_CONSTRAINT_NOTNULL => {
                PgError::new("23502", format!("null value violates not-null constraint: {text}"))
            }
            ffi::SQLITE_CONSTRAINT_FOREIGNKEY => PgError::new("23503", text),
            ffi::SQLITE_CONSTRAINT_CHECK => PgError::new("23514", text),
            _ => PgError::new("23000", text),
        },
        C::DatabaseBusy | C::DatabaseLocked => {
            if extended == ffi::SQLITE_BUSY_SNAPSHOT {
                PgError::new(
                    "40001",
                    "could not serialize access: another transaction committed a write after this transaction's first read",
                )
                .hint("Retry the transaction; start with the write, or keep read-then-write transactions short.")
            } else {
                PgError::new("55P03", format!("could not obtain lock: {text}"))
                    .hint("Another session holds the database; retry, or raise lock_timeout.")
            }
        }
        C::OperationInterrupted => PgError::new("57014", "canceling statement due to user request"),
        C::ReadOnly => PgError::new("25006", format!("cannot write: {text}")),
        C::DiskFull => PgError::new("53100", format!("could not write: disk full ({text})"))
            .hint("Free space on the data directory's file system; the failed statement was rolled back and committed data is intact."),
        C::TooBig => PgError::new("54000", text),
        C::OutOfMemory => PgError::new("53200", "out of memory"),
        C::AuthorizationForStatementDenied => PgError::new("42501", format!("permission denied: {text}")),
        C::TypeMismatch => PgError::new("42804", text),
        C::ParameterOutOfRange => PgError::protocol(text),
        C::DatabaseCorrupt | C::NotADatabase => PgError::new("XX001", text),
        C::SystemIoFailure => PgError::new("58030", text),
        C::ApiMisuse => PgError::new("XX000", text),
        _ => {
            let lower = text.to_ascii_lowercase();
            if lower.contains("syntax error") || lower.contains("incomplete input") || lower.contains("unrecognized token") {
                PgError::syntax(text)
            } else if lower.starts_with("no such table") || lower.starts_with("no such view") {
                PgError::new("42P01", text)
            } else if lower.starts_with("no such column") {
                PgError::new("42703", text)
            } else if lower.starts_with("no such function") || lower.contains("wrong number of arguments") {
                PgError::new("42883", text)
            } else if lower.contains("already exists") {
                PgError::new("42P07", text)
            } else if lower.contains("no such savepoint") {
                PgError::new("3B001", text)
            } else if lower.contains("division by zero") {
                PgError::new("22012", text)
            } else if lower.contains("ambiguous column") {
                PgError::new("42702", text)
            } else {
                PgError::new("42000", text)
            }
        }
    };
    pg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(sql: &str) -> PgError {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        c.execute_batch(
            "CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT NOT NULL, c INT CHECK (c > 0));",
        )
        .unwrap();
        c.execute("INSERT INTO t VALUES (1, 'x', 1)", []).unwrap();
        from_sqlite(c.execute_batch(sql).unwrap_err())
    }

    #[test]
    fn sqlite_errors_get_postgres_sqlstates() {
        assert_eq!(run("INSERT INTO t VALUES (1, 'y', 1)").code, "23505");
        assert_eq!(run("INSERT INTO t VALUES (2, NULL, 1)").code, "23502");
        assert_eq!(run("INSERT INTO t VALUES (3, 'z', 0)").code, "23514");
        assert_eq!(run("SELEC 1").code, "42601");
        assert_eq!(run("SELECT * FROM nope").code, "42P01");
        assert_eq!(run("SELECT nope FROM t").code, "42703");
        assert_eq!(run("SELECT nope(1)").code, "42883");
        assert_eq!(run("CREATE TABLE t(x)").code, "42P07");
        assert_eq!(run("ROLLBACK TO nope").code, "3B001");
    }

    #[test]
    fn responses_carry_severity_code_message_and_hint() {
        let e = PgError::in_failed_transaction();
        let r = e.to_response();
        assert!(r.fields.contains(&(b'C', "25P02".into())));
        assert!(r
            .fields
            .iter()
            .any(|(k, v)| *k == b'H' && v.contains("ROLLBACK")));
        assert!(r.fields.contains(&(b'S', "ERROR".into())));
    }
}
