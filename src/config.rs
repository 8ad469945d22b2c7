//! Configuration: the TOML file, environment overrides, flag overrides, and validation.
//!
//! Precedence is flags > environment > file > defaults. The file is parsed strictly
//! (`deny_unknown_fields`), then [`validate`](FileConfig) turns it into the effective
//! [`Config`]. Every error names the key (and the file line where the parser knows it), so an
//! operator can fix it from one line of output; the caller exits with [`EX_CONFIG`].

use crate::secret::{REDACTED, Secret};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
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

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

// ---------------------------------------------------------------------------------------------
// The file as written: every key optional, unknown keys refused.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    api: FileApi,
    heartbeat: FileHeartbeat,
    inventory: FileInventory,
    state: FileState,
    log: FileLog,
    metrics: FileMetrics,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileApi {
    url: Option<String>,
    node_id: Option<Uuid>,
    access_token: Option<String>,
    access_token_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    ca_file: Option<PathBuf>,
    allow_insecure_http: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileHeartbeat {
    #[serde(with = "humantime_serde")]
    interval: Option<Duration>,
    jitter: Option<f64>,
    #[serde(with = "humantime_serde")]
    initial_backoff: Option<Duration>,
    #[serde(with = "humantime_serde")]
    max_backoff: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileInventory {
    #[serde(with = "humantime_serde")]
    refresh_interval: Option<Duration>,
    gpu: Option<GpuMode>,
    nvml_library: Option<PathBuf>,
    description: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileState {
    dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileMetrics {
    textfile: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileLog {
    level: Option<String>,
    format: Option<LogFormat>,
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
    /// The bootstrap token from the config (or its file).
    #[serde(
        serialize_with = "serialize_redacted",
        skip_serializing_if = "Option::is_none"
    )]
    pub access_token: Option<Secret>,
    /// Where the bootstrap token was read from, if a file.
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
            Ok(text) => (parse_file(&text, &path.display().to_string())?, Some(path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match named_by {
                Some(named_by) => return Err(ConfigError::NotFound { path, named_by }),
                // No file at the default path: defaults + environment (containers, tests).
                None => (FileConfig::default(), None),
            },
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        build(file, source, overrides, env)
    }

    /// Parses a config text as if read from `path` (tests, fuzzing).
    pub fn from_toml(
        text: &str,
        path: &Path,
        overrides: &Overrides,
        env: EnvLookup<'_>,
    ) -> Result<Self, ConfigError> {
        let file = parse_file(text, &path.display().to_string())?;
        build(file, Some(path.to_path_buf()), overrides, env)
    }

    /// `PATCH` target for the configured or given node.
    pub fn node_url(&self, node_id: &Uuid) -> String {
        format!("{}/node/{}", self.api.url, node_id)
    }

    /// The effective configuration as TOML, tokens shown as `<redacted>`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
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

fn parse_file(text: &str, path: &str) -> Result<FileConfig, ConfigError> {
    let parse_error = |e: toml::de::Error, key: String| {
        let (line, column) = e
            .span()
            .map(|span| line_col(text, span.start))
            .unwrap_or((1, 1));
        ConfigError::Parse {
            path: path.to_string(),
            line,
            column,
            key,
            message: e.message().trim().replace('\n', " "),
        }
    };
    let de = toml::de::Deserializer::parse(text).map_err(|e| parse_error(e, String::new()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." || key.is_empty() {
            String::new()
        } else {
            format!("{key}: ")
        };
        parse_error(e.into_inner(), key)
    })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn build(
    file: FileConfig,
    source: Option<PathBuf>,
    overrides: &Overrides,
    env: EnvLookup<'_>,
) -> Result<Config, ConfigError> {
    let file_origin = origin_of(source.as_deref());
    let invalid = |origin: &str, key: &'static str, message: String| ConfigError::Invalid {
        origin: origin.to_string(),
        key,
        message,
    };

    // api.url: flag > env > file > default.
    let (url, url_origin) = if let Some(u) = &overrides.api_url {
        (u.clone(), "--api-url".to_string())
    } else if let Some(u) = env(ENV_API_URL) {
        (u, ENV_API_URL.to_string())
    } else if let Some(u) = file.api.url {
        (u, file_origin.clone())
    } else {
        (DEFAULT_API_URL.to_string(), "default".to_string())
    };
    let allow_insecure_http = file.api.allow_insecure_http.unwrap_or(false);
    let url =
        validate_url(&url, allow_insecure_http).map_err(|m| invalid(&url_origin, "api.url", m))?;

    // api.node_id
    let node_id = if let Some(n) = &overrides.node_id {
        Some(parse_uuid(n).map_err(|m| invalid("--node-id", "api.node_id", m))?)
    } else if let Some(n) = env(ENV_NODE_ID) {
        Some(parse_uuid(&n).map_err(|m| invalid(ENV_NODE_ID, "api.node_id", m))?)
    } else {
        file.api.node_id
    };

    // api.access_token / api.access_token_file
    let file_has_token = file.api.access_token.is_some();
    let (access_token, access_token_file) = if let Some(t) = env(ENV_ACCESS_TOKEN) {
        (Some(Secret::new(t.trim())), None)
    } else {
        match (file.api.access_token, file.api.access_token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    &file_origin,
                    "api.access_token",
                    "and api.access_token_file are both set; keep one".to_string(),
                ));
            }
            (Some(t), None) => (Some(Secret::new(t.trim())), None),
            (None, Some(p)) => {
                let raw = std::fs::read_to_string(&p).map_err(|e| {
                    invalid(
                        &file_origin,
                        "api.access_token_file",
                        format!("= {}: cannot read: {e}", p.display()),
                    )
                })?;
                (Some(Secret::new(raw.trim())), Some(p))
            }
            (None, None) => (None, None),
        }
    };
    if access_token.as_ref().is_some_and(Secret::is_blank) {
        return Err(invalid(
            &file_origin,
            "api.access_token",
            "is empty".to_string(),
        ));
    }

    let timeout = file.api.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let connect_timeout = file.api.connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    bounded(timeout, MAX_TIMEOUT).map_err(|m| invalid(&file_origin, "api.timeout", m))?;
    bounded(connect_timeout, MAX_TIMEOUT)
        .map_err(|m| invalid(&file_origin, "api.connect_timeout", m))?;
    if let Some(ca) = &file.api.ca_file
        && let Err(e) = std::fs::metadata(ca)
    {
        return Err(invalid(
            &file_origin,
            "api.ca_file",
            format!("= {}: {e}", ca.display()),
        ));
    }

    let interval = file.heartbeat.interval.unwrap_or(DEFAULT_INTERVAL);
    bounded(interval, MAX_INTERVAL).map_err(|m| invalid(&file_origin, "heartbeat.interval", m))?;
    let jitter = file.heartbeat.jitter.unwrap_or(DEFAULT_JITTER);
    if !(0.0..=MAX_JITTER).contains(&jitter) {
        return Err(invalid(
            &file_origin,
            "heartbeat.jitter",
            format!("= {jitter} is out of range (0 ≤ jitter ≤ {MAX_JITTER})"),
        ));
    }
    let initial_backoff = file
        .heartbeat
        .initial_backoff
        .unwrap_or(DEFAULT_INITIAL_BACKOFF);
    bounded(initial_backoff, MAX_INTERVAL)
        .map_err(|m| invalid(&file_origin, "heartbeat.initial_backoff", m))?;
    let max_backoff = file.heartbeat.max_backoff.unwrap_or(DEFAULT_MAX_BACKOFF);
    bounded(max_backoff, MAX_INTERVAL)
        .map_err(|m| invalid(&file_origin, "heartbeat.max_backoff", m))?;
    if max_backoff < initial_backoff {
        return Err(invalid(
            &file_origin,
            "heartbeat.max_backoff",
            format!(
                "= {} is below heartbeat.initial_backoff = {}",
                humantime::format_duration(max_backoff),
                humantime::format_duration(initial_backoff)
            ),
        ));
    }

    let refresh_interval = file
        .inventory
        .refresh_interval
        .unwrap_or(DEFAULT_REFRESH_INTERVAL);
    bounded(refresh_interval, MAX_REFRESH_INTERVAL)
        .map_err(|m| invalid(&file_origin, "inventory.refresh_interval", m))?;

    let state_dir = if let Some(d) = &overrides.state_dir {
        d.clone()
    } else if let Some(d) = env(ENV_STATE_DIR) {
        PathBuf::from(d)
    } else if let Some(d) = file.state.dir {
        d
    } else {
        default_state_dir(env)
    };
    if state_dir.as_os_str().is_empty() {
        return Err(invalid(&file_origin, "state.dir", "is empty".to_string()));
    }

    let (level, level_origin) = if let Some(l) = &overrides.log_level {
        (l.clone(), "--log-level".to_string())
    } else if let Some(l) = env(ENV_LOG) {
        (l, ENV_LOG.to_string())
    } else if let Some(l) = env("RUST_LOG") {
        (l, "RUST_LOG".to_string())
    } else if let Some(l) = file.log.level {
        (l, file_origin.clone())
    } else {
        ("info".to_string(), "default".to_string())
    };
    if let Err(e) = crate::logging::parse_filter(&level) {
        return Err(invalid(
            &level_origin,
            "log.level",
            format!("= {level:?} is not a valid filter: {e}"),
        ));
    }

    let mut warnings = Vec::new();
    let textfile = file.metrics.textfile;
    if let Some(w) = textfile
        .as_deref()
        .map(|p| validate_textfile(p).map_err(|m| invalid(&file_origin, "metrics.textfile", m)))
        .transpose()?
        .flatten()
    {
        warnings.push(w);
    }
    if file_has_token && let Some(w) = source.as_deref().and_then(secret_file_exposure) {
        warnings.push(format!("config file holds api.access_token but {w}"));
    }
    if let Some(w) = access_token_file.as_deref().and_then(secret_file_exposure) {
        warnings.push(format!("api.access_token_file {w}"));
    }

    Ok(Config {
        source,
        warnings,
        api: ApiConfig {
            url,
            node_id,
            access_token,
            access_token_file,
            timeout,
            connect_timeout,
            ca_file: file.api.ca_file,
            allow_insecure_http,
        },
        heartbeat: HeartbeatConfig {
            interval,
            jitter,
            initial_backoff,
            max_backoff,
        },
        inventory: InventoryConfig {
            refresh_interval,
            gpu: file.inventory.gpu.unwrap_or_default(),
            nvml_library: file.inventory.nvml_library,
            description: file.inventory.description,
        },
        state: StateConfig { dir: state_dir },
        log: LogConfig {
            level,
            format: file.log.format.unwrap_or_default(),
        },
        metrics: MetricsConfig { textfile },
    })
}

/// `metrics.textfile`: an absolute `*.prom` path (node_exporter reads nothing else). A missing
/// directory is a warning, not an error: node_exporter may be installed later.
fn validate_textfile(p: &Path) -> Result<Option<String>, String> {
    if !p.is_absolute() {
        return Err(format!("= {} must be an absolute path", p.display()));
    }
    if p.extension().is_none_or(|e| e != "prom") {
        return Err(format!(
            "= {}: node_exporter's textfile collector reads only files ending in .prom",
            p.display()
        ));
    }
    if p.is_dir() {
        return Err(format!(
            "= {} is a directory; name a file in it",
            p.display()
        ));
    }
    Ok(p.parent().filter(|d| !d.is_dir()).map(|d| {
        format!(
            "metrics.textfile: directory {} does not exist (yet); metrics are written once it does",
            d.display()
        )
    }))
}

/// Every duration has a range; the message names it.
fn bounded(d: Duration, max: Duration) -> Result<(), String> {
    if d.is_zero() {
        Err("must be greater than zero".to_string())
    } else if d < MIN_DURATION || d > max {
        Err(format!(
            "= {} is out of range ({} – {})",
            humantime::format_duration(d),
            humantime::format_duration(MIN_DURATION),
            humantime::format_duration(max)
        ))
    } else {
        Ok(())
    }
}

fn parse_uuid(s: &str) -> Result<Uuid, String> {
    Uuid::parse_str(s.trim()).map_err(|e| format!("= {s:?} is not a UUID: {e}"))
}

/// Checks scheme and host, refuses cleartext HTTP to anything but loopback unless allowed, and
/// strips the trailing `/`.
pub(crate) fn validate_url(raw: &str, allow_insecure_http: bool) -> Result<String, String> {
    let url =
        reqwest::Url::parse(raw.trim()).map_err(|e| format!("= {raw:?} is not a URL: {e}"))?;
    let host = url
        .host_str()
        .ok_or_else(|| format!("= {raw:?} has no host"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials (user:password@)".to_string());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("= {raw:?} must not have a query or fragment"));
    }
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure_http || is_loopback(host) => {}
        "http" => {
            return Err(format!(
                "= {raw:?} uses cleartext http:// to a non-loopback host; use https:// or set api.allow_insecure_http = true"
            ));
        }
        other => return Err(format!("= {raw:?}: scheme {other:?} is not http or https")),
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
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

/// Why a file holding a secret is too open, if it is: readable by others, or by a group that is
/// not the agent's own (the package installs the config `0640 root:exalsius-agent`, which is
/// fine).
pub fn secret_file_exposure(path: &Path) -> Option<String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o004 != 0 {
        return Some(format!(
            "{} is readable by every user (mode {mode:04o}); chmod o-r it",
            path.display()
        ));
    }
    if mode & 0o040 != 0 && Some(meta.gid()) != effective_gid() {
        return Some(format!(
            "{} is readable by group {} (mode {mode:04o}), which is not the agent's group; chmod g-r it",
            path.display(),
            meta.gid()
        ));
    }
    None
}

/// The effective gid from `/proc/self/status` (`Gid: real effective saved fs`).
fn effective_gid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Gid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The effective uid is the owner of `/proc/self`; avoids `unsafe` for `geteuid`.
use crate::perms::is_root;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const ID: &str = "123e4567-e89b-12d3-a456-426614174000";

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let lookup = move |k: &str| map.get(k).cloned();
        Config::from_toml(
            text,
            Path::new("/etc/test.toml"),
            &Overrides::default(),
            &lookup,
        )
    }

    fn err(text: &str) -> String {
        match load(text, &[("HOME", "/home/x")]) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../config.example.toml");
        let cfg = load(text, &[("HOME", "/home/x")]).expect("config.example.toml must be valid");
        assert_eq!(cfg.heartbeat.interval, DEFAULT_INTERVAL);
        assert_eq!(cfg.heartbeat.jitter, DEFAULT_JITTER);
        assert_eq!(cfg.api.timeout, DEFAULT_TIMEOUT);
        assert_eq!(cfg.api.url, DEFAULT_API_URL);
        assert_eq!(cfg.inventory.gpu, GpuMode::Auto);
    }

    #[test]
    fn defaults_when_empty() {
        let cfg = load("", &[("HOME", "/home/x")]).unwrap();
        assert_eq!(cfg.heartbeat.max_backoff, DEFAULT_MAX_BACKOFF);
        assert!(cfg.api.node_id.is_none());
        assert!(cfg.api.access_token.is_none());
        assert_eq!(cfg.log.level, "info");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = err("[api]\nurl = \"https://x.example\"\n\n[heartbeat]\nintervall = \"5s\"\n");
        assert!(e.starts_with("/etc/test.toml:5:"), "{e}");
        assert!(e.contains("intervall"), "{e}");
    }

    #[test]
    fn bad_type_names_key() {
        let e = err("[heartbeat]\ninterval = 5\n");
        assert!(e.contains("heartbeat.interval"), "{e}");
        assert!(e.starts_with("/etc/test.toml:2:"), "{e}");
    }

    #[test]
    fn bad_duration_names_key() {
        let e = err("[heartbeat]\ninitial_backoff = \"soon\"\n");
        assert!(e.contains("heartbeat.initial_backoff"), "{e}");
    }

    #[test]
    fn bad_uuid() {
        let e = err("[api]\nnode_id = \"not-a-uuid\"\n");
        assert!(e.contains("api.node_id"), "{e}");
    }

    #[test]
    fn jitter_out_of_range() {
        let e = err("[heartbeat]\njitter = 0.7\n");
        assert!(e.contains("heartbeat.jitter"), "{e}");
        assert!(e.contains("out of range"), "{e}");
        assert!(err("[heartbeat]\njitter = -0.1\n").contains("heartbeat.jitter"));
    }

    #[test]
    fn every_duration_has_a_range_named_in_the_error() {
        for (section, key, value) in [
            ("inventory", "refresh_interval", "300000000000years"),
            ("inventory", "refresh_interval", "8days"),
            ("heartbeat", "interval", "18446744073709551615s"),
            ("heartbeat", "interval", "25h"),
            ("heartbeat", "interval", "500us"),
            ("heartbeat", "initial_backoff", "2days"),
            ("heartbeat", "max_backoff", "100years"),
            ("api", "timeout", "11m"),
            ("api", "connect_timeout", "1year"),
        ] {
            let text = format!("[{section}]\n{key} = \"{value}\"\n");
            let e = err(&text);
            assert!(e.contains(&format!("{section}.{key}")), "{text}: {e}");
            assert!(e.contains("out of range"), "{text}: {e}");
        }
        // The bounds themselves are accepted.
        load(
            "[heartbeat]\ninterval = \"24h\"\ninitial_backoff = \"1ms\"\nmax_backoff = \"24h\"\n\
             [inventory]\nrefresh_interval = \"7days\"\n[api]\ntimeout = \"10m\"\n",
            &[],
        )
        .unwrap();
    }

    #[test]
    fn zero_interval() {
        let e = err("[heartbeat]\ninterval = \"0s\"\n");
        assert!(
            e.contains("heartbeat.interval must be greater than zero"),
            "{e}"
        );
    }

    #[test]
    fn http_to_remote_host_refused() {
        let e = err("[api]\nurl = \"http://api.example.com/v1\"\n");
        assert!(e.contains("api.url"), "{e}");
        assert!(e.contains("allow_insecure_http"), "{e}");
        load(
            "[api]\nurl = \"http://api.example.com/v1\"\nallow_insecure_http = true\n",
            &[],
        )
        .unwrap();
        for ok in [
            "http://127.0.0.1:8080/v1/",
            "http://localhost:1",
            "http://[::1]:9/x",
        ] {
            let cfg = load(&format!("[api]\nurl = \"{ok}\"\n"), &[]).unwrap();
            assert!(!cfg.api.url.ends_with('/'));
        }
    }

    #[test]
    fn node_url_strips_trailing_slash() {
        let cfg = load(
            &format!("[api]\nurl = \"https://api.example.com/v1/\"\nnode_id = \"{ID}\"\n"),
            &[],
        )
        .unwrap();
        let id = cfg.api.node_id.unwrap();
        assert_eq!(
            cfg.node_url(&id),
            format!("https://api.example.com/v1/node/{ID}")
        );
    }

    #[test]
    fn env_beats_file_and_flags_beat_env() {
        let text = format!("[api]\nurl = \"https://file.example\"\nnode_id = \"{ID}\"\n");
        let cfg = load(&text, &[(ENV_API_URL, "https://env.example")]).unwrap();
        assert_eq!(cfg.api.url, "https://env.example");
        let map: HashMap<&str, &str> = [(ENV_API_URL, "https://env.example")].into();
        let lookup = move |k: &str| map.get(k).map(|v| v.to_string());
        let flags = Overrides {
            api_url: Some("https://flag.example".into()),
            ..Default::default()
        };
        let cfg = Config::from_toml(&text, Path::new("/x.toml"), &flags, &lookup).unwrap();
        assert_eq!(cfg.api.url, "https://flag.example");
    }

    #[test]
    fn bad_env_uuid_names_the_variable() {
        let e = load("", &[(ENV_NODE_ID, "nope")]).unwrap_err().to_string();
        assert!(e.starts_with(ENV_NODE_ID), "{e}");
    }

    #[test]
    fn token_from_file_is_trimmed_and_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let tf = dir.path().join("token");
        std::fs::write(&tf, "  tok-from-file\n").unwrap();
        let cfg = load(
            &format!("[api]\naccess_token_file = \"{}\"\n", tf.display()),
            &[],
        )
        .unwrap();
        assert_eq!(
            cfg.api.access_token.as_ref().unwrap().expose(),
            "tok-from-file"
        );
        let shown = cfg.to_redacted_toml();
        assert!(!shown.contains("tok-from-file"), "{shown}");
        let cfg = load("[api]\naccess_token = \"abc\"\n", &[]).unwrap();
        let shown = cfg.to_redacted_toml();
        assert!(shown.contains("access_token = \"<redacted>\""), "{shown}");
        assert!(!shown.contains("abc"), "{shown}");
    }

    #[test]
    fn world_readable_token_files_are_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("c.toml");
        std::fs::write(&cfg_path, "[api]\naccess_token = \"x\"\n").unwrap();
        std::fs::set_permissions(&cfg_path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let cfg = Config::load(
            &Overrides {
                config: Some(cfg_path.clone()),
                ..Default::default()
            },
            &|_| None,
        )
        .unwrap();
        assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
        assert!(cfg.warnings[0].contains("readable by every user"));
        std::fs::set_permissions(&cfg_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cfg = Config::load(
            &Overrides {
                config: Some(cfg_path),
                ..Default::default()
            },
            &|_| None,
        )
        .unwrap();
        assert!(cfg.warnings.is_empty());
    }

    #[test]
    fn both_token_sources_refused() {
        let e = err("[api]\naccess_token = \"a\"\naccess_token_file = \"/x\"\n");
        assert!(e.contains("both"), "{e}");
    }

    #[test]
    fn unreadable_token_file() {
        let e = err("[api]\naccess_token_file = \"/nonexistent/token\"\n");
        assert!(e.contains("api.access_token_file"), "{e}");
    }

    #[test]
    fn state_dir_precedence() {
        let cfg = load("", &[("STATE_DIRECTORY", "/run/sd:/other")]).unwrap();
        assert_eq!(cfg.state.dir, PathBuf::from("/run/sd"));
        let cfg = load(
            "[state]\ndir = \"/from/file\"\n",
            &[("STATE_DIRECTORY", "/run/sd")],
        )
        .unwrap();
        assert_eq!(cfg.state.dir, PathBuf::from("/from/file"));
        let cfg = load(
            "[state]\ndir = \"/from/file\"\n",
            &[(ENV_STATE_DIR, "/env")],
        )
        .unwrap();
        assert_eq!(cfg.state.dir, PathBuf::from("/env"));
    }

    #[test]
    fn bad_log_level() {
        let e = err("[log]\nlevel = \"info,[[[\"\n");
        assert!(e.contains("log.level"), "{e}");
        let e = err("[log]\nformat = \"xml\"\n");
        assert!(e.contains("log.format"), "{e}");
    }

    #[test]
    fn backoff_order() {
        let e = err("[heartbeat]\ninitial_backoff = \"10s\"\nmax_backoff = \"1s\"\n");
        assert!(e.contains("heartbeat.max_backoff"), "{e}");
    }

    #[test]
    fn gpu_modes() {
        for (s, m) in [
            ("auto", GpuMode::Auto),
            ("nvml", GpuMode::Nvml),
            ("pci", GpuMode::Pci),
            ("off", GpuMode::Off),
        ] {
            let cfg = load(&format!("[inventory]\ngpu = \"{s}\"\n"), &[]).unwrap();
            assert_eq!(cfg.inventory.gpu, m);
        }
        assert!(err("[inventory]\ngpu = \"cuda\"\n").contains("inventory.gpu"));
    }
}
