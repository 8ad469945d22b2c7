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
    /// SIGHUP re-reads the configuration (an invalid one is refused and the old one kept, as
    /// when its files do not answer within 5 s) and refreshes the inventory. SIGTERM/SIGINT
    /// stop within a second, exit 0, also while a file read hangs (a heartbeat in flight gets
    /// up to 800 ms for its answer, whose new token is saved first).
    Run(RunArgs),
    /// Collect and print this node's specs. Needs no configuration and no network.
    Inventory(InventoryArgs),
    /// Show the last heartbeat from the state file; exit 0 if the last success is younger
    /// than 3 × heartbeat.interval, else 1 (usable as a health check).
    Status(StatusArgs),
    /// Validate the configuration and print the effective values (tokens redacted);
    /// exit 0 if valid, 78 if not.
    CheckConfig,
    /// Register this node with the pool using a registration token (POST /node/self-register),
    /// and keep the node id and access token in the state file, so `run` needs neither in the
    /// config.
    ///
    /// SIGTERM/SIGINT while the request is in flight wait for its answer (at most api.timeout)
    /// and save the token; a second signal stops at once. A 2xx answer that arrives cut off is
    /// never followed by a second request: exit 1, with what to do.
    ///
    /// Exit codes: 0 registered, 1 API/network failure or already registered (see --force),
    /// 2 usage error, 78 invalid value (endpoint, token file) or configuration error.
    Register(RegisterArgs),
    /// Take over this node from client-hw-info (exalsius's earlier tool) without registering
    /// it again: stops and disables client-hw-info.timer, moves NODE_ID / API_URL / AUTH_TOKEN
    /// from its config.env into the state file (as `register` writes it) and renames the file
    /// to config.env.migrated. The token is never printed.
    ///
    /// Exit codes: 0 imported (or already imported), 1 nothing to import, the state holds
    /// another node (see --force), or the legacy timer cannot be stopped; 78 invalid legacy
    /// file or a configuration that disagrees with it.
    ImportLegacy(ImportLegacyArgs),
    /// Answer "why is my node offline?": checks the config, the state directory and file,
    /// the service, the last heartbeat, the path to the API phase by phase (proxy, DNS, TCP,
    /// TLS, HTTP), the clock and GPU discovery. Sends no heartbeat, never takes the state lock,
    /// never shows the token.
    ///
    /// Exit codes: 0 nothing failed (warnings allowed), 1 at least one check failed.
    Doctor(DoctorArgs),
    /// Internal: one NVML query in this short-lived process, its answer as JSON on stdout
    /// (the daemon runs it, so the vendor library never stays in the daemon's memory).
    #[command(name = "nvml-probe", hide = true)]
    NvmlProbe(NvmlProbeArgs),
}

/// `nvml-probe` options (internal).
#[derive(Debug, Args)]
pub struct NvmlProbeArgs {
    /// The NVML library to load [default: libnvidia-ml.so.1 on the loader path]
    #[arg(long, value_name = "PATH")]
    pub library: Option<PathBuf>,
}

/// `import-legacy` options.
#[derive(Debug, Args)]
pub struct ImportLegacyArgs {
    /// client-hw-info's credentials file [default: /root/.config/exalsius/config.env]
    #[arg(long, value_name = "PATH")]
    pub from: Option<PathBuf>,
    /// Print what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Replace a state that holds another node (or another token); the old one is kept as
    /// state.json.bak.
    #[arg(long)]
    pub force: bool,
}

/// `doctor` options.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print the checks as JSON (for fleet tooling).
    #[arg(long)]
    pub json: bool,
    /// Judge the state directory for this user [default: User= of the installed unit, else
    /// the current user]
    #[arg(long, value_name = "USER")]
    pub service_user: Option<String>,
}

/// `register` options.
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Registration token (prefer --register-token-file or EXALSIUS_REGISTER_TOKEN: a flag is
    /// visible in `ps` and shell history)
    #[arg(
        long,
        env = "EXALSIUS_REGISTER_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN",
        conflicts_with = "register_token_file",
        required_unless_present = "register_token_file"
    )]
    pub register_token: Option<String>,
    /// Read the registration token from this file (surrounding whitespace trimmed)
    #[arg(long, value_name = "PATH")]
    pub register_token_file: Option<PathBuf>,
    /// SSH endpoint exalsius reaches this node on, HOST:PORT (IPv6 in brackets: [2001:db8::1]:22)
    #[arg(long, value_name = "HOST:PORT")]
    pub endpoint: String,
    /// SSH user name
    #[arg(long, value_name = "USER")]
    pub username: String,
    /// ID of the SSH key exalsius uses for this node (passed through as given)
    #[arg(long, value_name = "ID")]
    pub ssh_key_id: String,
    /// Node name in the pool [default: this machine's hostname]
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Price per hour in USD
    #[arg(long, value_name = "X")]
    pub price_per_hour: Option<f64>,
    /// Free-text description; the register call has no field for it, so it is kept in the
    /// state file and sent with the heartbeats (unless inventory.description is set)
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// Replace an existing registration (the old state is kept as state.json.bak)
    #[arg(long)]
    pub force: bool,
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
    /// Read /proc, /sys and /etc below DIR instead of / (a mounted image of another node, or a
    /// fixture tree); memory and tool versions still come from the running host
    #[arg(long, value_name = "DIR")]
    pub root: Option<std::path::PathBuf>,
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
