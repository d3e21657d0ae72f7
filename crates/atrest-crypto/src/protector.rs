//! The key-protector abstraction: whatever holds a key-encryption key
//! (the local service keystore, or a customer key in the vault) wraps and
//! unwraps DEKs through this one trait, so the storage code never knows
//! which kind it talks to.

use std::fmt;

use thiserror::Error;

use crate::{Dek, DekId};

/// Who holds the KEK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ProtectorKind {
    /// The service-managed key in the local keystore (always available).
    Service = 1,
    /// A customer-managed RSA key in the key vault.
    CustomerVault = 2,
    /// The infrastructure master key of the second layer (its own keystore).
    Infrastructure = 3,
}

impl ProtectorKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Service),
            2 => Some(Self::CustomerVault),
            3 => Some(Self::Infrastructure),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Service => "service-managed",
            Self::CustomerVault => "customer-managed",
            Self::Infrastructure => "infrastructure",
        }
    }
}

/// How the DEK was wrapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum WrapAlgorithm {
    /// AES-256-GCM with a random nonce (service key, parent keys).
    A256Gcm = 1,
    /// RSA-OAEP with SHA-256 (customer keys in the vault).
    RsaOaep256 = 2,
    // 3 was XChaCha20-Poly1305 (infrastructure layer of pre-release builds,
    // header format 2); it is not reused.
    /// AEGIS-256 (libaegis) with a random 256-bit nonce and a 128-bit tag
    /// (infrastructure layer).
    Aegis256 = 4,
}

impl WrapAlgorithm {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::A256Gcm),
            2 => Some(Self::RsaOaep256),
            4 => Some(Self::Aegis256),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::A256Gcm => "A256GCM",
            Self::RsaOaep256 => "RSA-OAEP-256",
            Self::Aegis256 => "AEGIS-256",
        }
    }
}

/// Names one KEK (and version) without revealing anything secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KekRef {
    pub kind: ProtectorKind,
    /// `service:<hex id>` for the service key; the full key URL with
    /// version for a vault key.
    pub key_id: String,
}

impl fmt::Display for KekRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} key {}", self.kind.name(), self.key_id)
    }
}

/// A DEK as stored in a file header: only ever in wrapped form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedDek {
    pub kek: KekRef,
    pub algorithm: WrapAlgorithm,
    pub bytes: Vec<u8>,
}

/// Why a protector could not wrap or unwrap. Messages say what to fix.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtectorError {
    #[error("{kek} was not found{where_}: {hint}", where_ = if .location.is_empty() { String::new() } else { format!(" in {}", .location) })]
    KeyNotFound {
        kek: KekRef,
        location: String,
        hint: String,
    },
    #[error("{kek} could not unwrap the data encryption key: the key present is not the one that wrapped it ({hint})")]
    WrongKey { kek: KekRef, hint: String },
    #[error("access to {kek} was refused: {reason}")]
    Denied { kek: KekRef, reason: String },
    #[error("{kek} is unreachable: {reason}")]
    Unavailable { kek: KekRef, reason: String },
    #[error("this protector holds {have}, but the file needs {want}")]
    NotMine { have: String, want: KekRef },
    #[error("key protector failure: {0}")]
    Other(String),
}

/// Wraps and unwraps DEKs under one KEK.
pub trait KeyProtector: Send + Sync + fmt::Debug {
    /// The KEK new DEKs are wrapped with.
    fn current_kek(&self) -> KekRef;
    /// Wraps `dek` under the current KEK.
    fn wrap(&self, dek: &Dek) -> Result<WrappedDek, ProtectorError>;
    /// Unwraps a DEK that names `dek_id`; fails if `wrapped` names a KEK
    /// this protector cannot use.
    fn unwrap(&self, dek_id: DekId, wrapped: &WrappedDek) -> Result<Dek, ProtectorError>;
}

/// Wraps with one KEK and unwraps with any of several: what a server uses
/// while it moves its DEKs from one KEK to another (service key to customer
/// key, one key version to the next). Files not yet rewrapped stay readable
/// as long as their old KEK is; once every file is rewrapped the old
/// protectors are never asked again.
#[derive(Debug)]
pub struct RoutingProtector {
    current: std::sync::Arc<dyn KeyProtector>,
    previous: Vec<std::sync::Arc<dyn KeyProtector>>,
}

impl RoutingProtector {
    pub fn new(
        current: std::sync::Arc<dyn KeyProtector>,
        previous: Vec<std::sync::Arc<dyn KeyProtector>>,
    ) -> Self {
        RoutingProtector { current, previous }
    }
}

impl KeyProtector for RoutingProtector {
    fn current_kek(&self) -> KekRef {
        self.current.current_kek()
    }

    fn wrap(&self, dek: &Dek) -> Result<WrappedDek, ProtectorError> {
        self.current.wrap(dek)
    }

    fn unwrap(&self, dek_id: DekId, wrapped: &WrappedDek) -> Result<Dek, ProtectorError> {
        let mut last = None;
        for p in std::iter::once(&self.current).chain(self.previous.iter()) {
            match p.unwrap(dek_id, wrapped) {
                Err(e @ ProtectorError::NotMine { .. }) => last = Some(e),
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| ProtectorError::Other("no protector".into())))
    }
}
