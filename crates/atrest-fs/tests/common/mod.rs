#![allow(dead_code)]
use std::path::Path;

use atrest_fs::RootKey;
use atrest_keystore::Keystore;

/// A fresh keystore with one service key, and a new tree in `dir`.
pub fn new_tree(ks_dir: &Path, dir: &Path) -> (atrest_keystore::ServiceProtector, RootKey) {
    let ks = Keystore::open(ks_dir).unwrap();
    let id = ks.create_service_key().unwrap();
    let p = ks.service_protector(id).unwrap();
    let root = RootKey::create(dir, &p).unwrap();
    (p, root)
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
