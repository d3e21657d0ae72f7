//! `atrest inspect`: print a file's header as JSON (never key material),
//! including which encryption layers protect it (`layers`: data, and
//! infrastructure when the data directory has infrastructure double
//! encryption).

use std::path::PathBuf;

use anyhow::Result;
use atrest_storage::{Engine, EngineOptions};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// An atrest file: database, WAL or journal.
    pub file: PathBuf,
    /// Also verify the header MAC with the keys of this data directory.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Keystore for --data.
    #[arg(long, env = "ATREST_KEYSTORE")]
    pub keystore: Option<PathBuf>,
    /// Infrastructure keystore for --data (when the data directory has the
    /// infrastructure layer).
    #[arg(long, env = "ATREST_INFRA_KEYSTORE")]
    pub infra_keystore: Option<PathBuf>,
}

pub fn run(args: InspectArgs) -> Result<std::process::ExitCode> {
    let report = match args.data {
        Some(data) => Engine::open(&EngineOptions {
            data_dir: data,
            keystore_dir: args.keystore,
            infrastructure_encryption: None,
            infra_keystore_dir: args.infra_keystore,
        })?
        .inspect(&args.file)?,
        None => atrest_storage::inspect(&args.file)?,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(std::process::ExitCode::SUCCESS)
}
