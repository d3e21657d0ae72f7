//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use atrest_storage::{Engine, EngineOptions};

/// The four encryption scenarios of the product brief.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Scenario 1: the service key only (data layer).
    ServiceKey,
    /// Scenario 2: the service key plus the infrastructure layer.
    ServiceKeyAndInfra,
    /// Scenario 3: DEKs wrapped by a customer RSA key (RSA-OAEP-256).
    CustomerKey,
    /// Scenario 4: customer key plus the infrastructure layer.
    CustomerKeyAndInfra,
}

impl Scenario {
    pub fn infra(self) -> bool {
        matches!(
            self,
            Scenario::ServiceKeyAndInfra | Scenario::CustomerKeyAndInfra
        )
    }
    pub fn customer(self) -> bool {
        matches!(self, Scenario::CustomerKey | Scenario::CustomerKeyAndInfra)
    }
    /// Tag and nonce bytes per unit (SQLite's reserve for pages).
    pub fn ov(self) -> usize {
        if self.infra() {
            atrest_storage::RESERVED_BYTES_INFRA
        } else {
            atrest_crypto::SEAL_OVERHEAD
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Scenario::ServiceKey => "1",
            Scenario::ServiceKeyAndInfra => "2",
            Scenario::CustomerKey => "3",
            Scenario::CustomerKeyAndInfra => "4",
        }
    }
    pub fn from_name(n: &str) -> Scenario {
        match n {
            "2" => Scenario::ServiceKeyAndInfra,
            "3" => Scenario::CustomerKey,
            "4" => Scenario::CustomerKeyAndInfra,
            _ => Scenario::ServiceKey,
        }
    }
}

/// Runs each named `fn(Scenario)` once per scenario, as four tests:
/// `NAME::service_key`, `NAME::service_key_and_infrastructure_layer`,
/// `NAME::customer_key`, `NAME::customer_key_and_infrastructure_layer`.
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
                #[test]
                fn customer_key() {
                    super::$name(super::Scenario::CustomerKey)
                }
                #[test]
                fn customer_key_and_infrastructure_layer() {
                    super::$name(super::Scenario::CustomerKeyAndInfra)
                }
            }
        )*
    };
}

/// A customer key-encryption key: RSA 2048 with RSA-OAEP-256, the same
/// algorithm and wrapped form the vault protector uses (the DEK id then the
/// DEK). It stands in for the vault so the storage suites can run the
/// customer-key scenarios without a vault process; the real vault path is
/// covered end to end by the server's tests. Kept in `ROOT/customer-kek.der`
/// so a crash test's child process uses the same key.
#[derive(Debug)]
pub struct CustomerKek {
    key: aws_lc_rs::rsa::PrivateDecryptingKey,
}

pub const CUSTOMER_KEY_ID: &str = "https://test-vault.invalid/keys/tde/0123456789abcdef";

impl CustomerKek {
    pub fn load_or_create(root: &Path) -> CustomerKek {
        use aws_lc_rs::encoding::AsDer;
        let path = root.join("customer-kek.der");
        let key = match std::fs::read(&path) {
            Ok(der) => aws_lc_rs::rsa::PrivateDecryptingKey::from_pkcs8(&der).unwrap(),
            Err(_) => {
                let k = aws_lc_rs::rsa::PrivateDecryptingKey::generate(
                    aws_lc_rs::rsa::KeySize::Rsa2048,
                )
                .unwrap();
                let der = k.as_der().unwrap();
                std::fs::write(&path, der.as_ref()).unwrap();
                k
            }
        };
        CustomerKek { key }
    }
}

impl atrest_crypto::KeyProtector for CustomerKek {
    fn current_kek(&self) -> atrest_crypto::KekRef {
        atrest_crypto::KekRef {
            kind: atrest_crypto::ProtectorKind::CustomerVault,
            key_id: CUSTOMER_KEY_ID.into(),
        }
    }

    fn wrap(
        &self,
        dek: &atrest_crypto::Dek,
    ) -> Result<atrest_crypto::WrappedDek, atrest_crypto::ProtectorError> {
        use aws_lc_rs::rsa::{OaepPublicEncryptingKey, OAEP_SHA256_MGF1SHA256};
        let enc = OaepPublicEncryptingKey::new(self.key.public_key()).unwrap();
        let mut plain = dek.id().0.to_vec();
        plain.extend_from_slice(dek.expose_secret());
        let mut out = vec![0u8; enc.ciphertext_size()];
        let n = enc
            .encrypt(&OAEP_SHA256_MGF1SHA256, &plain, &mut out, None)
            .unwrap()
            .len();
        out.truncate(n);
        Ok(atrest_crypto::WrappedDek {
            kek: self.current_kek(),
            algorithm: atrest_crypto::WrapAlgorithm::RsaOaep256,
            bytes: out,
        })
    }

    fn unwrap(
        &self,
        dek_id: atrest_crypto::DekId,
        wrapped: &atrest_crypto::WrappedDek,
    ) -> Result<atrest_crypto::Dek, atrest_crypto::ProtectorError> {
        use aws_lc_rs::rsa::{OaepPrivateDecryptingKey, OAEP_SHA256_MGF1SHA256};
        if wrapped.kek != self.current_kek() {
            return Err(atrest_crypto::ProtectorError::NotMine {
                have: self.current_kek().to_string(),
                want: wrapped.kek.clone(),
            });
        }
        let dec = OaepPrivateDecryptingKey::new(self.key.clone()).unwrap();
        let mut out = vec![0u8; dec.min_output_size()];
        let wrong = || atrest_crypto::ProtectorError::WrongKey {
            kek: wrapped.kek.clone(),
            hint: "test customer key".into(),
        };
        let plain = dec
            .decrypt(&OAEP_SHA256_MGF1SHA256, &wrapped.bytes, &mut out, None)
            .map_err(|_| wrong())?;
        if plain.len() != 48 || plain[..16] != dek_id.0 {
            return Err(wrong());
        }
        let mut k = [0u8; 32];
        k.copy_from_slice(&plain[16..]);
        Ok(atrest_crypto::Dek::from_parts(dek_id, &k))
    }
}

/// Opens the engine of scenario `sc` under `root`: the options below, and
/// for the customer-key scenarios the customer KEK as the protector.
pub fn open_engine(root: &Path, sc: Scenario) -> Engine {
    let engine = Engine::open(&options(root, sc)).unwrap();
    if sc.customer() {
        engine.set_protector(std::sync::Arc::new(CustomerKek::load_or_create(root)));
    }
    engine
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
        open_engine(self.dir.path(), self.scenario)
    }

    pub fn data(&self) -> PathBuf {
        self.opts.data_dir.clone()
    }

    /// An engine over another data directory with this fixture's keys (a
    /// copy of this one's `atrest.json`): a replica's, where files keep
    /// their names.
    pub fn engine_at(&self, data_dir: &Path) -> Engine {
        std::fs::create_dir_all(data_dir).unwrap();
        std::fs::copy(
            self.data().join("atrest.json"),
            data_dir.join("atrest.json"),
        )
        .unwrap();
        let engine = Engine::open(&EngineOptions {
            data_dir: data_dir.to_path_buf(),
            ..self.opts.clone()
        })
        .unwrap();
        if self.scenario.customer() {
            engine.set_protector(std::sync::Arc::new(CustomerKek::load_or_create(
                self.dir.path(),
            )));
        }
        engine
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
