//! The token is never lost or stranded: the real binary against the stand-in API on loopback,
//! in the situations operators create — a spurious 401, two processes on one state directory,
//! `register` while the daemon runs, unusual but valid answers, an API that rejects the body,
//! a symlink where the state file should be.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use support::*;

const MS: Duration = Duration::from_millis(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_spurious_401_is_answered_with_the_rotated_token_after_a_pause() {
    let (api, mut agent) = setup().await;
    // The slow schedule is 3 s here, so "at once" and "slowly" are told apart with room to
    // spare on a loaded machine (the exact gaps are proven in paused time, tests/it/schedule.rs).
    agent.write_config(
        &config_text(&api.url(), "").replace("max_backoff = \"400ms\"", "max_backoff = \"3s\""),
    );
    agent.spawn(&[]);
    // boot → r1, r1 → r2: the stand-in retires the configured token once r1 is used.
    api.wait_requests(2, 10 * SECOND).await;
    // One blip: the next request is rejected although its token is valid.
    api.script([Scripted::Status(401)]);
    let before = api.count();
    let seen = api.wait_requests(before + 3, 10 * SECOND).await;
    agent.stop();
    let blip = &seen[before];
    assert_eq!(blip.status, 401);
    let rotated = blip.auth.clone().unwrap();
    assert_ne!(rotated, bearer(BOOT));
    // The rotated token again after the short pause (never the configured token, which the
    // API answered once: under reuse detection presenting it again revokes the node): accepted.
    assert_eq!(seen[before + 1].auth.as_deref(), Some(rotated.as_str()));
    assert_eq!(seen[before + 1].status, 200);
    let pause = seen[before + 1].at - blip.at;
    assert!(pause >= 1900 * MS && pause < slack(2500 * MS), "{pause:?}");
    assert!(
        seen[before..]
            .iter()
            .all(|s| s.auth.as_deref() != Some(bearer(BOOT).as_str())),
        "the configured token was presented again"
    );
    // The stored token is the newest issued, never the configured token.
    // (A stop between issue and persist leaves the one before the newest.)
    let stored = agent.state_json()["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let issued = api.issued();
    assert!(issued[issued.len() - 2..].contains(&stored), "{stored}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_rejection_alternates_and_never_stores_the_configured_token() {
    let (api, mut agent) = setup_with("").await;
    agent.spawn(&[]);
    api.wait_requests(2, 10 * SECOND).await;
    // The auth backend rejects everything for a while.
    api.with(|s| s.always = Some(401));
    let before = api.count();
    let seen = api.wait_requests(before + 5, 10 * SECOND).await;
    let tokens: Vec<String> = seen[before..before + 5]
        .iter()
        .map(|s| s.auth.clone().unwrap())
        .collect();
    let rotated = tokens[0].clone();
    assert_eq!(
        tokens,
        vec![
            rotated.clone(),
            rotated.clone(),
            bearer(BOOT),
            rotated.clone(),
            bearer(BOOT),
        ],
        "rotated, rotated after the pause, immediate configured, then alternating"
    );
    let state = agent.state_json();
    assert_eq!(bearer(state["access_token"].as_str().unwrap()), rotated);
    // The backend recovers: the rotated token works again.
    api.with(|s| s.always = None);
    let n = api.count();
    let seen = api.wait_requests(n + 3, 10 * SECOND).await;
    agent.stop();
    assert!(seen[n..].iter().any(|s| s.status == 200), "{seen:?}");
    assert_ne!(agent.state_json()["access_token"], BOOT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writer_per_state_directory() {
    let (api, mut agent) = setup_with("").await;
    agent.spawn(&[]);
    api.wait_requests(2, 10 * SECOND).await;
    let pid = agent.pid();

    // A second daemon on the same directory: exit 1 at once, naming the running one.
    let second = agent.output(&["run"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    // `run --once` refuses the same way.
    let once = agent.output(&["run", "--once"]);
    assert_eq!(once.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&once.stderr).contains(&format!("pid {pid}")));
    // `register` refuses and says exactly what to do.
    let tf = agent.dir.path().join("rt");
    std::fs::write(&tf, REGISTER_TOKEN).unwrap();
    let reg = agent.output(&[
        "register",
        "--register-token-file",
        tf.to_str().unwrap(),
        "--endpoint",
        "10.0.0.1:22",
        "--username",
        "u",
        "--ssh-key-id",
        "k",
        "--force",
    ]);
    let err = String::from_utf8_lossy(&reg.stderr);
    assert_eq!(reg.status.code(), Some(1), "{err}");
    assert!(err.contains("systemctl stop exalsius-node-agent"), "{err}");
    assert!(
        api.seen().iter().all(|s| s.method != "POST"),
        "register must not reach the API while the daemon runs"
    );
    // `status` reads without the lock (its exit code is the health verdict, not checked here).
    let status = agent.output(&["status"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains(NODE_ID));

    // The first agent was undisturbed: still rotating, no 401.
    let n = api.count();
    let seen = api.wait_requests(n + 3, 10 * SECOND).await;
    assert!(seen.iter().all(|s| s.status == 200), "{seen:?}");
    // SIGKILL releases the lock (the kernel does): a new agent starts at once.
    agent.signal("KILL");
    agent.wait_exit(5 * SECOND);
    let n = api.count();
    agent.spawn(&[]);
    let seen = api.wait_requests(n + 2, 10 * SECOND).await;
    agent.stop();
    assert!(seen[n..].iter().all(|s| s.status == 200), "{seen:?}");
}

/// Runs the agent for three heartbeats against answers that carry `extra`; checks that each
/// request carried the token the one before it was issued, as `Bearer`. Returns the agent.
async fn three_heartbeats_with(extra: serde_json::Value) -> Agent {
    let api = StandIn::start().await;
    api.with(|s| s.extra = Some(extra));
    let mut agent = Agent::new();
    agent.write_config(&config_text(&api.url(), ""));
    agent.spawn(&[]);
    let seen = api.wait_requests(3, 10 * SECOND).await;
    agent.stop();
    assert!(seen.iter().all(|s| s.status == 200), "{seen:?}");
    let issued = api.issued();
    assert_eq!(seen[1].auth.as_deref(), Some(bearer(&issued[0]).as_str()));
    assert_eq!(seen[2].auth.as_deref(), Some(bearer(&issued[1]).as_str()));
    agent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_but_valid_answers_keep_the_token() {
    let agent = three_heartbeats_with(serde_json::json!({
        "next_access_token_expires_in": 3600.0,
        "next_access_token_type": "bearer",
        "node_labels": {"zone": "b"},
        "server_time": null
    }))
    .await;
    let state = agent.state_json();
    assert!(state["token_expires_at"].is_string(), "{state}");
    assert_eq!(state["token_type"], "Bearer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_optional_field_is_logged_and_the_token_kept() {
    let agent = three_heartbeats_with(serde_json::json!({
        "next_access_token_expires_in": -30,
        "next_access_token_type": "MAC"
    }))
    .await;
    let out = agent.all_output();
    assert!(out.contains("next_access_token_expires_in = -30"), "{out}");
    assert!(out.contains("sending Bearer"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_body_is_followed_by_a_pure_heartbeat_that_keeps_the_node_alive() {
    let api = StandIn::start().await;
    api.with(|s| s.reject_bodies = true);
    let mut agent = Agent::new();
    agent.write_config(&config_text(&api.url(), ""));
    agent.spawn(&[]);
    let seen = api.wait_requests(6, 10 * SECOND).await;
    agent.stop();
    // body → 422, at once an empty PATCH → 200 (token rotates), then the body again.
    let shape: Vec<(bool, u16)> = seen[..6]
        .iter()
        .map(|s| (!s.body.is_empty(), s.status))
        .collect();
    assert_eq!(
        shape,
        vec![
            (true, 422),
            (false, 200),
            (true, 422),
            (false, 200),
            (true, 422),
            (false, 200)
        ]
    );
    // "At once" is proven exactly in paused time (tests/it/schedule.rs,
    // a_rejected_body_is_followed_at_once_…); here the order is what a process shows.
    let pure = &seen[1];
    assert!(
        !pure
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type")),
        "an empty PATCH carries no content type"
    );
    let issued = api.issued();
    assert_eq!(seen[3].auth.as_deref(), Some(bearer(&issued[0]).as_str()));
    let out = agent.all_output();
    assert!(out.contains("hardware.gpu_type: unknown value"), "{out}");
}

/// Run as root (CI is), a symlink in place of `state.json` must not make the agent read,
/// chmod or write its target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_state_file_is_moved_aside_and_its_target_untouched() {
    let (api, agent) = setup_with("").await;
    std::fs::create_dir_all(agent.state_dir()).unwrap();
    std::fs::set_permissions(agent.state_dir(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let victim = agent.dir.path().join("victim.json");
    let text = format!(
        "{{\"node_id\":\"{NODE_ID}\",\"api_url\":\"{}\",\"access_token\":\"stolen\"}}\n",
        api.url()
    );
    std::fs::write(&victim, &text).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&victim, agent.state_file()).unwrap();

    let out = agent.output(&["run", "--once"]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("symlink"), "{all}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), text);
    assert_eq!(
        std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let meta = std::fs::symlink_metadata(agent.state_file()).unwrap();
    assert!(meta.is_file(), "a real state file replaced the link");
    assert_eq!(api.seen()[0].auth.as_deref(), Some(bearer(BOOT).as_str()));
    // `status` refuses to read a symlink too (read-only: it moves nothing).
    std::fs::remove_file(agent.state_file()).unwrap();
    std::os::unix::fs::symlink(&victim, agent.state_file()).unwrap();
    let st = agent.output(&["status"]);
    assert_eq!(st.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&st.stderr).contains("symlink"));
    assert!(
        std::fs::symlink_metadata(agent.state_file())
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

/// No wait — here a `Retry-After: 60` — runs past half of the token's remaining lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_never_lets_the_token_expire() {
    let api = StandIn::start().await;
    api.with(|s| s.expires_in = Some(8));
    let mut agent = Agent::new();
    // Normal cadence 30 s: only the token's lifetime can bring the retry forward.
    agent.write_config(
        &config_text(&api.url(), "").replace("interval = \"100ms\"", "interval = \"30s\""),
    );
    agent.spawn(&[]);
    api.wait_requests(1, 10 * SECOND).await;
    api.script([Scripted::StatusWithHeader(
        503,
        "retry-after",
        "60".to_string(),
    )]);
    // The second beat comes at half the 8 s lifetime (4 s), gets 503 + Retry-After: 60; the
    // third must still come before the token issued at the first one expires (8 s after it):
    // nominally at 6 s, so 2 s of room for a loaded machine.
    let seen = api.wait_requests(3, 15 * SECOND).await;
    agent.stop();
    assert_eq!(seen[1].status, 503);
    assert_eq!(seen[2].status, 200, "{seen:?}");
    let age = seen[2].at - seen[0].at;
    assert!(
        age < 8 * SECOND,
        "the retry came {age:?} after the token was issued"
    );
    assert!(
        seen[2].at - seen[1].at < 55 * SECOND,
        "Retry-After: 60 was not cut short"
    );
}

/// A state file the agent's user cannot read (copied back from a backup as root into the
/// service's directory): it may hold the only token the API still accepts. The agent neither
/// replaces nor moves it; it stops with exit 1 (systemd retries), naming the file and the
/// `chown` that fixes it — and once fixed, it runs on with that token. Needs root to switch to
/// `nobody`; skipped otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_file_the_agent_cannot_read_is_kept_and_named() {
    let Some(home) = NobodyHome::new() else {
        return;
    };
    let api = StandIn::start().await;
    let state_dir = home.dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&state_dir, Some(NOBODY), Some(NOBODY)).unwrap();
    let cfg = home.write_config(&format!(
        "{}\n[state]\ndir = \"{}\"\n",
        config_text(&api.url(), ""),
        state_dir.display()
    ));
    let bin_copy = home.bin.clone();
    let run_once = move || {
        as_nobody(&bin_copy, &cfg, &["run", "--once"])
            .output()
            .unwrap()
    };
    // A first run as the service user: the configured token is used, a rotated one stored, and
    // the API accepts only that one from now on.
    let out = tokio::task::spawn_blocking(run_once.clone()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let rotated = api.issued().last().unwrap().clone();
    api.with(|s| s.accepted = vec![rotated.clone()]);
    // Restored from a backup as root: root's, 0600.
    let file = state_dir.join("state.json");
    std::os::unix::fs::chown(&file, Some(0), Some(0)).unwrap();
    let before = std::fs::read(&file).unwrap();
    let seen_before = api.count();
    let out = tokio::task::spawn_blocking(run_once.clone()).await.unwrap();
    let all = text(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a machine fault, not a config error: {all}"
    );
    assert!(all.contains(&file.display().to_string()), "{all}");
    assert!(all.contains("Permission denied"), "{all}");
    assert!(all.contains("chown 65534:"), "{all}");
    assert!(!all.contains(&rotated) && !all.contains(BOOT), "{all}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        before,
        "the state file was changed"
    );
    assert_eq!(
        api.count(),
        seen_before,
        "no heartbeat with the configured token"
    );
    let names: Vec<String> = std::fs::read_dir(&state_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| ["state.json", "state.lock", "state.reserve"].contains(&n.as_str())),
        "{names:?}"
    );
    // The operator runs the chown: the next start uses the kept token.
    std::os::unix::fs::chown(&file, Some(NOBODY), Some(NOBODY)).unwrap();
    let out = tokio::task::spawn_blocking(run_once.clone()).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let next = &api.seen()[seen_before];
    assert_eq!(next.auth.as_deref(), Some(bearer(&rotated).as_str()));
    assert_eq!(next.status, 200);
}
