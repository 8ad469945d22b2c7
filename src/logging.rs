//! tracing set-up: everything to stderr (stdout belongs to the command's output), text or
//! JSON, no timestamps under systemd (the journal adds its own).

use crate::config::LogFormat;
use std::io::IsTerminal;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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

/// Installs the global subscriber. `level` was validated with the config; an invalid one
/// (impossible in practice) falls back to `info`.
pub fn init(level: &str, format: LogFormat) {
    let filter = parse_filter(level).unwrap_or_else(|_| Targets::new().with_default(Level::INFO));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !under_journal && std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    let result = match (format, under_journal) {
        (LogFormat::Json, _) => registry.with(fmt.json().flatten_event(true)).try_init(),
        (LogFormat::Text, true) => registry.with(fmt.without_time()).try_init(),
        (LogFormat::Text, false) => registry.with(fmt).try_init(),
    };
    // Already installed (tests calling twice): keep the first.
    let _ = result;
}
