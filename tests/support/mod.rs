//! Test support: a stand-in for the exalsius API on loopback (wiremock with a stateful
//! responder that issues and checks rotating tokens), a runner for the real binary, and the
//! contract check against the shared OpenAPI spec.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate, matchers};

pub mod hostile;

pub const NODE_ID: &str = "0d9c2f4e-8a51-4c1b-9e62-3f7a1b2c4d5e";
pub const BOOT: &str = "boot-token-SECRET-0001";
pub const REGISTER_TOKEN: &str = "register-SECRET-token-77";
pub const REGISTERED_ID: &str = "7c3e9a10-5b2d-4f8e-9a61-0c4d2e8f1b30";
/// One second, for the wall-clock bounds of binary-level tests.
pub const SECOND: Duration = Duration::from_secs(1);

/// The `Authorization` header value for a token.
pub fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

/// One request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub auth: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Status the stand-in answered with.
    pub status: u16,
}

/// A scripted answer that overrides the normal behaviour for one request.
#[derive(Debug, Clone)]
pub enum Scripted {
    Status(u16),
    StatusWithHeader(u16, &'static str, String),
    Body(u16, &'static str, Vec<u8>),
    Delay(Duration),
    /// The normal answer (a registration registers), sent this much later.
    Late(Duration),
}

/// What the stand-in does with a token once it has issued the next one (the API does not say;
/// token servers disagree: issue 29).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    /// Only the newest token lives.
    RetireOnIssue,
    /// Using a token retires every token issued before it (the default).
    #[default]
    RetireOnUse,
    /// Each token lives `expires_in` seconds (set `ApiState::expires_in`); none is retired.
    ExpiryOnly,
    /// Each token answers once; presenting an answered token revokes every token of the node.
    ReuseDetection,
    /// The same, but the token answered last is answered again within the grace, with the
    /// same next token (an idempotent replay).
    ReuseGrace(Duration),
}

#[derive(Debug, Default)]
pub struct ApiState {
    /// The rotation policy.
    pub policy: Policy,
    /// When each token was issued (for [`Policy::ExpiryOnly`]).
    pub issued_time: std::collections::HashMap<String, Instant>,
    /// Answered tokens: when, and the token issued in answer.
    pub answered: std::collections::HashMap<String, (Instant, String)>,
    /// The token answered last (the one a grace covers).
    pub last_answered: Option<String>,
    /// Every token of the node was revoked (reuse detected).
    pub revoked: bool,
    /// The next 200 is sent this long after the server rotated (a stop or kill with the answer
    /// in flight).
    pub delay_next_answer: Option<Duration>,
    /// The next issued token is framed by this white space (a trailing newline).
    pub frame_next_token: Option<&'static str>,
    /// Tokens the API accepts right now.
    pub accepted: Vec<String>,
    /// Every token issued, in order.
    pub issued: Vec<String>,
    /// Position of each issued token in `issued` (a soak issues tens of thousands: no scans).
    pub issued_at: std::collections::HashMap<String, usize>,
    pub seen: Vec<Seen>,
    pub script: VecDeque<Scripted>,
    /// `next_access_token_expires_in` of issued tokens.
    pub expires_in: Option<i64>,
    /// Node ids the pool knows.
    pub nodes: Vec<String>,
    /// Answer every request with this status (after the script).
    pub always: Option<u16>,
    /// Hostnames registered through self-register.
    pub registered_hosts: Vec<String>,
    /// For each issued token, the token whose use produced it.
    pub parents: Vec<String>,
    /// Fields merged into every heartbeat 200 (unusual but valid answers).
    pub extra: Option<serde_json::Value>,
    /// Answer 422 to every heartbeat that carries a body (an API that disagrees with the specs).
    pub reject_bodies: bool,
}

#[derive(Clone)]
pub struct StandIn {
    pub server: Arc<MockServer>,
    pub state: Arc<Mutex<ApiState>>,
}

struct Responder(Arc<Mutex<ApiState>>);

fn problem(status: u16, title: &str, detail: &str) -> ResponseTemplate {
    let body = serde_json::json!({"detail": {
        "type": "https://api.exalsius.ai/errors/x", "title": title, "status": status,
        "detail": detail, "instance": "/node"}});
    ResponseTemplate::new(status).set_body_raw(body.to_string(), "application/problem+json")
}

impl Respond for Responder {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let mut st = self.0.lock().unwrap();
        let auth = req
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let headers = req
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        let mut seen = Seen {
            at: Instant::now(),
            method: req.method.to_string(),
            path: req.url.path().to_string(),
            auth: auth.clone(),
            headers,
            body: req.body.clone(),
            status: 0,
        };
        let late = match st.script.front() {
            Some(Scripted::Late(d)) => {
                let d = *d;
                st.script.pop_front();
                Some(d)
            }
            _ => None,
        };
        let template = if let Some(s) = st.script.pop_front() {
            match s {
                Scripted::Status(code) => {
                    seen.status = code;
                    problem(code, "Scripted", &format!("scripted {code}"))
                }
                Scripted::StatusWithHeader(code, k, v) => {
                    seen.status = code;
                    problem(code, "Scripted", "scripted").insert_header(k, v.as_str())
                }
                Scripted::Body(code, mime, body) => {
                    seen.status = code;
                    ResponseTemplate::new(code).set_body_raw(body, mime)
                }
                Scripted::Delay(d) => {
                    seen.status = 200;
                    ResponseTemplate::new(200).set_delay(d)
                }
                Scripted::Late(_) => unreachable!("taken above"),
            }
        } else if let Some(code) = st.always {
            seen.status = code;
            problem(code, "Always", "always failing")
        } else if req.url.path().ends_with("/node/self-register") {
            let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
            let host = body["hostname"].as_str().unwrap_or("").to_string();
            if body["register_token"] != REGISTER_TOKEN {
                seen.status = 401;
                problem(
                    401,
                    "Unauthorized",
                    "The provided register token are invalid or expired.",
                )
            } else if st.registered_hosts.contains(&host) {
                seen.status = 409;
                problem(409, "Conflict", "The node with ID 123 already exists.")
            } else {
                st.registered_hosts.push(host);
                let n = st.registered_hosts.len();
                let id = if n == 1 {
                    REGISTERED_ID.to_string()
                } else {
                    format!("7c3e9a10-5b2d-4f8e-9a61-{n:012}")
                };
                st.nodes.push(id.clone());
                let token = format!("registered-SECRET-{n}");
                let at = st.issued.len();
                st.issued_at.insert(token.clone(), at);
                st.issued.push(token.clone());
                st.parents.push(String::new());
                st.accepted = vec![token.clone()];
                seen.status = 201;
                ResponseTemplate::new(201).set_body_raw(
                    serde_json::json!({"node_id": id, "next_access_token": token,
                        "next_access_token_expires_in": 3600, "next_access_token_type": "Bearer"})
                    .to_string(),
                    "application/json",
                )
            }
        } else {
            let node = req.url.path().rsplit('/').next().unwrap_or("").to_string();
            let token = auth
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "))
                .unwrap_or("");
            if !st.nodes.contains(&node) {
                seen.status = 404;
                problem(
                    404,
                    "Not Found",
                    &format!("The node with ID {node} was not found."),
                )
            } else if let Some(replay) = st.replay(token) {
                seen.status = 200;
                let body = serde_json::json!({"node_id": node, "next_access_token": replay,
                    "next_access_token_type": "Bearer"});
                ResponseTemplate::new(200).set_body_raw(body.to_string(), "application/json")
            } else if !st.policy_accepts(token) {
                seen.status = 401;
                problem(401, "Unauthorized", "The token is invalid or expired.")
            } else if st.reject_bodies && !req.body.is_empty() {
                seen.status = 422;
                problem(
                    422,
                    "Unprocessable Entity",
                    "hardware.gpu_type: unknown value",
                )
            } else {
                let n = st.issued.len() + 1;
                let next = format!("rotated-SECRET-{n:05}");
                // Rotation as a careful API does it: using a token retires every token issued
                // before it, but not the ones issued after it (a crash between issue and
                // persist leaves the agent with the older one, which must still work).
                let used_at = st.issued_at.get(token).copied();
                let index = std::mem::take(&mut st.issued_at);
                st.accepted
                    .retain(|t| match (used_at, index.get(t).copied()) {
                        (Some(u), Some(i)) => i >= u,
                        (Some(_), None) => false, // configured: retired once a rotated one is used
                        (None, _) => true,
                    });
                st.issued_at = index;
                st.after_rotation(token, &next);
                let at = st.issued.len();
                st.issued_at.insert(next.clone(), at);
                st.issued.push(next.clone());
                st.parents.push(token.to_string());
                st.accepted.push(next.clone());
                let framed = match st.frame_next_token.take() {
                    Some(ws) => format!("{next}{ws}"),
                    None => next.clone(),
                };
                let mut body = serde_json::json!({
                    "node_id": node,
                    "next_access_token": framed,
                    "next_access_token_type": "Bearer",
                });
                if let Some(e) = st.expires_in {
                    body["next_access_token_expires_in"] = e.into();
                }
                if let Some(serde_json::Value::Object(extra)) = &st.extra {
                    for (k, v) in extra {
                        body[k] = v.clone();
                    }
                }
                seen.status = 200;
                let template =
                    ResponseTemplate::new(200).set_body_raw(body.to_string(), "application/json");
                match st.delay_next_answer.take() {
                    Some(d) => template.set_delay(d),
                    None => template,
                }
            }
        };
        st.seen.push(seen);
        match late {
            Some(d) => template.set_delay(d),
            None => template,
        }
    }
}

impl ApiState {
    /// Whether the policy accepts `token` now (reuse detection revokes on an answered one).
    fn policy_accepts(&mut self, token: &str) -> bool {
        if self.revoked {
            return false;
        }
        match self.policy {
            Policy::RetireOnIssue | Policy::RetireOnUse => self.accepted.iter().any(|t| t == token),
            Policy::ExpiryOnly => {
                let life = Duration::from_secs(self.expires_in.unwrap_or(3600).max(0) as u64);
                self.accepted.iter().any(|t| t == token)
                    && self
                        .issued_time
                        .get(token)
                        .is_none_or(|at| at.elapsed() < life)
            }
            Policy::ReuseDetection | Policy::ReuseGrace(_) => {
                if self.answered.contains_key(token) {
                    self.revoked = true;
                    self.accepted.clear();
                    return false;
                }
                self.accepted.iter().any(|t| t == token)
            }
        }
    }

    /// Under a grace: the token answered last, presented again within the grace, gets the same
    /// answer.
    fn replay(&self, token: &str) -> Option<String> {
        let Policy::ReuseGrace(grace) = self.policy else {
            return None;
        };
        let (at, next) = self.answered.get(token)?;
        (!self.revoked && self.last_answered.as_deref() == Some(token) && at.elapsed() <= grace)
            .then(|| next.clone())
    }

    /// Bookkeeping after `used` was answered with `next`.
    fn after_rotation(&mut self, used: &str, next: &str) {
        self.issued_time.insert(next.to_string(), Instant::now());
        self.answered
            .insert(used.to_string(), (Instant::now(), next.to_string()));
        self.last_answered = Some(used.to_string());
        match self.policy {
            Policy::RetireOnIssue => self.accepted.clear(),
            Policy::ExpiryOnly => {
                // Nothing retires: the retain above is undone by keeping every issued token.
                let issued = self.issued.clone();
                for t in issued.into_iter().chain([BOOT.to_string()]) {
                    if !self.accepted.contains(&t) {
                        self.accepted.push(t);
                    }
                }
            }
            Policy::ReuseDetection | Policy::ReuseGrace(_) => self.accepted.retain(|t| t != used),
            Policy::RetireOnUse => {}
        }
    }
}

impl StandIn {
    pub async fn start() -> Self {
        Self::start_on(None).await
    }

    /// Starts on a given listener (to come up on a port the agent already tries).
    pub async fn start_on(listener: Option<std::net::TcpListener>) -> Self {
        let builder = MockServer::builder();
        let builder = match listener {
            Some(l) => builder.listener(l),
            None => builder,
        };
        let server = builder.start().await;
        let state = Arc::new(Mutex::new(ApiState {
            accepted: vec![BOOT.to_string()],
            nodes: vec![NODE_ID.to_string()],
            ..Default::default()
        }));
        Mock::given(matchers::any())
            .respond_with(Responder(state.clone()))
            .mount(&server)
            .await;
        Self {
            server: Arc::new(server),
            state,
        }
    }

    pub fn url(&self) -> String {
        format!("{}/v1", self.server.uri())
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().seen.len()
    }

    pub fn issued(&self) -> Vec<String> {
        self.state.lock().unwrap().issued.clone()
    }

    pub fn script(&self, items: impl IntoIterator<Item = Scripted>) {
        self.state.lock().unwrap().script.extend(items);
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut ApiState) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// Waits until at least `n` requests arrived.
    pub async fn wait_requests(&self, n: usize, within: Duration) -> Vec<Seen> {
        let deadline = Instant::now() + within;
        loop {
            if self.count() >= n {
                return self.seen();
            }
            if Instant::now() > deadline {
                let seen = self.seen();
                panic!(
                    "expected {n} requests within {within:?}, got {}: {seen:#?}",
                    seen.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The binary under test, with a config file, state dir and captured output in a temp dir.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
}

/// The binary under test: `EXALSIUS_TEST_BIN` when set (packaging/test-arm64.sh runs the
/// binary-level suite once more against the aarch64 build, which binfmt_misc hands to
/// qemu-user), else the one cargo built.
pub fn bin() -> String {
    std::env::var("EXALSIUS_TEST_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_exalsius-node-agent").to_string())
}

/// How much slower than a native run this one may be: `EXALSIUS_TEST_TIME_SCALE` (the qemu
/// run sets it), 1 otherwise. Upper bounds on wall-clock gaps are multiplied by it, never
/// dropped; lower bounds (nothing came sooner than X) need no scaling.
pub fn time_scale() -> u32 {
    std::env::var("EXALSIUS_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

/// An upper bound for a wall-clock assertion in a process-level test: `d` (chosen with room
/// for a loaded 2-core machine), scaled by [`time_scale`].
pub fn slack(d: Duration) -> Duration {
    d * time_scale()
}

/// The binary with none of the caller's agent, proxy or systemd variables.
pub fn clean_command() -> Command {
    clean_command_for(Path::new(&bin()))
}

/// Like [`clean_command`], for another copy of the binary.
pub fn clean_command_for(bin: &Path) -> Command {
    let mut c = Command::new(bin);
    for v in [
        "EXALSIUS_AGENT_CONFIG",
        "EXALSIUS_API_URL",
        "EXALSIUS_NODE_ID",
        "EXALSIUS_ACCESS_TOKEN",
        "EXALSIUS_STATE_DIR",
        "EXALSIUS_REGISTER_TOKEN",
        "EXALSIUS_LOG",
        "RUST_LOG",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "JOURNAL_STREAM",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        c.env_remove(v);
    }
    c.stdin(Stdio::null());
    c
}

/// The uid and gid of `nobody`, the stand-in for the packaged service's user.
pub const NOBODY: u32 = 65534;

/// A directory to run the agent as `nobody` from: 0755, owned by `nobody`, with a copy of the
/// binary nobody can reach whatever the permissions of the checkout's directories. `None`
/// (the test says "skipped") unless the tests run as root.
pub struct NobodyHome {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
}

impl NobodyHome {
    pub fn new() -> Option<Self> {
        use std::os::unix::fs::PermissionsExt;
        if !exalsius_node_agent::perms::is_root() {
            eprintln!("skipped: needs root to run as nobody");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        let bin_copy = dir.path().join("exalsius-node-agent");
        std::fs::copy(bin(), &bin_copy).unwrap();
        Some(Self { dir, bin: bin_copy })
    }

    /// Writes `agent.toml` there (0644, so nobody can read it); returns its path.
    pub fn write_config(&self, text: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let cfg = self.dir.path().join("agent.toml");
        std::fs::write(&cfg, text).unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
        cfg
    }

    /// The copy of the binary, to run as `nobody`, with `--config` and `args`.
    pub fn command(&self, cfg: &Path, args: &[&str]) -> Command {
        as_nobody(&self.bin, cfg, args)
    }
}

/// `bin --config cfg args…` as `nobody`, with none of the caller's agent variables.
pub fn as_nobody(bin: &Path, cfg: &Path, args: &[&str]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = clean_command_for(bin);
    c.arg("--config")
        .arg(cfg)
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY);
    c
}

/// A finished command's stdout and stderr, as one text (for assertions and their messages).
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A config pointing at `url` with fast test timings; `extra` is appended (TOML).
/// A running stand-in API and an agent (its own temporary directory), no config written yet.
pub async fn setup() -> (StandIn, Agent) {
    (StandIn::start().await, Agent::new())
}

/// [`setup`], with the agent's config pointing at the stand-in (`config_text` plus `extra`).
pub async fn setup_with(extra: &str) -> (StandIn, Agent) {
    let (api, agent) = setup().await;
    agent.write_config(&config_text(&api.url(), extra));
    (api, agent)
}

pub fn config_text(url: &str, extra: &str) -> String {
    format!(
        "[api]\nurl = \"{url}\"\nnode_id = \"{NODE_ID}\"\naccess_token = \"{BOOT}\"\ntimeout = \"2s\"\nconnect_timeout = \"500ms\"\n\n\
         [heartbeat]\ninterval = \"100ms\"\njitter = 0.0\ninitial_backoff = \"50ms\"\nmax_backoff = \"400ms\"\n\n\
         [inventory]\ngpu = \"off\"\n\n[log]\nlevel = \"debug\"\n\n{extra}"
    )
}

impl Agent {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            child: None,
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir().join("state.json")
    }

    pub fn write_config(&self, text: &str) {
        let text = if text.contains("[state]") {
            text.to_string()
        } else {
            format!(
                "{text}\n[state]\ndir = \"{}\"\n",
                self.state_dir().display()
            )
        };
        std::fs::write(self.config_path(), text).unwrap();
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = clean_command();
        c.arg("--config").arg(self.config_path()).args(args);
        c
    }

    /// Starts `run` (plus args) in the background, output going to files.
    pub fn spawn(&mut self, args: &[&str]) {
        self.spawn_env(args, &[]);
    }

    /// Like `spawn`, with extra environment variables.
    pub fn spawn_env(&mut self, args: &[&str], env: &[(&str, &str)]) {
        let n = std::fs::read_dir(self.dir.path()).unwrap().count();
        let out = std::fs::File::create(self.dir.path().join(format!("stdout.{n}"))).unwrap();
        let err = std::fs::File::create(self.dir.path().join(format!("stderr.{n}"))).unwrap();
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        let mut cmd = self.command(&all);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Runs a command to completion.
    pub fn output(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().unwrap()
    }

    /// Runs a command with extra environment.
    pub fn output_env(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut c = self.command(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Waits for the process to exit; panics after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> (ExitStatus, Duration) {
        let started = Instant::now();
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return (st, started.elapsed());
            }
            if started.elapsed() > within {
                let _ = child.kill();
                panic!(
                    "agent did not exit within {within:?}\n{}",
                    self.all_output()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM and wait; returns the exit status and how long the stop took.
    pub fn stop(&mut self) -> (ExitStatus, Duration) {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(5))
    }

    /// Everything the agent wrote so far (all runs), stdout and stderr.
    pub fn all_output(&self) -> String {
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy().to_string();
                n.starts_with("stdout.") || n.starts_with("stderr.")
            })
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn stdout_of_last_run(&self) -> String {
        let mut names: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("stdout.")
            })
            .collect();
        names.sort_by_key(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .and_then(|e| e.parse::<u32>().ok())
        });
        std::fs::read_to_string(names.last().unwrap()).unwrap()
    }

    pub fn state_json(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(self.state_file()).unwrap()).unwrap()
    }

    /// Waits until the combined output contains `needle`.
    pub async fn wait_output(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.all_output().contains(needle) {
            if Instant::now() > deadline {
                panic!("output never contained {needle:?}:\n{}", self.all_output());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Contract: the part of the OpenAPI spec kept in the repository (tests/contract/).

pub mod contract;

/// `../shared/exalsius-api/openapi` beside the repository (or `$EXALSIUS_API_SPEC`), when it
/// is there: the extract in `tests/contract/` is checked against it.
pub fn spec_dir() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("EXALSIUS_API_SPEC") {
        return Some(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/exalsius-api/openapi");
    p.join("openapi.yaml").exists().then_some(p)
}

/// `tests/contract/exalsius-api.json`: the schemas the tests check, extracted from the spec.
pub fn contract_extract() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/contract/exalsius-api.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Forbids properties the spec does not define, so a body with a misspelt or invented field
/// fails.
fn strict(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut out: serde_json::Map<String, Value> =
                map.into_iter().map(|(k, v)| (k, strict(v))).collect();
            if out.get("type") == Some(&Value::String("object".into()))
                && out.contains_key("properties")
            {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(strict).collect()),
        other => other,
    }
}

/// The JSON Schema of a component file, e.g. `components/requests/node-patch-request.yaml`.
pub fn schema(rel: &str) -> serde_json::Value {
    let schema = contract_extract()["schemas"][rel].clone();
    assert!(
        !schema.is_null(),
        "{rel} is not in tests/contract/exalsius-api.json"
    );
    strict(schema)
}

/// Asserts `body` validates against the schema in `rel`, with int32 bounds checked too.
pub fn assert_valid(rel: &str, body: &serde_json::Value) {
    let schema = schema(rel);
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap();
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(errors.is_empty(), "{rel} rejects {body}: {errors:#?}");
    check_int32(&schema, body);
}

fn check_int32(schema: &serde_json::Value, v: &serde_json::Value) {
    if schema.get("format").and_then(|f| f.as_str()) == Some("int32") {
        let n = v.as_i64().expect("int32 field is an integer");
        assert!(i32::try_from(n).is_ok(), "{n} does not fit int32");
    }
    if let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(|p| p.as_object()),
        v.as_object(),
    ) {
        for (k, s) in props {
            if let Some(x) = obj.get(k) {
                check_int32(s, x);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The stub NVML.

/// Compiles `tests/support/fake_nvml.c` into `dir/libnvidia-ml.so.1` with the machine's C
/// compiler and writes its config (`fake_nvml.conf`, beside it).
/// For the test process itself (in-process collectors load it).
pub fn build_fake_nvml(dir: &Path, conf: &str) -> PathBuf {
    build_fake_nvml_with("cc", dir, conf)
}

/// Like [`build_fake_nvml`], for the agent binary under test to load: built by
/// `EXALSIUS_TEST_CC` when set (the aarch64 run: `aarch64-linux-gnu-gcc`; not `CC`, which would
/// also build the tests' own C dependencies for the wrong machine).
pub fn build_agent_nvml(dir: &Path, conf: &str) -> PathBuf {
    let cc = std::env::var("EXALSIUS_TEST_CC").unwrap_or_else(|_| "cc".to_string());
    build_fake_nvml_with(&cc, dir, conf)
}

/// Like [`build_fake_nvml`] with a given C compiler (a cross compiler for the arm64 proof).
pub fn build_fake_nvml_with(cc: &str, dir: &Path, conf: &str) -> PathBuf {
    build_fake_nvml_flags(cc, dir, conf, &[])
}

/// The stub compiled with extra flags (`-DNO_MEMORY_V2`: a driver before R510).
pub fn build_fake_nvml_flags(cc: &str, dir: &Path, conf: &str, flags: &[&str]) -> PathBuf {
    // Collectors built in this (test) process start the agent binary as their NVML probe.
    exalsius_node_agent::inventory::gpu::probe::set_program(Path::new(env!(
        "CARGO_BIN_EXE_exalsius-node-agent"
    )));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/fake_nvml.c");
    let lib = dir.join("libnvidia-ml.so.1");
    let out = Command::new(cc)
        .args(flags)
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o"])
        .arg(&lib)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc}: {e}"));
    assert!(
        out.status.success(),
        "compiling fake_nvml.c failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    set_fake_nvml(dir, conf);
    lib
}

/// Rewrites the stub's behaviour (read again on every init and device count).
pub fn set_fake_nvml(dir: &Path, conf: &str) {
    std::fs::write(dir.join("fake_nvml.conf"), conf).unwrap();
}

pub fn fixture_host(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hosts")
        .join(name)
}

/// Runs one test of this crate again, in a private mount namespace of its own (`unshare
/// --mount --propagation private`), with `child_env` set so the test knows it is the child:
/// for tests that mount (a tmpfs that fills up, a FUSE mount that never answers) without
/// touching the host's mounts. `test` is the name libtest knows (`area::fn`). Returns the
/// child's output, stdout then stderr.
pub fn rerun_in_mount_namespace(test: &str, child_env: &str) -> (std::process::Output, String) {
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(child_env, "1")
        .output()
        .expect("unshare (util-linux)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}
