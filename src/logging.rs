//! tracing set-up: everything to stderr (stdout belongs to the command's output), text or
//! JSON, no timestamps under systemd (the journal adds its own).

use crate::config::LogFormat;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` was validated with the config; an invalid one
/// (impossible in practice) falls back to `info`.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::builder()
        .parse(level)
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !under_journal && std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(ansi);
    let result = match (format, under_journal) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => builder.without_time().try_init(),
        (LogFormat::Text, false) => builder.try_init(),
    };
    // Already installed (tests calling twice): keep the first.
    let _ = result;
}
