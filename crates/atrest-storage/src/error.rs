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

impl StorageError {
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
