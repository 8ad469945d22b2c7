//! sd_notify over a real datagram socket: READY after start, STATUS after heartbeats, WATCHDOG
//! pings (also while the API is down), RELOADING/READY around SIGHUP, STOPPING on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};
use support::*;

fn drain(sock: &UnixDatagram, into: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        into.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
}

async fn wait_for(sock: &UnixDatagram, msgs: &mut Vec<String>, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        drain(sock, msgs);
        if msgs.iter().any(|m| m.contains(needle)) {
            return;
        }
        assert!(Instant::now() < deadline, "no {needle:?} in {msgs:#?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_ready_status_watchdog_reload_and_stopping() {
    let (api, mut agent) = setup().await;
    let path = agent.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_nonblocking(true).unwrap();
    agent.write_config(
        &config_text(&api.url(), "").replace("interval = \"100ms\"", "interval = \"1s\""),
    );
    agent.spawn_env(
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let mut msgs = Vec::new();
    wait_for(&sock, &mut msgs, "READY=1").await;
    wait_for(&sock, &mut msgs, "STATUS=last heartbeat").await;
    // Watchdog every 100 ms (half of WATCHDOG_USEC), also while the API fails.
    api.with(|s| s.always = Some(503));
    msgs.clear();
    // Read as systemd does, as datagrams arrive (the kernel queues only 10 unread ones).
    let until = Instant::now() + Duration::from_millis(2000);
    while Instant::now() < until {
        drain(&sock, &mut msgs);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pings = msgs.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        pings >= 14,
        "{pings} watchdog pings in 2 s (nominally 20): {msgs:#?}"
    );
    assert!(
        msgs.iter().any(|m| m.contains("STATUS=API failing since")),
        "{msgs:#?}"
    );
    agent.signal("HUP");
    wait_for(&sock, &mut msgs, "RELOADING=1").await;
    let reload_at = msgs
        .iter()
        .rposition(|m| m.contains("RELOADING=1"))
        .unwrap();
    wait_for(&sock, &mut msgs, "READY=1").await;
    assert!(msgs.iter().rposition(|m| m.contains("READY=1")).unwrap() > reload_at);
    agent.signal("TERM");
    agent.wait_exit(Duration::from_secs(5));
    wait_for(&sock, &mut msgs, "STOPPING=1").await;
    assert!(!msgs.concat().contains("SECRET"));
}

/// A service manager that does not read its notify socket (busy, hung) must not stop the
/// heartbeats: notifications are dropped, never waited for. (With a blocking send the loop
/// stopped once the kernel's 10-datagram queue was full.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_notify_socket_never_stalls_the_loop() {
    let (api, mut agent) = setup().await;
    let path = agent.dir.path().join("notify.sock");
    let _sock = UnixDatagram::bind(&path).unwrap(); // never read
    agent.write_config(&config_text(&api.url(), ""));
    agent.spawn_env(
        &[],
        &[
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    api.wait_requests(2, Duration::from_secs(10)).await;
    let before = api.count();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let after = api.count();
    let (status, took) = agent.stop();
    assert!(
        after - before >= 10,
        "{} heartbeats in 2 s at a 100 ms interval with the notify socket full",
        after - before
    );
    assert!(
        status.success() && took < slack(Duration::from_secs(2)),
        "{status:?} {took:?}"
    );
}

/// A hostile or broken server's problem detail carries notify assignments, a forged log line
/// and terminal escapes. It reaches systemd as one `STATUS=` line (a `WATCHDOG=trigger` would
/// make systemd kill the agent, and Restart= turn backoff into a restart every 5 s), the log
/// as data, and the state file and `status` escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_from_the_server_is_data_not_structure() {
    let api = StandIn::start().await;
    let hostile = "bad\nWATCHDOG=trigger\nMAINPID=1\n2026-01-01T00:00:00Z  INFO heartbeat ok forged\u{1b}[2J\u{2028}end";
    let body = serde_json::json!({"detail": {"title": "Service Unavailable", "status": 503,
        "detail": hostile}})
    .to_string()
    .into_bytes();
    api.script((0..50).map(|_| Scripted::Body(503, "application/problem+json", body.clone())));
    let mut agent = Agent::new();
    let path = agent.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_nonblocking(true).unwrap();
    agent.write_config(&config_text(&api.url(), ""));
    agent.spawn_env(&[], &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut msgs = Vec::new();
    wait_for(&sock, &mut msgs, "WATCHDOG=trigger").await;
    api.wait_requests(3, 10 * Duration::from_secs(1)).await;
    drain(&sock, &mut msgs);
    let status = agent.output(&["status"]);
    agent.stop();
    for m in &msgs {
        for line in m.lines() {
            let key = line.split('=').next().unwrap_or("");
            assert!(
                [
                    "READY",
                    "STATUS",
                    "WATCHDOG",
                    "STOPPING",
                    "RELOADING",
                    "MONOTONIC_USEC"
                ]
                .contains(&key),
                "a notification carries {line:?}: {m:?}"
            );
            assert_ne!(line, "WATCHDOG=trigger", "{m:?}");
            assert!(!line.starts_with("MAINPID"), "{m:?}");
        }
    }
    assert!(
        msgs.iter().any(|m| m.contains("\\nWATCHDOG=trigger")),
        "{msgs:?}"
    );
    let out = agent.all_output();
    assert!(
        !out.contains('\u{1b}') && !out.contains('\u{2028}'),
        "{out}"
    );
    assert!(
        !out.lines()
            .any(|l| l.starts_with("WATCHDOG=") || l.starts_with("2026-01-01")),
        "{out}"
    );
    assert!(out.contains("\\nWATCHDOG=trigger"), "{out}");
    let last_error = agent.state_json()["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(last_error.contains("\\nWATCHDOG=trigger"), "{last_error}");
    assert!(
        !last_error.contains('\n') && !last_error.contains('\u{1b}'),
        "{last_error}"
    );
    let shown = text(&status);
    assert!(!shown.contains('\u{1b}'), "{shown}");
    assert!(
        !shown.lines().any(|l| l.starts_with("WATCHDOG=")),
        "{shown}"
    );
}
