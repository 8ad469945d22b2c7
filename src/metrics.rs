//! Prometheus metrics through node_exporter's textfile collector: no listening socket. After
//! every heartbeat attempt the whole file is rewritten atomically (a temp file beside it, mode
//! 0644, renamed over it), so the collector never reads half a file. The temp file's name does
//! not end in `.prom`, so the collector never reads it either.
//!
//! Counters start at zero with each process (Prometheus' `rate()` handles the reset); the
//! gauges that describe the node (last success, failures, token expiry) are seeded from the
//! state file, so a restart does not make a failing node look healthy or a healthy one new.
//!
//! The textfile directory is the operator's choice and may sit on a mount that stops
//! answering: the file is written on a thread of its own, one write in flight at a time, so a
//! write that hangs costs that thread only. Writes asked for meanwhile replace each other (each
//! is the whole file), and the newest goes out when the hung one returns.

use crate::state::State;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// Prefix of every metric name.
const NS: &str = "exalsius_node_agent";
/// Upper bounds of the heartbeat latency buckets, in seconds: a healthy API answers in tens of
/// milliseconds; the default request timeout is 10 s.
pub const LATENCY_BUCKETS: [f64; 9] = [0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Every attempt outcome, pre-set to zero so `rate()` sees a series from the first scrape.
pub const OUTCOMES: [&str; 5] = ["ok", "transient", "unauthorized", "not_found", "rejected"];
/// Inventory sources whose failures are counted.
pub const INVENTORY_SOURCES: [&str; 2] = ["collection", "nvml"];

/// A write still running after this long is reported (once): writing a few kilobytes takes
/// milliseconds, so it is a file system that stopped answering.
pub const WRITE_STUCK_AFTER: Duration = Duration::from_secs(10);

/// At exit the last write is awaited this long: a local write takes well under a millisecond,
/// and a hung one must not delay the stop SIGTERM promises within a second.
pub const EXIT_FLUSH_WAIT: Duration = Duration::from_millis(300);

/// The build, for `exalsius_node_agent_build_info`.
pub fn build_commit() -> &'static str {
    option_env!("EXALSIUS_BUILD_COMMIT").unwrap_or("unknown")
}

/// One GPU's health states, as the metrics file shows them.
#[derive(Debug, Clone)]
struct GpuStates {
    index: u32,
    uuid: String,
    bus_id: String,
    states: Vec<crate::inventory::gpu::health::GpuState>,
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
    /// Per NVML GPU (index, UUID, bus id): its health states (`gpu_health_state`).
    gpu_states: Vec<GpuStates>,
    /// Where the token presented next is on disk (2, 1, 0: [`Metrics::token_persisted`]).
    token_persisted: Option<u8>,
    refresh_seconds: Option<f64>,
    inventory_errors: BTreeMap<&'static str, u64>,
    /// The thread that writes the file (shared by clones).
    writer: Arc<Mutex<Writer>>,
}

/// The writing thread's state.
#[derive(Debug, Default)]
struct Writer {
    /// Since when a write is in flight (`None`: no thread is writing).
    busy_since: Option<Instant>,
    /// The newest file asked for while a write was in flight.
    next: Option<String>,
    /// A hung write was reported.
    stuck_reported: bool,
    /// The kind of the last write error warned about (one warning per kind).
    error: Option<std::io::ErrorKind>,
    /// The configuration no longer names the file: remove it after the write in flight.
    retired: bool,
}

fn lock(w: &Mutex<Writer>) -> std::sync::MutexGuard<'_, Writer> {
    w.lock().unwrap_or_else(PoisonError::into_inner)
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
            gpu_states: Vec::new(),
            token_persisted: None,
            refresh_seconds: None,
            inventory_errors: INVENTORY_SOURCES.iter().map(|s| (*s, 0)).collect(),
            writer: Arc::default(),
        }
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The configuration no longer asks for this file (a reload moved it or switched metrics
    /// off): removes it, so node_exporter does not serve frozen figures for ever. Only a
    /// regular file is removed (never what a symlink points to); a failure is logged.
    /// On the writing thread, after any write in flight (which would create it again), so
    /// that a hung mount holds that thread only.
    pub fn retire(self) {
        let mut w = lock(&self.writer);
        w.next = None;
        w.retired = true;
        if w.busy_since.is_some() {
            return;
        }
        w.busy_since = Some(Instant::now());
        drop(w);
        if let Err(e) = self.spawn_writer(|writer, path| {
            remove_written(path);
            lock(writer).busy_since = None;
        }) {
            tracing::warn!(
                "metrics: cannot start the thread that removes {}: {e}",
                self.path.display()
            );
        }
    }

    /// Starts the writing thread with `job` (the caller has set `busy_since`); if the thread
    /// cannot start, no write is in flight after all.
    fn spawn_writer(
        &self,
        job: impl FnOnce(&Mutex<Writer>, &Path) + Send + 'static,
    ) -> std::io::Result<()> {
        let (writer, path) = (Arc::clone(&self.writer), self.path.clone());
        let spawned = std::thread::Builder::new()
            .name("metrics-writer".into())
            .spawn(move || job(&writer, &path));
        if spawned.is_err() {
            lock(&self.writer).busy_since = None;
        }
        spawned.map(drop)
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

    /// Records the health states of the GPUs NVML checked (replacing the last refresh's).
    pub fn gpu_states(&mut self, gpus: &[crate::inventory::gpu::Gpu]) {
        self.gpu_states = gpus
            .iter()
            .filter(|g| g.health.is_some())
            .map(|g| GpuStates {
                index: g.index,
                uuid: g.uuid.clone().unwrap_or_default(),
                bus_id: g.bus_id.clone(),
                states: g.states(),
            })
            .collect();
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
        self.render_gpu_states(&mut out);
        out
    }

    /// `gpu_health_state{gpu,uuid,bus_id,state}`: 1 while the GPU is in that state, else 0;
    /// every state of every NVML GPU is written, so an alert resolves when the state clears.
    fn render_gpu_states(&self, out: &mut String) {
        if self.gpu_states.is_empty() {
            return;
        }
        let _ = write!(
            out,
            "# HELP {NS}_gpu_health_state 1 while NVML reports the GPU in this health state (not counted: reset_required, gpu_lost, row_remap_failed, fabric_not_ready, fabric_failed).\n# TYPE {NS}_gpu_health_state gauge\n"
        );
        for g in &self.gpu_states {
            for s in crate::inventory::gpu::health::ALL_STATES {
                let _ = writeln!(
                    out,
                    "{NS}_gpu_health_state{{gpu=\"{}\",uuid=\"{}\",bus_id=\"{}\",state=\"{}\"}} {}",
                    g.index,
                    label(&g.uuid),
                    label(&g.bus_id),
                    s.name(),
                    u8::from(g.states.contains(&s))
                );
            }
        }
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

    /// Rewrites the file (on the writing thread, see the module docs); a failure is logged
    /// once per distinct error and never stops a heartbeat.
    pub fn write(&mut self) {
        let body = self.render();
        let mut w = lock(&self.writer);
        if let Some(since) = w.busy_since {
            w.next = Some(body);
            if since.elapsed() >= WRITE_STUCK_AFTER
                && !std::mem::replace(&mut w.stuck_reported, true)
            {
                tracing::warn!(
                    "metrics: writing {} has not returned for {}s: the file system there does not answer; \
                     heartbeats go on, and the newest metrics are written when it does",
                    self.path.display(),
                    since.elapsed().as_secs()
                );
            }
            return;
        }
        w.busy_since = Some(Instant::now());
        drop(w);
        if let Err(e) =
            self.spawn_writer(move |writer, path| write_until_drained(writer, path, body))
        {
            tracing::warn!(
                "metrics: cannot start the writing thread: {e}; retried after the next attempt"
            );
        }
    }

    /// Waits (blocking) until no write is in flight, at most `within` (at exit: `run --once`
    /// ends right after its one write).
    /// A write that started longer than `within` ago is hung: not waited for at all.
    pub fn flush(&self, within: Duration) {
        loop {
            match lock(&self.writer).busy_since {
                Some(since) if since.elapsed() < within => {}
                _ => return,
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until no write is in flight (tests).
    #[cfg(test)]
    fn flushed(&self) -> &Self {
        self.flush(Duration::from_secs(60));
        self
    }
}

/// The writing thread: writes `body`, then whatever was asked for meanwhile, until nothing is.
fn write_until_drained(writer: &Mutex<Writer>, path: &Path, mut body: String) {
    loop {
        let result = write_atomic(path, body.as_bytes());
        let mut w = lock(writer);
        report(&mut w, path, result);
        if w.retired {
            drop(w);
            remove_written(path);
            lock(writer).busy_since = None;
            return;
        }
        match w.next.take() {
            Some(next) => {
                body = next;
                w.busy_since = Some(Instant::now());
            }
            None => {
                w.busy_since = None;
                return;
            }
        }
    }
}

/// Logs a write's result: each kind of error once, and the recovery.
fn report(w: &mut Writer, path: &Path, result: std::io::Result<()>) {
    if std::mem::take(&mut w.stuck_reported) {
        tracing::info!("metrics: the hung write of {} has returned", path.display());
    }
    match result {
        Ok(()) => {
            if w.error.take().is_some() {
                tracing::info!("metrics: writing {} works again", path.display());
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
            if w.error != Some(e.kind()) {
                tracing::warn!(
                    "metrics: cannot write {}: {msg}; heartbeats go on, retried after each attempt \
                     (the packaged unit needs a drop-in to write there: see \
                     /usr/share/doc/exalsius-node-agent/operator-guide.md, \"Monitoring\")",
                    path.display()
                );
                w.error = Some(e.kind());
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

/// Removes a metrics file the configuration no longer names: a regular file only (never what
/// a symlink points to); a failure is logged.
fn remove_written(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(
                textfile = %path.display(),
                "metrics: removed the file the configuration no longer names"
            ),
            Err(e) => tracing::warn!(
                textfile = %path.display(),
                "metrics: cannot remove the file the configuration no longer names: {e}"
            ),
        },
        _ => {}
    }
}

/// The file in the state directory that records which metrics file the agent writes, so that
/// a later start (or reload) whose configuration names another file, or none, can remove it.
pub const WRITTEN_MARKER: &str = "metrics-textfile";

/// [`adopt`] on a thread of its own (SIGHUP: the files it may remove are the operator's, on
/// mounts that may not answer), at most one at a time; a reload while one is stuck skips it.
pub fn adopt_off_runtime(state_dir: &Path, current: Option<&Path>) {
    static ADOPTING: crate::bounded::Kind = crate::bounded::Kind::new();
    let (dir, current) = (state_dir.to_path_buf(), current.map(Path::to_path_buf));
    if let Err(e) = ADOPTING.spawn(move || adopt(&dir, current.as_deref())) {
        tracing::warn!("metrics: the file an earlier configuration named is not checked now: {e}");
    }
}

/// Makes `current` (the configured `metrics.textfile`, `None`: off) the one metrics file the
/// agent answers for: a file an earlier run or configuration wrote elsewhere — recorded in
/// `{state_dir}/metrics-textfile` — is removed (a regular `*.prom` file only, never what a
/// symlink points to), and the record names `current` (or goes). Best effort: a failure is
/// logged and changes nothing else.
pub fn adopt(state_dir: &Path, current: Option<&Path>) {
    use std::os::unix::ffi::OsStrExt;
    let marker = state_dir.join(WRITTEN_MARKER);
    let previous = std::fs::read(&marker)
        .ok()
        .map(|b| PathBuf::from(std::ffi::OsStr::from_bytes(&b)));
    if let Some(prev) = previous.filter(|p| {
        Some(p.as_path()) != current
            && p.is_absolute()
            && p.extension().is_some_and(|e| e == "prom")
    }) {
        remove_written(&prev);
    }
    let recorded = match current {
        Some(p) => std::fs::write(&marker, p.as_os_str().as_bytes()),
        None => match std::fs::remove_file(&marker) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        },
    };
    if let Err(e) = recorded {
        tracing::warn!(
            "metrics: cannot record the metrics file in {}: {e}",
            marker.display()
        );
    }
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
    fn writes_asked_for_while_one_is_in_flight_end_with_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.prom");
        let mut m = Metrics::new(&path, Duration::from_secs(60), None);
        // Held busy as a hung write would be: the writes queue, none starts a second thread.
        lock(&m.writer).busy_since = Some(Instant::now());
        for _ in 0..50 {
            m.attempt("ok", Some(200), Duration::from_millis(1), &state());
            m.write();
        }
        assert!(
            !path.exists(),
            "written while the first write was in flight"
        );
        let newest = lock(&m.writer).next.take().unwrap();
        assert!(newest.contains("heartbeats_total{outcome=\"ok\"} 50\n"));
        // When the hung write returns, the newest file goes out.
        let writer = Arc::clone(&m.writer);
        write_until_drained(&writer, &path, newest);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("outcome=\"ok\"} 50\n")
        );
        assert!(lock(&m.writer).busy_since.is_none());
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
        m.flushed();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("agent.prom")]);
        assert!(lock(&m.writer).error.is_none());
        // A missing directory: remembered once, no panic.
        let mut bad = Metrics::new(
            &dir.path().join("missing/agent.prom"),
            Duration::from_secs(60),
            None,
        );
        bad.write();
        assert!(lock(&bad.flushed().writer).error.is_some());
    }
}
