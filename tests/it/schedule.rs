//! The loop's timing and credential rules in paused time: a scripted sender answers, virtual
//! time runs, and the gaps between attempts are exact — no wall clock, no server, no flakes.
//! (The same rules as pure functions: `heartbeat::schedule` and `heartbeat::credentials` unit
//! tests; the binary against a real server: `tests/it/daemon.rs`, `tests/it/credentials.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use exalsius_node_agent::api::{Answer, Failure, FailureKind, Issued, Outcome, Success};
use exalsius_node_agent::config::{Config, GpuMode, Overrides};
use exalsius_node_agent::heartbeat::{self, Agent, Control, Mode, SendFuture, Sender};
use exalsius_node_agent::inventory::{Collector, FixedCollector, HostCollector};
use exalsius_node_agent::secret::Secret;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const NODE: &str = "0d9c2f4e-8a51-4c1b-9e62-3f7a1b2c4d5e";
const S: Duration = Duration::from_secs(1);

/// One attempt as the sender saw it.
#[derive(Debug, Clone)]
struct Sent {
    at: Duration,
    token: String,
    body: usize,
}

/// Answers from a script; once it runs out, 200 with a fresh token.
#[derive(Clone)]
struct Scripted {
    start: Instant,
    script: Arc<Mutex<VecDeque<Outcome>>>,
    sent: Arc<Mutex<Vec<Sent>>>,
}

impl Sender for Scripted {
    fn send<'a>(&'a self, _url: &'a str, token: &'a Secret, body: Vec<u8>) -> SendFuture<'a> {
        let mut sent = self.sent.lock().unwrap();
        sent.push(Sent {
            at: self.start.elapsed(),
            token: token.expose().to_string(),
            body: body.len(),
        });
        let n = sent.len();
        let answer = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| ok(&format!("t{n}"), None));
        Box::pin(std::future::ready(answer))
    }
}

fn ok(token: &str, expires_in: Option<u64>) -> Outcome {
    Ok(Success {
        status: 200,
        latency: Duration::ZERO,
        body: Answer {
            node_id: NODE.to_string(),
            issued: Some(Issued {
                token: Secret::new(token),
                expires_in: expires_in.map(Duration::from_secs),
                token_type: Some("Bearer".into()),
            }),
            notes: Vec::new(),
        },
    })
}

fn failed(kind: FailureKind, status: u16, retry_after: Option<u64>) -> Outcome {
    Err(Failure {
        kind,
        status: Some(status),
        message: format!("HTTP {status}"),
        retry_after: retry_after.map(Duration::from_secs),
    })
}

/// Runs the daemon loop (start splay off) for `window` of virtual time against `script`;
/// returns every attempt.
async fn run(
    script: Vec<Outcome>,
    extra: &str,
    window: Duration,
    tune: impl FnOnce(Agent) -> Agent,
) -> Vec<Sent> {
    run_with(script, extra, window, |a| tune(a.without_splay())).await
}

async fn run_with(
    script: Vec<Outcome>,
    extra: &str,
    window: Duration,
    tune: impl FnOnce(Agent) -> Agent,
) -> Vec<Sent> {
    run_mode(Mode::Daemon, script, extra, window, tune).await.0
}

/// Like `run_with` in any mode; also returns how the loop ended.
async fn run_mode(
    mode: Mode,
    script: Vec<Outcome>,
    extra: &str,
    window: Duration,
    tune: impl FnOnce(Agent) -> Agent,
) -> (Vec<Sent>, Result<(), heartbeat::RunError>) {
    let dir = tempfile::tempdir().unwrap();
    run_in(dir.path(), mode, script, extra, window, tune).await
}

/// Like `run_mode` with the state directory `dir` (a second run finds the first one's state).
async fn run_in(
    dir: &Path,
    mode: Mode,
    script: Vec<Outcome>,
    extra: &str,
    window: Duration,
    tune: impl FnOnce(Agent) -> Agent,
) -> (Vec<Sent>, Result<(), heartbeat::RunError>) {
    let text = format!(
        "[api]\nurl = \"http://127.0.0.1:9/v1\"\nnode_id = \"{NODE}\"\naccess_token = \"boot\"\n\
         [heartbeat]\ninterval = \"60s\"\njitter = 0.0\ninitial_backoff = \"1s\"\nmax_backoff = \"300s\"\n\
         [inventory]\ngpu = \"off\"\n[state]\ndir = \"{}\"\n{extra}",
        dir.display()
    );
    let cfg = Config::from_toml(&text, Path::new("/t.toml"), &Overrides::default(), &|_| {
        None
    })
    .unwrap();
    let inventory = HostCollector::new(GpuMode::Off, None).collect();
    let collector: Arc<dyn Collector> = Arc::new(FixedCollector(inventory.clone()));
    let sender = Scripted {
        start: Instant::now(),
        script: Arc::new(Mutex::new(script.into())),
        sent: Arc::new(Mutex::new(Vec::new())),
    };
    let agent = heartbeat::prepare(cfg, mode, collector)
        .unwrap()
        .with_inventory(inventory)
        .with_sender(Box::new(sender.clone()));
    let agent = tune(agent);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(window).await;
        stop.cancel();
    });
    let result = agent
        .run(Control {
            shutdown,
            reload: None,
            reloader: None,
            collectors: None,
        })
        .await;
    (sender.sent.lock().unwrap().clone(), result)
}

fn gaps(sent: &[Sent]) -> Vec<Duration> {
    sent.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[tokio::test(start_paused = true)]
async fn backoff_doubles_to_the_cap_then_the_normal_cadence_resumes() {
    let mut script: Vec<Outcome> = (0..10)
        .map(|_| failed(FailureKind::Retryable, 503, None))
        .collect();
    script.push(ok("t-ok", None));
    let sent = run(script, "", 1200 * S, Agent::without_backoff_jitter).await;
    let g = gaps(&sent);
    let secs: Vec<u64> = g.iter().map(Duration::as_secs).collect();
    assert_eq!(
        &secs[..11],
        &[1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 60],
        "backoff 1 s doubling, capped at max_backoff 300 s; then the 60 s interval"
    );
    assert_eq!(
        sent[0].at,
        Duration::ZERO,
        "the first heartbeat goes out at once"
    );
}

#[tokio::test(start_paused = true)]
async fn equal_jitter_keeps_each_retry_between_half_and_the_full_delay() {
    let script: Vec<Outcome> = (0..9)
        .map(|_| failed(FailureKind::Retryable, 503, None))
        .collect();
    let sent = run(script, "", 1000 * S, |a| a).await;
    let g = gaps(&sent);
    for (n, gap) in g.iter().take(9).enumerate() {
        let full = Duration::from_secs(1 << n).min(300 * S);
        assert!(
            *gap >= full / 2 && *gap <= full,
            "retry {n}: {gap:?} not within [{:?}, {full:?}]",
            full / 2
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_above_the_backoff_and_the_cap() {
    let script = vec![
        failed(FailureKind::Retryable, 429, Some(7)),
        failed(FailureKind::Retryable, 503, Some(600)),
        ok("t-ok", None),
    ];
    let sent = run(script, "", 700 * S, Agent::without_backoff_jitter).await;
    let g = gaps(&sent);
    assert_eq!(g[0], 7 * S, "Retry-After: 7 beats the 1 s backoff");
    assert_eq!(g[1], 600 * S, "Retry-After above max_backoff is honoured");
}

#[tokio::test(start_paused = true)]
async fn no_wait_runs_past_half_the_token_lifetime_and_short_tokens_cannot_storm() {
    let script = vec![ok("t1", Some(40)), ok("t2", Some(1)), ok("t3", Some(0))];
    let sent = run(script, "", 90 * S, |a| a).await;
    let g = gaps(&sent);
    assert_eq!(g[0], 20 * S, "half of 40 s, not the 60 s interval");
    assert_eq!(g[1], S, "a 1 s token: at most one heartbeat a second");
    // A 0 s lifetime is not a usable expiry: the normal interval.
    assert_eq!(g[2], 60 * S, "{g:?}");
    assert_eq!(sent[1].token, "t1");
    assert_eq!(sent[2].token, "t2");
}

#[tokio::test(start_paused = true)]
async fn a_rejected_stored_token_is_retried_after_a_pause_then_the_configured_once_then_alternates_slowly()
 {
    let script = vec![
        ok("t1", None),
        failed(FailureKind::Unauthorized, 401, None),
        failed(FailureKind::Unauthorized, 401, None),
        failed(FailureKind::Unauthorized, 401, None),
        failed(FailureKind::Unauthorized, 401, None),
        ok("t2", None),
    ];
    let sent = run(script, "", 900 * S, |a| a).await;
    let tokens: Vec<&str> = sent.iter().map(|s| s.token.as_str()).collect();
    // The configured token ("boot") was answered when t1 was issued: under reuse detection
    // presenting it again revokes the family, so it comes only after t1 is refused twice.
    assert_eq!(
        &tokens[..7],
        ["boot", "t1", "t1", "boot", "t1", "boot", "t2"]
    );
    let g = gaps(&sent);
    assert_eq!(
        g[1],
        heartbeat::STORED_RETRY_PAUSE,
        "the stored token again after a pause"
    );
    assert_eq!(
        g[2],
        Duration::ZERO,
        "one immediate try with the configured token"
    );
    assert_eq!(
        g[3],
        300 * S,
        "then the slow schedule (max_backoff, jitter 0)"
    );
    assert_eq!(g[4], 300 * S);
    assert_eq!(g[5], 60 * S, "accepted again: the normal cadence");
}

/// A sender whose every answer comes `delay` after the request (`None`: never).
struct Slow {
    delay: Option<Duration>,
    token: &'static str,
}

impl Sender for Slow {
    fn send<'a>(&'a self, _url: &'a str, _token: &'a Secret, _body: Vec<u8>) -> SendFuture<'a> {
        Box::pin(async move {
            match self.delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending::<()>().await,
            }
            ok(self.token, None)
        })
    }
}

/// Runs `mode` against `sender`, stopped (SIGTERM) `stop_at` after the start; returns how it
/// ended, how long after the stop, and the token in `state.json`.
async fn stop_in_flight(
    mode: Mode,
    sender: Slow,
    stop_at: Duration,
) -> (Result<(), heartbeat::RunError>, Duration, String) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[api]\nurl = \"http://127.0.0.1:9/v1\"\nnode_id = \"{NODE}\"\naccess_token = \"boot\"\n\
         [inventory]\ngpu = \"off\"\n[state]\ndir = \"{}\"\n",
        dir.path().display()
    );
    let cfg = Config::from_toml(&text, Path::new("/t.toml"), &Overrides::default(), &|_| {
        None
    })
    .unwrap();
    let inventory = HostCollector::new(GpuMode::Off, None).collect();
    let collector: Arc<dyn Collector> = Arc::new(FixedCollector(inventory.clone()));
    let agent = heartbeat::prepare(cfg, mode, collector)
        .unwrap()
        .with_inventory(inventory)
        .with_sender(Box::new(sender));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let stop = shutdown.clone();
    let start = Instant::now();
    tokio::spawn(async move {
        tokio::time::sleep(stop_at).await;
        stop.cancel();
    });
    let result = agent
        .run(Control {
            shutdown,
            reload: None,
            reloader: None,
            collectors: None,
        })
        .await;
    let took = start.elapsed().saturating_sub(stop_at);
    let state = std::fs::read_to_string(dir.path().join("state.json")).unwrap_or_default();
    let token = serde_json::from_str::<serde_json::Value>(&state)
        .map(|v| v["access_token"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default();
    (result, took, token)
}

/// SIGTERM while a heartbeat is in flight: the server may have rotated the token already, so
/// the stop reads the answer (within `STOP_DRAIN`, inside the promised second) and saves the
/// issued token before it exits; an answer that does not come in time is given up.
#[tokio::test(start_paused = true)]
async fn a_stop_reads_the_answer_in_flight_and_saves_its_token() {
    let ms = Duration::from_millis;
    for mode in [Mode::Daemon, Mode::Once] {
        let answered = Slow {
            delay: Some(ms(500)),
            token: "t-late",
        };
        let (result, took, token) = stop_in_flight(mode, answered, ms(100)).await;
        assert!(result.is_ok(), "{mode:?}: {result:?}");
        assert_eq!(token, "t-late", "{mode:?}: the issued token is saved");
        assert_eq!(took, ms(400), "{mode:?}: as soon as the answer is read");

        let silent = Slow {
            delay: None,
            token: "never",
        };
        let (result, took, token) = stop_in_flight(mode, silent, ms(100)).await;
        assert_eq!(took, heartbeat::STOP_DRAIN, "{mode:?}: bounded");
        assert!(took < S);
        assert_eq!(token, "", "{mode:?}: nothing to save");
        assert_eq!(result.is_ok(), mode == Mode::Daemon, "{mode:?}: {result:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_unknown_node_is_retried_on_the_slow_schedule() {
    let script = vec![
        failed(FailureKind::NotFound, 404, None),
        failed(FailureKind::NotFound, 404, None),
    ];
    let sent = run(script, "", 650 * S, |a| a).await;
    let g = gaps(&sent);
    assert_eq!(&g[..2], [300 * S, 300 * S]);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_body_is_followed_at_once_by_a_pure_heartbeat_then_the_body_at_the_interval() {
    let script = vec![
        failed(FailureKind::Rejected, 422, None),
        ok("t1", None),
        ok("t2", None),
    ];
    let sent = run(script, "", 130 * S, |a| a).await;
    assert!(sent[0].body > 0, "the first heartbeat carries the specs");
    assert_eq!(sent[1].body, 0, "then a pure heartbeat");
    assert!(sent[2].body > 0, "and the specs again");
    let g = gaps(&sent);
    assert_eq!(g[0], Duration::ZERO);
    assert_eq!(g[1], 60 * S);
}

#[tokio::test(start_paused = true)]
async fn the_start_splay_spreads_the_second_heartbeat_over_one_interval() {
    let mut gaps_ms = Vec::new();
    for _ in 0..12 {
        let sent = run_with(Vec::new(), "", 61 * S, |a| a).await;
        assert_eq!(sent[0].at, Duration::ZERO, "the first heartbeat at once");
        gaps_ms.push((sent[1].at - sent[0].at).as_millis());
    }
    assert!(gaps_ms.iter().all(|&ms| ms < 60_000), "{gaps_ms:?}");
    let mut distinct = gaps_ms.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert!(distinct.len() > 6, "spread, not bunched: {gaps_ms:?}");
}

/// `--once` is the same loop with a stop condition: done after a success; after a failure
/// that retrying soon will not change; or after three attempts, backing off between them.
#[tokio::test(start_paused = true)]
async fn once_stops_after_success_a_final_failure_or_three_attempts() {
    let (sent, result) = run_mode(Mode::Once, vec![ok("t1", None)], "", 600 * S, |a| a).await;
    assert!(result.is_ok());
    assert_eq!(sent.len(), 1);

    let three = vec![
        failed(FailureKind::Retryable, 503, None),
        failed(FailureKind::Retryable, 503, None),
        failed(FailureKind::Retryable, 503, None),
        ok("t1", None),
    ];
    let (sent, result) = run_mode(
        Mode::Once,
        three,
        "",
        600 * S,
        Agent::without_backoff_jitter,
    )
    .await;
    let e = result.unwrap_err().to_string();
    assert!(e.contains("HTTP 503"), "{e}");
    assert_eq!(sent.len(), 3, "gives up after 3 attempts");
    assert_eq!(gaps(&sent), [S, 2 * S], "with backoff between them");

    let (sent, result) = run_mode(
        Mode::Once,
        vec![failed(FailureKind::NotFound, 404, None)],
        "",
        600 * S,
        |a| a,
    )
    .await;
    assert!(result.is_err());
    assert_eq!(sent.len(), 1, "a 404 is not retried by --once");

    // Interrupted before it is done: a failure, not a success.
    let stuck = vec![failed(FailureKind::Retryable, 503, Some(500))];
    let (_, result) = run_mode(Mode::Once, stuck, "", 10 * S, |a| a).await;
    assert!(result.unwrap_err().to_string().contains("interrupted"));
}

/// `--once` with a stored token the API no longer accepts makes the daemon's immediate try with
/// the configured token before it reports anything: an operator running it in the foreground
/// must see what the service would do, not a failure the service would have recovered from.
#[tokio::test(start_paused = true)]
async fn once_tries_the_configured_token_when_the_stored_one_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let once = |script| run_in(dir.path(), Mode::Once, script, "", 600 * S, |a| a);
    let (_, result) = once(vec![ok("t1", None)]).await;
    assert!(result.is_ok(), "the first run stores t1");

    let (sent, result) = once(vec![
        failed(FailureKind::Unauthorized, 401, None),
        failed(FailureKind::Unauthorized, 401, None),
        ok("t2", None),
    ])
    .await;
    let tokens: Vec<&str> = sent.iter().map(|s| s.token.as_str()).collect();
    assert_eq!(
        tokens,
        ["t1", "t1", "boot"],
        "the stored token again after a pause, then the configured token"
    );
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(
        gaps(&sent),
        [heartbeat::STORED_RETRY_PAUSE, Duration::ZERO],
        "as the daemon does"
    );

    // All rejected: a failure naming the 401, after the fallback and not before; no fourth try.
    let (sent, result) = once(vec![
        failed(FailureKind::Unauthorized, 401, None),
        failed(FailureKind::Unauthorized, 401, None),
        failed(FailureKind::Unauthorized, 401, None),
    ])
    .await;
    let tokens: Vec<&str> = sent.iter().map(|s| s.token.as_str()).collect();
    assert_eq!(tokens, ["t2", "t2", "boot"]);
    assert!(result.unwrap_err().to_string().contains("HTTP 401"));

    // Only the configured token to try (nothing stored for it yet): it again after the pause,
    // then the 401 is final.
    let (sent, result) = run_mode(
        Mode::Once,
        vec![
            failed(FailureKind::Unauthorized, 401, None),
            failed(FailureKind::Unauthorized, 401, None),
        ],
        "",
        600 * S,
        |a| a,
    )
    .await;
    assert_eq!(sent.len(), 2);
    assert!(result.is_err());
}
