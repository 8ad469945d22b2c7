//! The file as written: every key optional, unknown keys refused, every error with its key
//! path and line:column.

use super::{ConfigError, GpuMode, LogFormat};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;
use uuid::Uuid;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileConfig {
    pub(super) api: FileApi,
    pub(super) heartbeat: FileHeartbeat,
    pub(super) inventory: FileInventory,
    pub(super) state: FileState,
    pub(super) log: FileLog,
    pub(super) metrics: FileMetrics,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileApi {
    pub(super) url: Option<String>,
    pub(super) node_id: Option<Uuid>,
    pub(super) access_token: Option<String>,
    pub(super) access_token_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub(super) timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub(super) connect_timeout: Option<Duration>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) allow_insecure_http: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileHeartbeat {
    #[serde(with = "humantime_serde")]
    pub(super) interval: Option<Duration>,
    pub(super) jitter: Option<f64>,
    #[serde(with = "humantime_serde")]
    pub(super) initial_backoff: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub(super) max_backoff: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileInventory {
    #[serde(with = "humantime_serde")]
    pub(super) refresh_interval: Option<Duration>,
    pub(super) gpu: Option<GpuMode>,
    pub(super) nvml_library: Option<PathBuf>,
    pub(super) description: Option<String>,
    pub(super) count_unhealthy_gpus: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileState {
    pub(super) dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileMetrics {
    pub(super) textfile: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct FileLog {
    pub(super) level: Option<String>,
    pub(super) format: Option<LogFormat>,
}

pub(super) fn parse(text: &str, path: &str) -> Result<FileConfig, ConfigError> {
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
