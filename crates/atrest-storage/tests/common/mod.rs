//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use atrest_storage::{Engine, EngineOptions};

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub opts: EngineOptions,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let opts = EngineOptions {
            data_dir: dir.path().join("data"),
            keystore_dir: Some(dir.path().join("keystore")),
        };
        Self { dir, opts }
    }

    pub fn engine(&self) -> Engine {
        Engine::open(&self.opts).unwrap()
    }

    pub fn data(&self) -> PathBuf {
        self.opts.data_dir.clone()
    }
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if p.is_file() {
            out.push(p);
        }
    }
    out
}

/// Offsets of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Files this process has open under the temp dir, read through
/// /proc/self/fd (temp files are unlinked as soon as they are opened).
pub fn open_temp_files(marker_prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy().to_string();
        if t.contains(marker_prefix) {
            if let Ok(bytes) = std::fs::read(e.path()) {
                out.push((t, bytes));
            }
        }
    }
    out
}
