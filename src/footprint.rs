//! Footprint marks for the benchmark (`bench/footprint.py`): with `EXALSIUS_FOOTPRINT_MARKS`
//! set to a file, each phase of `run` (command line parsed, configuration, logging, runtime,
//! HTTP client with its TLS roots, state, first inventory, first and later heartbeats) appends
//! the process's resident memory at that moment — total, anonymous, file-backed and the peak —
//! so the growth between two marks is what that phase cost. Without the variable each mark is
//! one relaxed atomic load.

use std::io::Write;
use std::sync::OnceLock;

static FILE: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();

/// Appends `phase` and the resident memory now (KiB), when marks are asked for.
pub fn mark(phase: &str) {
    let Some(path) = FILE
        .get_or_init(|| std::env::var_os("EXALSIUS_FOOTPRINT_MARKS").map(Into::into))
        .as_ref()
    else {
        return;
    };
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .unwrap_or("0")
            .to_string()
    };
    let line = format!(
        "{phase}\t{}\t{}\t{}\t{}\n",
        field("VmRSS:"),
        field("RssAnon:"),
        field("RssFile:"),
        field("VmHWM:")
    );
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// After each heartbeat: marks the 1st, 10th, 100th and 1000th.
pub fn heartbeat_done() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let n = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
    if matches!(n, 1 | 10 | 100 | 1000) {
        mark(&format!("heartbeat {n}"));
    }
}
