#![allow(dead_code)]
use std::path::Path;

use atrest_fs::RootKey;
use atrest_keystore::{InfraKeystore, Keystore};

/// A fresh keystore with one service key, and a new tree in `dir`.
pub fn new_tree(ks_dir: &Path, dir: &Path) -> (atrest_keystore::ServiceProtector, RootKey) {
    let (p, root, _) = new_tree_with(ks_dir, dir, false);
    (p, root)
}

/// As [`new_tree`], with the infrastructure layer when `infra` (its own
/// keystore in `ks_dir`-infra, returned).
pub fn new_tree_with(
    ks_dir: &Path,
    dir: &Path,
    infra: bool,
) -> (
    atrest_keystore::ServiceProtector,
    RootKey,
    Option<InfraKeystore>,
) {
    let ks = Keystore::open(ks_dir).unwrap();
    let id = ks.create_service_key().unwrap();
    let p = ks.service_protector(id).unwrap();
    let iks = infra.then(|| InfraKeystore::open(ks_dir.with_extension("infra")).unwrap());
    let root = RootKey::create(dir, &p, iks.as_ref()).unwrap();
    (p, root, iks)
}

/// Deterministic pseudo-random bytes.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
