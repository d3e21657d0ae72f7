//! The cryptographic core of atrest: sealing units (pages, WAL frames,
//! blocks) under per-file data encryption keys, wrapping those keys, and the
//! authenticated, self-describing header every atrest file starts with.
//!
//! This crate does no I/O. It decides *what* bytes go to disk and checks
//! what comes back; the storage crate decides *where*. Every primitive of the
//! data layer comes from aws-lc-rs (the `fips` feature switches to the FIPS
//! 140-3 module); the infrastructure layer ([`InfraUnitKey`], [`InfraKek`])
//! deliberately uses another algorithm and implementation: AEGIS-256 from
//! libaegis (C), through the `aegis` crate.
//!
//! What it is not: a key store (see `atrest-keystore`), a VFS (see
//! `atrest-storage`), or a general-purpose crypto toolkit.

#![forbid(unsafe_code)]

mod error;
mod header;
mod infra;
mod keys;
mod protector;
mod seal;
mod wrap;

pub use error::CryptoError;
pub use header::{
    FileHeader, FileKind, FsLayout, InfraKeyRecord, KeySource, Layers, Rotation, UnverifiedHeader,
    HEADER_SLOT_SIZE,
};
pub use infra::{
    note_fork_in_child, os_random, InfraDek, InfraKek, InfraUnitCipher, InfraUnitKey,
    INFRA_CIPHER_ID, INFRA_CIPHER_NAME, INFRA_IMPLEMENTATION, INFRA_NONCE_LEN, INFRA_OVERHEAD,
    INFRA_TAG_LEN, INFRA_WRAPPED_LEN, NONCE_COUNTER_LIMIT, NONCE_PREFIX_LEN, NONCE_PREFIX_REFRESH,
};
pub use keys::{random_id, Dek, DekId, FileId};
pub use protector::{
    KekRef, KeyProtector, ProtectorError, ProtectorKind, RoutingProtector, WrapAlgorithm,
    WrappedDek,
};
pub use seal::{CipherId, SealContext, UnitKey, SEAL_OVERHEAD, SEAL_USAGE_LIMIT, SEAL_USAGE_WARN};
pub use wrap::SymmetricKek;

/// Whether this build uses the FIPS 140-3 validated AWS-LC module.
pub fn fips_mode() -> bool {
    aws_lc_rs::try_fips_mode().is_ok()
}

#[cfg(test)]
mod tests {
    /// With `--features fips` the validated module must really be in use.
    #[cfg(feature = "fips")]
    #[test]
    fn fips_module_is_active() {
        assert!(
            super::fips_mode(),
            "built with the fips feature but AWS-LC is not in FIPS mode"
        );
    }

    #[cfg(not(feature = "fips"))]
    #[test]
    fn default_build_reports_non_fips() {
        assert!(!super::fips_mode());
    }
}
