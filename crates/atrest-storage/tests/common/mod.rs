//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use atrest_storage::{Engine, EngineOptions};

/// The encryption scenarios of the product brief that the storage engine
/// alone can run (the customer-key scenarios 3 and 4 come with the
/// customer-managed-key issue, through the same `KeyProtector` trait).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Scenario 1: the service key only (data layer).
    ServiceKey,
    /// Scenario 2: the service key plus the infrastructure layer.
    ServiceKeyAndInfra,
}

impl Scenario {
    pub fn infra(self) -> bool {
        self == Scenario::ServiceKeyAndInfra
    }
    /// Tag and nonce bytes per unit (SQLite's reserve for pages).
    pub fn ov(self) -> usize {
        if self.infra() {
            68
        } else {
            28
        }
    }
}

/// Runs each named `fn(Scenario)` once per scenario, as two tests:
/// `NAME::service_key` and `NAME::service_key_and_infrastructure_layer`.
#[macro_export]
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn service_key() {
                    super::$name(super::Scenario::ServiceKey)
                }
                #[test]
                fn service_key_and_infrastructure_layer() {
                    super::$name(super::Scenario::ServiceKeyAndInfra)
                }
            }
        )*
    };
}

/// Engine options for a data directory under `root` in scenario `sc`.
pub fn options(root: &Path, sc: Scenario) -> EngineOptions {
    EngineOptions {
        data_dir: root.join("data"),
        keystore_dir: Some(root.join("keystore")),
        infrastructure_encryption: Some(sc.infra()),
        infra_keystore_dir: Some(root.join("infra-keystore")),
    }
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub opts: EngineOptions,
    pub scenario: Scenario,
}

impl Fixture {
    /// Scenario 1 (service key only).
    pub fn new() -> Self {
        Self::with(Scenario::ServiceKey)
    }

    pub fn with(scenario: Scenario) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let opts = options(dir.path(), scenario);
        Self {
            dir,
            opts,
            scenario,
        }
    }

    /// Tag and nonce bytes per unit in this fixture's scenario.
    pub fn ov(&self) -> usize {
        self.scenario.ov()
    }

    pub fn infra_keystore(&self) -> PathBuf {
        self.opts.infra_keystore_dir.clone().unwrap()
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
