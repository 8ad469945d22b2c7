//! The heartbeat loop: sends, classifies each outcome, persists the state, logs, and waits.
//!
//! The decisions live beside it as pure code: [`schedule`] turns an outcome into the wait
//! (first heartbeat at once, the start splay, `interval × (1 ± jitter)`, backoff with equal
//! jitter, `Retry-After`, the slow schedule, never past half the token's remaining lifetime);
//! [`credentials`] decides which token is sent and which is stored. Scheduling uses the
//! monotonic clock (`tokio::time::Instant`); wall-clock time is used only for token expiry and
//! the timestamps in the state file.

pub mod credentials;
pub mod schedule;

pub use credentials::{AfterRejection, Credentials, Sending};
pub use schedule::{
    Backoff, MIN_TOKEN_REFRESH_WAIT, Schedule, Verdict, equal_jitter, jittered, secs,
};

use crate::api::{
    ApiClient, ClientError, Failure, FailureKind, NodePatchRequest, NodeSpecs, Success,
};
use crate::config::{Config, ConfigError};
use crate::inventory::{Collector, Inventory};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::state::{LockError, State, StateLock, StateStore, rfc3339};
use crate::systemd;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

/// An inventory collection that takes longer than this is abandoned for this round (the last
/// good specs are sent); NVML on a faulted GPU can block for minutes.
pub const COLLECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts made by `run --once` before it gives up.
pub const ONCE_ATTEMPTS: u32 = 3;

/// How the loop runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forever, until SIGTERM/SIGINT.
    Daemon,
    /// One heartbeat (up to [`ONCE_ATTEMPTS`] attempts), then exit.
    Once,
    /// No network: print each body to stdout instead of sending it.
    DryRun,
}

/// Why `run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// No usable node id / token.
    #[error("{0}")]
    Credentials(String),
    /// The HTTP client cannot be built (CA file).
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `--once` did not get a successful heartbeat.
    #[error("heartbeat failed: {0}")]
    OnceFailed(String),
    /// Another process writes this state directory.
    #[error(transparent)]
    Locked(LockError),
}

impl RunError {
    /// Process exit code: 78 for configuration problems, 1 for runtime failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::OnceFailed(_) | RunError::Locked(LockError::Held { .. }) => 1,
            _ => crate::config::EX_CONFIG,
        }
    }
}

/// Re-reads the configuration on SIGHUP.
pub type Reloader = Box<dyn Fn() -> Result<Config, ConfigError> + Send>;

/// The outside world's handles on the loop.
pub struct Control {
    /// Cancelled on SIGTERM/SIGINT.
    pub shutdown: CancellationToken,
    /// One message per SIGHUP.
    pub reload: Option<mpsc::Receiver<()>>,
    /// How to re-read the configuration.
    pub reloader: Option<Reloader>,
    /// How to build the inventory collector for a configuration (SIGHUP changing
    /// `inventory.gpu` or `inventory.nvml_library`); `None` keeps the one given at start.
    pub collectors: Option<CollectorFactory>,
}

/// Builds the inventory collector for a configuration.
pub type CollectorFactory = Box<dyn Fn(&Config) -> Arc<dyn Collector> + Send>;

// ---------------------------------------------------------------------------------------------
// The loop.

/// The running agent.
pub struct Agent {
    cfg: Config,
    mode: Mode,
    client: ApiClient,
    store: StateStore,
    /// Held for the agent's lifetime: one writer per state directory (`None` in dry-run).
    _lock: Option<StateLock>,
    creds: Credentials,
    schedule: Schedule,
    /// The API rejected the last body (400/422): the next attempt is a pure heartbeat.
    bodyless_next: bool,
    failing_since: Option<SystemTime>,
    specs: Option<Arc<NodeSpecs>>,
    collector: Arc<dyn Collector>,
    collecting: Arc<AtomicBool>,
    /// `[metrics] textfile`, rewritten after every attempt (`None`: off, and in dry-run).
    metrics: Option<Metrics>,
    /// When the current attempt was sent (for the latency metric).
    sent_at: Instant,
}

/// Takes the state directory's lock, loads the state, chooses credentials and builds the
/// client: everything that can fail before the loop starts.
pub fn prepare(cfg: Config, mode: Mode, collector: Arc<dyn Collector>) -> Result<Agent, RunError> {
    let client = ApiClient::new(&cfg.api)?;
    let store = StateStore::new(&cfg.state.dir);
    let (lock, creds) = if mode == Mode::DryRun {
        // No network, no state: the body is all that matters.
        let id = cfg.api.node_id.unwrap_or(Uuid::nil());
        let state = State::new(id, &cfg.api.url, Secret::new(""), None);
        (None, Credentials::new(state, None))
    } else {
        let lock = store.lock().map_err(|e| match e {
            LockError::State(e) => RunError::Credentials(e.to_string()),
            held => RunError::Locked(held),
        })?;
        let stale = lock.remove_stale_temp_files();
        if stale > 0 {
            info!("removed {stale} temp file(s) left by an interrupted state write");
        }
        let stored = load_state(&store);
        let (creds, reason) = Credentials::start(&cfg, stored).map_err(RunError::Credentials)?;
        info!(
            node_id = %creds.state().node_id,
            api = %cfg.api.url,
            state_dir = %store.dir().display(),
            "{reason}"
        );
        (Some(lock), creds)
    };
    let metrics = match (mode, &cfg.metrics.textfile) {
        (Mode::DryRun, _) | (_, None) => None,
        (_, Some(path)) => Some(Metrics::new(
            path,
            cfg.heartbeat.interval,
            Some(creds.state()),
        )),
    };
    Ok(Agent {
        schedule: Schedule::new(&cfg.heartbeat),
        cfg,
        mode,
        client,
        store,
        _lock: lock,
        creds,
        bodyless_next: false,
        failing_since: None,
        specs: None,
        collector,
        collecting: Arc::new(AtomicBool::new(false)),
        metrics,
        sent_at: Instant::now(),
    })
}

/// Reads the state file (under the lock); an unreadable one, or a symlink or special file in
/// its place, is moved aside (kept for inspection) and the agent starts fresh rather than
/// refusing to run.
fn load_state(store: &StateStore) -> Option<State> {
    match store.load() {
        Ok((state, warnings)) => {
            for w in warnings {
                warn!("{w}");
            }
            state
        }
        Err(e @ crate::state::StateError::Corrupt { .. }) => {
            let aside = store.quarantine();
            error!("{e}; moved aside to {}; starting fresh", shown(aside));
            None
        }
        Err(e @ crate::state::StateError::NotAFile { .. }) => {
            let aside = store.move_aside(crate::state::STATE_FILE, "notafile");
            error!("{e}; moved aside to {}; starting fresh", shown(aside));
            None
        }
        Err(e) => {
            error!("{e}; starting from the configured token");
            None
        }
    }
}

fn shown(p: Option<std::path::PathBuf>) -> String {
    p.map_or_else(
        || "(could not move)".to_string(),
        |p| p.display().to_string(),
    )
}

/// What the loop does next after an attempt.
struct Next {
    wait: Duration,
    /// The failure, when the attempt failed.
    failure: Option<Failure>,
    /// Retry at once: with the bootstrap token after a 401, or without a body after a
    /// 400/422 (not counted as an attempt by `--once`).
    immediate: bool,
}

impl Agent {
    /// Retries without jitter (fleet benchmark only: demonstrates the synchronized retry storm
    /// the jitter prevents).
    pub fn without_backoff_jitter(mut self) -> Self {
        self.schedule = self.schedule.without_backoff_jitter();
        self
    }

    /// No start splay (fleet benchmark only: shows the bunching of a fleet started together).
    pub fn without_splay(mut self) -> Self {
        self.schedule = self.schedule.without_splay();
        self
    }

    /// Runs until shutdown (daemon, dry run) or one heartbeat is done (`--once`).
    pub async fn run(mut self, mut control: Control) -> Result<(), RunError> {
        let shutdown = control.shutdown.clone();
        // First inventory before the first heartbeat.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                // Stopped while the first collection was still running (a hung probe).
                systemd::stopping();
                info!("stopped");
                return Ok(());
            }
            () = self.refresh_inventory_now() => {}
        }
        if self.mode == Mode::Once {
            return self.run_once(&shutdown).await;
        }
        systemd::ready();
        let result = self.run_loop(&mut control).await;
        systemd::stopping();
        info!("stopped");
        result
    }

    async fn run_once(&mut self, shutdown: &CancellationToken) -> Result<(), RunError> {
        let mut attempts = 0;
        loop {
            let outcome = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(RunError::OnceFailed("interrupted".into())),
                o = self.attempt() => o,
            };
            let next = self.handle(outcome.0, outcome.1);
            let Some(failure) = next.failure else {
                return Ok(());
            };
            if next.immediate && failure.kind == FailureKind::Unauthorized {
                continue;
            }
            attempts += 1;
            if failure.kind != FailureKind::Retryable || attempts >= ONCE_ATTEMPTS {
                return Err(RunError::OnceFailed(failure.message));
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Err(RunError::OnceFailed("interrupted".into())),
                () = tokio::time::sleep(next.wait) => {}
            }
        }
    }

    async fn run_loop(&mut self, control: &mut Control) -> Result<(), RunError> {
        let shutdown = control.shutdown.clone();
        let mut next_beat = Instant::now();
        let mut next_refresh = Instant::now() + self.cfg.inventory.refresh_interval;
        let watchdog_period = systemd::watchdog_period();
        let mut next_watchdog = Instant::now();
        let mut refresh: Option<tokio::task::JoinHandle<(Inventory, Duration)>> = None;
        let mut refresh_deadline = Instant::now();
        loop {
            let far = Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                Some(()) = recv_reload(&mut control.reload) => {
                    self.reload(control.reloader.as_ref(), control.collectors.as_ref());
                    // Pick up the new interval now, and retry soon after a fix.
                    next_beat = next_beat.min(
                        Instant::now() + jittered(self.cfg.heartbeat.interval, self.cfg.heartbeat.jitter),
                    );
                    next_refresh = Instant::now();
                    systemd::ready();
                }
                () = tokio::time::sleep_until(next_watchdog.min(far)), if watchdog_period.is_some() => {
                    systemd::watchdog();
                    next_watchdog = Instant::now() + watchdog_period.unwrap_or(Duration::from_secs(60));
                }
                done = join_refresh(&mut refresh), if refresh.is_some() => {
                    refresh = None;
                    match done {
                        Ok((inv, took)) => self.apply_inventory(inv, took),
                        Err(e) => {
                            self.inventory_error();
                            warn!("inventory collection failed: {e}; keeping the last specs");
                        }
                    }
                }
                () = tokio::time::sleep_until(refresh_deadline), if refresh.is_some() => {
                    // The blocking task keeps running; `collecting` stops a second one from
                    // piling up behind it.
                    refresh = None;
                    self.inventory_error();
                    warn!("inventory collection did not finish within {COLLECT_TIMEOUT:?}; sending the last good specs");
                }
                () = tokio::time::sleep_until(next_refresh), if refresh.is_none() => {
                    next_refresh = Instant::now() + self.cfg.inventory.refresh_interval;
                    refresh = self.spawn_collection();
                    refresh_deadline = Instant::now() + COLLECT_TIMEOUT;
                }
                () = tokio::time::sleep_until(next_beat) => {
                    let outcome = {
                        let attempt = self.attempt();
                        tokio::pin!(attempt);
                        loop {
                            tokio::select! {
                                biased;
                                _ = shutdown.cancelled() => return Ok(()),
                                o = &mut attempt => break o,
                                // A slow request must not starve the watchdog.
                                () = tokio::time::sleep_until(next_watchdog.min(far)), if watchdog_period.is_some() => {
                                    systemd::watchdog();
                                    next_watchdog = Instant::now() + watchdog_period.unwrap_or(Duration::from_secs(60));
                                }
                            }
                        }
                    };
                    let next = self.handle(outcome.0, outcome.1);
                    next_beat = Instant::now() + next.wait;
                }
            }
        }
    }

    /// Starts a collection in the blocking pool unless one is still stuck there.
    fn spawn_collection(&self) -> Option<tokio::task::JoinHandle<(Inventory, Duration)>> {
        if self.collecting.swap(true, Ordering::AcqRel) {
            warn!("previous inventory collection is still running; skipping this refresh");
            return None;
        }
        let collector = Arc::clone(&self.collector);
        let flag = Arc::clone(&self.collecting);
        Some(tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let inv = collector.collect();
            flag.store(false, Ordering::Release);
            (inv, started.elapsed())
        }))
    }

    async fn refresh_inventory_now(&mut self) {
        let Some(handle) = self.spawn_collection() else {
            return;
        };
        match tokio::time::timeout(COLLECT_TIMEOUT, handle).await {
            Ok(Ok((inv, took))) => self.apply_inventory(inv, took),
            Ok(Err(e)) => {
                self.inventory_error();
                warn!("inventory collection failed: {e}");
            }
            Err(_) => {
                self.inventory_error();
                warn!(
                    "inventory collection did not finish within {COLLECT_TIMEOUT:?}; heartbeats carry no specs until it does"
                );
            }
        }
    }

    fn inventory_error(&mut self) {
        if let Some(m) = &mut self.metrics {
            m.inventory_error("collection");
        }
    }

    fn apply_inventory(&mut self, inv: Inventory, took: Duration) {
        if let Some(m) = &mut self.metrics {
            m.inventory(inv.specs.hardware.gpu_count, took);
            if inv.details.nvml_failed {
                m.inventory_error("nvml");
            }
        }
        let new = Arc::new(inv.specs);
        if let Some(old) = &self.specs {
            if old.hardware.gpu_count > new.hardware.gpu_count {
                warn!(
                    before = old.hardware.gpu_count,
                    now = new.hardware.gpu_count,
                    "GPU count dropped"
                );
            }
            if **old != *new {
                info!("node specs changed");
            }
        }
        debug!(specs = ?new, took_ms = took.as_millis() as u64, "inventory refreshed");
        self.specs = Some(new);
    }

    /// SIGHUP: applies every setting it can — logging, GPU discovery (a new collector), the
    /// API client, the schedule, the credentials; the state directory needs a restart.
    fn reload(&mut self, reloader: Option<&Reloader>, collectors: Option<&CollectorFactory>) {
        systemd::reloading();
        let Some(reloader) = reloader else {
            return;
        };
        let cfg = match reloader() {
            Ok(c) => c,
            Err(e) => {
                error!("reload: keeping the running configuration: {e}");
                return;
            }
        };
        let client = match ApiClient::new(&cfg.api) {
            Ok(c) => c,
            Err(e) => {
                error!("reload: keeping the running configuration: {e}");
                return;
            }
        };
        if self.mode != Mode::DryRun {
            if cfg.state.dir != self.store.dir() {
                warn!(
                    "reload: state.dir changed to {}; that takes a restart (systemctl restart exalsius-node-agent); still using {}",
                    cfg.state.dir.display(),
                    self.store.dir().display()
                );
            }
            let mut creds = self.creds.clone();
            match creds.reconfigure(&cfg) {
                Ok(changed) => {
                    if let Some(why) = changed {
                        info!(node_id = %creds.state().node_id, "reload: {why}");
                    }
                    self.creds = creds;
                }
                Err(e) => {
                    error!("reload: keeping the running configuration: {e}");
                    return;
                }
            }
        }
        self.schedule.reconfigure(&cfg.heartbeat);
        self.client = client;
        self.reconfigure_metrics(&cfg);
        if let Err(e) = crate::logging::reconfigure(&cfg.log.level, cfg.log.format) {
            debug!("reload: logging unchanged: {e}");
        }
        let inv = (&cfg.inventory.gpu, &cfg.inventory.nvml_library);
        if inv != (&self.cfg.inventory.gpu, &self.cfg.inventory.nvml_library)
            && let Some(build) = collectors
        {
            info!(gpu = ?cfg.inventory.gpu, "reload: GPU discovery reconfigured");
            self.collector = build(&cfg);
        }
        for w in &cfg.warnings {
            warn!("{w}");
        }
        info!(
            interval = %secs(cfg.heartbeat.interval),
            "configuration reloaded"
        );
        let dir = self.cfg.state.dir.clone();
        self.cfg = cfg;
        // The state directory is the one setting a reload cannot change.
        self.cfg.state.dir = dir;
    }

    /// SIGHUP: a new interval, or a new (or no) metrics file.
    fn reconfigure_metrics(&mut self, cfg: &Config) {
        if self.mode == Mode::DryRun {
            return;
        }
        match (&mut self.metrics, &cfg.metrics.textfile) {
            (Some(m), Some(p)) if m.path() == p => m.set_interval(cfg.heartbeat.interval),
            (_, Some(p)) => {
                info!(textfile = %p.display(), "reload: metrics file set");
                self.metrics = Some(Metrics::new(
                    p,
                    cfg.heartbeat.interval,
                    Some(self.creds.state()),
                ));
            }
            (_, None) => self.metrics = None,
        }
    }

    /// One request (or, in dry-run mode, one printed body). Returns whether a body was sent.
    async fn attempt(&mut self) -> (Result<Success, Failure>, bool) {
        let body = match (&self.specs, self.bodyless_next) {
            (Some(specs), false) => serde_json::to_vec(&NodePatchRequest::new(
                specs,
                self.cfg.inventory.description.as_deref().or(self
                    .creds
                    .state()
                    .description
                    .as_deref()),
            ))
            .unwrap_or_default(),
            // No inventory yet, or the API rejected the last body: the spec allows an empty
            // PATCH as a pure heartbeat, which keeps the node alive and the token rotating
            // (and is better than claiming zero CPUs).
            _ => Vec::new(),
        };
        let had_body = !body.is_empty();
        if self.mode == Mode::DryRun {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&body);
            let _ = out.write_all(b"\n");
            let _ = out.flush();
            let ok = Success {
                status: 0,
                latency: Duration::ZERO,
                body: crate::api::Answer {
                    node_id: self.creds.state().node_id.to_string(),
                    issued: None,
                    notes: Vec::new(),
                },
            };
            return (Ok(ok), had_body);
        }
        self.sent_at = Instant::now();
        let url = self.cfg.node_url(&self.creds.state().node_id);
        debug!(%url, bytes = body.len(), sending = ?self.creds.sending(), "sending heartbeat");
        let outcome = self.client.patch_node(&url, self.creds.token(), body).await;
        (outcome, had_body)
    }

    /// Updates token and state from an outcome, persists, logs, and decides the wait.
    fn handle(&mut self, outcome: Result<Success, Failure>, had_body: bool) -> Next {
        let now = SystemTime::now();
        self.creds.state_mut().last_attempt_at = Some(now);
        let outcome = outcome.and_then(|s| self.check_node(s));
        let (label, status) = match &outcome {
            Ok(s) => ("ok", Some(s.status)),
            Err(f) => (outcome_label(f.kind), f.status),
        };
        let next = match outcome {
            Ok(success) => self.on_success(success, now),
            Err(failure) => self.on_failure(failure, now, had_body),
        };
        if self.mode != Mode::DryRun
            && let Err(e) = self.store.save(self.creds.state())
        {
            error!(
                "cannot persist state: {e}; the current token is kept in memory and saving is retried every heartbeat"
            );
        }
        if let Some(m) = &mut self.metrics {
            m.attempt(label, status, self.sent_at.elapsed(), self.creds.state());
            m.write();
        }
        self.report_status(&next, now);
        next
    }

    /// A 2xx for another node is not a success: a misrouting proxy must not rotate our token.
    fn check_node(&self, s: Success) -> Result<Success, Failure> {
        if self.mode == Mode::DryRun {
            return Ok(s);
        }
        let ours = self.creds.state().node_id;
        match Uuid::parse_str(s.body.node_id.trim()) {
            Ok(id) if id == ours => Ok(s),
            _ => Err(Failure {
                kind: FailureKind::Retryable,
                status: Some(s.status),
                message: format!(
                    "HTTP {} answered for node {:?}, not for this node {ours}; ignored",
                    s.status, s.body.node_id
                ),
                retry_after: None,
            }),
        }
    }

    fn on_success(&mut self, success: Success, now: SystemTime) -> Next {
        for note in &success.body.notes {
            warn!("heartbeat answer: {note}");
        }
        let lifetime = success.body.issued.as_ref().and_then(|i| i.expires_in);
        if self.creds.sending() == Sending::Bootstrap {
            info!("the configured access token was accepted");
        }
        self.creds.on_accepted(success.body.issued, now);
        self.bodyless_next = false;
        let state = self.creds.state_mut();
        state.last_success_at = Some(now);
        state.consecutive_failures = 0;
        state.last_error = None;
        let wait = self.next_wait(Verdict::Ok, now);
        if let Some(since) = self.failing_since.take() {
            let down = now.duration_since(since).unwrap_or_default();
            info!("API reachable again after {}", secs(down));
        }
        if self.mode != Mode::DryRun {
            let expiry = lifetime.map_or_else(|| "unknown".to_string(), secs);
            info!(
                status = success.status,
                latency_ms = success.latency.as_millis() as u64,
                token_expires_in = %expiry,
                next_in = %secs(wait),
                "heartbeat ok"
            );
        }
        Next {
            wait,
            failure: None,
            immediate: false,
        }
    }

    /// The schedule's wait for `v`, kept short of half the stored token's remaining lifetime.
    fn next_wait(&mut self, v: Verdict, now: SystemTime) -> Duration {
        self.schedule
            .next(v, self.creds.state().token_expires_at, now)
    }

    fn on_failure(&mut self, failure: Failure, now: SystemTime, had_body: bool) -> Next {
        let state = self.creds.state_mut();
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        state.last_error = Some(failure.message.clone());
        let n = state.consecutive_failures;
        self.failing_since.get_or_insert(now);
        let mut immediate = false;
        let wait = match failure.kind {
            FailureKind::Retryable => {
                let wait = self.next_wait(
                    Verdict::Retryable {
                        retry_after: failure.retry_after,
                    },
                    now,
                );
                warn!(
                    attempt = n,
                    "heartbeat failed: {failure}; retrying in {}",
                    secs(wait)
                );
                wait
            }
            FailureKind::Unauthorized => self.on_rejected_token(&failure, n, now),
            FailureKind::NotFound => {
                let wait = self.next_wait(Verdict::Slow, now);
                error!(
                    attempt = n,
                    "heartbeat failed: {failure}; node {} is not in the pool at {}: check api.node_id in {}; retrying in {}",
                    self.creds.state().node_id,
                    self.cfg.api.url,
                    self.cfg.file_hint(),
                    secs(wait)
                );
                wait
            }
            FailureKind::Rejected | FailureKind::Conflict if had_body => {
                // The API does not accept what we report; keep the node alive and the token
                // rotating with a pure heartbeat now, and offer the body again next time.
                warn!(
                    attempt = n,
                    "heartbeat body rejected: {failure}; sending a heartbeat without specs now"
                );
                self.bodyless_next = true;
                immediate = true;
                self.next_wait(Verdict::Now, now)
            }
            FailureKind::Rejected | FailureKind::Conflict => {
                self.bodyless_next = false;
                let wait = self.next_wait(Verdict::Rejected, now);
                warn!(
                    attempt = n,
                    "heartbeat rejected: {failure}; next try in {}",
                    secs(wait)
                );
                wait
            }
        };
        Next {
            wait,
            failure: Some(failure),
            immediate,
        }
    }

    /// 401/403: the credential rules decide the token; the log says what the operator can do.
    fn on_rejected_token(&mut self, failure: &Failure, n: u32, now: SystemTime) -> Duration {
        let rejected = self.creds.sending();
        match self.creds.on_rejected() {
            AfterRejection::RetryNow => {
                warn!(
                    "heartbeat failed: {failure}; the stored token was rejected, retrying once with the configured token (the stored token is kept)"
                );
                self.next_wait(Verdict::Now, now)
            }
            AfterRejection::RetrySlowly { switched } => {
                let wait = self.next_wait(Verdict::Slow, now);
                let what_to_do = if self.creds.bootstrap().is_some() {
                    format!(
                        "if this persists, put a new access token in {} (api.access_token) and reload: systemctl reload exalsius-node-agent",
                        self.cfg.file_hint()
                    )
                } else {
                    "if this persists, this node's registration is no longer accepted: re-register it with `exalsius-node-agent register --force …` (stop the service first)".to_string()
                };
                let which = match rejected {
                    Sending::Stored => "stored",
                    Sending::Bootstrap => "configured",
                };
                let next = if switched {
                    match self.creds.sending() {
                        Sending::Stored => "; next try with the stored token",
                        Sending::Bootstrap => "; next try with the configured token",
                    }
                } else {
                    ""
                };
                error!(
                    attempt = n,
                    "heartbeat failed: {failure}; the {which} access token was rejected: {what_to_do}; retrying in {}{next}",
                    secs(wait)
                );
                wait
            }
        }
    }

    fn report_status(&self, next: &Next, now: SystemTime) {
        let line = match (&next.failure, self.failing_since) {
            (None, _) => {
                let token = self
                    .creds
                    .state()
                    .token_expires_at
                    .and_then(|t| t.duration_since(now).ok())
                    .map_or_else(String::new, |d| {
                        format!(
                            ", token valid {}",
                            humantime::format_duration(Duration::from_secs(d.as_secs()))
                        )
                    });
                format!("last heartbeat {}: ok{token}", rfc3339(now))
            }
            (Some(f), since) => format!(
                "API failing since {}: {}; retrying in {}",
                since.map_or_else(|| rfc3339(now), rfc3339),
                f.message,
                secs(next.wait)
            ),
        };
        systemd::status(&line);
    }
}

/// The `outcome` label of `exalsius_node_agent_heartbeats_total`.
fn outcome_label(kind: FailureKind) -> &'static str {
    match kind {
        FailureKind::Retryable => "transient",
        FailureKind::Unauthorized => "unauthorized",
        FailureKind::NotFound => "not_found",
        FailureKind::Rejected | FailureKind::Conflict => "rejected",
    }
}

async fn join_refresh<T>(
    handle: &mut Option<tokio::task::JoinHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match handle {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

async fn recv_reload(rx: &mut Option<mpsc::Receiver<()>>) -> Option<()> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
