//! atrest-fs: an encrypting filesystem in user space (FUSE) for database
//! servers that cannot be changed to encrypt their own pages (PostgreSQL,
//! MariaDB).
//!
//! A mount shows the plaintext view of a directory of sealed files. Every
//! file there has the authenticated header the SQLite engine's files have
//! (file id, DEK id, the wrapped DEK, the KEK reference) and its content
//! in units of 8 KiB sealed with AES-256-GCM from aws-lc-rs, bound to the
//! file id, unit index, DEK id, length and a per-file sequence number.
//! Names, sizes, times and the tree's shape are not hidden.
//!
//! What it is not: a general-purpose filesystem. Hard links, special
//! files and extended attributes are refused; one process owns a tree.
//! It needs no `unsafe`: the FUSE protocol is `fuser`'s safe API.

#![forbid(unsafe_code)]

pub mod file;
pub mod fs;
pub mod keys;
pub mod layout;

pub use file::CryptFile;
pub use fs::{
    mount, AtrestFs, FileRekey, MountOptions, Mounted, RotationMark, SlotPolicy, Stats, Tree,
    ROTATION_FILE,
};
pub use keys::{infra_key_of, RootKey, ROOT_FILE};

use thiserror::Error;

/// Why a filesystem operation failed. Messages name the file and unit.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum FsError {
    /// A unit or header that does not authenticate, or a file cut short.
    #[error("{file}: {what}; the file was changed outside atrest (restore it from a backup)")]
    Tampered { file: String, what: String },
    /// An OS-level failure on the ciphertext file.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Crypto(#[from] atrest_crypto::CryptoError),
    /// The KEK could not unwrap (or wrap) the tree's root key.
    #[error("the tree's root key: {0}")]
    Key(atrest_crypto::ProtectorError),
    /// The infrastructure layer's keystore or master key.
    #[error("the infrastructure layer: {0}")]
    Infra(#[from] atrest_keystore::KeystoreError),
    /// The infrastructure master key could not unwrap (or wrap) a key.
    #[error("the infrastructure layer's key: {0}")]
    InfraKey(atrest_crypto::ProtectorError),
    /// The layers of a file or tree differ from what was asked for.
    #[error("encryption layers: {0}")]
    Layers(String),
    #[error("invalid header: {0}")]
    Header(String),
    /// A file wrapped by another tree's root key.
    #[error("the file belongs to another atrest-fs tree")]
    ForeignFile,
    #[error("{0} is not an atrest-fs ciphertext directory (no {ROOT_FILE}); create the server with atrest")]
    NotATree(String),
    #[error("mount failed: {0}")]
    Mount(String),
}

impl FsError {
    pub(crate) fn io(what: String, source: std::io::Error) -> Self {
        FsError::Io { what, source }
    }

    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Io { source, .. } => source.raw_os_error().unwrap_or(libc_eio()),
            _ => libc_eio(),
        }
    }
}

fn libc_eio() -> i32 {
    rustix::io::Errno::IO.raw_os_error()
}

/// Moves this process into its own mount namespace whose mounts do not
/// propagate to the host's, so a mount made afterwards (and the plaintext
/// view it shows) is seen only by this process and the children it starts.
///
/// Call it while the process has one thread: a namespace change applies to
/// the calling thread only.
pub fn private_mount_namespace() -> Result<(), FsError> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1);
    if threads != 1 {
        return Err(FsError::Mount(format!(
            "a private mount namespace must be entered before threads start ({threads} running)"
        )));
    }
    // `unshare_unsafe` is the new name of this call; it is unsafe because
    // of the flags that split the file-descriptor table or the fs context
    // between threads. With one thread and only CLONE_NEWNS neither
    // matters, so the safe (deprecated) spelling is used.
    #[allow(deprecated)]
    rustix::thread::unshare(rustix::thread::UnshareFlags::NEWNS).map_err(|e| {
        FsError::Mount(format!(
            "entering a private mount namespace failed: {e} (atrest runs the postgres engine as root)"
        ))
    })?;
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::PRIVATE | rustix::mount::MountPropagationFlags::REC,
    )
    .map_err(|e| FsError::Mount(format!("making the mount namespace private failed: {e}")))
}
