//! sd_notify over a real datagram socket: READY after start, STATUS after heartbeats, WATCHDOG
//! pings (also while the API is down), RELOADING/READY around SIGHUP, STOPPING on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

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
    let api = StandIn::start().await;
    let mut agent = Agent::new();
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
    tokio::time::sleep(Duration::from_millis(2000)).await;
    drain(&sock, &mut msgs);
    // Nominally 20 in 2 s; every state write (fsync) runs on the loop's thread, so a busy disk
    // delays some. A starved watchdog (the old nested-select bug) sends one or two.
    let pings = msgs.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 8, "{pings} watchdog pings in 2 s: {msgs:#?}");
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
