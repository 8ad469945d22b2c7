//! The heartbeat loop: schedule, classify outcomes, retry/backoff, token rotation, persistence.
//!
//! Cadence: the first heartbeat goes out at start, then every `interval × (1 ± jitter)`, and
//! never later than half the lifetime of the token the API just issued. Failures are
//! classified (see [`FailureKind`]) into: exponential backoff with equal jitter (transport
//! errors, timeouts, 5xx, 429), a fallback to the bootstrap token and then slow retries (401/403),
//! slow retries (404), or the normal cadence (400/422/3xx). `Retry-After` is honoured.
//! Scheduling uses the monotonic clock (`tokio::time::Instant`); wall-clock time is used only
//! for token expiry and the timestamps in the state file.

use crate::api::{
    ApiClient, ClientError, Failure, FailureKind, NodePatchRequest, NodeSpecs, Success,
};
use crate::config::{Config, ConfigError};
use crate::inventory::Collector;
use crate::secret::Secret;
use crate::state::{State, StateStore, rfc3339};
use crate::systemd;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
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
/// A short-lived token never makes the agent heartbeat more often than this (unless the
/// configured interval is itself shorter): a server that issues tokens valid for 0–1 s must
/// not turn the agent into a request storm.
pub const MIN_TOKEN_REFRESH_WAIT: Duration = Duration::from_secs(1);

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
}

impl RunError {
    /// Process exit code: 78 for configuration problems, 1 for runtime failures.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::OnceFailed(_) => 1,
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
}

// ---------------------------------------------------------------------------------------------
// Timing helpers.

/// `interval × (1 ± jitter)`, uniformly.
pub fn jittered(interval: Duration, jitter: f64) -> Duration {
    let factor = 1.0 + jitter * (2.0 * fastrand::f64() - 1.0);
    interval.mul_f64(factor.max(0.0))
}

/// "Equal jitter": `d/2 + random(0, d/2)` — never above `d`, never below half of it.
pub fn equal_jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(fastrand::f64())
}

/// Exponential retry delays: `min(max, initial × 2^n)` from backon (without its own jitter,
/// which adds up to +100 % and can overshoot the cap), then equal jitter.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
    jitter: bool,
}

impl Backoff {
    /// Delays from `initial` doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(initial)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        Self {
            builder,
            delays: builder.build(),
            max,
            jitter: true,
        }
    }

    /// The nominal delay of the next retry (before jitter).
    pub fn next_nominal(&mut self) -> Duration {
        // without_max_times: the iterator never ends; the fallback is the cap.
        self.delays.next().unwrap_or(self.max)
    }

    /// The next retry delay, jittered.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next_nominal();
        if self.jitter { equal_jitter(d) } else { d }
    }

    /// Turns the jitter off: for the fleet benchmark, which shows what a fleet without it does
    /// to the API when it comes back. Never used by the agent itself.
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// Credentials.

/// The node and token to start with, and the bootstrap token to fall back to.
#[derive(Debug)]
pub struct Credentials {
    /// State to start from (in memory; persisted by the loop).
    pub state: State,
    /// The configured token, if any (absent for a `register`ed node).
    pub bootstrap: Option<Secret>,
    /// Why this state was chosen, for the start-up log line.
    pub reason: &'static str,
}

/// Chooses the starting token: the stored one when it belongs to this node, API and bootstrap
/// token and has not expired; otherwise the configured one.
pub fn resolve_credentials(
    cfg: &Config,
    stored: Option<State>,
    now: SystemTime,
) -> Result<Credentials, String> {
    let file = cfg.file_hint();
    match (&cfg.api.node_id, &cfg.api.access_token) {
        (Some(node_id), Some(token)) => {
            let sha = token.sha256_hex();
            let reason = match &stored {
                None => "no state yet: starting from the configured token",
                Some(s) if s.node_id != *node_id => {
                    "state is for another node: starting from the configured token"
                }
                Some(s) if s.api_url != cfg.api.url => {
                    "state is for another API URL: starting from the configured token"
                }
                Some(s) if s.bootstrap_token_sha256.as_deref() != Some(sha.as_str()) => {
                    "the configured token changed: starting from it"
                }
                Some(s) if s.token_expired(now) => {
                    "the stored token has expired: starting from the configured token"
                }
                Some(_) => "using the stored (rotated) token",
            };
            let state = match stored {
                Some(s) if reason == "using the stored (rotated) token" => s,
                _ => State::new(*node_id, &cfg.api.url, token.clone(), Some(token)),
            };
            Ok(Credentials {
                state,
                bootstrap: Some(token.clone()),
                reason,
            })
        }
        (None, Some(_)) => Err(format!(
            "api.access_token is set but api.node_id is not: set api.node_id in {file} (or EXALSIUS_NODE_ID)"
        )),
        (configured_id, None) => {
            let Some(s) = stored else {
                return Err(format!(
                    "no access token: set api.node_id and api.access_token in {file} \
                     (or EXALSIUS_NODE_ID / EXALSIUS_ACCESS_TOKEN), or register this node with \
                     `exalsius-node-agent register`"
                ));
            };
            if let Some(id) = configured_id
                && *id != s.node_id
            {
                return Err(format!(
                    "api.node_id = {id} in {file} differs from the registered node {} in the state file; \
                         remove api.node_id or register again with --force",
                    s.node_id
                ));
            }
            if s.api_url != cfg.api.url {
                return Err(format!(
                    "the node was registered with {} but api.url is {} in {file}; make them match",
                    s.api_url, cfg.api.url
                ));
            }
            Ok(Credentials {
                state: s,
                bootstrap: None,
                reason: "using the registered node's token from the state file",
            })
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The loop.

/// The running agent.
pub struct Agent {
    cfg: Config,
    mode: Mode,
    client: ApiClient,
    store: StateStore,
    state: State,
    bootstrap: Option<Secret>,
    backoff: Backoff,
    fallback_tried: bool,
    failing_since: Option<SystemTime>,
    specs: Option<Arc<NodeSpecs>>,
    collector: Arc<dyn Collector>,
    collecting: Arc<AtomicBool>,
}

/// Loads the state, chooses credentials and builds the client: everything that can fail with
/// a configuration error before the loop starts.
pub fn prepare(cfg: Config, mode: Mode, collector: Arc<dyn Collector>) -> Result<Agent, RunError> {
    let client = ApiClient::new(&cfg.api)?;
    let store = StateStore::new(&cfg.state.dir);
    let (state, bootstrap) = if mode == Mode::DryRun {
        // No network, no state: the body is all that matters.
        let id = cfg.api.node_id.unwrap_or(Uuid::nil());
        (State::new(id, &cfg.api.url, Secret::new(""), None), None)
    } else {
        let stored = load_state(&store);
        let creds =
            resolve_credentials(&cfg, stored, SystemTime::now()).map_err(RunError::Credentials)?;
        info!(
            node_id = %creds.state.node_id,
            api = %cfg.api.url,
            state_dir = %store.dir().display(),
            "{}",
            creds.reason
        );
        (creds.state, creds.bootstrap)
    };
    Ok(Agent {
        backoff: Backoff::new(cfg.heartbeat.initial_backoff, cfg.heartbeat.max_backoff),
        cfg,
        mode,
        client,
        store,
        state,
        bootstrap,
        fallback_tried: false,
        failing_since: None,
        specs: None,
        collector,
        collecting: Arc::new(AtomicBool::new(false)),
    })
}

/// Reads the state file; an unreadable one is moved aside (kept for inspection) and the agent
/// starts fresh rather than refusing to run.
fn load_state(store: &StateStore) -> Option<State> {
    if let Ok(Some(w)) = store.ensure_dir() {
        warn!("{w}");
    }
    let stale = store.remove_stale_temp_files();
    if stale > 0 {
        info!("removed {stale} temp file(s) left by an interrupted state write");
    }
    match store.load() {
        Ok((state, warnings)) => {
            for w in warnings {
                warn!("{w}");
            }
            state
        }
        Err(e @ crate::state::StateError::Corrupt { .. }) => {
            let aside = store.quarantine();
            error!(
                "{e}; moved aside to {}; starting fresh",
                aside.map_or_else(
                    || "(could not move)".to_string(),
                    |p| p.display().to_string()
                )
            );
            None
        }
        Err(e) => {
            error!("{e}; starting from the configured token");
            None
        }
    }
}

/// What the loop does next after an attempt.
struct Next {
    wait: Duration,
    /// The failure, when the attempt failed.
    failure: Option<Failure>,
    /// Retry at once with the bootstrap token (not counted as an attempt by `--once`).
    fallback: bool,
}

impl Agent {
    /// Retries without jitter (fleet benchmark only: demonstrates the synchronized retry storm
    /// the jitter prevents).
    pub fn without_backoff_jitter(mut self) -> Self {
        self.backoff = Backoff::new(
            self.cfg.heartbeat.initial_backoff,
            self.cfg.heartbeat.max_backoff,
        )
        .without_jitter();
        self
    }

    /// Runs until shutdown (daemon, dry run) or one heartbeat is done (`--once`).
    pub async fn run(mut self, mut control: Control) -> Result<(), RunError> {
        let shutdown = control.shutdown.clone();
        // First inventory before the first heartbeat.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Ok(()),
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
            let next = self.handle(outcome);
            let Some(failure) = next.failure else {
                return Ok(());
            };
            if next.fallback {
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
        let mut refresh: Option<tokio::task::JoinHandle<crate::inventory::Inventory>> = None;
        let mut refresh_deadline = Instant::now();
        loop {
            let far = Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                Some(()) = recv_reload(&mut control.reload) => {
                    self.reload(control.reloader.as_ref());
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
                        Ok(inv) => self.apply_inventory(inv),
                        Err(e) => warn!("inventory collection failed: {e}; keeping the last specs"),
                    }
                }
                () = tokio::time::sleep_until(refresh_deadline), if refresh.is_some() => {
                    // The blocking task keeps running; `collecting` stops a second one from
                    // piling up behind it.
                    refresh = None;
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
                    let next = self.handle(outcome);
                    next_beat = Instant::now() + next.wait;
                }
            }
        }
    }

    /// Starts a collection in the blocking pool unless one is still stuck there.
    fn spawn_collection(&self) -> Option<tokio::task::JoinHandle<crate::inventory::Inventory>> {
        if self.collecting.swap(true, Ordering::AcqRel) {
            warn!("previous inventory collection is still running; skipping this refresh");
            return None;
        }
        let collector = Arc::clone(&self.collector);
        let flag = Arc::clone(&self.collecting);
        Some(tokio::task::spawn_blocking(move || {
            let inv = collector.collect();
            flag.store(false, Ordering::Release);
            inv
        }))
    }

    async fn refresh_inventory_now(&mut self) {
        let Some(handle) = self.spawn_collection() else {
            return;
        };
        match tokio::time::timeout(COLLECT_TIMEOUT, handle).await {
            Ok(Ok(inv)) => self.apply_inventory(inv),
            Ok(Err(e)) => warn!("inventory collection failed: {e}"),
            Err(_) => warn!(
                "inventory collection did not finish within {COLLECT_TIMEOUT:?}; heartbeats carry no specs until it does"
            ),
        }
    }

    fn apply_inventory(&mut self, inv: crate::inventory::Inventory) {
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
        debug!(specs = ?new, "inventory refreshed");
        self.specs = Some(new);
    }

    fn reload(&mut self, reloader: Option<&Reloader>) {
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
            match resolve_credentials(&cfg, Some(self.state.clone()), SystemTime::now()) {
                Ok(creds) => {
                    if creds.state.access_token != self.state.access_token
                        || creds.state.node_id != self.state.node_id
                    {
                        info!(node_id = %creds.state.node_id, "reload: {}", creds.reason);
                    }
                    self.state = creds.state;
                    self.bootstrap = creds.bootstrap;
                    self.store = StateStore::new(&cfg.state.dir);
                }
                Err(e) => {
                    error!("reload: keeping the running configuration: {e}");
                    return;
                }
            }
        }
        self.backoff = Backoff::new(cfg.heartbeat.initial_backoff, cfg.heartbeat.max_backoff);
        self.fallback_tried = false;
        self.client = client;
        for w in &cfg.warnings {
            warn!("{w}");
        }
        info!(
            interval = %secs(cfg.heartbeat.interval),
            "configuration reloaded"
        );
        self.cfg = cfg;
    }

    /// One request (or, in dry-run mode, one printed body).
    async fn attempt(&mut self) -> Result<Success, Failure> {
        let body = match &self.specs {
            Some(specs) => serde_json::to_vec(&NodePatchRequest::new(
                specs,
                self.cfg
                    .inventory
                    .description
                    .as_deref()
                    .or(self.state.description.as_deref()),
            ))
            .unwrap_or_default(),
            // No inventory yet: the spec allows an empty PATCH as a pure heartbeat, which is
            // better than claiming zero CPUs.
            None => Vec::new(),
        };
        if self.mode == Mode::DryRun {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&body);
            let _ = out.write_all(b"\n");
            let _ = out.flush();
            return Ok(Success {
                status: 0,
                latency: Duration::ZERO,
                body: crate::api::TokenResponse {
                    node_id: self.state.node_id.to_string(),
                    next_access_token: None,
                    next_access_token_expires_in: None,
                    next_access_token_type: None,
                },
            });
        }
        let url = self.cfg.node_url(&self.state.node_id);
        debug!(%url, bytes = body.len(), "sending heartbeat");
        self.client
            .patch_node(
                &url,
                &self.state.access_token,
                self.state.token_type.as_deref(),
                body,
            )
            .await
    }

    /// Updates token and state from an outcome, persists, logs, and decides the wait.
    fn handle(&mut self, outcome: Result<Success, Failure>) -> Next {
        let now = SystemTime::now();
        self.state.last_attempt_at = Some(now);
        let outcome = outcome.and_then(|s| self.check_node(s));
        let next = match outcome {
            Ok(success) => self.on_success(success, now),
            Err(failure) => self.on_failure(failure, now),
        };
        if self.mode != Mode::DryRun
            && let Err(e) = self.store.save(&self.state)
        {
            error!(
                "cannot persist state: {e}; the current token is kept in memory and saving is retried every heartbeat"
            );
        }
        self.report_status(&next, now);
        next
    }

    /// A 2xx for another node is not a success: a misrouting proxy must not rotate our token.
    fn check_node(&self, s: Success) -> Result<Success, Failure> {
        if self.mode == Mode::DryRun {
            return Ok(s);
        }
        match Uuid::parse_str(s.body.node_id.trim()) {
            Ok(id) if id == self.state.node_id => Ok(s),
            _ => Err(Failure {
                kind: FailureKind::Retryable,
                status: Some(s.status),
                message: format!(
                    "HTTP {} answered for node {:?}, not for this node {}; ignored",
                    s.status, s.body.node_id, self.state.node_id
                ),
                retry_after: None,
            }),
        }
    }

    fn on_success(&mut self, success: Success, now: SystemTime) -> Next {
        let hb = &self.cfg.heartbeat;
        let mut wait = jittered(hb.interval, hb.jitter);
        let mut lifetime = None;
        if let Some(token) = success.body.next_access_token {
            self.state.access_token = Secret::new(token);
            self.state.token_type = success
                .body
                .next_access_token_type
                .filter(|t| !t.trim().is_empty());
            self.state.token_expires_at = match success.body.next_access_token_expires_in {
                Some(s) if s > 0 => {
                    let life = Duration::from_secs(s.unsigned_abs());
                    lifetime = Some(life);
                    now.checked_add(life)
                }
                _ => None,
            };
        }
        if let Some(life) = lifetime {
            // Renew before half the lifetime is gone, but never spin on tiny lifetimes.
            let half = (life / 2).max(MIN_TOKEN_REFRESH_WAIT);
            wait = wait.min(half);
        }
        self.state.last_success_at = Some(now);
        self.state.consecutive_failures = 0;
        self.state.last_error = None;
        self.backoff.reset();
        self.fallback_tried = false;
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
            fallback: false,
        }
    }

    fn on_failure(&mut self, failure: Failure, now: SystemTime) -> Next {
        let hb = self.cfg.heartbeat.clone();
        self.state.consecutive_failures = self.state.consecutive_failures.saturating_add(1);
        self.state.last_error = Some(failure.message.clone());
        self.failing_since.get_or_insert(now);
        let n = self.state.consecutive_failures;
        let mut fallback = false;
        let wait = match failure.kind {
            FailureKind::Retryable => {
                let mut wait = self.backoff.next_delay();
                if let Some(ra) = failure.retry_after {
                    wait = wait.max(ra);
                }
                warn!(
                    attempt = n,
                    "heartbeat failed: {failure}; retrying in {}",
                    secs(wait)
                );
                wait
            }
            FailureKind::Unauthorized => {
                let can_fall_back = !self.fallback_tried
                    && self
                        .bootstrap
                        .as_ref()
                        .is_some_and(|b| *b != self.state.access_token);
                if let (true, Some(b)) = (can_fall_back, self.bootstrap.clone()) {
                    warn!(
                        "heartbeat failed: {failure}; the rotated token was rejected, retrying once with the configured token"
                    );
                    self.state.access_token = b;
                    self.state.token_type = None;
                    self.state.token_expires_at = None;
                    self.fallback_tried = true;
                    fallback = true;
                    Duration::ZERO
                } else {
                    let what_to_do = if self.bootstrap.is_some() {
                        format!(
                            "put a new access token in {} (api.access_token) and reload: systemctl reload exalsius-node-agent",
                            self.cfg.file_hint()
                        )
                    } else {
                        "this node's registration is no longer accepted: re-register it with `exalsius-node-agent register --force …`".to_string()
                    };
                    error!(
                        attempt = n,
                        "heartbeat failed: {failure}; the access token was rejected: {what_to_do}; retrying in {}",
                        secs(hb.max_backoff)
                    );
                    hb.max_backoff
                }
            }
            FailureKind::NotFound => {
                error!(
                    attempt = n,
                    "heartbeat failed: {failure}; node {} is not in the pool at {}: check api.node_id in {}; retrying in {}",
                    self.state.node_id,
                    self.cfg.api.url,
                    self.cfg.file_hint(),
                    secs(hb.max_backoff)
                );
                hb.max_backoff
            }
            FailureKind::Rejected | FailureKind::Conflict => {
                let wait = jittered(hb.interval, hb.jitter);
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
            fallback,
        }
    }

    fn report_status(&self, next: &Next, now: SystemTime) {
        let line = match (&next.failure, self.failing_since) {
            (None, _) => {
                let token = self
                    .state
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;
    use std::path::Path;

    #[test]
    fn equal_jitter_bounds() {
        for _ in 0..10_000 {
            let d = Duration::from_secs(10);
            let j = equal_jitter(d);
            assert!(j >= Duration::from_secs(5) && j <= d, "{j:?}");
        }
    }

    #[test]
    fn interval_jitter_bounds() {
        let i = Duration::from_secs(60);
        for _ in 0..10_000 {
            let j = jittered(i, 0.1);
            assert!(
                j >= Duration::from_secs(54) && j <= Duration::from_secs(66),
                "{j:?}"
            );
        }
        assert_eq!(jittered(i, 0.0), i);
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let nominal: Vec<u64> = (0..6).map(|_| b.next_nominal().as_secs()).collect();
        assert_eq!(nominal, vec![1, 2, 4, 8, 10, 10]);
        for _ in 0..200 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(10) && d >= Duration::from_secs(5));
        }
        b.reset();
        assert_eq!(b.next_nominal(), Duration::from_secs(1));
    }

    fn cfg(text: &str) -> Config {
        Config::from_toml(
            text,
            Path::new("/etc/x.toml"),
            &Overrides::default(),
            &|_| None,
        )
        .unwrap()
    }

    const ID: &str = "123e4567-e89b-12d3-a456-426614174000";

    #[test]
    fn credential_choice() {
        let c = cfg(&format!(
            "[api]\nurl = \"https://a.example\"\nnode_id = \"{ID}\"\naccess_token = \"boot\"\n"
        ));
        let now = SystemTime::now();
        let fresh = resolve_credentials(&c, None, now).unwrap();
        assert_eq!(fresh.state.access_token.expose(), "boot");

        let mut rotated = fresh.state.clone();
        rotated.access_token = Secret::new("rot-1");
        let got = resolve_credentials(&c, Some(rotated.clone()), now).unwrap();
        assert_eq!(got.state.access_token.expose(), "rot-1");

        // Expired → configured token.
        let mut expired = rotated.clone();
        expired.token_expires_at = Some(now - Duration::from_secs(1));
        let got = resolve_credentials(&c, Some(expired), now).unwrap();
        assert_eq!(got.state.access_token.expose(), "boot");

        // New bootstrap token in the config → configured token.
        let c2 = cfg(&format!(
            "[api]\nurl = \"https://a.example\"\nnode_id = \"{ID}\"\naccess_token = \"boot-2\"\n"
        ));
        let got = resolve_credentials(&c2, Some(rotated.clone()), now).unwrap();
        assert_eq!(got.state.access_token.expose(), "boot-2");

        // Other node → configured token.
        let mut other = rotated.clone();
        other.node_id = Uuid::nil();
        let got = resolve_credentials(&c, Some(other), now).unwrap();
        assert_eq!(got.state.access_token.expose(), "boot");
    }

    #[test]
    fn registered_node_without_config_token() {
        let c = cfg("[api]\nurl = \"https://a.example\"\n");
        let now = SystemTime::now();
        let e = resolve_credentials(&c, None, now).unwrap_err();
        assert!(e.contains("register"), "{e}");
        let id = Uuid::parse_str(ID).unwrap();
        let s = State::new(id, "https://a.example", Secret::new("reg"), None);
        let got = resolve_credentials(&c, Some(s.clone()), now).unwrap();
        assert!(got.bootstrap.is_none());
        assert_eq!(got.state.access_token.expose(), "reg");
        let c_other = cfg(&format!(
            "[api]\nurl = \"https://a.example\"\nnode_id = \"{}\"\n",
            Uuid::nil()
        ));
        let e = resolve_credentials(&c_other, Some(s), now).unwrap_err();
        assert!(e.contains("differs"), "{e}");
    }
}
