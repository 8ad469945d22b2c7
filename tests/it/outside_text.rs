//! Text from outside is data, never structure: arbitrary strings — newlines, `WATCHDOG=trigger`,
//! escape sequences, bidi overrides, C1 controls, kilobytes — as the API's problem title and
//! detail, a `Location` header and a non-JSON error body, through the real binary, to every
//! writer they reach: the systemd notify socket (each datagram holds only the assignments the
//! agent makes, at most one `STATUS=`), the log (one line per record in text, one JSON object
//! per line in json, no escape byte), the metrics file (still parses as the text format), the
//! state file and `status` (one line per field, no control character).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use proptest::prelude::*;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};
use support::*;

/// What the agent itself writes to the notify socket.
const KEYS: &[&str] = &[
    "READY",
    "STATUS",
    "STOPPING",
    "RELOADING",
    "WATCHDOG",
    "MONOTONIC_USEC",
];

fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,80}",
        "[a=\\n\\r\\t\\x00-\\x1f\\x7f\\u{85}\\u{2028}\\u{2029}\\u{202e}\\u{2066}WATCHDOG=trigger MAINPID=1\\x1b\\[31m]{0,120}",
        Just("bad\nWATCHDOG=trigger\nMAINPID=1\nSTATUS=forged".to_string()),
        Just(format!(
            "{}\n2026-01-01T00:00:00Z  INFO heartbeat ok",
            "x".repeat(3000)
        )),
    ]
}

/// Header values can hold any visible ASCII and obs-text, but no line break.
fn header_value() -> impl Strategy<Value = String> {
    "[ -~]{0,200}"
}

fn no_control(s: &str) -> bool {
    !s.chars().any(|c| c.is_control() && c != '\n')
}

fn check_datagrams(msgs: &[String]) -> Result<(), String> {
    for m in msgs {
        let mut status = 0;
        for line in m.lines() {
            let (key, value) = line
                .split_once('=')
                .ok_or(format!("not an assignment: {line:?} in {m:?}"))?;
            if !KEYS.contains(&key) {
                return Err(format!("{key:?} assigned: {m:?}"));
            }
            if key == "WATCHDOG" && value != "1" {
                return Err(format!("WATCHDOG={value:?}: {m:?}"));
            }
            status += usize::from(key == "STATUS");
        }
        if status > 1 || !no_control(m) {
            return Err(format!("datagram {m:?}"));
        }
    }
    Ok(())
}

fn check_log(stderr: &str, json: bool) -> Result<(), String> {
    if stderr.contains('\u{1b}') {
        return Err("an escape byte reached the log".into());
    }
    // (The agent's stdout and stderr files are joined by empty lines.)
    for line in stderr.lines().filter(|l| !l.is_empty()) {
        let ok = if json {
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.is_object())
        } else {
            // Every record starts with its timestamp and level.
            line.len() > 30
                && line.as_bytes()[..4].iter().all(u8::is_ascii_digit)
                && line.contains('Z')
        };
        if !ok || !no_control(line) {
            return Err(format!("not one record per line: {line:?}"));
        }
    }
    Ok(())
}

/// The Prometheus text format, strictly enough: comments, or `name{labels} value`.
fn check_metrics(text: &str) -> Result<(), String> {
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .ok_or(format!("metrics line {line:?}"))?;
        value
            .parse::<f64>()
            .map_err(|_| format!("metrics value in {line:?}"))?;
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("metrics name in {line:?}"));
        }
        if name_end < series.len() && !series.ends_with('}') {
            return Err(format!("metrics labels in {line:?}"));
        }
    }
    Ok(())
}

async fn one_run(
    title: String,
    detail: String,
    location: String,
    json: bool,
) -> Result<(), String> {
    let (api, mut agent) = setup().await;
    let sock_path = agent.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_nonblocking(true).unwrap();
    let metrics = agent.dir.path().join("agent.prom");
    let format = if json { "json" } else { "text" };
    agent.write_config(
        &config_text(
            &api.url(),
            &format!("[metrics]\ntextfile = \"{}\"\n", metrics.display()),
        )
        .replace(
            "level = \"debug\"",
            &format!("level = \"debug\"\nformat = \"{format}\""),
        ),
    );
    let problem = serde_json::json!({"title": title, "detail": detail, "status": 503}).to_string();
    api.script([
        Scripted::Body(
            503,
            "application/problem+json",
            problem.clone().into_bytes(),
        ),
        Scripted::Body(400, "application/problem+json", problem.into_bytes()),
        Scripted::Body(500, "text/plain", detail.clone().into_bytes()),
        Scripted::StatusWithHeader(308, "location", location),
    ]);
    agent.spawn_env(&[], &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    api.wait_requests(6, 10 * SECOND).await;
    // Drain what the agent sent as datagrams arrive, then stop it.
    let mut msgs = Vec::new();
    let until = Instant::now() + Duration::from_millis(300);
    let mut buf = vec![0u8; 65536];
    while Instant::now() < until {
        while let Ok(n) = sock.recv(&mut buf) {
            msgs.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    agent.stop();
    while let Ok(n) = sock.recv(&mut buf) {
        msgs.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    if !msgs.iter().any(|m| m.contains("STATUS=API failing")) {
        return Err(format!("no failure status was sent: {msgs:?}"));
    }
    check_datagrams(&msgs)?;
    let stderr = agent.all_output();
    check_log(&stderr, json)?;
    check_metrics(&std::fs::read_to_string(&metrics).map_err(|e| e.to_string())?)?;
    let status = agent.output(&["status"]);
    let out = text(&status);
    if !no_control(&out) || out.contains("WATCHDOG=trigger\n") {
        return Err(format!("status: {out:?}"));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 32, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn text_from_the_api_never_becomes_structure(
        title in hostile(),
        detail in hostile(),
        location in header_value(),
        json in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let result = rt.block_on(one_run(title, detail, location, json));
        prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}
