//! (under construction)

/// Arguments.
#[derive(clap::Args)]
pub struct Args {}

/// Arguments of the hidden peer process.
#[derive(clap::Args)]
pub struct PeerArgs {}

/// Runs the subcommand.
pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}

/// Runs the peer side.
pub fn run_peer(_args: PeerArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
