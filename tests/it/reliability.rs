//! The promises under harder faults: crash-safe state, an unwritable state directory, hostile
//! and broken servers, long outages, clock jumps, proxies, a soak, and secrets.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::path::Path;
use std::time::{Duration, Instant};
use support::hostile::{self, Misbehaviour};
use support::*;

/// PATH without docker & co, so a start costs milliseconds.
const NO_TOOLS: (&str, &str) = ("PATH", "/nonexistent");

/// 1. Crash consistency: SIGKILL at random moments while tokens rotate every few ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_loses_the_token() {
    const KILLS: usize = 200;
    let (api, mut agent) = setup().await;
    agent.write_config(
        &config_text(&api.url(), "")
            .replace("interval = \"100ms\"", "interval = \"2ms\"")
            .replace("level = \"debug\"", "level = \"warn\""),
    );
    let mut ever_written = false;
    let (mut latest, mut one_before, mut runs_with_requests) = (0, 0, 0);
    for i in 0..KILLS {
        let stored = std::fs::read_to_string(agent.state_file()).ok();
        let before = api.count();
        agent.spawn_env(&[], &[NO_TOOLS]);
        // Kill anywhere from before the first request to a dozen rotations in. The moment is
        // taken from the run's first request (not from the spawn), so a loaded machine that
        // is slow to start the process still kills mid-rotation; one run in four is killed
        // early, possibly before any request.
        if fastrand::u8(0..4) > 0 {
            let deadline = std::time::Instant::now() + slack(10 * SECOND);
            while api.count() == before && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            tokio::time::sleep(Duration::from_micros(fastrand::u64(0..40_000))).await;
        } else {
            tokio::time::sleep(Duration::from_micros(fastrand::u64(0..20_000))).await;
        }
        agent.signal("KILL");
        agent.wait_exit(5 * SECOND);

        let seen = api.seen();
        if seen.len() > before {
            runs_with_requests += 1;
            // The run started from the stored token, and the API accepted it.
            let expected = match &stored {
                Some(text) => {
                    let v: serde_json::Value = serde_json::from_str(text).unwrap();
                    v["access_token"].as_str().unwrap().to_string()
                }
                None => BOOT.to_string(),
            };
            assert_eq!(
                seen[before].auth.as_deref(),
                Some(bearer(&expected).as_str()),
                "run {i}"
            );
            assert_eq!(
                seen[before].status, 200,
                "run {i}: the stored token was refused"
            );
        }
        match std::fs::read_to_string(agent.state_file()) {
            Ok(text) => {
                ever_written = true;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("run {i}: torn state file ({e}): {text:?}"));
                let token = v["access_token"].as_str().unwrap();
                let (issued, parents) = api.with(|s| (s.issued.clone(), s.parents.clone()));
                if let (Some(last), Some(parent)) = (issued.last(), parents.last()) {
                    if token == last {
                        latest += 1;
                    } else if token == parent {
                        one_before += 1;
                    } else {
                        panic!(
                            "run {i}: state holds {token}, neither the latest token {last} nor the one it was issued for ({parent})"
                        );
                    }
                }
            }
            Err(e) => assert!(!ever_written, "run {i}: state file vanished: {e}"),
        }
        // No temp files pile up.
        let leftovers = std::fs::read_dir(agent.state_dir())
            .map(|d| d.count())
            .unwrap_or(0);
        assert!(
            leftovers <= 4, // state.json, .lock, .reserve and at most one interrupted temp file
            "run {i}: {leftovers} files in the state dir"
        );
    }
    assert!(
        runs_with_requests > KILLS / 2,
        "only {runs_with_requests} runs got a request out"
    );
    eprintln!("{KILLS} kills: state held the latest token {latest}×, the one before {one_before}×");
    // And the final state still works.
    let before = api.count();
    agent.spawn_env(&[], &[NO_TOOLS]);
    let seen = api.wait_requests(before + 2, 10 * SECOND).await;
    agent.stop();
    assert_eq!(seen[before].status, 200);
}

/// 2. The state directory disappears mid-run (replaced by a file), then comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_state_keeps_the_token_in_memory_and_persists_when_possible() {
    let (api, mut agent) = setup().await;
    agent.write_config(
        &config_text(&api.url(), "").replace("interval = \"100ms\"", "interval = \"50ms\""),
    );
    agent.spawn_env(&[], &[NO_TOOLS]);
    api.wait_requests(2, 10 * SECOND).await;
    let dir = agent.state_dir();
    std::fs::rename(&dir, agent.dir.path().join("state.moved")).unwrap();
    std::fs::write(&dir, "a file where the state directory was").unwrap();
    let before = api.count();
    let seen = api.wait_requests(before + 6, 10 * SECOND).await;
    // Heartbeats go on, every one accepted, each with the token issued by the one before.
    let issued = api.issued();
    for s in &seen[before + 1..before + 6] {
        assert_eq!(s.status, 200);
        let used = s.auth.clone().unwrap();
        assert!(issued.iter().any(|t| bearer(t) == used));
    }
    let errors = agent.all_output().matches("cannot persist state").count();
    assert!(errors >= 5, "an error each cycle: {errors}");
    std::fs::remove_file(&dir).unwrap();
    let deadline = Instant::now() + 5 * SECOND;
    while !agent.state_file().exists() {
        assert!(Instant::now() < deadline, "state never written again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    agent.stop();
    let token = agent.state_json()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let (issued, parents) = api.with(|s| (s.issued.clone(), s.parents.clone()));
    assert!(token == *issued.last().unwrap() || token == *parents.last().unwrap());
}

async fn run_against(
    url: &str,
    extra: &str,
    env: &[(&str, &str)],
    requests_wait: Duration,
) -> Agent {
    let mut agent = Agent::new();
    agent.write_config(&format!("{}{extra}", config_text(url, "")));
    agent.spawn_env(&[], env);
    tokio::time::sleep(requests_wait).await;
    agent
}

fn assert_alive_and_token_unchanged(agent: &mut Agent) {
    let (status, _) = agent.stop();
    assert!(status.success(), "{}", agent.all_output());
    let v = agent.state_json();
    assert_eq!(v["access_token"], BOOT, "a bad answer changed the token");
    assert!(v["consecutive_failures"].as_u64().unwrap() >= 1);
}

/// 3a. Headers, then one byte a second: the whole-request timeout ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_drip_is_cut_by_the_timeout() {
    let (addr, conns) = hostile::raw_server(Misbehaviour::Drip).await;
    let mut agent = run_against(
        &format!("http://{addr}/v1"),
        "",
        &[NO_TOOLS],
        Duration::from_millis(200),
    )
    .await;
    // timeout = 2s in config_text.
    agent.wait_output("timed out", 5 * SECOND).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        conns.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "retried"
    );
    assert_alive_and_token_unchanged(&mut agent);
}

/// 3b. Accept and never answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_and_never_answer_is_cut_by_the_timeout() {
    let (addr, conns) = hostile::raw_server(Misbehaviour::Silent).await;
    let mut agent = run_against(
        &format!("http://{addr}/v1"),
        "",
        &[NO_TOOLS],
        Duration::ZERO,
    )
    .await;
    agent.wait_output("timed out", 5 * SECOND).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(conns.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert_alive_and_token_unchanged(&mut agent);
}

/// 3c. Connection reset in the middle of the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_body_is_a_retryable_failure() {
    let (addr, conns) = hostile::raw_server(Misbehaviour::ResetMidBody).await;
    let mut agent = run_against(
        &format!("http://{addr}/v1"),
        "",
        &[NO_TOOLS],
        Duration::from_millis(800),
    )
    .await;
    assert!(
        conns.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "backoff retries"
    );
    assert!(
        agent.all_output().contains("heartbeat failed"),
        "{}",
        agent.all_output()
    );
    assert_alive_and_token_unchanged(&mut agent);
}

/// 3d. A 200 with an empty body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_200_changes_nothing() {
    let (addr, _) = hostile::raw_server(Misbehaviour::Empty).await;
    let mut agent = run_against(
        &format!("http://{addr}/v1"),
        "",
        &[NO_TOOLS],
        Duration::from_millis(500),
    )
    .await;
    assert!(
        agent.all_output().contains("unreadable body (0 bytes)"),
        "{}",
        agent.all_output()
    );
    assert_alive_and_token_unchanged(&mut agent);
}

/// 3e. A 50 MB chunked body: refused after 1 MiB, memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabyte_body_is_refused_with_bounded_memory() {
    let (addr, conns) = hostile::raw_server(Misbehaviour::Huge).await;
    let mut agent = run_against(
        &format!("http://{addr}/v1"),
        "",
        &[NO_TOOLS],
        Duration::ZERO,
    )
    .await;
    agent
        .wait_output("exceeds the 1048576-byte limit", 10 * SECOND)
        .await;
    while conns.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (peak_kib, _, _) = hostile::proc_stats(agent.pid());
    assert!(
        peak_kib < 24 * 1024,
        "peak RSS {peak_kib} KiB while refusing 50 MB bodies"
    );
    eprintln!("peak RSS while refusing 50 MB bodies: {peak_kib} KiB");
    assert_alive_and_token_unchanged(&mut agent);
}

/// 3f. TLS: a certificate nobody trusts is refused; a private CA given by api.ca_file works,
/// over HTTP/1.1 and over HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_untrusted_refused_private_ca_works_over_http1_and_http2() {
    let bad = hostile::self_signed();
    let (addr, seen) = hostile::tls_api(&bad, &[b"h2", b"http/1.1"]).await;
    let mut agent = run_against(
        &format!("https://localhost:{}/v1", addr.port()),
        "",
        &[NO_TOOLS],
        Duration::ZERO,
    )
    .await;
    agent
        .wait_output("TLS handshake with localhost failed: the server's certificate is not signed by a trusted CA", 5 * SECOND)
        .await;
    assert!(agent.all_output().contains("api.ca_file"));
    assert!(
        seen.lock().unwrap().versions.is_empty(),
        "no request got through"
    );
    assert_alive_and_token_unchanged(&mut agent);

    let pki = hostile::private_ca();
    for (alpn, version) in [
        (&[&b"h2"[..], b"http/1.1"][..], "HTTP/2.0"),
        (&[&b"http/1.1"[..]][..], "HTTP/1.1"),
    ] {
        let (addr, seen) = hostile::tls_api(&pki, alpn).await;
        let mut agent = Agent::new();
        let ca = agent.dir.path().join("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        agent.write_config(
            &config_text(&format!("https://localhost:{}/v1", addr.port()), "").replace(
                "connect_timeout = \"500ms\"",
                &format!(
                    "connect_timeout = \"500ms\"\nca_file = \"{}\"",
                    ca.display()
                ),
            ),
        );
        agent.spawn_env(&[], &[NO_TOOLS]);
        let deadline = Instant::now() + 10 * SECOND;
        while seen.lock().unwrap().versions.len() < 3 {
            assert!(Instant::now() < deadline, "{}", agent.all_output());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        agent.stop();
        let s = seen.lock().unwrap();
        assert!(s.versions.iter().all(|v| v == version), "{:?}", s.versions);
        assert_eq!(s.auths[0], bearer(BOOT));
        assert_eq!(s.auths[1], "Bearer tls-SECRET-1");
        assert!(
            agent.state_json()["access_token"]
                .as_str()
                .unwrap()
                .starts_with("tls-SECRET-")
        );
    }
}

/// 3g. A redirect to another host is not followed: the token never reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_to_another_host_is_not_followed() {
    let elsewhere =
        StandIn::start_on(Some(std::net::TcpListener::bind("127.0.0.2:0").unwrap())).await;
    let api = StandIn::start().await;
    let target = format!("{}/steal", elsewhere.server.uri());
    api.script([
        Scripted::StatusWithHeader(307, "location", target.clone()),
        Scripted::StatusWithHeader(301, "location", target),
    ]);
    let mut agent = Agent::new();
    agent.write_config(&config_text(&api.url(), ""));
    agent.spawn_env(&[], &[NO_TOOLS]);
    let seen = api.wait_requests(3, 10 * SECOND).await;
    agent.stop();
    assert_eq!(elsewhere.count(), 0, "the redirect was followed");
    assert_eq!(seen[2].status, 200);
    assert!(agent.all_output().contains("redirect not followed"));
}

/// 4. A long outage: attempts follow the backoff schedule, capped; recovery without a storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_outage_follows_the_backoff_schedule_and_recovers_quietly() {
    let api = StandIn::start().await;
    api.with(|s| s.always = Some(503));
    let mut agent = Agent::new();
    // initial 20ms doubling to a 200ms cap; normal interval 500ms.
    agent.write_config(
        &config_text(&api.url(), "")
            .replace("interval = \"100ms\"", "interval = \"500ms\"")
            .replace("initial_backoff = \"50ms\"", "initial_backoff = \"20ms\"")
            .replace("max_backoff = \"400ms\"", "max_backoff = \"200ms\""),
    );
    agent.spawn_env(&[], &[NO_TOOLS]);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let outage = api.seen();
    api.with(|s| s.always = None);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    agent.stop();
    let all = api.seen();

    let gaps: Vec<Duration> = outage.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (i, g) in gaps.iter().enumerate() {
        let nominal = Duration::from_millis((20u64 << i.min(20)).min(200));
        assert!(
            *g >= nominal / 2,
            "retry {i} after {g:?} < half of {nominal:?}"
        );
        assert!(
            *g <= Duration::from_millis(200) + slack(Duration::from_millis(300)),
            "retry {i} after {g:?} > cap"
        );
    }
    // Nominal 20+40+80+160 ms, then 200 ms capped with equal jitter (100–200 ms): in 4 s about
    // 4 + 3.7 s / 150 ms ≈ 29 attempts; at most 4 + 3.7/0.1 (the backoff's floor: a machine
    // can only be slower), at least 8 (every gap within the 500 ms bound above, scaled).
    let n = outage.len();
    let fewest = (8 / time_scale() as usize).max(1);
    assert!((fewest..=42).contains(&n), "{n} attempts in a 4 s outage");
    // Recovery: the first attempt after it succeeds, then the normal 500 ms cadence.
    let after: Vec<&Seen> = all[n..].iter().collect();
    assert_eq!(after[0].status, 200);
    assert!(
        after.len() <= 7,
        "{} requests in 2.2 s after recovery: a storm",
        after.len()
    );
    eprintln!(
        "outage: {n} attempts in 4 s (cap 200 ms); after recovery: {} in 2.2 s",
        after.len()
    );
}

/// 5. Wall-clock jumps (libfaketime) do not stop or speed up the heartbeat: scheduling runs on
/// the monotonic clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wall_clock_jumps_do_not_disturb_the_schedule() {
    let lib = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("libfaketime is installed by .ci/run (apt-get install faketime)");
    let api = StandIn::start().await;
    api.with(|s| s.expires_in = Some(3600));
    let mut agent = Agent::new();
    let offset_file = agent.dir.path().join("faketime");
    std::fs::write(&offset_file, "+0\n").unwrap();
    agent.write_config(
        &config_text(&api.url(), "").replace("interval = \"100ms\"", "interval = \"200ms\""),
    );
    let offset = offset_file.to_str().unwrap().to_string();
    agent.spawn_env(
        &[],
        &[
            NO_TOOLS,
            ("LD_PRELOAD", lib),
            ("FAKETIME_TIMESTAMP_FILE", &offset),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    api.wait_requests(3, 10 * SECOND).await;
    let rate = |from: usize, to: usize, seen: &[Seen]| {
        (to - from) as f64 / (seen[to - 1].at - seen[from].at).as_secs_f64().max(0.001)
    };
    for jump in ["+30d", "-400d", "+0"] {
        std::fs::write(&offset_file, format!("{jump}\n")).unwrap();
        let before = api.count();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let seen = api.seen();
        let n = seen.len() - before;
        assert!(
            (5..=10).contains(&n),
            "after a {jump} jump: {n} heartbeats in 1.5 s at 200 ms"
        );
        assert!(seen[before..].iter().all(|s| s.status == 200));
        let r = rate(before, seen.len(), &seen);
        assert!(r < 7.0, "{jump}: {r:.1}/s");
    }
    agent.stop();
    // The faked clock reached the state file: the library was really in effect.
    assert!(agent.all_output().contains("heartbeat ok"));
}

/// A node whose clock is a day behind (libfaketime) gets a 503 with `Retry-After` as an HTTP
/// date 3 s ahead of the server's clock: it retries after about 3 s, measured against the
/// answer's `Date`, not after the 1-hour cap its own clock would give. Before this rule: no
/// retry within 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_date_is_read_on_the_servers_clock() {
    let lib = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
        "/usr/lib/faketime/libfaketimeMT.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("libfaketime is installed by .ci/run (apt-get install faketime)");
    let api = StandIn::start().await;
    let when = std::time::SystemTime::now() + Duration::from_secs(3);
    api.with(|s| {
        s.script.push_back(Scripted::StatusWithHeader(
            503,
            "retry-after",
            httpdate::fmt_http_date(when),
        ))
    });
    let mut agent = Agent::new();
    agent.write_config(&config_text(&api.url(), ""));
    agent.spawn_env(
        &[],
        &[
            NO_TOOLS,
            ("LD_PRELOAD", lib),
            ("FAKETIME", "-1d"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let seen = api.wait_requests(2, slack(10 * SECOND)).await;
    agent.stop();
    assert_eq!(seen[0].status, 503);
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= Duration::from_millis(1500) && gap < slack(6 * SECOND),
        "retried after {gap:?}\n{}",
        agent.all_output()
    );
}

/// 6. HTTPS_PROXY is used (CONNECT through a local proxy); NO_PROXY bypasses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_and_no_proxy_are_honoured() {
    let pki = hostile::private_ca();
    let (addr, seen) = hostile::tls_api(&pki, &[b"http/1.1"]).await;
    let (proxy, connects) = hostile::connect_proxy().await;
    let proxy_url = format!("http://{proxy}");
    for (no_proxy, expect_proxy) in [("", true), ("localhost", false)] {
        let mut agent = Agent::new();
        let ca = agent.dir.path().join("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).unwrap();
        agent.write_config(
            &config_text(&format!("https://localhost:{}/v1", addr.port()), "").replace(
                "connect_timeout = \"500ms\"",
                &format!(
                    "connect_timeout = \"500ms\"\nca_file = \"{}\"",
                    ca.display()
                ),
            ),
        );
        let before_connects = connects.lock().unwrap().len();
        let before = seen.lock().unwrap().versions.len();
        agent.spawn_env(
            &[],
            &[
                NO_TOOLS,
                ("HTTPS_PROXY", &proxy_url),
                ("NO_PROXY", no_proxy),
            ],
        );
        let deadline = Instant::now() + 10 * SECOND;
        while seen.lock().unwrap().versions.len() < before + 2 {
            assert!(Instant::now() < deadline, "{}", agent.all_output());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        agent.stop();
        let through_proxy = connects.lock().unwrap().len() - before_connects;
        if expect_proxy {
            assert!(through_proxy >= 1, "HTTPS_PROXY ignored");
            assert_eq!(
                connects.lock().unwrap()[before_connects],
                format!("localhost:{}", addr.port())
            );
        } else {
            assert_eq!(through_proxy, 0, "NO_PROXY ignored");
        }
    }
}

/// 8. Soak: 15,000 heartbeats against a local server; RSS and fds stay flat from the 1,500th
/// on (a tenfold span, as before; 15,000 rather than 20,000 keeps `cargo test` under two
/// minutes on two cores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_fifteen_thousand_heartbeats() {
    const N: usize = 15_000;
    const BASE: usize = N / 10;
    let (api, mut agent) = setup().await;
    // The state on tmpfs where there is one: every heartbeat still writes, fsyncs and renames
    // the state file, but the soak measures the agent's memory, not the disk's fsync latency
    // (which made this test take minutes).
    let shm = tempfile::tempdir_in("/dev/shm").ok();
    let state_dir = shm
        .as_ref()
        .map_or_else(|| agent.state_dir(), |d| d.path().join("state"));
    agent.write_config(&format!(
        "{}\n[state]\ndir = \"{}\"\n",
        config_text(&api.url(), "")
            .replace("interval = \"100ms\"", "interval = \"1ms\"")
            .replace("level = \"debug\"", "level = \"warn\""),
        state_dir.display()
    ));
    agent.spawn_env(&[], &[NO_TOOLS]);
    api.wait_requests(BASE, 120 * SECOND).await;
    let (_, rss_2k, fds_2k) = hostile::proc_stats(agent.pid());
    api.wait_requests(N, 600 * SECOND).await;
    let (peak, rss_20k, fds_20k) = hostile::proc_stats(agent.pid());
    agent.stop();
    let seen = api.seen();
    let failures = seen.iter().filter(|s| s.status != 200).count();
    eprintln!(
        "soak: {} heartbeats; RSS {rss_2k} KiB at {BASE}, {rss_20k} KiB at {N} (peak {peak} KiB); fds {fds_2k} → {fds_20k}",
        seen.len()
    );
    assert_eq!(failures, 0);
    assert!(rss_20k <= rss_2k + 512, "RSS grew {rss_2k} → {rss_20k} KiB");
    assert!(fds_20k <= fds_2k + 2, "fds grew {fds_2k} → {fds_20k}");
    assert!(
        !agent.all_output().contains("ERROR"),
        "{}",
        agent.all_output()
    );
}

/// 9. Secrets in JSON logs at trace level, and after a panic-free run of every command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_in_json_logs_at_trace_level() {
    let api = StandIn::start().await;
    api.script([Scripted::Status(401), Scripted::Status(500)]);
    let mut agent = Agent::new();
    agent.write_config(
        &config_text(&api.url(), "")
            .replace("level = \"debug\"", "level = \"trace\"\nformat = \"json\""),
    );
    agent.spawn_env(&[], &[NO_TOOLS]);
    api.wait_requests(6, 10 * SECOND).await;
    agent.stop();
    let out = agent.all_output();
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 20);
    for l in &lines {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
    }
    assert!(!out.contains("SECRET"), "a token leaked into JSON logs");
    assert!(!out.contains("panicked"));
}
