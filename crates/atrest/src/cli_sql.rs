//! `atrest sql`: placeholder until the storage engine lands.
use anyhow::Result;

#[derive(clap::Args)]
pub struct SqlArgs {
    /// Data directory.
    #[arg(long)]
    pub data: std::path::PathBuf,
    /// SQL to run (default: read from standard input).
    #[arg(short = 'c')]
    pub command: Option<String>,
}

pub fn run(_args: SqlArgs) -> Result<std::process::ExitCode> {
    anyhow::bail!("not yet implemented")
}
