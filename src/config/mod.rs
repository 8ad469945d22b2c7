//! Configuration: the TOML file, environment overrides, flag overrides, and validation.
//!
//! Precedence is flags > environment > file > defaults. The file is parsed strictly
//! (`deny_unknown_fields`), then [`validate`](FileConfig) turns it into the effective
//! [`Config`]. Every error names the key (and the file line where the parser knows it), so an
//! operator can fix it from one line of output; the caller exits with [`EX_CONFIG`].

mod file;
mod layers;
mod validate;
pub use validate::{SHARED_DIR_BITS, is_shared_dir_mode};

pub use crate::logging::LogFormat;
pub(crate) use validate::validate_url;

use crate::perms::is_root;
use crate::secret::{REDACTED, Secret};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// Exit code for configuration errors (sysexits.h `EX_CONFIG`); systemd's unit stops
/// restarting on it because restarting does not fix a bad config.
pub const EX_CONFIG: u8 = 78;

/// Where the packaged config lives.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/exalsius/node-agent.toml";
/// Environment variable naming the config file.
pub const ENV_CONFIG: &str = "EXALSIUS_AGENT_CONFIG";
/// Environment overrides, one per overridable key.
pub const ENV_API_URL: &str = "EXALSIUS_API_URL";
/// Overrides `api.node_id`.
pub const ENV_NODE_ID: &str = "EXALSIUS_NODE_ID";
/// Overrides `api.access_token` (and clears `api.access_token_file`).
pub const ENV_ACCESS_TOKEN: &str = "EXALSIUS_ACCESS_TOKEN";
/// Overrides `state.dir`.
pub const ENV_STATE_DIR: &str = "EXALSIUS_STATE_DIR";
/// Overrides `log.level` (RUST_LOG is honoured after it).
pub const ENV_LOG: &str = "EXALSIUS_LOG";

/// The production API.
pub const DEFAULT_API_URL: &str = "https://api.exalsius.ai/v1";
/// A whole request may take this long: generous for a slow API, short enough that a silent
/// server cannot hold the loop for minutes.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP + TLS set-up; a healthy API answers in well under a second.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One heartbeat a minute keeps the pool's view fresh at negligible cost.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// ±10 % spreads a fleet that was started together.
pub const DEFAULT_JITTER: f64 = 0.1;
/// Jitter above ±50 % would make the cadence meaningless.
pub const MAX_JITTER: f64 = 0.5;
/// First retry after one second: quick recovery from a blip.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// Never wait longer than five minutes between retries: the node must not look dead for long
/// after the API comes back.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Hardware rarely changes; five minutes catches a GPU falling off the bus soon enough.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// Root's default state directory (systemd's `StateDirectory=` sets `$STATE_DIRECTORY` to it).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/exalsius-node-agent";

/// The shortest accepted duration: sub-second values exist for tests and demos, zero would
/// spin.
pub const MIN_DURATION: Duration = Duration::from_millis(1);
/// `api.timeout` / `api.connect_timeout` above this are typos: a request that has not
/// answered in 10 minutes never will, and the watchdog would have fired long before.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// `heartbeat.interval` and the backoffs: a node silent for more than a day is gone from the
/// pool anyway. Keeps every instant/duration sum far from overflow.
pub const MAX_INTERVAL: Duration = Duration::from_secs(86_400);
/// `inventory.refresh_interval`: hardware changes (a GPU falling off the bus) must show within
/// a week at the latest; SIGHUP refreshes at once.
pub const MAX_REFRESH_INTERVAL: Duration = Duration::from_secs(7 * 86_400);

/// A configuration problem, printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` or `EXALSIUS_AGENT_CONFIG` named a file that does not exist.
    #[error("config file {path} not found (named by {named_by})")]
    NotFound {
        path: PathBuf,
        named_by: &'static str,
    },
    /// The file exists but cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax error, unknown key or wrong type.
    #[error("{path}:{line}:{column}: {key}{message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        key: String,
        message: String,
    },
    /// A value that parses but is not allowed.
    #[error("{origin}: {key} {message}")]
    Invalid {
        origin: String,
        key: &'static str,
        message: String,
    },
    /// A file the configuration names (`api.access_token_file`, `api.ca_file`) is there but
    /// cannot be read now: permissions that changed, an I/O error (exit 1, retried).
    #[error("{origin}: {key} = {}: cannot read now: {source}", path.display())]
    NamedFileUnreadable {
        origin: String,
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// True when an I/O error on a file the configuration names is the operator's to fix (exit
/// 78): the file is missing, something else is in its place, or its bytes are not text.
/// Anything else (permission denied, an I/O error) is a fault of the machine (exit 1).
pub fn is_operators_to_fix(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::NotFound
            | ErrorKind::IsADirectory
            | ErrorKind::NotADirectory
            | ErrorKind::InvalidData
    )
}

impl ConfigError {
    /// A fault of the machine rather than of what the operator wrote: the file exists but
    /// cannot be read now (permissions that changed, an I/O error). Exit 1, which systemd
    /// retries; everything else is exit 78, which it does not (the operator must edit).
    /// A directory or non-UTF-8 bytes where the file should be are the operator's to fix.
    pub fn is_machine_fault(&self) -> bool {
        use std::io::ErrorKind;
        match self {
            ConfigError::Read { source, .. } => !matches!(
                source.kind(),
                ErrorKind::IsADirectory | ErrorKind::InvalidData
            ),
            ConfigError::NamedFileUnreadable { .. } => true,
            _ => false,
        }
    }
}

/// Where a value came from, for error messages.
fn origin_of(path: Option<&Path>) -> String {
    match path {
        Some(p) => p.display().to_string(),
        None => "configuration".to_string(),
    }
}

/// How GPUs are discovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GpuMode {
    /// NVML first, then the PCI scan for what NVML did not cover.
    #[default]
    Auto,
    /// NVML only.
    Nvml,
    /// PCI scan only.
    Pci,
    /// No GPU discovery: always report no GPUs.
    Off,
}

// ---------------------------------------------------------------------------------------------
// The effective configuration.

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// The file it was read from (`None`: defaults and environment only).
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// Problems worth a warning that do not stop the agent (a token file others can read).
    #[serde(skip)]
    pub warnings: Vec<String>,
    /// Where each value not left at its default came from (`--api-url`, `EXALSIUS_NODE_ID`,
    /// the file), for `check-config`.
    #[serde(skip)]
    pub origins: Vec<(&'static str, String)>,
    /// `[api]`
    pub api: ApiConfig,
    /// `[heartbeat]`
    pub heartbeat: HeartbeatConfig,
    /// `[inventory]`
    pub inventory: InventoryConfig,
    /// `[state]`
    pub state: StateConfig,
    /// `[log]`
    pub log: LogConfig,
    /// `[metrics]`
    pub metrics: MetricsConfig,
}

/// `[metrics]`
#[derive(Debug, Clone, Default, Serialize)]
pub struct MetricsConfig {
    /// node_exporter textfile-collector file, rewritten after every attempt; `None`: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub textfile: Option<PathBuf>,
}

/// `[api]`
#[derive(Debug, Clone, Serialize)]
pub struct ApiConfig {
    /// Base URL without a trailing `/`.
    pub url: String,
    /// This node's id in the pool; `None` when `register` supplied it through the state file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<Uuid>,
    /// The configured token from the config (or its file).
    #[serde(
        serialize_with = "serialize_redacted",
        skip_serializing_if = "Option::is_none"
    )]
    pub access_token: Option<Secret>,
    /// Where the configured token was read from, if a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_token_file: Option<PathBuf>,
    /// Whole-request timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// TCP/TLS connect timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Extra root CA bundle (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Allow `http://` to non-loopback hosts.
    pub allow_insecure_http: bool,
}

/// `[heartbeat]`
#[derive(Debug, Clone, Serialize)]
pub struct HeartbeatConfig {
    /// Nominal time between heartbeats.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Each wait is `interval × (1 ± jitter)`.
    pub jitter: f64,
    /// First retry delay.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Cap on retry delays.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

/// `[inventory]`
#[derive(Debug, Clone, Serialize)]
pub struct InventoryConfig {
    /// How often specs are re-collected.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// GPU discovery mode.
    pub gpu: GpuMode,
    /// NVML library path override.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvml_library: Option<PathBuf>,
    /// Sent as `NodePatchRequest.description`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Count GPUs that NVIDIA says cannot take work (reset required, failed row remap, fabric
    /// not ready) in `gpu_count` anyway.
    pub count_unhealthy_gpus: bool,
}

/// `[state]`
#[derive(Debug, Clone, Serialize)]
pub struct StateConfig {
    /// Directory holding `state.json`.
    pub dir: PathBuf,
}

/// `[log]`
#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    /// A filter: a level (`info`, `debug`, …) or `target=level` directives
    /// (`exalsius_node_agent=debug,warn`).
    pub level: String,
    /// Text or JSON.
    pub format: LogFormat,
}

fn serialize_redacted<S: serde::Serializer>(v: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str(REDACTED),
        None => s.serialize_none(),
    }
}

/// Values given on the command line; they beat everything else.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--config`
    pub config: Option<PathBuf>,
    /// `--api-url`
    pub api_url: Option<String>,
    /// `--node-id`
    pub node_id: Option<String>,
    /// `--state-dir`
    pub state_dir: Option<PathBuf>,
    /// `--log-level`
    pub log_level: Option<String>,
}

/// Reads environment variables; a function so tests can hand in a map instead of the process
/// environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, ignoring empty values (an empty `EXALSIUS_NODE_ID=` in a unit file
/// means "not set", not "invalid").
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Config {
    /// Loads the effective configuration from file, environment and flags.
    pub fn load(overrides: &Overrides, env: EnvLookup<'_>) -> Result<Self, ConfigError> {
        let (path, named_by) = match (&overrides.config, env(ENV_CONFIG)) {
            (Some(p), _) => (p.clone(), Some("--config")),
            (None, Some(p)) => (PathBuf::from(p), Some(ENV_CONFIG)),
            (None, None) => (PathBuf::from(DEFAULT_CONFIG_PATH), None),
        };
        let (file, source) = match std::fs::read_to_string(&path) {
            Ok(text) => (file::parse(&text, &path.display().to_string())?, Some(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match named_by {
                Some(named_by) => return Err(ConfigError::NotFound { path, named_by }),
                // No file at the default path: defaults + environment (containers, tests).
                None => (file::FileConfig::default(), None),
            },
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        layers::build(file, source, overrides, env)
    }

    /// Parses a config text as if read from `path` (tests, fuzzing).
    pub fn from_toml(
        text: &str,
        path: &Path,
        overrides: &Overrides,
        env: EnvLookup<'_>,
    ) -> Result<Self, ConfigError> {
        let file = file::parse(text, &path.display().to_string())?;
        layers::build(file, Some(path.to_path_buf()), overrides, env)
    }

    /// `PATCH` target for the configured or given node.
    pub fn node_url(&self, node_id: &Uuid) -> String {
        format!("{}/node/{}", self.api.url, node_id)
    }

    /// The effective configuration as TOML, tokens shown as `<redacted>`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }

    /// Where `key`'s value came from, for advice ("set X in …"): its recorded origin (the
    /// config file, an environment variable, a flag), else the config file.
    pub fn origin_of(&self, key: &str) -> String {
        self.origins
            .iter()
            .find(|(k, _)| *k == key)
            .map_or_else(|| self.file_hint(), |(_, o)| o.clone())
    }

    /// What to do for a new access token, where the configured one came from (its recorded
    /// origin): the environment needs a restart (a reload keeps the process's environment),
    /// a token file or the config file a reload.
    pub fn new_token_advice(&self) -> String {
        const RELOAD: &str = "reload: systemctl reload exalsius-node-agent";
        let origin = self
            .origins
            .iter()
            .find(|(k, _)| *k == "api.access_token")
            .map(|(_, o)| o.as_str());
        match (origin, &self.api.access_token_file) {
            (Some(ENV_ACCESS_TOKEN), _) => format!(
                "the token comes from {ENV_ACCESS_TOKEN}: set a new one where the service gets its environment (for the packaged service: systemctl edit exalsius-node-agent, Environment={ENV_ACCESS_TOKEN}=…) and restart it (a reload keeps the old environment): systemctl restart exalsius-node-agent"
            ),
            (_, Some(file)) => format!(
                "put a new access token in {} (api.access_token_file) and {RELOAD}",
                file.display()
            ),
            _ => format!(
                "put a new access token in {} (api.access_token) and {RELOAD}",
                self.file_hint()
            ),
        }
    }

    /// The file the operator should edit (for messages).
    pub fn file_hint(&self) -> String {
        self.source
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_CONFIG_PATH))
            .display()
            .to_string()
    }
}

/// `$STATE_DIRECTORY` (systemd) > root's `/var/lib/…` > `$XDG_STATE_HOME/exalsius-node-agent`.
pub fn default_state_dir(env: EnvLookup<'_>) -> PathBuf {
    if let Some(dirs) = env("STATE_DIRECTORY") {
        // systemd may list several, separated by ':'; ours is the first.
        if let Some(first) = dirs.split(':').find(|d| !d.is_empty()) {
            return PathBuf::from(first);
        }
    }
    if is_root() {
        return PathBuf::from(DEFAULT_STATE_DIR);
    }
    let base = env("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("exalsius-node-agent")
}

#[cfg(test)]
mod tests;
