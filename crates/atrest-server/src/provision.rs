//! Creating a server of any engine: the server directory
//! ([`crate::resource::create`]), then the engine's own step.

use crate::config::EngineKind;
use crate::resource::{self, CreateOptions, Created, ResourceError};

/// `atrest server create`.
pub fn create(opts: &CreateOptions) -> Result<Created, ResourceError> {
    resource::create(opts, &|dir, config, admin, password| match config.engine {
        EngineKind::Postgres => crate::postgres::initialize(dir, config, admin, password),
        // The sqlite engine's files are made with the directory.
        EngineKind::Sqlite => Ok(()),
    })
}
