//! Unwrapped DEKs held in memory, and the registry of open files.
//!
//! The protector (service key or vault) is called once per database DEK;
//! after that the DEK is served from this cache, so opening connections or
//! companion files (journal, WAL) never calls the protector again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};

use atrest_crypto::{Dek, DekId, KeyProtector, ProtectorError, WrappedDek};
use atrest_keystore::InfraProtector;

use crate::file::SharedFile;

pub struct Keyring {
    /// Replaced when the server switches keys (service to customer, a new
    /// key version); DEKs cached so far stay valid.
    protector: RwLock<Arc<dyn KeyProtector>>,
    cache: Mutex<HashMap<DekId, Dek>>,
    /// The infrastructure layer's master key, when the data directory has
    /// that layer. Replaced (never removed) by a rotation.
    infra: RwLock<Option<Arc<InfraProtector>>>,
    /// Another infrastructure master key that may still unwrap (never
    /// wrap): the source server's while a restore moves files to this one.
    infra_previous: RwLock<Option<Arc<InfraProtector>>>,
}

/// Files open in this process, by path. Process-wide, not per engine: two
/// engines on one data directory must still share one state per file (one
/// seal counter, one header writer).
static OPEN_FILES: std::sync::LazyLock<Mutex<HashMap<String, Weak<SharedFile>>>> =
    std::sync::LazyLock::new(Mutex::default);

impl Keyring {
    pub fn new(protector: Arc<dyn KeyProtector>, infra: Option<Arc<InfraProtector>>) -> Self {
        Self {
            protector: RwLock::new(protector),
            cache: Mutex::default(),
            infra: RwLock::new(infra),
            infra_previous: RwLock::new(None),
        }
    }

    pub fn protector(&self) -> Arc<dyn KeyProtector> {
        Arc::clone(&self.protector.read().unwrap())
    }

    /// New DEKs (and rewraps) go to `p` from now on.
    pub fn set_protector(&self, p: Arc<dyn KeyProtector>) {
        *self.protector.write().unwrap() = p;
    }

    /// Drops every cached DEK (each is zeroized as it drops). The next
    /// open of any file asks the protector again.
    pub fn forget_keys(&self) -> usize {
        let mut cache = self.cache.lock().unwrap();
        let n = cache.len();
        cache.clear();
        n
    }

    /// Drops one cached DEK (a rotation retired it).
    pub fn forget_key(&self, id: DekId) {
        self.cache.lock().unwrap().remove(&id);
    }

    pub fn cached_keys(&self) -> usize {
        self.cache.lock().unwrap().len()
    }

    /// `dek` wrapped under the current protector's KEK.
    pub fn wrap(&self, dek: &Dek) -> Result<WrappedDek, ProtectorError> {
        self.protector().wrap(dek)
    }

    /// The infrastructure protector, if the layer is on.
    pub fn infra(&self) -> Option<Arc<InfraProtector>> {
        self.infra.read().unwrap().clone()
    }

    /// See [`Keyring::infra_previous`]'s field.
    pub fn infra_previous(&self) -> Option<Arc<InfraProtector>> {
        self.infra_previous.read().unwrap().clone()
    }

    pub fn set_infra_previous(&self, protector: Option<Arc<InfraProtector>>) {
        *self.infra_previous.write().unwrap() = protector;
    }

    /// Switches the infrastructure layer to a new master key version.
    pub fn set_infra(&self, protector: Arc<InfraProtector>) {
        *self.infra.write().unwrap() = Some(protector);
    }

    /// A new DEK wrapped under the protector's current KEK.
    pub fn new_wrapped_dek(&self) -> Result<(Dek, WrappedDek), ProtectorError> {
        let dek = Dek::generate().map_err(|e| ProtectorError::Other(e.to_string()))?;
        let wrapped = self.protector().wrap(&dek)?;
        self.cache.lock().unwrap().insert(dek.id(), dek.clone());
        Ok((dek, wrapped))
    }

    /// The DEK `dek_id`, from the cache or unwrapped by the protector.
    pub fn unwrap(&self, dek_id: DekId, wrapped: &WrappedDek) -> Result<Dek, ProtectorError> {
        if let Some(dek) = self.cache.lock().unwrap().get(&dek_id) {
            return Ok(dek.clone());
        }
        let dek = self.protector().unwrap(dek_id, wrapped)?;
        if dek.id() != dek_id {
            return Err(ProtectorError::Other(
                "unwrapped key carries another id".into(),
            ));
        }
        self.cache.lock().unwrap().insert(dek_id, dek.clone());
        Ok(dek)
    }

    /// Runs `open` under the registry lock unless `path` is already open,
    /// so two connections opening one file at once share one state.
    pub fn shared_file<E>(
        &self,
        path: &str,
        open: impl FnOnce() -> Result<Arc<SharedFile>, E>,
    ) -> Result<Arc<SharedFile>, E> {
        let mut files = OPEN_FILES.lock().unwrap();
        if let Some(existing) = files.get(path).and_then(Weak::upgrade) {
            return Ok(existing);
        }
        let fresh = open()?;
        files.insert(path.to_string(), Arc::downgrade(&fresh));
        Ok(fresh)
    }

    /// An open file's shared state, if some handle has it open.
    pub fn find_open(&self, path: &str) -> Option<Arc<SharedFile>> {
        OPEN_FILES.lock().unwrap().get(path).and_then(Weak::upgrade)
    }

    /// Forgets a deleted file so a new file at that path starts afresh.
    pub fn forget(&self, path: &str) {
        OPEN_FILES.lock().unwrap().remove(path);
    }
}
