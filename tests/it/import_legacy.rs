//! `import-legacy` as a process: client-hw-info's config.env becomes the agent's state, the
//! legacy token is the one the first heartbeat sends, and every refusal changes nothing. (The
//! systemd half — stopping and disabling client-hw-info.timer — is proved in the booted
//! container by packaging/test-packages.sh.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::path::{Path, PathBuf};
use support::*;

const LEGACY_TOKEN: &str = "legacy-SECRET-rotated-0042";

fn legacy_env(dir: &Path, url: &str, token: &str) -> PathBuf {
    let path = dir.join("config.env");
    std::fs::write(
        &path,
        format!(
            "# client-hw-info\nexport NODE_ID=\"{NODE_ID}\"\nexport API_URL=\"{url}\"\nexport AUTH_TOKEN=\"{token}\"\n"
        ),
    )
    .unwrap();
    path
}

/// A config with only the API URL: the node and token come from the import.
fn url_only_config(agent: &Agent, url: &str) {
    agent.write_config(&format!(
        "[api]\nurl = \"{url}\"\n\n[heartbeat]\ninterval = \"100ms\"\njitter = 0.0\n\n[inventory]\ngpu = \"off\"\n"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_heartbeat_after_an_import_carries_the_legacy_token() {
    let api = StandIn::start().await;
    // The configured is long retired: only the latest rotated legacy token is accepted.
    api.with(|s| s.accepted = vec![LEGACY_TOKEN.to_string()]);
    let agent = Agent::new();
    url_only_config(&agent, &api.url());
    let from = legacy_env(agent.dir.path(), &api.url(), LEGACY_TOKEN);

    let dry = agent.output(&[
        "import-legacy",
        "--dry-run",
        "--from",
        from.to_str().unwrap(),
    ]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(text(&dry).contains("would write"), "{}", text(&dry));
    assert!(
        !agent.state_dir().exists(),
        "--dry-run created the state dir"
    );
    assert!(from.exists(), "--dry-run renamed the file");

    let out = agent.output(&["import-legacy", "--from", from.to_str().unwrap()]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(!said.contains("SECRET"), "the token was printed: {said}");
    assert!(said.contains(&format!("imported node {NODE_ID}")), "{said}");
    assert!(!from.exists());
    assert!(agent.dir.path().join("config.env.migrated").exists());
    let state = agent.state_json();
    assert_eq!(state["node_id"], NODE_ID);
    assert_eq!(state["access_token"], LEGACY_TOKEN);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(agent.state_file()).unwrap().permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o600);

    let out = agent.output(&["run", "--once"]);
    assert!(out.status.success(), "{}", text(&out));
    let seen = api.seen();
    assert_eq!(
        seen[0].auth.as_deref(),
        Some(format!("Bearer {LEGACY_TOKEN}").as_str())
    );
    assert_eq!(seen[0].status, 200);
    assert_ne!(
        agent.state_json()["access_token"],
        LEGACY_TOKEN,
        "the token rotated"
    );

    // Running the import again: the file is gone, nothing to import, the state untouched.
    let before = std::fs::read(agent.state_file()).unwrap();
    let again = agent.output(&["import-legacy", "--from", from.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1), "{}", text(&again));
    assert!(
        text(&again).contains("nothing to import"),
        "{}",
        text(&again)
    );
    assert_eq!(std::fs::read(agent.state_file()).unwrap(), before);
}

#[test]
fn refusals_change_nothing() {
    let agent = Agent::new();
    let url = "http://127.0.0.1:9/v1";
    url_only_config(&agent, url);

    // Broken legacy files: exit 78, the reason, no state dir, the file where it was.
    for (body, says) in [
        (
            format!("NODE_ID={NODE_ID}\nAPI_URL={url}\n"),
            "AUTH_TOKEN missing",
        ),
        (
            format!("NODE_ID={NODE_ID}\nAPI_URL={url}\nAUTH_TOKEN=\"\"\n"),
            "AUTH_TOKEN is empty",
        ),
        (
            format!("NODE_ID=not-a-uuid\nAPI_URL={url}\nAUTH_TOKEN={LEGACY_TOKEN}\n"),
            "not a UUID",
        ),
        (
            format!("NODE_ID={NODE_ID}\nAPI_URL={url}\nAUTH_TOKEN=\"{LEGACY_TOKEN}\n"),
            "unclosed quote",
        ),
    ] {
        let from = agent.dir.path().join("config.env");
        std::fs::write(&from, &body).unwrap();
        let out = agent.output(&["import-legacy", "--from", from.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(78), "{body:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{body:?}: {}", text(&out));
        assert!(!text(&out).contains("SECRET"), "{}", text(&out));
        assert!(!agent.state_dir().exists());
        assert_eq!(std::fs::read_to_string(&from).unwrap(), body);
    }

    // Bytes that are not text: the file's content, 78 (was 1).
    let bin = agent.dir.path().join("binary.env");
    std::fs::write(&bin, b"NODE_ID=\xff\xfe\n").unwrap();
    let out = agent.output(&["import-legacy", "--from", bin.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));

    // A directory where the file should be; a missing file.
    let dir = agent.dir.path().join("adir");
    std::fs::create_dir(&dir).unwrap();
    let out = agent.output(&["import-legacy", "--from", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    let out = agent.output(&["import-legacy", "--from", "/nonexistent/config.env"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("not found"), "{}", text(&out));

    // Another API than the config's: what `run` would refuse later is refused now.
    let from = legacy_env(agent.dir.path(), "https://legacy.example/v1", LEGACY_TOKEN);
    let out = agent.output(&["import-legacy", "--from", from.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        text(&out).contains("set api.url = \"https://legacy.example/v1\""),
        "{}",
        text(&out)
    );
    assert!(from.exists() && !agent.state_dir().exists());

    // The agent already holds another node: exit 1, state and legacy file untouched; --force
    // replaces it and keeps the old state.
    let other = "11111111-2222-4333-8444-555555555555";
    std::fs::create_dir_all(agent.state_dir()).unwrap();
    let held = format!(
        "{{\"node_id\":\"{other}\",\"api_url\":\"{url}\",\"access_token\":\"other-SECRET\"}}\n"
    );
    std::fs::write(agent.state_file(), &held).unwrap();
    let from = legacy_env(agent.dir.path(), url, LEGACY_TOKEN);
    let out = agent.output(&["import-legacy", "--from", from.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains(other) && text(&out).contains("--force"));
    assert_eq!(std::fs::read_to_string(agent.state_file()).unwrap(), held);
    assert!(from.exists());
    let out = agent.output(&["import-legacy", "--force", "--from", from.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(agent.state_json()["node_id"], NODE_ID);
    assert_eq!(
        std::fs::read_to_string(agent.state_dir().join("state.json.bak")).unwrap(),
        held
    );
}

#[test]
fn a_running_agent_blocks_the_import() {
    let agent = Agent::new();
    let url = "http://127.0.0.1:9/v1";
    url_only_config(&agent, url);
    let from = legacy_env(agent.dir.path(), url, LEGACY_TOKEN);
    // Hold the state lock as a running agent does (flock on state.lock).
    std::fs::create_dir_all(agent.state_dir()).unwrap();
    let lock = std::fs::File::create(agent.state_dir().join("state.lock")).unwrap();
    lock.try_lock().unwrap();
    let out = agent.output(&["import-legacy", "--from", from.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("systemctl stop exalsius-node-agent"),
        "{}",
        text(&out)
    );
    assert!(from.exists() && !agent.state_file().exists());
}
