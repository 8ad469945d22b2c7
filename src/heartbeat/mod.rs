//! The heartbeat loop: sends, classifies each outcome, persists the state, logs, and waits.
//!
//! The decisions live beside it as pure code: [`schedule`] turns an outcome into the wait
//! (first heartbeat at once, the start splay, `interval × (1 ± jitter)`, backoff with equal
//! jitter, `Retry-After`, the slow schedule, never past half the token's remaining lifetime);
//! [`credentials`] decides which token is sent and which is stored. Scheduling uses the
//! monotonic clock (`tokio::time::Instant`); wall-clock time is used only for token expiry and
//! the timestamps in the state file.

pub mod credentials;
mod outcome;
pub mod persist;
mod reload;
mod reload_read;
mod resume;
pub mod schedule;
pub mod sender;
mod specs;

pub use credentials::{AfterRejection, Choice, Credentials, STORED_RETRY_PAUSE, Sending};
pub use persist::{Disk, Nothing, Persist, Saved};
pub use schedule::{
    Backoff, MIN_TOKEN_REFRESH_WAIT, Schedule, Verdict, equal_jitter, jittered, secs,
};
pub use sender::{SendFuture, Sender, Stdout};

use crate::api::{
    ApiClient, ClientError, Failure, FailureKind, NodePatchRequest, NodeSpecs, Success,
};
use crate::config::{Config, ConfigError};
use crate::inventory::{Collector, Inventory};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::state::{LockError, State, StateStore, rfc3339};
use crate::systemd;
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
/// How long a stop waits for the answer to the heartbeat in flight (which may carry the only
/// token the API still accepts): the rest of the second a stop is promised in, left for saving
/// it and exiting.
pub const STOP_DRAIN: Duration = Duration::from_millis(800);
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
    /// The state directory or file cannot be used as it is now (permissions, a full or
    /// read-only file system): a fault of the machine, which systemd retries — the state,
    /// which may hold the only token the API still accepts, is left as it is.
    #[error("{0}")]
    State(String),
    /// Stopping so that systemd starts the service again with a device policy that covers
    /// the NVIDIA driver loaded since (`specs.rs`, `device_policy_restart`).
    #[error("{0}")]
    RestartForDevices(String),
}

impl RunError {
    /// Process exit code: 78 for what the operator must edit, 1 for faults of the machine
    /// (systemd retries those; `RestartPreventExitStatus=78` stops it for the others).
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::OnceFailed(_)
            | RunError::Locked(_)
            | RunError::State(_)
            | RunError::RestartForDevices(_) => 1,
            RunError::Config(e) if e.is_machine_fault() => 1,
            RunError::Client(e) if e.is_machine_fault() => 1,
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
    sender: Box<dyn Sender>,
    /// The sender was given by [`Agent::with_sender`]: a reload keeps it.
    fixed_sender: bool,
    /// Where the state goes after every attempt (the state directory under its lock, or
    /// nothing in dry-run).
    sink: Box<dyn Persist>,
    /// Where the last save put it.
    persisted: Saved,
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
    /// Set by a collection that found NVML refused by the service's device policy: the loop
    /// stops with it, and systemd starts the service again.
    restart_for_devices: Option<String>,
}

/// Takes the state directory's lock, loads the state, chooses credentials and builds the
/// client: everything that can fail before the loop starts.
pub fn prepare(cfg: Config, mode: Mode, collector: Arc<dyn Collector>) -> Result<Agent, RunError> {
    // Built in every mode: a bad api.ca_file is refused by --dry-run too.
    let client = ApiClient::new(&cfg.api)?;
    crate::footprint::mark("HTTP client and TLS roots");
    let sender: Box<dyn Sender> = match mode {
        Mode::DryRun => Box::new(Stdout),
        Mode::Daemon | Mode::Once => Box::new(client),
    };
    let store = StateStore::new(&cfg.state.dir);
    let (sink, creds): (Box<dyn Persist>, _) = if mode == Mode::DryRun {
        // No network, no state: the body is all that matters.
        let id = cfg.api.node_id.unwrap_or(Uuid::nil());
        let state = State::new(id, &cfg.api.url, Secret::new(""), None);
        (Box::new(Nothing), Credentials::new(state, None))
    } else {
        let lock = store.lock().map_err(|e| match e {
            LockError::State(e) => RunError::State(e.to_string()),
            held => RunError::Locked(held),
        })?;
        let stale = lock.remove_stale_temp_files();
        if stale > 0 {
            info!("removed {stale} temp file(s) left by an interrupted state write");
        }
        let (stored, on_disk) = resume::load(&store)?;
        crate::footprint::mark("state loaded");
        let previous = stored.clone();
        let (creds, choice) = Credentials::start(&cfg, stored).map_err(RunError::Credentials)?;
        let mut sink = Disk::new(store, lock, on_disk);
        if let (true, Some(previous)) = (choice.replaced(), &previous) {
            sink.keep_replaced(previous);
        }
        info!(
            node_id = %creds.state().node_id,
            api = %cfg.api.url,
            state_dir = %cfg.state.dir.display(),
            "{choice}"
        );
        (Box::new(sink), creds)
    };
    if let Some(dir) = sink.dir() {
        // A metrics file an earlier run wrote elsewhere does not outlive its configuration
        // (no state directory for --dry-run: it touches nothing).
        crate::metrics::adopt(dir, cfg.metrics.textfile.as_deref());
    }
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
        sender,
        fixed_sender: false,
        sink,
        persisted: Saved::NotKept,
        creds,
        bodyless_next: false,
        failing_since: None,
        specs: None,
        collector,
        collecting: Arc::new(AtomicBool::new(false)),
        metrics,
        sent_at: Instant::now(),
        restart_for_devices: None,
    })
}

/// What the loop does next after an attempt.
struct Next {
    wait: Duration,
    /// The failure, when the attempt failed.
    failure: Option<Failure>,
    /// Retry at once: with the configured token after a 401 (`--once` makes that try too and
    /// does not count it as an attempt), or without a body after a 400/422 (for `--once` the
    /// rejection is final: it reports it).
    immediate: bool,
}

impl Agent {
    /// Retries without jitter (fleet benchmark only: demonstrates the synchronized retry storm
    /// the jitter prevents).
    pub fn without_backoff_jitter(mut self) -> Self {
        self.schedule = self.schedule.without_backoff_jitter();
        self
    }

    /// Starts with this inventory already collected (tests in paused time, where the first
    /// collection on a blocking thread may lose the race against the virtual clock).
    pub fn with_inventory(mut self, inv: Inventory) -> Self {
        self.apply_inventory(inv, Duration::ZERO);
        self
    }

    /// Sends through `sender` instead (tests: scripted answers in paused time), also after a
    /// reload (which otherwise builds a new API client).
    pub fn with_sender(mut self, sender: Box<dyn Sender>) -> Self {
        self.sender = sender;
        self.fixed_sender = true;
        self
    }

    /// No start splay (fleet benchmark only: shows the bunching of a fleet started together).
    pub fn without_splay(mut self) -> Self {
        self.schedule = self.schedule.without_splay();
        self
    }

    /// Runs until shutdown (daemon, dry run) or one heartbeat is done (`--once`: the same loop
    /// with a stop condition, [`Agent::once_done`]).
    pub async fn run(mut self, mut control: Control) -> Result<(), RunError> {
        let shutdown = control.shutdown.clone();
        // First inventory before the first heartbeat.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                // Stopped while the first collection was still running (a hung probe).
                return self.finish(interrupted(self.mode));
            }
            () = self.refresh_inventory_now() => {}
        }
        crate::footprint::mark("first inventory");
        if self.mode != Mode::Once {
            systemd::ready();
        }
        let result = self.run_loop(&mut control).await;
        self.finish(result)
    }

    fn finish(&self, result: Result<(), RunError>) -> Result<(), RunError> {
        if let Some(m) = &self.metrics {
            m.flush(crate::metrics::EXIT_FLUSH_WAIT);
        }
        if self.mode != Mode::Once {
            systemd::stopping();
            info!("stopped");
        }
        result
    }

    /// `--once`: done after a success, a failure that retrying soon will not change, or
    /// [`ONCE_ATTEMPTS`] attempts (the immediate retry with the configured token after a 401
    /// does not count). `None`: go on (and always in the other modes).
    fn once_done(&self, next: &Next, attempts: &mut u32) -> Option<Result<(), RunError>> {
        if self.mode != Mode::Once {
            return None;
        }
        let Some(failure) = &next.failure else {
            return Some(Ok(()));
        };
        if next.immediate && failure.kind == FailureKind::Unauthorized {
            return None;
        }
        *attempts += 1;
        if failure.kind != FailureKind::Retryable || *attempts >= ONCE_ATTEMPTS {
            return Some(Err(RunError::OnceFailed(failure.message.clone())));
        }
        None
    }

    // Long: one `select!` over every event source (signals, watchdog, inventory, heartbeat);
    // the arms share the loop's timers, so splitting them apart would scatter its state.
    async fn run_loop(&mut self, control: &mut Control) -> Result<(), RunError> {
        let shutdown = control.shutdown.clone();
        let mut next_beat = Instant::now();
        let mut next_refresh = Instant::now() + self.cfg.inventory.refresh_interval;
        let watchdog_period = systemd::watchdog_period();
        let mut next_watchdog = Instant::now();
        let mut refresh: Option<tokio::task::JoinHandle<(Inventory, Duration)>> = None;
        let mut refresh_deadline = Instant::now();
        let mut once_attempts = 0;
        let mode = self.mode;
        let mut reloads = reload_read::Reloads::new(control.reloader.take());
        loop {
            if let Some(why) = self.restart_for_devices.take() {
                return Err(RunError::RestartForDevices(why));
            }
            let far = Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return interrupted(mode),
                Some(()) = recv_reload(&mut control.reload) => {
                    systemd::reloading();
                    match reloads.request() {
                        reload_read::Requested::Started | reload_read::Requested::Queued => {}
                        reload_read::Requested::Stuck => systemd::ready(),
                        reload_read::Requested::Unavailable => {
                            next_refresh = Instant::now();
                            systemd::ready();
                        }
                    }
                }
                loaded = reloads.next(), if reloads.busy() => {
                    if let Some(loaded) = loaded {
                        self.reload(loaded, control.collectors.as_ref());
                        // Pick up the new interval now, and retry soon after a fix.
                        next_beat = next_beat.min(
                            Instant::now() + jittered(self.cfg.heartbeat.interval, self.cfg.heartbeat.jitter),
                        );
                        next_refresh = Instant::now();
                    }
                    if !reloads.busy() {
                        systemd::ready();
                    }
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
                    let (outcome, stopping) = {
                        let attempt = self.attempt();
                        tokio::pin!(attempt);
                        loop {
                            tokio::select! {
                                biased;
                                _ = shutdown.cancelled() => {
                                    // The server may have rotated the token already: its
                                    // answer is read (bounded) and saved before the stop.
                                    match tokio::time::timeout(STOP_DRAIN, &mut attempt).await {
                                        Ok(o) => break (o, true),
                                        Err(_) => {
                                            warn!("stopping: no answer to the heartbeat in flight within {STOP_DRAIN:?}; if the API answered it, that answer is lost");
                                            return interrupted(mode);
                                        }
                                    }
                                }
                                o = &mut attempt => break (o, false),
                                // A slow request must not starve the watchdog.
                                () = tokio::time::sleep_until(next_watchdog.min(far)), if watchdog_period.is_some() => {
                                    systemd::watchdog();
                                    next_watchdog = Instant::now() + watchdog_period.unwrap_or(Duration::from_secs(60));
                                }
                            }
                        }
                    };
                    let next = self.handle(outcome.0, outcome.1);
                    if stopping {
                        return match (mode, &next.failure) {
                            (Mode::Once, None) => Ok(()),
                            _ => interrupted(mode),
                        };
                    }
                    if let Some(result) = self.once_done(&next, &mut once_attempts) {
                        return result;
                    }
                    next_beat = Instant::now() + next.wait;
                }
            }
        }
    }

    /// One heartbeat through the sender. Returns whether a body was sent.
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
        self.sent_at = Instant::now();
        let url = self.cfg.node_url(&self.creds.state().node_id);
        debug!(%url, bytes = body.len(), sending = ?self.creds.sending(), "sending heartbeat");
        let outcome = self.sender.send(&url, self.creds.token(), body).await;
        (outcome, had_body)
    }
}
/// What a shutdown means in `mode`: the end of the daemon, or an unfinished `--once`.
fn interrupted(mode: Mode) -> Result<(), RunError> {
    match mode {
        Mode::Once => Err(RunError::OnceFailed("interrupted".into())),
        Mode::Daemon | Mode::DryRun => Ok(()),
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
