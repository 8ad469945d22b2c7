//! `register`: self-registration with a registration token (`POST {api.url}/node/self-register`).
//!
//! On success the node id and the returned access token are written to the state file exactly
//! as a rotated token is (atomic, 0600), so `run` needs neither in the config. The register
//! token is sent once and never written or logged.
//!
//! Registering is a transaction with the API: once the POST is sent, the node may be in the
//! pool, and only its answer holds the token. So a signal while the POST is in flight waits for
//! the answer (and saves it), and an answer that is a 2xx but cannot be read ends `register`
//! without a second POST, saying what happened and what to do.

use super::{Exit, load_config, runtime};
use crate::api::{ApiClient, Failure, FailureKind, NodeSelfRegisterRequest, Success};
use crate::cli::RegisterArgs;
use crate::config::{Config, Overrides};
use crate::heartbeat::credentials::registered_state;
use crate::heartbeat::{Schedule, Verdict};
use crate::inventory::{Collector, HostCollector};
use crate::secret::Secret;
use crate::state::{LockError, StateStore};
use std::net::Ipv6Addr;
use std::time::SystemTime;
use tokio::signal::unix::{Signal, SignalKind, signal};
use uuid::Uuid;

/// Attempts before `register` gives up on connection problems and 5xx: enough to ride out a
/// restart of the API, few enough that an operator at the terminal gets an answer in seconds.
pub const REGISTER_ATTEMPTS: u32 = 4;

/// Checks `host:port` (IPv6 in brackets); returns a message naming the problem.
pub fn validate_endpoint(endpoint: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("--endpoint {endpoint:?}: {why}"));
    let (host, port) = if let Some(rest) = endpoint.strip_prefix('[') {
        let Some((h, p)) = rest.split_once("]:") else {
            return bad("expected [IPv6]:PORT");
        };
        if h.parse::<Ipv6Addr>().is_err() {
            return bad("not an IPv6 address inside the brackets");
        }
        (h, p)
    } else {
        let Some((h, p)) = endpoint.rsplit_once(':') else {
            return bad("expected HOST:PORT");
        };
        if h.contains(':') {
            return bad("an IPv6 address must be in brackets: [2001:db8::1]:22");
        }
        let valid = !h.is_empty()
            && h.len() <= 253
            && h.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid {
            return bad("not a valid host name or IPv4 address");
        }
        (h, p)
    };
    let _ = host;
    match port.parse::<u16>() {
        Ok(0) | Err(_) => bad("port must be 1–65535"),
        Ok(_) => Ok(()),
    }
}

/// This machine's host name.
fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| sysinfo::System::host_name().ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// The registration token; a file that cannot be read now (an I/O error, permissions) is a
/// fault of the machine (exit 1), a wrong path the operator's to fix (exit 78).
fn register_token(args: &RegisterArgs) -> Result<Secret, Exit> {
    let token = match (&args.register_token, &args.register_token_file) {
        (_, Some(path)) => std::fs::read_to_string(path)
            .map(|t| Secret::new(t.trim()))
            .map_err(|e| {
                let message = format!("--register-token-file {}: {e}", path.display());
                if crate::config::is_operators_to_fix(&e) {
                    Exit::config(message)
                } else {
                    Exit::runtime(message)
                }
            })?,
        (Some(t), None) => Secret::new(t.trim()),
        (None, None) => return Err(Exit::config("no registration token given")),
    };
    if token.is_blank() {
        return Err(Exit::config("the registration token is empty"));
    }
    Ok(token)
}

/// Checks the arguments before anything else happens (exit 78 on a bad value).
fn validate(args: &RegisterArgs) -> Result<Secret, Exit> {
    validate_endpoint(&args.endpoint).map_err(Exit::config)?;
    if args.username.trim().is_empty() {
        return Err(Exit::config("--username is empty"));
    }
    if args.ssh_key_id.trim().is_empty() {
        return Err(Exit::config("--ssh-key-id is empty"));
    }
    if let Some(p) = args.price_per_hour
        && (!p.is_finite() || p < 0.0)
    {
        return Err(Exit::config(format!(
            "--price-per-hour {p} must be a non-negative number"
        )));
    }
    register_token(args)
}

/// Runs `register`.
pub fn run(overrides: &Overrides, args: &RegisterArgs) -> Result<(), Exit> {
    let cfg = load_config(overrides)?;
    let token = validate(args)?;
    crate::logging::init(&cfg.log.level, cfg.log.format);

    let store = StateStore::new(&cfg.state.dir);
    // One writer per state directory: a running agent would overwrite the new registration
    // with its next save. Taking the lock also proves the directory is writable before the
    // API is asked to register anything.
    let lock = store.lock().map_err(|e| match e {
        e @ LockError::Held { .. } => Exit::runtime(format!(
            "{e}; then run this register command again, and start the service afterwards: systemctl start exalsius-node-agent"
        )),
        LockError::State(e) => Exit::runtime(format!(
            "cannot write the state in {}: {e}; nothing was registered",
            store.dir().display()
        )),
    })?;
    match store.load() {
        Ok((Some(existing), _)) if !args.force => {
            return Err(Exit::runtime(format!(
                "this agent already holds node {} ({}) in {}; \
                 use --force to register again (the old state is kept as state.json.bak)",
                existing.node_id,
                existing.api_url,
                store.path().display()
            )));
        }
        Err(e) if !args.force => {
            return Err(Exit::runtime(format!("{e}; use --force to replace it")));
        }
        _ => {}
    }

    let runtime = runtime()?;
    let node_id = runtime.block_on(register(&cfg, args, &token, &store, &lock))?;
    crate::sayln!("registered node {node_id} with {}", cfg.api.url);
    crate::sayln!("state written to {}", store.path().display());
    // A non-root user without a configured state dir registers into its own
    // $XDG_STATE_HOME, which the system service never reads.
    let users_own = !crate::perms::is_root()
        && store.dir() == crate::config::default_state_dir(&crate::config::process_env)
        && store.dir() != std::path::Path::new(crate::config::DEFAULT_STATE_DIR);
    if users_own {
        crate::sayln!(
            "note: the system service reads {}, not {}: it will not see this registration; \
             to register for the service, run this command as root (sudo -E …)",
            crate::config::DEFAULT_STATE_DIR,
            store.dir().display()
        );
        crate::sayln!("next: exalsius-node-agent run   (in the foreground, as this user)");
    } else {
        crate::sayln!("next: systemctl enable --now exalsius-node-agent");
        crate::sayln!("   or: exalsius-node-agent run   (in the foreground)");
    }
    Ok(())
}

async fn register(
    cfg: &Config,
    args: &RegisterArgs,
    token: &Secret,
    store: &StateStore,
    lock: &crate::state::StateLock,
) -> Result<Uuid, Exit> {
    let client = ApiClient::new(&cfg.api).map_err(|e| {
        if e.is_machine_fault() {
            Exit::runtime(e.to_string())
        } else {
            Exit::config(e.to_string())
        }
    })?;
    let mut stop = Stop::install();
    let collector = HostCollector::new(cfg.inventory.gpu, cfg.inventory.nvml_library.as_deref())
        .count_unhealthy_gpus(cfg.inventory.count_unhealthy_gpus);
    let collecting = tokio::task::spawn_blocking(move || collector.collect());
    let inventory = tokio::select! {
        biased;
        sig = stop.recv() => {
            return Err(Exit::runtime(format!(
                "registration interrupted ({sig}) while collecting the inventory: nothing was sent, nothing registered"
            )));
        }
        inv = collecting => inv.map_err(|e| {
            Exit::runtime(format!(
                "registration failed: inventory collection failed: {e}"
            ))
        })?,
    };
    let hostname = args.hostname.clone().unwrap_or_else(local_hostname);
    let body = NodeSelfRegisterRequest {
        register_token: token.expose(),
        hostname: &hostname,
        endpoint: &args.endpoint,
        username: &args.username,
        ssh_key_id: &args.ssh_key_id,
        price_per_hour: args.price_per_hour,
        hardware: &inventory.specs.hardware,
        software: &inventory.specs.software,
        system: &inventory.specs.system,
    };
    let body = serde_json::to_vec(&body)
        .map_err(|e| Exit::runtime(format!("registration failed: {e}")))?;
    let url = format!("{}/node/self-register", cfg.api.url);
    let post = Post {
        client: &client,
        cfg,
        url: &url,
        hostname: &hostname,
    };
    let (success, stopped) = post.with_retries(body, &mut stop).await?;
    let node_id = Uuid::parse_str(success.body.node_id.trim()).map_err(|_| {
        Exit::runtime(format!(
            "registration failed: the API answered with node_id {:?}, which is not a UUID",
            success.body.node_id
        ))
    })?;
    for note in &success.body.notes {
        tracing::warn!("registration answer: {note}");
    }
    let Some(issued) = success.body.issued else {
        return Err(Exit::runtime(
            "registration failed: the API registered the node but returned no access token",
        ));
    };
    let mut state = registered_state(node_id, &cfg.api.url, issued, SystemTime::now());
    state.description = args.description.clone();
    match store.replace(lock, &state, args.force) {
        Ok(Some(bak)) => tracing::info!("previous state kept as {}", bak.display()),
        Ok(None) => {}
        Err(e) => {
            return Err(Exit::runtime(format!(
                "registration failed: node {node_id} was registered but its token could not be saved: {e}; \
                 fix the state directory and register again with --force"
            )));
        }
    }
    if let Some(sig) = stopped {
        tracing::warn!(
            "{sig} came while the registration answer was on its way: node {node_id} is registered and its token saved; stopping now"
        );
    }
    Ok(node_id)
}

/// SIGTERM, SIGINT and SIGHUP while `register` runs: before the POST they stop it at once;
/// while the POST is in flight they wait for its answer (the API registers the node either
/// way), bounded by the request's own timeout, so that the token is saved; a second signal
/// stops it at once, saying what that means.
struct Stop {
    term: Option<Signal>,
    int: Option<Signal>,
    hup: Option<Signal>,
}

impl Stop {
    fn install() -> Self {
        let install = |kind, name| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                // Without the handler the signal keeps its default: it ends the process.
                tracing::warn!("cannot handle {name}: {e}");
                None
            }
        };
        Self {
            term: install(SignalKind::terminate(), "SIGTERM"),
            int: install(SignalKind::interrupt(), "SIGINT"),
            hup: install(SignalKind::hangup(), "SIGHUP"),
        }
    }

    /// The next signal's name (never returns without one).
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            Some(()) = next(&mut self.term) => "SIGTERM",
            Some(()) = next(&mut self.int) => "SIGINT",
            Some(()) = next(&mut self.hup) => "SIGHUP",
            else => std::future::pending().await,
        }
    }
}

async fn next(s: &mut Option<Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// The API answered 2xx (and registered the node), but the answer is unusable.
fn accepted(f: &Failure) -> bool {
    f.status.is_some_and(|s| (200..300).contains(&s))
}

/// The node may be registered without this agent holding its token: what to do.
fn may_be_registered(hostname: &str, api: &str) -> String {
    format!(
        "node {hostname} may now be registered at {api} without this agent holding its token; \
         register it again, but not under another name: look for {hostname} in the exalsius node pool, \
         remove it there if it is listed (or ask exalsius support for its token), then run this register command again"
    )
}

/// The registration POST and what its failures mean for this node.
struct Post<'a> {
    client: &'a ApiClient,
    cfg: &'a Config,
    url: &'a str,
    hostname: &'a str,
}

impl Post<'_> {
    /// `POST` with up to [`REGISTER_ATTEMPTS`] attempts on connection problems, 5xx and 429,
    /// waiting between them as the heartbeats do (the heartbeat [`Schedule`]: backoff with
    /// jitter, at least `Retry-After`). Returns the answer and the signal that came while it
    /// was in flight, if one did.
    async fn with_retries(
        &self,
        body: Vec<u8>,
        stop: &mut Stop,
    ) -> Result<(Success, Option<&'static str>), Exit> {
        let mut schedule = Schedule::new(&self.cfg.heartbeat);
        // An attempt that got no answer (a timeout, a reset) may still have registered the node.
        let mut maybe_registered = false;
        for attempt in 1..=REGISTER_ATTEMPTS {
            let (outcome, stopped) = self.attempt(body.clone(), stop).await?;
            let f = match outcome {
                Ok(s) => return Ok((s, stopped)),
                Err(f) => f,
            };
            // A 2xx that cannot be read registered the node: never followed by another POST.
            let retry =
                f.kind == FailureKind::Retryable && !accepted(&f) && attempt < REGISTER_ATTEMPTS;
            if let Some(sig) = stopped.filter(|_| retry) {
                return Err(self.failed(&format!(
                    "{f} (interrupted by {sig}; not retried){}",
                    self.maybe(maybe_registered || f.status.is_none())
                )));
            }
            if !retry {
                return Err(self.final_failure(&f, attempt, maybe_registered));
            }
            maybe_registered |= f.status.is_none() || f.status.is_some_and(|s| s >= 500);
            let wait = schedule.next(
                Verdict::Retryable {
                    retry_after: f.retry_after,
                },
                None,
                SystemTime::now(),
            );
            tracing::warn!(
                "registration attempt {attempt} failed: {f}; retrying in {:.1}s",
                wait.as_secs_f64()
            );
            tokio::select! {
                biased;
                sig = stop.recv() => {
                    return Err(self.failed(&format!(
                        "{f} (interrupted by {sig} before attempt {}){}",
                        attempt + 1,
                        self.maybe(maybe_registered)
                    )));
                }
                () = tokio::time::sleep(wait) => {}
            }
        }
        Err(self.failed("no attempt was made"))
    }

    /// One POST. A signal while it is in flight waits for its answer, at most the request's
    /// timeout (`api.timeout`); a second signal does not.
    async fn attempt(
        &self,
        body: Vec<u8>,
        stop: &mut Stop,
    ) -> Result<(Result<Success, Failure>, Option<&'static str>), Exit> {
        let post = self.client.post_json(self.url, body);
        tokio::pin!(post);
        let sig = tokio::select! {
            biased;
            outcome = &mut post => return Ok((outcome, None)),
            sig = stop.recv() => sig,
        };
        tracing::warn!(
            "{sig} received while the registration request is in flight: waiting up to {}s for the answer so that the node's token is saved (send it again to stop at once)",
            self.cfg.api.timeout.as_secs()
        );
        let waited = tokio::select! {
            biased;
            again = stop.recv() => Err(again),
            outcome = tokio::time::timeout(self.cfg.api.timeout, &mut post) => Ok(outcome),
        };
        match waited {
            Ok(Ok(outcome)) => Ok((outcome, Some(sig))),
            Ok(Err(_)) => Err(self.failed(&format!(
                "interrupted by {sig}, and no answer came within {}s; {}",
                self.cfg.api.timeout.as_secs(),
                may_be_registered(self.hostname, &self.cfg.api.url)
            ))),
            Err(again) => Err(self.failed(&format!(
                "interrupted by {sig}, then {again}, before the answer came; {}",
                may_be_registered(self.hostname, &self.cfg.api.url)
            ))),
        }
    }

    /// What a failure that ends `register` means for this node.
    fn final_failure(&self, f: &Failure, attempt: u32, maybe_registered: bool) -> Exit {
        let msg = match f.kind {
            // A 2xx whose body was cut off or unreadable: the API has registered the node, the
            // token did not arrive. Another POST would get 409 "already exists".
            FailureKind::Retryable if accepted(f) => {
                format!(
                    "{f}: the API has most likely registered node {} but its access token did not arrive, \
                     so nothing was saved and no second request was sent (it would fail with 409 \"already exists\"); {}",
                    self.hostname,
                    may_be_registered(self.hostname, &self.cfg.api.url)
                )
            }
            FailureKind::Conflict if maybe_registered => format!(
                "{f}: an earlier attempt got no answer and may have registered this node \
                 ({}) already, but its token was never received; remove the node \
                 from the pool (or ask exalsius support for its token) and register again",
                self.hostname
            ),
            FailureKind::Unauthorized => {
                format!("{f}: the registration token is invalid or expired; get a new one")
            }
            FailureKind::Conflict => {
                format!("{f}: a node with this hostname or endpoint already exists in the pool")
            }
            FailureKind::Retryable => format!("{f} (gave up after {attempt} attempts)"),
            _ => f.message.clone(),
        };
        self.failed(&msg)
    }

    /// The advice for a failure after which the node may be registered.
    fn maybe(&self, maybe_registered: bool) -> String {
        if maybe_registered {
            format!(
                "; an attempt got no answer: {}",
                may_be_registered(self.hostname, &self.cfg.api.url)
            )
        } else {
            String::new()
        }
    }

    fn failed(&self, msg: &str) -> Exit {
        Exit::runtime(format!("registration failed: {msg}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(token_file: &str) -> RegisterArgs {
        RegisterArgs {
            register_token: None,
            register_token_file: Some(std::path::PathBuf::from(token_file)),
            endpoint: "192.168.1.1:22".into(),
            username: "ubuntu".into(),
            ssh_key_id: "123e4567-e89b-12d3-a456-426614174000".into(),
            hostname: None,
            price_per_hour: None,
            description: None,
            force: false,
        }
    }

    /// The registration token file follows the class of every named file: missing or a
    /// directory → 78 (fix the command line), an I/O error now → 1 (`/proc/self/mem` read at
    /// offset 0 fails with EIO). Before this rule: 78 for both.
    #[test]
    fn a_token_file_fault_is_1_and_a_wrong_path_78() {
        assert_eq!(validate(&args("/nonexistent/token")).unwrap_err().code, 78);
        assert_eq!(validate(&args("/")).unwrap_err().code, 78);
        let e = validate(&args("/proc/self/mem")).unwrap_err();
        assert_eq!(e.code, 1, "{}", e.message);
    }

    #[test]
    fn endpoints() {
        for ok in [
            "192.168.1.1:22",
            "node-7.example.com:2222",
            "[2001:db8::1]:22",
            "[::1]:22",
            "h:65535",
        ] {
            assert!(validate_endpoint(ok).is_ok(), "{ok}");
        }
        for bad in [
            "host",
            "host:",
            ":22",
            "host:0",
            "host:70000",
            "2001:db8::1:22",
            "[2001:db8::1]",
            "[nope]:22",
            "bad_host:22",
            "-x.example:22",
            "a..b:22",
        ] {
            assert!(validate_endpoint(bad).is_err(), "{bad}");
        }
    }
}
