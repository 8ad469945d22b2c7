//! The real binary against a real HTTP server on loopback: rotation, persistence, failure
//! handling, signals, exit codes, and the contract with the shared OpenAPI spec.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};
use support::*;

fn auths(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .map(|s| s.auth.clone().unwrap_or_default())
        .collect()
}

fn header<'a>(s: &'a Seen, name: &str) -> Option<&'a str> {
    s.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotates_the_token_on_every_heartbeat_and_persists_it() {
    let (api, mut agent) = setup_with("").await;
    agent.spawn(&[]);
    let seen = api.wait_requests(5, 10 * SECOND).await;
    let (status, _) = agent.stop();
    assert!(status.success(), "{}", agent.all_output());

    let issued = api.issued();
    let a = auths(&seen);
    assert_eq!(a[0], format!("Bearer {BOOT}"));
    for i in 1..5 {
        assert_eq!(
            a[i],
            format!("Bearer {}", issued[i - 1]),
            "request {i} uses the token of {}",
            i - 1
        );
    }
    for s in &seen[..5] {
        assert_eq!(s.method, "PATCH");
        assert_eq!(s.path, format!("/v1/node/{NODE_ID}"));
        assert_eq!(header(s, "content-type"), Some("application/json"));
        assert_eq!(
            header(s, "accept"),
            Some("application/json, application/problem+json")
        );
        assert_eq!(
            header(s, "user-agent"),
            Some(format!("exalsius-node-agent/{}", env!("CARGO_PKG_VERSION")).as_str())
        );
        let body: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
        assert_valid("components/requests/node-patch-request.yaml", &body);
        assert!(body["hardware"]["cpu_cores"].as_i64().unwrap() >= 1);
    }

    // The state file holds the newest token the server issued, 0600 in a 0700 dir.
    let state = agent.state_json();
    assert_eq!(state["access_token"], *issued.last().unwrap());
    assert_eq!(state["node_id"], NODE_ID);
    assert_eq!(state["consecutive_failures"], 0);
    let fmode = std::fs::metadata(agent.state_file())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    let dmode = std::fs::metadata(agent.state_dir())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!((fmode, dmode), (0o600, 0o700));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_uses_the_persisted_token_and_a_new_configured_token_wins() {
    let (api, mut agent) = setup_with("").await;
    agent.spawn(&[]);
    api.wait_requests(3, 10 * SECOND).await;
    agent.stop();
    let last = api.issued().last().unwrap().clone();
    let before = api.count();

    // Restart: the first request carries the persisted token, not the configured one.
    agent.spawn(&[]);
    let seen = api.wait_requests(before + 1, 10 * SECOND).await;
    agent.stop();
    assert_eq!(
        seen[before].auth.as_deref(),
        Some(format!("Bearer {last}").as_str())
    );
    assert_eq!(seen[before].status, 200);

    // An operator puts a new configured token in the config: it is used from the start.
    api.with(|s| s.accepted.push("boot-token-SECRET-0002".into()));
    agent.write_config(&config_text(&api.url(), "").replace(BOOT, "boot-token-SECRET-0002"));
    let before = api.count();
    agent.spawn(&[]);
    let seen = api.wait_requests(before + 2, 10 * SECOND).await;
    agent.stop();
    assert_eq!(
        seen[before].auth.as_deref(),
        Some("Bearer boot-token-SECRET-0002")
    );
    assert_eq!(seen[before].status, 200);
    assert!(agent.all_output().contains("the configured token changed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_back_off_with_growing_gaps_then_recover() {
    let api = StandIn::start().await;
    api.script([
        Scripted::Status(503),
        Scripted::Status(500),
        Scripted::Status(502),
        Scripted::Status(500),
    ]);
    let mut agent = Agent::new();
    // Nominal delays 100, 200, 400, 800 ms; equal jitter keeps each in [d/2, d].
    agent.write_config(&config_text(&api.url(), "").replace(
        "initial_backoff = \"50ms\"\nmax_backoff = \"400ms\"",
        "initial_backoff = \"100ms\"\nmax_backoff = \"800ms\"",
    ));
    agent.spawn(&[]);
    let seen = api.wait_requests(6, 15 * SECOND).await;
    agent.stop();
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (i, nominal_ms) in [100u64, 200, 400, 800].iter().enumerate() {
        let g = gaps[i];
        assert!(
            g >= Duration::from_millis(nominal_ms / 2),
            "retry {i} came after {g:?}, sooner than half of {nominal_ms} ms"
        );
        assert!(
            g <= Duration::from_millis(*nominal_ms) + slack(Duration::from_millis(1000)),
            "retry {i} came after {g:?}, far later than {nominal_ms} ms"
        );
    }
    assert_eq!(seen[4].status, 200, "first attempt after recovery succeeds");
    let out = agent.all_output();
    assert!(
        out.contains("HTTP 503 Service Unavailable: Scripted: scripted 503"),
        "{out}"
    );
    assert!(out.contains("API reachable again"), "{out}");
    // Failed attempts do not change the token: request 4 still uses the configured token.
    assert_eq!(
        seen[4].auth.as_deref(),
        Some(format!("Bearer {BOOT}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused_then_recovery() {
    // Reserve a port, free it, and let the agent knock on a closed door first.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut agent = Agent::new();
    agent.write_config(&config_text(&format!("http://{addr}/v1"), ""));
    agent.spawn(&[]);
    // The log line names the phase and the address.
    agent
        .wait_output(
            &format!("cannot connect to {addr}: connection refused"),
            10 * SECOND,
        )
        .await;
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let api = StandIn::start_on(Some(listener)).await;
    let seen = api.wait_requests(2, 10 * SECOND).await;
    agent.stop();
    assert_eq!(seen[0].status, 200);
    assert!(agent.all_output().contains("API reachable again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_above_max_backoff() {
    let api = StandIn::start().await;
    api.script([Scripted::StatusWithHeader(429, "retry-after", "2".into())]);
    let mut agent = Agent::new();
    agent.write_config(&config_text(&api.url(), ""));
    agent.spawn(&[]);
    let seen = api.wait_requests(2, 10 * SECOND).await;
    agent.stop();
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= 2 * SECOND,
        "retried after {gap:?}, before Retry-After: 2"
    );
    assert!(gap < 2 * SECOND + slack(2 * SECOND), "{gap:?}");
    assert_eq!(seen[1].status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_rotated_token_is_retried_then_falls_back_to_the_configured_token_once() {
    let (api, mut agent) = setup().await;
    // A 5 s slow schedule: "at once" is then far from "on the slow schedule" on any machine;
    // the exact zero gap is proven in paused time (tests/it/schedule.rs).
    agent.write_config(
        &config_text(&api.url(), "").replace("max_backoff = \"400ms\"", "max_backoff = \"5s\""),
    );
    agent.spawn(&[]);
    api.wait_requests(2, 10 * SECOND).await;
    agent.stop();
    let rotated = api.issued().last().unwrap().clone();
    // The API forgets every rotated token; only the configured token works again.
    api.with(|s| s.accepted = vec![BOOT.to_string()]);
    let before = api.count();
    agent.spawn(&[]);
    let seen = api.wait_requests(before + 3, 10 * SECOND).await;
    agent.stop();
    // The rotated token twice (the second after a short pause: a blip is likelier than a
    // revocation, and the configured token has been answered) ...
    for s in &seen[before..before + 2] {
        assert_eq!(
            s.auth.as_deref(),
            Some(format!("Bearer {rotated}").as_str())
        );
        assert_eq!(s.status, 401);
    }
    // ... then the configured token at once.
    assert_eq!(
        seen[before + 2].auth.as_deref(),
        Some(format!("Bearer {BOOT}").as_str())
    );
    assert_eq!(seen[before + 2].status, 200);
    let gap = seen[before + 2].at - seen[before + 1].at;
    assert!(
        gap < slack(2 * SECOND),
        "fallback should be immediate (not after the 5 s slow schedule), took {gap:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_configured_token_waits_max_backoff_and_says_what_to_do() {
    let api = StandIn::start().await;
    api.with(|s| s.accepted.clear());
    let mut agent = Agent::new();
    agent.write_config(&config_text(&api.url(), ""));
    agent.spawn(&[]);
    let seen = api.wait_requests(3, 10 * SECOND).await;
    agent.stop();
    for w in seen.windows(2) {
        assert!(
            w[1].at - w[0].at >= Duration::from_millis(400),
            "401 retried sooner than max_backoff"
        );
    }
    let out = agent.all_output();
    assert!(out.contains("access token was rejected"), "{out}");
    assert!(out.contains("api.access_token"), "{out}");
    assert!(!out.contains(BOOT), "token leaked: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_node_is_logged_and_retried_slowly() {
    let api = StandIn::start().await;
    api.with(|s| s.nodes.clear());
    let mut agent = Agent::new();
    agent.write_config(&config_text(&api.url(), ""));
    agent.spawn(&[]);
    let seen = api.wait_requests(3, 10 * SECOND).await;
    agent.stop();
    assert!(seen.iter().all(|s| s.status == 404));
    for w in seen.windows(2) {
        assert!(w[1].at - w[0].at >= Duration::from_millis(400));
    }
    let out = agent.all_output();
    assert!(
        out.contains(&format!("node {NODE_ID} is not in the pool")),
        "{out}"
    );
    assert!(
        out.contains("The node with ID"),
        "problem detail is logged: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_server_times_out_and_the_agent_keeps_going() {
    let api = StandIn::start().await;
    api.script([Scripted::Delay(Duration::from_secs(30))]);
    let mut agent = Agent::new();
    agent.write_config(
        &config_text(&api.url(), "").replace("timeout = \"2s\"", "timeout = \"300ms\""),
    );
    agent.spawn(&[]);
    let seen = api.wait_requests(2, 10 * SECOND).await;
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(300), "{gap:?}");
    api.wait_requests(3, 10 * SECOND).await;
    agent.stop();
    assert!(
        agent
            .all_output()
            .contains("no response within api.timeout (0.3s): timed out"),
        "{}",
        agent.all_output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_bodies_change_nothing() {
    let api = StandIn::start().await;
    api.script([
        Scripted::Body(200, "application/json", b"{not json".to_vec()),
        Scripted::Body(200, "application/json", vec![b' '; 2 * 1024 * 1024]),
        Scripted::Body(200, "text/html", b"<html>login</html>".to_vec()),
        Scripted::Body(
            200,
            "application/json",
            br#"{"node_id":"11111111-2222-3333-4444-555555555555","next_access_token":"evil-SECRET"}"#.to_vec(),
        ),
    ]);
    let mut agent = Agent::new();
    agent.write_config(&config_text(&api.url(), ""));
    agent.spawn(&[]);
    let seen = api.wait_requests(6, 15 * SECOND).await;
    agent.stop();
    // Every bad answer left the configured token in place; the fifth request succeeds with it.
    for s in &seen[..5] {
        assert_eq!(s.auth.as_deref(), Some(format!("Bearer {BOOT}").as_str()));
    }
    assert_eq!(seen[4].status, 200);
    let out = agent.all_output();
    assert!(out.contains("unreadable body"), "{out}");
    assert!(out.contains("exceeds the 1048576-byte limit"), "{out}");
    assert!(out.contains("unexpected content type"), "{out}");
    assert!(out.contains("not for this node"), "{out}");
    assert_ne!(agent.state_json()["access_token"], "evil-SECRET");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_within_a_second_mid_backoff_and_mid_request() {
    let api = StandIn::start().await;
    api.with(|s| s.always = Some(503));
    let mut agent = Agent::new();
    agent.write_config(&config_text(&api.url(), "").replace(
        "initial_backoff = \"50ms\"\nmax_backoff = \"400ms\"",
        "initial_backoff = \"30s\"\nmax_backoff = \"60s\"",
    ));
    agent.spawn(&[]);
    api.wait_requests(1, 10 * SECOND).await;
    agent.wait_output("retrying in", 5 * SECOND).await;
    let (status, took) = agent.stop();
    assert!(status.success(), "exit {status:?}");
    assert!(took < slack(SECOND), "stop mid-backoff took {took:?}");

    // Mid-request: the server holds the request for 30 s.
    api.with(|s| s.always = None);
    api.script([Scripted::Delay(Duration::from_secs(30))]);
    agent.write_config(
        &config_text(&api.url(), "").replace("timeout = \"2s\"", "timeout = \"60s\""),
    );
    let before = api.count();
    agent.spawn(&[]);
    api.wait_requests(before + 1, 10 * SECOND).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, took) = agent.stop();
    assert!(status.success(), "exit {status:?}");
    assert!(took < slack(SECOND), "stop mid-request took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_exit_codes() {
    let (api, agent) = setup_with("").await;
    let out = agent.output(&["run", "--once"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(api.count(), 1);
    assert_eq!(agent.state_json()["access_token"], api.issued()[0]);

    api.with(|s| s.always = Some(500));
    let out = agent.output(&["run", "--once"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("heartbeat failed: HTTP 500"), "{stderr}");
    assert_eq!(api.count(), 1 + 3, "three attempts");

    // A 404 is not retried by --once.
    api.with(|s| {
        s.always = None;
        s.nodes.clear();
    });
    let out = agent.output(&["run", "--once"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(api.count(), 1 + 3 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_exit_codes() {
    let (api, agent) = setup_with("").await;
    let out = agent.output(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no heartbeat recorded yet"));

    assert!(agent.output(&["run", "--once"]).status.success());
    // Interval 100 ms: 400 ms later the last success is older than 3 × interval.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let out = agent.output(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("UNHEALTHY"), "{text}");

    // With a 60 s interval the fresh success is healthy.
    agent.write_config(
        &config_text(&api.url(), "").replace("interval = \"100ms\"", "interval = \"60s\""),
    );
    let out = agent.output(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(NODE_ID) && text.contains("last success"),
        "{text}"
    );
    let json = agent.output(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["healthy"], true);
    assert_eq!(v["last_result"], "ok");
    for t in api.issued().iter().chain([&BOOT.to_string()]) {
        assert!(!text.contains(t.as_str()));
        assert!(!String::from_utf8_lossy(&json.stdout).contains(t.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_interval_and_keeps_the_old_config_when_the_new_one_is_bad() {
    let (api, mut agent) = setup().await;
    agent.write_config(
        &config_text(&api.url(), "").replace("interval = \"100ms\"", "interval = \"60s\""),
    );
    agent.spawn(&[]);
    api.wait_requests(1, 10 * SECOND).await;
    let pid = agent.pid();

    // A broken config is refused; the agent keeps running with the old one.
    std::fs::write(agent.config_path(), "[heartbeat]\ninterval = \"fast\"\n").unwrap();
    agent.signal("HUP");
    agent
        .wait_output("keeping the running configuration", 5 * SECOND)
        .await;
    assert_eq!(api.count(), 1);

    agent.write_config(&config_text(&api.url(), ""));
    agent.signal("HUP");
    let seen = api.wait_requests(4, 5 * SECOND).await;
    assert_eq!(agent.pid(), pid);
    let gap = seen[3].at - seen[2].at;
    assert!(
        gap < slack(5 * SECOND),
        "new 100ms interval in use (not 60 s): {gap:?}"
    );
    agent.stop();
    assert!(agent.all_output().contains("configuration reloaded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_appears_in_any_output_at_trace_level() {
    let api = StandIn::start().await;
    api.script([Scripted::Status(401)]);
    let mut agent = Agent::new();
    agent.write_config(
        &config_text(&api.url(), "").replace("level = \"debug\"", "level = \"trace\""),
    );
    agent.spawn(&[]);
    api.wait_requests(5, 10 * SECOND).await;
    agent.stop();
    let mut everything = agent.all_output();
    for args in [&["status"][..], &["status", "--json"], &["check-config"]] {
        let out = agent.output(args);
        everything.push_str(&String::from_utf8_lossy(&out.stdout));
        everything.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    assert!(
        everything.contains("heartbeat ok"),
        "trace output was captured"
    );
    let mut tokens = api.issued();
    tokens.push(BOOT.to_string());
    for t in tokens {
        assert!(!everything.contains(&t), "token {t} leaked");
    }
    assert!(!everything.contains("SECRET"), "a token fragment leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_prints_valid_bodies_and_sends_nothing() {
    let (api, mut agent) = setup().await;
    agent.write_config(
        &config_text(&api.url(), "[inventory]\ndescription = \"rack 4\"\n")
            .replace("[inventory]\ngpu = \"off\"\n", ""),
    );
    agent.spawn(&["--dry-run"]);
    let deadline = Instant::now() + 10 * SECOND;
    while agent.stdout_of_last_run().lines().count() < 3 {
        assert!(Instant::now() < deadline, "{}", agent.all_output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.stop();
    for line in agent.stdout_of_last_run().lines() {
        let body: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_valid("components/requests/node-patch-request.yaml", &body);
        assert_eq!(body["description"], "rack 4");
    }
    assert_eq!(api.count(), 0);
    assert!(!agent.state_file().exists());
}

/// The advice after a rejected token names where the token came from: with
/// `EXALSIUS_ACCESS_TOKEN`, the environment and a restart, not the config file (editing it
/// would change nothing). Before this rule it named the config file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_token_from_the_environment_is_advised_there() {
    let api = StandIn::start().await;
    api.with(|s| s.accepted.clear());
    let mut agent = Agent::new();
    agent.write_config(&config_text(&api.url(), ""));
    agent.spawn_env(&[], &[("EXALSIUS_ACCESS_TOKEN", "from-the-environment")]);
    agent
        .wait_output("access token was rejected", 10 * SECOND)
        .await;
    agent.stop();
    let out = agent.all_output();
    assert!(
        out.contains("the token comes from EXALSIUS_ACCESS_TOKEN") && out.contains("restart"),
        "{out}"
    );
    assert!(!out.contains("(api.access_token) and reload"), "{out}");
}
