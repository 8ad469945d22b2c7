//! Command-line definitions (clap derive) — no behaviour here.

use crate::config::GpuMode;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Keeps a self-managed GPU node alive and truthfully described in the exalsius node pool.
///
/// Sends `PATCH {api.url}/node/{node_id}` heartbeats with the node's specs, rotates the access
/// token the API returns on every heartbeat, and keeps it in the state file.
///
/// Exit codes: 0 ok, 1 runtime failure (or unhealthy `status`), 2 usage error,
/// 78 configuration error.
#[derive(Debug, Parser)]
#[command(name = "exalsius-node-agent", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file [default: $EXALSIUS_AGENT_CONFIG, else /etc/exalsius/node-agent.toml]
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Override api.url (beats EXALSIUS_API_URL and the file)
    #[arg(long, global = true, value_name = "URL")]
    pub api_url: Option<String>,
    /// Override api.node_id (beats EXALSIUS_NODE_ID and the file)
    #[arg(long, global = true, value_name = "UUID")]
    pub node_id: Option<String>,
    /// Override state.dir (beats EXALSIUS_STATE_DIR and the file)
    #[arg(long, global = true, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Override log.level, e.g. debug or "exalsius_node_agent=debug,warn" (beats EXALSIUS_LOG, RUST_LOG)
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground (what systemd starts): heartbeat until SIGTERM.
    ///
    /// SIGHUP re-reads the configuration (an invalid one is refused and the old one kept) and
    /// refreshes the inventory. SIGTERM/SIGINT stop within a second, exit 0.
    Run(RunArgs),
    /// Collect and print this node's specs. Needs no configuration and no network.
    Inventory(InventoryArgs),
    /// Show the last heartbeat from the state file; exit 0 if the last success is younger
    /// than 3 × heartbeat.interval, else 1 (usable as a health check).
    Status(StatusArgs),
    /// Validate the configuration and print the effective values (tokens redacted);
    /// exit 0 if valid, 78 if not.
    CheckConfig,
}

/// `run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Send one heartbeat (up to 3 attempts with backoff), then exit: 0 on success, 1 on
    /// failure with the reason on stderr.
    #[arg(long, conflicts_with = "dry_run")]
    pub once: bool,
    /// No network: each heartbeat prints the JSON body it would send, one line on stdout.
    #[arg(long)]
    pub dry_run: bool,
}

/// `inventory` options.
#[derive(Debug, Args)]
pub struct InventoryArgs {
    /// Print exactly the NodePatchRequest body the heartbeat sends.
    #[arg(long, conflicts_with = "verbose_json")]
    pub json: bool,
    /// Print everything collected (per GPU, per disk, CPU details) as JSON.
    #[arg(long)]
    pub verbose_json: bool,
    /// GPU discovery mode for this run [default: inventory.gpu from the config, else auto]
    #[arg(long, value_enum)]
    pub gpu: Option<GpuModeArg>,
}

/// `--gpu` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum GpuModeArg {
    /// NVML, then PCI for the rest.
    Auto,
    /// NVML only.
    Nvml,
    /// PCI scan only.
    Pci,
    /// No GPU discovery.
    Off,
}

impl From<GpuModeArg> for GpuMode {
    fn from(a: GpuModeArg) -> Self {
        match a {
            GpuModeArg::Auto => GpuMode::Auto,
            GpuModeArg::Nvml => GpuMode::Nvml,
            GpuModeArg::Pci => GpuMode::Pci,
            GpuModeArg::Off => GpuMode::Off,
        }
    }
}

/// `status` options.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print as JSON.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_flag_before_or_after_subcommand() {
        let a = Cli::try_parse_from(["x", "--config", "/a.toml", "check-config"]).unwrap();
        let b = Cli::try_parse_from(["x", "check-config", "--config", "/a.toml"]).unwrap();
        assert_eq!(a.config, b.config);
    }
}
