//! From the parsed file, the environment and the flags to the effective [`Config`]: one small
//! function per section, and [`Layers`], which takes each layered value from the first layer
//! that has it (flag > environment > file > default) and remembers where it came from, so that
//! an error and `check-config` can name the origin.

use super::file::{FileApi, FileConfig, FileHeartbeat, FileInventory};
use super::validate::{bounded, parse_uuid, validate_state_dir, validate_textfile, validate_url};
use super::*;

/// Where values come from, and the origin of each one taken.
struct Layers<'a> {
    overrides: &'a Overrides,
    env: EnvLookup<'a>,
    /// The config file's path (or "configuration").
    file: String,
    origins: Vec<(&'static str, String)>,
}

impl Layers<'_> {
    /// The first of flag > environment > file > default that is set, noting its origin.
    fn pick<T>(
        &mut self,
        key: &'static str,
        flag: (Option<T>, &'static str),
        env: Option<&'static str>,
        file: Option<T>,
        parse_env: impl FnOnce(String) -> T,
    ) -> Option<(T, String)> {
        let found = if let Some(v) = flag.0 {
            Some((v, flag.1.to_string()))
        } else if let Some((name, v)) = env.and_then(|n| (self.env)(n).map(|v| (n, v))) {
            Some((parse_env(v), name.to_string()))
        } else {
            file.map(|v| (v, self.file.clone()))
        };
        if let Some((_, origin)) = &found {
            self.origins.push((key, origin.clone()));
        }
        found
    }

    /// A key only the file sets (or its default).
    fn file_or_default<T>(&mut self, key: &'static str, file: Option<T>, default: T) -> T {
        match file {
            Some(v) => {
                self.origins.push((key, self.file.clone()));
                v
            }
            None => default,
        }
    }

    fn invalid(&self, origin: &str, key: &'static str, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: origin.to_string(),
            key,
            message,
        }
    }
}

// Long: the sections in order and the cross-section warnings; each section is its own
// function below.
pub(super) fn build(
    file: FileConfig,
    source: Option<PathBuf>,
    overrides: &Overrides,
    env: EnvLookup<'_>,
) -> Result<Config, ConfigError> {
    let mut layers = Layers {
        overrides,
        env,
        file: origin_of(source.as_deref()),
        origins: Vec::new(),
    };
    // A token in the file is worth a warning when the file is open, even if the environment
    // overrides it: the file still exposes it.
    let file_has_token = file.api.access_token.is_some();
    let api = api(&mut layers, file.api)?;
    let heartbeat = heartbeat(&mut layers, file.heartbeat)?;
    let inventory = inventory(&mut layers, file.inventory)?;
    let state_dir = state_dir(&mut layers, file.state.dir)?;
    let level = log_level(&mut layers, file.log.level)?;
    let format = layers.file_or_default("log.format", file.log.format, LogFormat::default());
    let mut warnings = Vec::new();
    let textfile = match file.metrics.textfile {
        Some(p) => {
            if let Some(w) = validate_textfile(&p)
                .map_err(|m| layers.invalid(&layers.file, "metrics.textfile", m))?
            {
                warnings.push(w);
            }
            layers
                .origins
                .push(("metrics.textfile", layers.file.clone()));
            Some(p)
        }
        None => None,
    };
    if file_has_token
        && let Some(w) = source
            .as_deref()
            .and_then(crate::perms::secret_file_exposure)
    {
        warnings.push(format!("config file holds api.access_token but {w}"));
    }
    if let Some(w) = api
        .access_token_file
        .as_deref()
        .and_then(crate::perms::secret_file_exposure)
    {
        warnings.push(format!("api.access_token_file {w}"));
    }
    Ok(Config {
        source,
        warnings,
        origins: layers.origins,
        api,
        heartbeat,
        inventory,
        state: StateConfig { dir: state_dir },
        log: LogConfig { level, format },
        metrics: MetricsConfig { textfile },
    })
}

fn api(layers: &mut Layers<'_>, file: FileApi) -> Result<ApiConfig, ConfigError> {
    let flag = (layers.overrides.api_url.clone(), "--api-url");
    let (url, url_origin) = layers
        .pick("api.url", flag, Some(ENV_API_URL), file.url, |v| v)
        .unwrap_or_else(|| (DEFAULT_API_URL.to_string(), "default".to_string()));
    let allow_insecure_http =
        layers.file_or_default("api.allow_insecure_http", file.allow_insecure_http, false);
    let url = validate_url(&url, allow_insecure_http)
        .map_err(|m| layers.invalid(&url_origin, "api.url", m))?;

    // A UUID given by flag or environment is checked here (the file's by the parser).
    let flag = (layers.overrides.node_id.clone(), "--node-id");
    let node_id = match layers.pick(
        "api.node_id",
        flag.clone(),
        Some(ENV_NODE_ID),
        file.node_id.map(|u| u.to_string()),
        |v| v,
    ) {
        Some((text, origin)) => {
            Some(parse_uuid(&text).map_err(|m| layers.invalid(&origin, "api.node_id", m))?)
        }
        None => None,
    };

    let (access_token, access_token_file) =
        token(layers, file.access_token, file.access_token_file)?;
    let timeout = layers.file_or_default("api.timeout", file.timeout, DEFAULT_TIMEOUT);
    let connect_timeout = layers.file_or_default(
        "api.connect_timeout",
        file.connect_timeout,
        DEFAULT_CONNECT_TIMEOUT,
    );
    bounded(timeout, MAX_TIMEOUT).map_err(|m| layers.invalid(&layers.file, "api.timeout", m))?;
    bounded(connect_timeout, MAX_TIMEOUT)
        .map_err(|m| layers.invalid(&layers.file, "api.connect_timeout", m))?;
    if let Some(ca) = &file.ca_file {
        std::fs::metadata(ca)
            .map_err(|e| named_file_error(layers, "api.ca_file", ca, e, String::new()))?;
        layers.origins.push(("api.ca_file", layers.file.clone()));
    }
    Ok(ApiConfig {
        url,
        node_id,
        access_token,
        access_token_file,
        timeout,
        connect_timeout,
        ca_file: file.ca_file,
        allow_insecure_http,
    })
}

/// A file the configuration names could not be read: 78 when the operator must edit (see
/// [`super::is_operators_to_fix`]), else a fault of the machine (exit 1).
fn named_file_error(
    layers: &Layers<'_>,
    key: &'static str,
    path: &Path,
    e: std::io::Error,
    what: String,
) -> ConfigError {
    if super::is_operators_to_fix(&e) {
        layers.invalid(
            &layers.file,
            key,
            format!("= {}: {what}{e}", path.display()),
        )
    } else {
        ConfigError::NamedFileUnreadable {
            origin: layers.file.clone(),
            key,
            path: path.to_path_buf(),
            source: e,
        }
    }
}

/// `api.access_token` / `api.access_token_file` (one of them), or `EXALSIUS_ACCESS_TOKEN`,
/// which clears the file.
fn token(
    layers: &mut Layers<'_>,
    inline: Option<String>,
    path: Option<PathBuf>,
) -> Result<(Option<Secret>, Option<PathBuf>), ConfigError> {
    let from_env = (layers.env)(ENV_ACCESS_TOKEN);
    let (token, file) = match (from_env, inline, path) {
        (Some(t), _, _) => {
            layers
                .origins
                .push(("api.access_token", ENV_ACCESS_TOKEN.to_string()));
            (Some(Secret::new(t.trim())), None)
        }
        (None, Some(_), Some(_)) => {
            return Err(layers.invalid(
                &layers.file,
                "api.access_token",
                "and api.access_token_file are both set; keep one".to_string(),
            ));
        }
        (None, Some(t), None) => {
            layers
                .origins
                .push(("api.access_token", layers.file.clone()));
            (Some(Secret::new(t.trim())), None)
        }
        (None, None, Some(p)) => {
            let raw = std::fs::read_to_string(&p).map_err(|e| {
                named_file_error(
                    layers,
                    "api.access_token_file",
                    &p,
                    e,
                    "cannot read: ".to_string(),
                )
            })?;
            layers
                .origins
                .push(("api.access_token", p.display().to_string()));
            (Some(Secret::new(raw.trim())), Some(p))
        }
        (None, None, None) => (None, None),
    };
    if token.as_ref().is_some_and(Secret::is_blank) {
        return Err(layers.invalid(&layers.file, "api.access_token", "is empty".to_string()));
    }
    Ok((token, file))
}

fn heartbeat(layers: &mut Layers<'_>, file: FileHeartbeat) -> Result<HeartbeatConfig, ConfigError> {
    let interval = layers.file_or_default("heartbeat.interval", file.interval, DEFAULT_INTERVAL);
    bounded(interval, MAX_INTERVAL)
        .map_err(|m| layers.invalid(&layers.file, "heartbeat.interval", m))?;
    let jitter = layers.file_or_default("heartbeat.jitter", file.jitter, DEFAULT_JITTER);
    if !(0.0..=MAX_JITTER).contains(&jitter) {
        return Err(layers.invalid(
            &layers.file,
            "heartbeat.jitter",
            format!("= {jitter} is out of range (0 ≤ jitter ≤ {MAX_JITTER})"),
        ));
    }
    let initial_backoff = layers.file_or_default(
        "heartbeat.initial_backoff",
        file.initial_backoff,
        DEFAULT_INITIAL_BACKOFF,
    );
    bounded(initial_backoff, MAX_INTERVAL)
        .map_err(|m| layers.invalid(&layers.file, "heartbeat.initial_backoff", m))?;
    let max_backoff = layers.file_or_default(
        "heartbeat.max_backoff",
        file.max_backoff,
        DEFAULT_MAX_BACKOFF,
    );
    bounded(max_backoff, MAX_INTERVAL)
        .map_err(|m| layers.invalid(&layers.file, "heartbeat.max_backoff", m))?;
    if max_backoff < initial_backoff {
        return Err(layers.invalid(
            &layers.file,
            "heartbeat.max_backoff",
            format!(
                "= {} is below heartbeat.initial_backoff = {}",
                humantime::format_duration(max_backoff),
                humantime::format_duration(initial_backoff)
            ),
        ));
    }
    Ok(HeartbeatConfig {
        interval,
        jitter,
        initial_backoff,
        max_backoff,
    })
}

fn inventory(layers: &mut Layers<'_>, file: FileInventory) -> Result<InventoryConfig, ConfigError> {
    let refresh_interval = layers.file_or_default(
        "inventory.refresh_interval",
        file.refresh_interval,
        DEFAULT_REFRESH_INTERVAL,
    );
    bounded(refresh_interval, MAX_REFRESH_INTERVAL)
        .map_err(|m| layers.invalid(&layers.file, "inventory.refresh_interval", m))?;
    let gpu = layers.file_or_default("inventory.gpu", file.gpu, GpuMode::default());
    let nvml_library =
        layers.file_or_default("inventory.nvml_library", file.nvml_library.map(Some), None);
    let description =
        layers.file_or_default("inventory.description", file.description.map(Some), None);
    let count_unhealthy_gpus = layers.file_or_default(
        "inventory.count_unhealthy_gpus",
        file.count_unhealthy_gpus,
        false,
    );
    Ok(InventoryConfig {
        refresh_interval,
        gpu,
        nvml_library,
        description,
        count_unhealthy_gpus,
    })
}

fn state_dir(layers: &mut Layers<'_>, file: Option<PathBuf>) -> Result<PathBuf, ConfigError> {
    let flag = (layers.overrides.state_dir.clone(), "--state-dir");
    let (dir, origin) = layers
        .pick("state.dir", flag, Some(ENV_STATE_DIR), file, PathBuf::from)
        .map_or_else(
            || (default_state_dir(layers.env), "default".to_string()),
            |(d, o)| (d, o),
        );
    if dir.as_os_str().is_empty() {
        return Err(layers.invalid(&layers.file, "state.dir", "is empty".to_string()));
    }
    validate_state_dir(&dir).map_err(|m| layers.invalid(&origin, "state.dir", m))?;
    Ok(dir)
}

fn log_level(layers: &mut Layers<'_>, file: Option<String>) -> Result<String, ConfigError> {
    let flag = (layers.overrides.log_level.clone(), "--log-level");
    // EXALSIUS_LOG, then RUST_LOG: two environment layers.
    let env_layer = if (layers.env)(ENV_LOG).is_some() {
        Some(ENV_LOG)
    } else {
        Some("RUST_LOG")
    };
    let (level, origin) = layers
        .pick("log.level", flag, env_layer, file, |v| v)
        .unwrap_or_else(|| ("info".to_string(), "default".to_string()));
    if let Err(e) = crate::logging::parse_filter(&level) {
        return Err(layers.invalid(
            &origin,
            "log.level",
            format!("= {level:?} is not a valid filter: {e}"),
        ));
    }
    Ok(level)
}
