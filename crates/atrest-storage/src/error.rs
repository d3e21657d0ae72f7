use atrest_crypto::{CryptoError, ProtectorError};
use atrest_keystore::KeystoreError;
use thiserror::Error;

/// Everything the storage engine can report. Each message names the file
/// (and page or unit) and what to do; none contains key material.
#[derive(Debug, Error)]
pub enum StorageError {
    #[error("{unit} of {path} failed authentication: its bytes were changed, moved from another place or file, or sealed under another key. The file is damaged or was tampered with; restore it from a backup")]
    Tampered { path: String, unit: String },
    #[error("{unit} of {path} is from an older generation of the WAL although frames up to {durable} were committed: the WAL was rolled back or replayed; restore it from a backup")]
    Replayed {
        path: String,
        unit: String,
        durable: u64,
    },
    #[error("{path} has no valid atrest header: {reason}")]
    Header { path: String, reason: String },
    #[error("{path}: cannot get its data encryption key: {source}")]
    Key {
        path: String,
        #[source]
        source: ProtectorError,
    },
    #[error("{path}: cannot get its infrastructure-layer key: {source}")]
    InfraKey {
        path: String,
        #[source]
        source: ProtectorError,
    },
    #[error("{path} is protected by the {file} layer(s), but this data directory uses {data_dir}: the file comes from another data directory or was altered; restore it from a backup of this one")]
    Layers {
        path: String,
        file: String,
        data_dir: String,
    },
    #[error("data directory {path} was created with infrastructure double encryption {recorded}; it is fixed at create and cannot be turned {requested} (create a new data directory and copy the data into it)")]
    InfraFixedAtCreate {
        path: String,
        recorded: &'static str,
        requested: &'static str,
    },
    #[error("{path}: {source}")]
    Crypto {
        path: String,
        #[source]
        source: CryptoError,
    },
    #[error("{path}: page {page} has {have} reserved bytes but atrest needs {need} for nonce and tag; open databases through atrest (it sets the reserve before the first write)")]
    Reserve {
        path: String,
        page: u64,
        have: u8,
        need: usize,
    },
    #[error("{path}: unsupported access: {what}")]
    Unsupported { path: String, what: String },
    #[error("{path}: I/O error (SQLite code {code})")]
    Io { path: String, code: i32 },
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    #[error("data directory {path}: {reason}")]
    DataDir { path: String, reason: String },
    /// An ordinary SQL error (syntax, constraint, ...).
    #[error("{0}")]
    Sqlite(rusqlite::Error),
}

/// The last component of a path: what a SQL client is told instead of
/// where the server keeps its files.
fn file_label(path: &str) -> String {
    std::path::Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "a file".into())
}

impl StorageError {
    /// The same error with every path cut to its file name (`sales.db`,
    /// `sales.db-wal`), for SQL clients: they learn which database's file
    /// failed, not the server's directory layout. Logs keep the full error.
    pub fn redacted(self) -> Self {
        use StorageError as E;
        match self {
            E::Tampered { path, unit } => E::Tampered {
                path: file_label(&path),
                unit,
            },
            E::Replayed {
                path,
                unit,
                durable,
            } => E::Replayed {
                path: file_label(&path),
                unit,
                durable,
            },
            E::Header { path, reason } => E::Header {
                path: file_label(&path),
                reason,
            },
            E::Key { path, source } => E::Key {
                path: file_label(&path),
                source,
            },
            E::InfraKey { path, source } => E::InfraKey {
                path: file_label(&path),
                source,
            },
            E::Layers {
                path,
                file,
                data_dir,
            } => E::Layers {
                path: file_label(&path),
                file,
                data_dir,
            },
            E::InfraFixedAtCreate {
                path,
                recorded,
                requested,
            } => E::InfraFixedAtCreate {
                path: file_label(&path),
                recorded,
                requested,
            },
            E::Crypto { path, source } => E::Crypto {
                path: file_label(&path),
                source,
            },
            E::Reserve {
                path,
                page,
                have,
                need,
            } => E::Reserve {
                path: file_label(&path),
                page,
                have,
                need,
            },
            E::Unsupported { path, what } => E::Unsupported {
                path: file_label(&path),
                what,
            },
            E::Io { path, code } => E::Io {
                path: file_label(&path),
                code,
            },
            E::DataDir { path, reason } => E::DataDir {
                path: file_label(&path),
                reason,
            },
            // The keystore's errors name its directory: say what failed only.
            E::Keystore(_) => E::DataDir {
                path: "service keystore".into(),
                reason: "the service key could not be read (the server log names the file)".into(),
            },
            E::Sqlite(e) => E::Sqlite(e),
        }
    }

    /// Turns a SQLite error into the detailed error the VFS recorded for it
    /// on this thread, if there is one.
    pub fn from_sqlite(err: rusqlite::Error) -> Self {
        let io_like = matches!(
            err.sqlite_error_code(),
            Some(rusqlite::ErrorCode::SystemIoFailure)
                | Some(rusqlite::ErrorCode::CannotOpen)
                | Some(rusqlite::ErrorCode::DatabaseCorrupt)
                | Some(rusqlite::ErrorCode::NotADatabase)
        );
        if io_like {
            let rc = match &err {
                rusqlite::Error::SqliteFailure(e, _) => e.extended_code,
                _ => 0,
            };
            if let Some(detail) = crate::take_last_error(rc) {
                return detail;
            }
        }
        StorageError::Sqlite(err)
    }
}

impl From<rusqlite::Error> for StorageError {
    fn from(err: rusqlite::Error) -> Self {
        Self::from_sqlite(err)
    }
}
