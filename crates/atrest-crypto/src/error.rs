use thiserror::Error;

/// Errors from sealing, opening, wrapping and header parsing.
///
/// Messages never include key material or plaintext.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CryptoError {
    /// The AEAD tag did not verify: the bytes were altered, moved from
    /// another place, or sealed under another key.
    #[error("authentication failed")]
    AuthenticationFailed,
    /// A buffer was too small to hold a sealed unit.
    #[error("sealed unit of {len} bytes is shorter than the {min} bytes of nonce and tag")]
    UnitTooShort { len: usize, min: usize },
    /// The random number generator or the cipher reported a failure.
    #[error("the cryptographic library failed: {0}")]
    Library(&'static str),
    /// The header is not an atrest header or is damaged.
    #[error("invalid file header: {0}")]
    InvalidHeader(String),
    /// The header is an atrest header in a format this build does not
    /// read (a newer one, or a retired pre-release one).
    #[error("unsupported file format: {0}")]
    UnsupportedFormat(String),
    /// The header parsed but its MAC does not verify under the file's DEK.
    #[error("file header authentication failed (header was modified or belongs to another key)")]
    HeaderAuthenticationFailed,
    /// An infrastructure-layer key instance made before this process
    /// forked was asked to seal in the child: its nonce counter is a copy
    /// of the parent's, so it refuses (reopen the file in the child).
    #[error("infrastructure-layer key was created before this process forked; it does not seal in the child (reopen the file)")]
    UsedAfterFork,
    /// The per-key usage limit from docs/CRYPTO.md was reached.
    #[error(
        "data encryption key {dek_id} has sealed {count} units, its limit; rotate the file's DEK"
    )]
    UsageLimitReached { dek_id: String, count: u64 },
}
