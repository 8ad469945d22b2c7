//! tracing set-up: everything to stderr (stdout belongs to the command's output), text or
//! JSON, no timestamps under systemd (the journal adds its own).

use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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

/// Parses a log filter: a level (`info`), or comma-separated `target=level` directives with an
/// optional bare default (`exalsius_node_agent=debug,warn`). A plain target filter rather than
/// `EnvFilter`: the same directives operators use, without a regex engine in the binary.
pub fn parse_filter(level: &str) -> Result<Targets, String> {
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let target = directive.split_once('=').map_or(directive, |(t, _)| t);
        if !target
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-')
        {
            return Err(format!("{target:?} is not a module path"));
        }
    }
    level.trim().parse::<Targets>().map_err(|e| e.to_string())
}

type Base = tracing_subscriber::layer::Layered<
    tracing_subscriber::reload::Layer<Targets, tracing_subscriber::Registry>,
    tracing_subscriber::Registry,
>;
type FmtLayer = Box<dyn tracing_subscriber::Layer<Base> + Send + Sync>;

/// The handles `reconfigure` uses to change the filter and the format of the running
/// subscriber (SIGHUP).
struct Handles {
    filter: tracing_subscriber::reload::Handle<Targets, tracing_subscriber::Registry>,
    fmt: tracing_subscriber::reload::Handle<FmtLayer, Base>,
}

static HANDLES: std::sync::OnceLock<Handles> = std::sync::OnceLock::new();

fn fmt_layer(format: LogFormat) -> FmtLayer {
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !under_journal && std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    match (format, under_journal) {
        (LogFormat::Json, _) => Box::new(fmt.json().flatten_event(true)),
        (LogFormat::Text, true) => Box::new(fmt.without_time()),
        (LogFormat::Text, false) => Box::new(fmt),
    }
}

/// Installs the global subscriber. `level` was validated with the config; an invalid one
/// (impossible in practice) falls back to `info`.
pub fn init(level: &str, format: LogFormat) {
    let filter = parse_filter(level).unwrap_or_else(|_| Targets::new().with_default(Level::INFO));
    let (filter, filter_handle) = tracing_subscriber::reload::Layer::new(filter);
    let (fmt, fmt_handle) = tracing_subscriber::reload::Layer::new(fmt_layer(format));
    let result = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init();
    // Already installed (tests calling twice): keep the first.
    if result.is_ok() {
        let _ = HANDLES.set(Handles {
            filter: filter_handle,
            fmt: fmt_handle,
        });
    }
}

/// Applies a new level and format to the running subscriber (SIGHUP).
pub fn reconfigure(level: &str, format: LogFormat) -> Result<(), String> {
    let Some(h) = HANDLES.get() else {
        return Err("logging is not initialised".to_string());
    };
    let filter = parse_filter(level)?;
    h.filter.reload(filter).map_err(|e| e.to_string())?;
    h.fmt.reload(fmt_layer(format)).map_err(|e| e.to_string())
}
