//! `doctor` against a real server on loopback, with one failure injected at a time: each shows
//! the right ✗ and hint, and doctor never sends a heartbeat, never takes the lock, never
//! changes the state and never prints a token.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use serde_json::Value;
use std::time::Duration;
use support::*;

/// Runs `doctor --json`; returns the exit code and the checks by name.
fn doctor(agent: &Agent, extra: &[&str]) -> (Option<i32>, Vec<Value>, String) {
    let mut args = vec!["doctor", "--json"];
    args.extend_from_slice(extra);
    let out = agent.output(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains("SECRET"), "doctor printed a token: {all}");
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {all}"));
    (
        out.status.code(),
        report["checks"].as_array().unwrap().clone(),
        all,
    )
}

/// The test config with a one-minute interval: "healthy" means a success within 3 minutes.
fn minute_config(url: &str) -> String {
    config_text(url, "").replace("interval = \"100ms\"", "interval = \"60s\"")
}

fn check<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:#?}"))
}

fn status(checks: &[Value], name: &str) -> String {
    check(checks, name)["status"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_node_passes_and_doctor_changes_nothing() {
    let (api, agent) = setup().await;
    agent.write_config(&minute_config(&api.url()));
    assert!(agent.output(&["run", "--once"]).status.success());
    let before = std::fs::read(agent.state_file()).unwrap();
    let requests = api.count();

    let (code, checks, all) = doctor(&agent, &[]);
    assert_eq!(code, Some(0), "{all}");
    for name in [
        "state directory",
        "state file",
        "credentials",
        "last heartbeat",
        "dns",
        "tcp",
        "http",
        "clock",
    ] {
        assert_eq!(status(&checks, name), "ok", "{name}: {all}");
    }
    // The test config is world-readable (a warning), the API plain http (information).
    assert_eq!(status(&checks, "config"), "warn", "{all}");
    assert_eq!(status(&checks, "tls"), "info");
    assert_eq!(status(&checks, "gpu"), "info", "gpu = off");
    assert!(
        check(&checks, "http")["finding"]
            .as_str()
            .unwrap()
            .contains("no token sent")
    );
    // One unauthenticated GET, no PATCH; the state file byte for byte as it was.
    let seen = api.seen();
    assert_eq!(seen.len(), requests + 1);
    assert_eq!(seen.last().unwrap().method, "GET");
    assert_eq!(seen.last().unwrap().auth, None);
    assert_eq!(std::fs::read(agent.state_file()).unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_is_named_and_left_alone() {
    let (api, mut agent) = setup_with("").await;
    agent.spawn(&[]);
    api.wait_requests(2, 10 * SECOND).await;
    let (_, checks, all) = doctor(&agent, &[]);
    let lock = check(&checks, "state lock")["finding"].as_str().unwrap();
    assert!(
        lock.contains(&format!("pid {} ", agent.pid())),
        "{lock}\n{all}"
    );
    // The agent kept its lock and keeps heartbeating.
    let n = api.count();
    api.wait_requests(n + 2, 10 * SECOND).await;
    let (status, _) = agent.stop();
    assert!(status.success());
}

#[test]
fn a_bad_dns_name_fails_at_dns() {
    let agent = Agent::new();
    agent.write_config(&config_text("https://doctor-test.invalid/v1", ""));
    let (code, checks, all) = doctor(&agent, &[]);
    assert_eq!(code, Some(1), "{all}");
    assert_eq!(status(&checks, "dns"), "fail", "{all}");
    assert!(
        check(&checks, "dns")["hint"]
            .as_str()
            .unwrap()
            .contains("resolver")
    );
    assert!(
        checks.iter().all(|c| c["check"] != "tcp"),
        "later phases skipped"
    );
}

#[test]
fn a_refused_port_fails_at_tcp() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent = Agent::new();
    agent.write_config(&config_text(&format!("http://127.0.0.1:{port}/v1"), ""));
    let (code, checks, all) = doctor(&agent, &[]);
    assert_eq!(code, Some(1));
    assert_eq!(status(&checks, "dns"), "ok", "an address needs no lookup");
    assert_eq!(status(&checks, "tcp"), "fail", "{all}");
    let finding = check(&checks, "tcp")["finding"].as_str().unwrap();
    assert!(finding.to_lowercase().contains("refused"), "{finding}");
    assert!(checks.iter().all(|c| c["check"] != "http"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_fails_at_tls_and_names_it() {
    let bad = hostile::self_signed();
    let (addr, _) = hostile::tls_api(&bad, &[b"http/1.1"]).await;
    let agent = Agent::new();
    agent.write_config(&config_text(
        &format!("https://localhost:{}/v1", addr.port()),
        "",
    ));
    let (code, checks, all) = doctor(&agent, &[]);
    assert_eq!(code, Some(1));
    assert_eq!(status(&checks, "tcp"), "ok", "{all}");
    assert_eq!(status(&checks, "tls"), "fail", "{all}");
    let tls = check(&checks, "tls");
    let finding = tls["finding"].as_str().unwrap();
    assert!(finding.contains("UnknownIssuer"), "{finding}");
    assert!(
        finding.contains("subject") && finding.contains("issuer"),
        "{finding}"
    );
    assert!(tls["hint"].as_str().unwrap().contains("api.ca_file"));

    // The same server with its CA named in api.ca_file: trusted, and the answer proves it.
    let pki = hostile::private_ca();
    let (addr, _) = hostile::tls_api(&pki, &[b"http/1.1"]).await;
    let ca = agent.dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    agent.write_config(
        &config_text(&format!("https://localhost:{}/v1", addr.port()), "").replace(
            "[heartbeat]",
            &format!("ca_file = \"{}\"\n\n[heartbeat]", ca.display()),
        ),
    );
    let (_, checks, all) = doctor(&agent, &[]);
    assert_eq!(status(&checks, "tls"), "ok", "{all}");
    let finding = check(&checks, "tls")["finding"].as_str().unwrap();
    assert!(
        finding.contains("exalsius test CA") && finding.contains("valid until"),
        "{finding}"
    );
    assert_eq!(status(&checks, "http"), "ok", "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_owned_by_another_user_fails_with_the_chown() {
    if !std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
    {
        eprintln!("skipped: needs root to chown");
        return;
    }
    let (_api, agent) = setup_with("").await;
    assert!(agent.output(&["run", "--once"]).status.success());
    std::os::unix::fs::chown(agent.state_dir(), Some(65534), Some(65534)).unwrap();
    // The service runs as root here (no unit installed): the directory must be root's.
    let (code, checks, all) = doctor(&agent, &[]);
    assert_eq!(code, Some(1));
    let dir = check(&checks, "state directory");
    assert_eq!(dir["status"], "fail", "{all}");
    assert!(
        dir["finding"]
            .as_str()
            .unwrap()
            .contains("but the service runs as root"),
        "{dir}"
    );
    assert!(
        dir["hint"].as_str().unwrap().starts_with("chown -R root:"),
        "{dir}"
    );
    // Judged for another user (--service-user), the root-owned state file is the problem.
    std::os::unix::fs::chown(agent.state_dir(), Some(0), Some(0)).unwrap();
    let (_, checks, _) = doctor(&agent, &["--service-user", "nobody"]);
    assert_eq!(status(&checks, "state directory"), "fail");
    assert!(
        check(&checks, "service user")["finding"]
            .as_str()
            .unwrap()
            .contains("--service-user")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_heartbeat_and_an_expired_token_fail() {
    let (_api, agent) = setup_with("").await;
    assert!(agent.output(&["run", "--once"]).status.success());
    let mut state = agent.state_json();
    let hours_ago = |h: u64| {
        humantime::format_rfc3339_seconds(
            std::time::SystemTime::now() - Duration::from_secs(h * 3600),
        )
        .to_string()
    };
    state["last_success_at"] = hours_ago(2).into();
    state["last_attempt_at"] = hours_ago(0).into();
    state["last_error"] = "cannot connect to api: connection refused".into();
    state["consecutive_failures"] = 40.into();
    state["token_expires_at"] = hours_ago(1).into();
    std::fs::write(agent.state_file(), state.to_string()).unwrap();
    let (code, checks, all) = doctor(&agent, &[]);
    assert_eq!(code, Some(1));
    let beat = check(&checks, "last heartbeat");
    assert_eq!(beat["status"], "fail", "{all}");
    let finding = beat["finding"].as_str().unwrap();
    assert!(
        // "2h ago", or "2h 1s ago" on a loaded machine: no bet on the wall clock.
        finding.contains("last success 2h") && finding.contains("40 in a row"),
        "{finding}"
    );
    assert_eq!(status(&checks, "token"), "fail");
    // The API itself is fine: doctor says so, which points at the agent, not the network.
    assert_eq!(status(&checks, "http"), "ok");
}

#[test]
fn a_broken_config_is_the_first_failure_and_text_output_marks_it() {
    let agent = Agent::new();
    std::fs::write(agent.config_path(), "[api]\nurl = 7\n").unwrap();
    let out = agent.output(&["doctor"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with("✗ config") && first.contains("api.url"),
        "{text}"
    );
    assert!(text.contains("→ fix that line"), "{text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("doctor: "),
        "one summary line on stderr"
    );
}
