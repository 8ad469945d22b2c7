//! SIGHUP applies every setting it can: the log level, GPU discovery (a new collector with
//! another NVML library), the API URL — and says that the state directory needs a restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use support::*;

fn gpu_count(s: &Seen) -> i64 {
    let body: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
    body["hardware"]["gpu_count"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_the_log_level_the_gpu_mode_and_the_api_url() {
    let first = StandIn::start().await;
    let second = StandIn::start().await;
    let mut agent = Agent::new();
    let lib = build_agent_nvml(agent.dir.path(), "count=8\n");
    agent.write_config(
        &config_text(&first.url(), "").replace("level = \"debug\"", "level = \"info\""),
    );
    agent.spawn(&[]);
    let seen = first.wait_requests(2, 10 * SECOND).await;
    assert_eq!(gpu_count(&seen[1]), 0, "gpu = off");
    assert!(
        !agent.all_output().contains("sending heartbeat"),
        "debug lines at info level"
    );

    // Everything at once: level, GPU mode + library, API URL, and the state dir.
    let other_state = agent.dir.path().join("other-state");
    let text = config_text(&second.url(), "").replace(
        "[inventory]\ngpu = \"off\"\n",
        &format!(
            "[inventory]\ngpu = \"nvml\"\nnvml_library = \"{}\"\n",
            lib.display()
        ),
    );
    std::fs::write(
        agent.config_path(),
        format!("{text}\n[state]\ndir = \"{}\"\n", other_state.display()),
    )
    .unwrap();
    agent.signal("HUP");
    let seen = second.wait_requests(5, 10 * SECOND).await;
    agent.stop();
    // Same node, same configured token, another URL: the rotated token goes with it (a typo
    // fixed or an alias is the same API). This stand-in is another API and refuses it twice
    // (the second try after a short pause); the configured token follows, and 8 GPUs.
    let boot = format!("Bearer {BOOT}");
    assert_ne!(seen[0].auth.as_deref(), Some(boot.as_str()));
    assert_eq!(seen[0].status, 401, "{seen:?}");
    assert_eq!(seen[1].auth, seen[0].auth, "{seen:?}");
    assert_eq!(seen[1].status, 401, "{seen:?}");
    assert_eq!(seen[2].auth.as_deref(), Some(boot.as_str()));
    assert!(seen[2..].iter().all(|s| s.status == 200), "{seen:?}");
    assert_eq!(
        gpu_count(seen.last().unwrap()),
        8,
        "gpu = nvml after reload"
    );
    let out = agent.all_output();
    assert!(
        out.contains("sending heartbeat"),
        "debug level after reload: {out}"
    );
    assert!(out.contains("GPU discovery reconfigured"), "{out}");
    assert!(out.contains("state.dir changed"), "{out}");
    assert!(out.contains("takes a restart"), "{out}");
    // The state directory did not change under the running agent.
    assert!(!other_state.exists());
    assert!(agent.state_file().exists());
}

/// An `api.url` with a typo, fixed by `systemctl reload`: the heartbeats then succeed and the
/// token rotates (the API retires the configured token) — and the next restart (a reboot, an
/// upgrade) must go on with the rotated token. The state used to stay tied to the typo URL,
/// so the restart fell back to the retired configured token: 401 for ever, and its first save
/// overwrote the rotated token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_fixes_the_url_survives_the_next_restart() {
    let (api, mut agent) = setup().await;
    // Port 9 (discard) on loopback: connection refused, like a mistyped host.
    agent.write_config(&config_text("http://127.0.0.1:9/v1", ""));
    agent.spawn(&[]);
    agent.wait_output("cannot connect", 10 * SECOND).await;
    agent.write_config(&config_text(&api.url(), ""));
    agent.signal("HUP");
    // boot → r1, then r1 → r2: the configured token is retired.
    api.wait_requests(3, 10 * SECOND).await;
    agent.stop();
    assert_eq!(agent.state_json()["api_url"], api.url().as_str());
    let before = api.count();
    agent.spawn(&[]);
    let seen = api.wait_requests(before + 2, 10 * SECOND).await;
    agent.stop();
    let first = &seen[before];
    assert_ne!(
        first.auth.as_deref(),
        Some(format!("Bearer {BOOT}").as_str())
    );
    assert_eq!(first.status, 200, "{}", agent.all_output());
    assert!(seen[before..].iter().all(|s| s.status == 200));
}
