//! Prometheus metrics through node_exporter's textfile collector: no listening socket. After
//! every heartbeat attempt the whole file is rewritten atomically (a temp file beside it, mode
//! 0644, renamed over it), so the collector never reads half a file. The temp file's name does
//! not end in `.prom`, so the collector never reads it either.
//!
//! Counters start at zero with each process (Prometheus' `rate()` handles the reset); the
//! gauges that describe the node (last success, failures, token expiry) are seeded from the
//! state file, so a restart does not make a failing node look healthy or a healthy one new.

use crate::state::State;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Prefix of every metric name.
const NS: &str = "exalsius_node_agent";
/// Upper bounds of the heartbeat latency buckets, in seconds: a healthy API answers in tens of
/// milliseconds; the default request timeout is 10 s.
pub const LATENCY_BUCKETS: [f64; 9] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Every attempt outcome, pre-set to zero so `rate()` sees a series from the first scrape.
pub const OUTCOMES: [&str; 5] = ["ok", "transient", "unauthorized", "not_found", "rejected"];
/// Inventory sources whose failures are counted.
pub const INVENTORY_SOURCES: [&str; 2] = ["collection", "nvml"];

/// The build, for `exalsius_node_agent_build_info`.
pub fn build_commit() -> &'static str {
    option_env!("EXALSIUS_BUILD_COMMIT").unwrap_or("unknown")
}

/// What the agent knows about itself, rendered into the exposition format.
#[derive(Debug, Clone)]
pub struct Metrics {
    path: PathBuf,
    started: SystemTime,
    interval: Duration,
    attempts: BTreeMap<&'static str, u64>,
    latency_buckets: [u64; LATENCY_BUCKETS.len()],
    latency_sum: f64,
    latency_count: u64,
    last_attempt: Option<SystemTime>,
    last_success: Option<SystemTime>,
    consecutive_failures: u32,
    last_status: Option<u16>,
    token_expiry: Option<SystemTime>,
    gpus: Option<i32>,
    /// Where the token presented next is on disk (2, 1, 0: [`Metrics::token_persisted`]).
    token_persisted: Option<u8>,
    refresh_seconds: Option<f64>,
    inventory_errors: BTreeMap<&'static str, u64>,
    /// The kind of the last write error warned about (one warning per kind).
    write_error: Option<std::io::ErrorKind>,
}

impl Metrics {
    /// Metrics for the file at `path`, seeded from the stored state.
    pub fn new(path: &Path, interval: Duration, state: Option<&State>) -> Self {
        Self {
            path: path.to_path_buf(),
            started: SystemTime::now(),
            interval,
            attempts: OUTCOMES.iter().map(|o| (*o, 0)).collect(),
            latency_buckets: [0; LATENCY_BUCKETS.len()],
            latency_sum: 0.0,
            latency_count: 0,
            last_attempt: state.and_then(|s| s.last_attempt_at),
            last_success: state.and_then(|s| s.last_success_at),
            consecutive_failures: state.map_or(0, |s| s.consecutive_failures),
            last_status: None,
            token_expiry: state.and_then(|s| s.token_expires_at),
            gpus: None,
            token_persisted: None,
            refresh_seconds: None,
            inventory_errors: INVENTORY_SOURCES.iter().map(|s| (*s, 0)).collect(),
            write_error: None,
        }
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new heartbeat interval (SIGHUP).
    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval;
    }

    /// Records one attempt: its outcome label, HTTP status (if an answer came), how long it
    /// took, and the state after it.
    pub fn attempt(
        &mut self,
        outcome: &'static str,
        status: Option<u16>,
        took: Duration,
        state: &State,
    ) {
        *self.attempts.entry(outcome).or_insert(0) += 1;
        let secs = took.as_secs_f64();
        for (bound, count) in LATENCY_BUCKETS.iter().zip(self.latency_buckets.iter_mut()) {
            if secs <= *bound {
                *count += 1;
            }
        }
        self.latency_sum += secs;
        self.latency_count += 1;
        self.last_status = status;
        self.last_attempt = state.last_attempt_at;
        self.last_success = state.last_success_at;
        self.consecutive_failures = state.consecutive_failures;
        self.token_expiry = state.token_expires_at;
    }

    /// Where the token presented next is on disk: 2 in `state.json`, 1 only in the token
    /// reserve (`state.json` cannot be saved), 0 nowhere (a crash now loses it).
    pub fn token_persisted(&mut self, level: u8) {
        self.token_persisted = Some(level);
    }

    /// Records an inventory refresh: the GPUs it reported and how long it took.
    pub fn inventory(&mut self, gpus: i32, took: Duration) {
        self.gpus = Some(gpus);
        self.refresh_seconds = Some(took.as_secs_f64());
    }

    /// Records a failed inventory source (`collection`: the whole collection timed out or
    /// panicked; `nvml`: an NVML error).
    pub fn inventory_error(&mut self, source: &'static str) {
        *self.inventory_errors.entry(source).or_insert(0) += 1;
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_gauges(&mut out);
        let _ = write!(
            out,
            "# HELP {NS}_build_info The running build (always 1).\n# TYPE {NS}_build_info gauge\n\
             {NS}_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
            label(env!("CARGO_PKG_VERSION")),
            label(build_commit())
        );
        counter(
            &mut out,
            "heartbeats_total",
            "Heartbeat attempts by outcome.",
            "outcome",
            &self.attempts,
        );
        counter(
            &mut out,
            "inventory_errors_total",
            "Failed inventory collections by source.",
            "source",
            &self.inventory_errors,
        );
        self.render_latency(&mut out);
        out
    }

    fn render_gauges(&self, out: &mut String) {
        let ts = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        };
        let mut rows = vec![
            (
                "start_time_seconds",
                "When this agent process started (Unix time).",
                ts(self.started),
            ),
            (
                "heartbeat_interval_seconds",
                "The configured heartbeat.interval.",
                self.interval.as_secs_f64(),
            ),
            (
                "last_attempt_timestamp_seconds",
                "Last heartbeat attempt (Unix time; 0: never).",
                self.last_attempt.map_or(0.0, ts),
            ),
            (
                "last_success_timestamp_seconds",
                "Last successful heartbeat (Unix time; 0: never).",
                self.last_success.map_or(0.0, ts),
            ),
            (
                "consecutive_failures",
                "Failed heartbeat attempts since the last success.",
                f64::from(self.consecutive_failures),
            ),
            (
                "last_http_status",
                "HTTP status of the last attempt (0: no answer, e.g. a connection error).",
                f64::from(self.last_status.unwrap_or(0)),
            ),
        ];
        if let Some(t) = self.token_expiry {
            rows.push(("token_expiry_timestamp_seconds", "When the stored access token expires (Unix time); absent when the API did not say.", ts(t)));
        }
        if let Some(n) = self.token_persisted {
            rows.push(("token_persisted", "Where the token presented next is on disk: 2 state.json, 1 only the token reserve (state.json cannot be saved), 0 nowhere (alarm: a crash now loses the node).", f64::from(n)));
        }
        if let Some(n) = self.gpus {
            rows.push(("gpus", "GPUs reported to the API.", f64::from(n)));
        }
        if let Some(s) = self.refresh_seconds {
            rows.push((
                "inventory_refresh_duration_seconds",
                "How long the last inventory collection took.",
                s,
            ));
        }
        for (name, help, value) in rows {
            let _ = write!(
                out,
                "# HELP {NS}_{name} {help}\n# TYPE {NS}_{name} gauge\n{NS}_{name} {}\n",
                num(value)
            );
        }
    }

    fn render_latency(&self, out: &mut String) {
        let name = format!("{NS}_heartbeat_duration_seconds");
        let _ = write!(
            out,
            "# HELP {name} Time from sending a heartbeat to its outcome.\n# TYPE {name} histogram\n"
        );
        for (bound, n) in LATENCY_BUCKETS.iter().zip(self.latency_buckets.iter()) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {n}", num(*bound));
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.latency_count,
            num(self.latency_sum),
            self.latency_count
        );
    }

    /// Rewrites the file; a failure is logged once per distinct error and never stops a
    /// heartbeat.
    pub fn write(&mut self) {
        match write_atomic(&self.path, self.render().as_bytes()) {
            Ok(()) => {
                if self.write_error.take().is_some() {
                    tracing::info!("metrics: writing {} works again", self.path.display());
                }
            }
            Err(e) => {
                // tempfile's message names the random temp file, which would make every
                // failure look new: one warning per kind of error, the message without it.
                let msg = e.to_string();
                let msg = msg
                    .split(" at path ")
                    .next()
                    .unwrap_or_default()
                    .to_string();
                if self.write_error != Some(e.kind()) {
                    tracing::warn!(
                        "metrics: cannot write {}: {msg}; heartbeats go on, retried after each attempt \
                         (the packaged unit needs a drop-in to write there: see \
                         /usr/share/doc/exalsius-node-agent/operator-guide.md, \"Monitoring\")",
                        self.path.display()
                    );
                    self.write_error = Some(e.kind());
                }
            }
        }
    }
}

/// A counter family with one label.
fn counter(out: &mut String, name: &str, help: &str, key: &str, values: &BTreeMap<&str, u64>) {
    let _ = write!(
        out,
        "# HELP {NS}_{name} {help}\n# TYPE {NS}_{name} counter\n"
    );
    for (value, n) in values {
        let _ = writeln!(out, "{NS}_{name}{{{key}=\"{value}\"}} {n}");
    }
}

/// A number as the exposition format writes it (`1`, `0.25`, no exponent for ordinary
/// values).
fn num(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Escapes a label value: backslash, double quote, newline.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Temp file in the same directory (not matching `*.prom`), mode 0644, renamed over `path`.
/// No fsync: after a crash a stale or missing metrics file is harmless, and the next attempt
/// rewrites it.
fn write_atomic(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map_or_else(|| "metrics".into(), |n| n.to_string_lossy().into_owned());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(body)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use uuid::Uuid;

    fn state() -> State {
        State::new(Uuid::nil(), "http://x", Secret::new("t"), None)
    }

    #[test]
    fn seeded_from_state_and_counts_attempts() {
        let mut s = state();
        s.last_success_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        s.consecutive_failures = 4;
        let mut m = Metrics::new(Path::new("/x.prom"), Duration::from_secs(60), Some(&s));
        let text = m.render();
        assert!(text.contains("exalsius_node_agent_last_success_timestamp_seconds 1700000000\n"));
        assert!(text.contains("exalsius_node_agent_consecutive_failures 4\n"));
        assert!(text.contains("exalsius_node_agent_heartbeats_total{outcome=\"ok\"} 0\n"));
        assert!(!text.contains("token_expiry"), "unknown expiry is absent");
        s.consecutive_failures = 0;
        m.attempt("ok", Some(200), Duration::from_millis(30), &s);
        m.attempt("transient", None, Duration::from_secs(20), &s);
        let text = m.render();
        assert!(text.contains("exalsius_node_agent_heartbeats_total{outcome=\"ok\"} 1\n"));
        assert!(text.contains("exalsius_node_agent_heartbeats_total{outcome=\"transient\"} 1\n"));
        assert!(text.contains("exalsius_node_agent_last_http_status 0\n"));
        // 30 ms: not in the 25 ms bucket, in the 50 ms one; 20 s only in +Inf.
        assert!(text.contains("_bucket{le=\"0.025\"} 0\n"));
        assert!(text.contains("_bucket{le=\"0.05\"} 1\n"));
        assert!(text.contains("_bucket{le=\"10\"} 1\n"));
        assert!(text.contains("_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("exalsius_node_agent_heartbeat_duration_seconds_count 2\n"));
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(num(3.0), "3");
        assert_eq!(num(0.25), "0.25");
    }

    #[test]
    fn written_atomically_with_mode_0644() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.prom");
        let mut m = Metrics::new(&path, Duration::from_secs(60), None);
        m.write();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("agent.prom")]);
        assert!(m.write_error.is_none());
        // A missing directory: remembered once, no panic.
        let mut bad = Metrics::new(
            &dir.path().join("missing/agent.prom"),
            Duration::from_secs(60),
            None,
        );
        bad.write();
        assert!(bad.write_error.is_some());
    }
}
