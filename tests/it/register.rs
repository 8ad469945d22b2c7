//! `register` against a local stand-in for the API, then `run` with no node id or token in
//! the config.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use support::*;

/// A config with the API URL and state dir only: no node id, no token.
fn bare_config(url: &str) -> String {
    format!(
        "[api]\nurl = \"{url}\"\ntimeout = \"2s\"\nconnect_timeout = \"500ms\"\n\n\
         [heartbeat]\ninterval = \"100ms\"\njitter = 0.0\ninitial_backoff = \"50ms\"\nmax_backoff = \"400ms\"\n\n\
         [inventory]\ngpu = \"off\"\n\n[log]\nlevel = \"debug\"\n"
    )
}

fn register_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "register",
        "--endpoint",
        "192.168.1.1:22",
        "--username",
        "ubuntu",
        "--ssh-key-id",
        "123e4567-e89b-12d3-a456-426614174000",
        "--hostname",
        "gpu-node-1",
    ];
    v.extend_from_slice(extra);
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_then_run_heartbeats_with_the_registered_node() {
    let (api, mut agent) = setup().await;
    agent.write_config(&bare_config(&api.url()));
    let tf = agent.dir.path().join("register-token");
    std::fs::write(&tf, format!("{REGISTER_TOKEN}\n")).unwrap();
    let out = agent.output(&register_args(&[
        "--register-token-file",
        tf.to_str().unwrap(),
        "--price-per-hour",
        "1.25",
        "--description",
        "rack 4",
    ]));
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains(REGISTERED_ID), "{all}");
    assert!(
        all.contains("systemctl enable --now exalsius-node-agent"),
        "{all}"
    );

    let seen = api.seen();
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/v1/node/self-register");
    let body: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_valid("components/requests/node-self-register-request.yaml", &body);
    assert_eq!(body["hostname"], "gpu-node-1");
    assert_eq!(body["price_per_hour"], 1.25);
    assert!(body["hardware"]["cpu_cores"].as_i64().unwrap() >= 1);
    assert!(
        seen[0].auth.is_none(),
        "self-register carries no Authorization"
    );

    let state = agent.state_json();
    assert_eq!(state["node_id"], REGISTERED_ID);
    assert_eq!(state["access_token"], "registered-SECRET-1");
    assert!(state.get("bootstrap_token_sha256").is_none());
    let mode = std::fs::metadata(agent.state_file())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let raw = std::fs::read_to_string(agent.state_file()).unwrap();
    assert!(
        !raw.contains(REGISTER_TOKEN),
        "register token written to the state file"
    );

    // run: no node id or token in the config; the state supplies them, rotation continues.
    agent.spawn(&[]);
    let seen = api.wait_requests(4, Duration::from_secs(10)).await;
    agent.stop();
    assert_eq!(seen[1].path, format!("/v1/node/{REGISTERED_ID}"));
    assert_eq!(seen[1].auth.as_deref(), Some("Bearer registered-SECRET-1"));
    assert_eq!(seen[1].status, 200);
    let issued = api.issued();
    assert_eq!(
        seen[2].auth.as_deref(),
        Some(format!("Bearer {}", issued[1]).as_str())
    );
    let hb: serde_json::Value = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(hb["description"], "rack 4");
    assert!(
        !agent.all_output().contains("SECRET"),
        "{}",
        agent.all_output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_are_explained() {
    let (api, agent) = setup().await;
    agent.write_config(&bare_config(&api.url()));

    let out = agent.output_env(
        &register_args(&[]),
        &[("EXALSIUS_REGISTER_TOKEN", "wrong-token")],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("HTTP 401"), "{}", text(&out));
    assert!(text(&out).contains("registration token is invalid or expired"));
    assert!(!text(&out).contains("wrong-token"));

    api.with(|s| s.registered_hosts.push("gpu-node-1".into()));
    let out = agent.output_env(
        &register_args(&[]),
        &[("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("HTTP 409"), "{}", text(&out));
    assert!(text(&out).contains("already exists"));

    api.script([Scripted::Status(422)]);
    let out = agent.output_env(
        &register_args(&[]),
        &[("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("HTTP 422 Unprocessable Entity: Scripted: scripted 422"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains(REGISTER_TOKEN));
    assert!(!agent.state_file().exists());
}

#[test]
fn connection_problems_are_retried_a_few_times_then_fail_clearly() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let agent = Agent::new();
    agent.write_config(&bare_config(&format!("http://{addr}/v1")));
    let out = agent.output_env(
        &register_args(&[]),
        &[("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("cannot connect"), "{all}");
    assert!(all.contains("gave up after 4 attempts"), "{all}");
    assert_eq!(all.matches("registration attempt").count(), 3, "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_registration_needs_force_and_is_kept_as_bak() {
    let (api, agent) = setup().await;
    agent.write_config(&bare_config(&api.url()));
    let env = [("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)];
    assert!(agent.output_env(&register_args(&[]), &env).status.success());
    let mut second = register_args(&[]);
    second[8] = "gpu-node-2";
    let out = agent.output_env(&second, &env);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("--force"), "{}", text(&out));
    assert_eq!(api.count(), 1, "refused before calling the API");

    second.push("--force");
    let out = agent.output_env(&second, &env);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let bak: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(agent.state_dir().join("state.json.bak")).unwrap(),
    )
    .unwrap();
    assert_eq!(bak["node_id"], REGISTERED_ID);
    assert_ne!(agent.state_json()["node_id"], REGISTERED_ID);
}

#[test]
fn invalid_values_exit_78() {
    let agent = Agent::new();
    agent.write_config(&bare_config("http://127.0.0.1:9/v1"));
    let env = [("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)];
    for endpoint in ["no-port", "::1:22", "host:0", "host:99999", "bad host:22"] {
        let mut args = register_args(&[]);
        args[2] = endpoint;
        let out = agent.output_env(&args, &env);
        assert_eq!(out.status.code(), Some(78), "{endpoint}: {}", text(&out));
        assert!(text(&out).contains("--endpoint"), "{}", text(&out));
    }
    let out = agent.output(&register_args(&[
        "--register-token-file",
        "/nonexistent/token",
    ]));
    assert_eq!(out.status.code(), Some(78));
    assert!(text(&out).contains("/nonexistent/token"));
    // No token at all is a usage error.
    let out = agent.output(&register_args(&[]));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_node_id_in_the_config_is_refused() {
    let (api, agent) = setup().await;
    agent.write_config(&bare_config(&api.url()));
    let env = [("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)];
    assert!(agent.output_env(&register_args(&[]), &env).status.success());
    let out = agent.output(&["run", "--once", "--node-id", NODE_ID]);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out));
    assert!(
        text(&out).contains("differs from the registered node"),
        "{}",
        text(&out)
    );
    // The registered id itself is fine.
    let out = agent.output(&["run", "--once", "--node-id", REGISTERED_ID]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_registered_token_says_re_register() {
    let (api, mut agent) = setup().await;
    agent.write_config(&bare_config(&api.url()));
    let env = [("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)];
    assert!(agent.output_env(&register_args(&[]), &env).status.success());
    api.with(|s| s.accepted.clear());
    agent.spawn(&[]);
    let seen = api.wait_requests(3, Duration::from_secs(10)).await;
    agent.stop();
    assert_eq!(seen[1].status, 401);
    assert!(
        seen[2].at - seen[1].at >= Duration::from_millis(400),
        "slow retries"
    );
    assert!(
        agent.all_output().contains("re-register"),
        "{}",
        agent.all_output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_409_after_a_timed_out_attempt_says_the_node_may_be_registered_already() {
    let api = StandIn::start().await;
    // The first attempt reaches the API, which registers the node, but the answer never
    // arrives within api.timeout (2 s); the retry then finds the node.
    api.with(|s| {
        s.registered_hosts.push("gpu-node-1".into());
        s.script.push_back(Scripted::Delay(Duration::from_secs(3)));
    });
    let agent = Agent::new();
    agent.write_config(&bare_config(&api.url()));
    let out = agent.output_env(
        &register_args(&[]),
        &[("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("409"), "{all}");
    assert!(all.contains("may have registered this node"), "{all}");
    assert!(
        !agent.state_file().exists(),
        "nothing is written without a token"
    );
    assert!(!all.contains(REGISTER_TOKEN), "token leaked: {all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_refuses_before_the_post_when_the_state_cannot_be_written() {
    let (api, agent) = setup().await;
    agent.write_config(&bare_config(&api.url()));
    // A file where the state directory should be.
    std::fs::write(agent.state_dir(), "not a directory").unwrap();
    let out = agent.output_env(
        &register_args(&[]),
        &[("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert!(all.contains("nothing was registered"), "{all}");
    assert_eq!(
        api.count(),
        0,
        "the API was asked to register a node whose token could not be kept"
    );
}

/// A non-root user without a configured state directory registers into its own
/// `$XDG_STATE_HOME`; the note says the system service will not see it. Needs root to switch
/// to `nobody` (CI runs as root); skipped otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_root_register_says_the_service_will_not_see_it() {
    let Some(home) = NobodyHome::new() else {
        return;
    };
    let api = StandIn::start().await;
    let cfg = home.write_config(&bare_config(&api.url()));
    let mut cmd = home.command(&cfg, &register_args(&[]));
    cmd.env("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)
        .env("HOME", home.dir.path())
        .env_remove("XDG_STATE_HOME")
        .env_remove("STATE_DIRECTORY");
    let out = cmd.output().unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let dir = home.dir.path().join(".local/state/exalsius-node-agent");
    assert!(dir.join("state.json").exists(), "{all}");
    assert!(all.contains(&dir.display().to_string()), "{all}");
    assert!(all.contains("will not see this registration"), "{all}");
    assert!(all.contains("/var/lib/exalsius-node-agent"), "{all}");
}

/// `register --force` on a full disk: the new state cannot be written, and the old one — the
/// node's token — is still `state.json` (it used to be renamed to `.bak` first, leaving no
/// state at all while the message said nothing was imported). The state directory is a
/// 128 KiB tmpfs, filled, in a mount namespace of its own (root; skipped otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_force_on_a_full_disk_keeps_the_old_state() {
    if !exalsius_node_agent::perms::is_root()
        || !std::process::Command::new("unshare")
            .args(["--mount", "true"])
            .status()
            .is_ok_and(|s| s.success())
    {
        eprintln!("skipped: needs root and unshare --mount");
        return;
    }
    let (api, agent) = setup().await;
    agent.write_config(&bare_config(&api.url()));
    std::fs::create_dir_all(agent.state_dir()).unwrap();
    let out_dir = agent.dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let script = r#"
        set -u
        mount -t tmpfs -o size=128k,mode=0700 tmpfs "$STATE"
        "$BIN" --config "$CFG" register --endpoint 192.168.1.1:22 --username ubuntu \
          --ssh-key-id 123e4567-e89b-12d3-a456-426614174000 --hostname gpu-node-1 >"$OUT/first.log" 2>&1
        echo "$?" >"$OUT/first.rc"
        cp "$STATE/state.json" "$OUT/before.json"
        dd if=/dev/zero of="$STATE/fill" bs=4k 2>/dev/null
        "$BIN" --config "$CFG" register --force --endpoint 192.168.1.1:22 --username ubuntu \
          --ssh-key-id 123e4567-e89b-12d3-a456-426614174000 --hostname gpu-node-2 >"$OUT/force.log" 2>&1
        echo "$?" >"$OUT/force.rc"
        cp "$STATE/state.json" "$OUT/after.json" 2>/dev/null
        ls -a "$STATE" >"$OUT/ls"
    "#;
    let mut cmd = clean_command_for(std::path::Path::new("unshare"));
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("STATE", agent.state_dir())
        .env("BIN", bin())
        .env("CFG", agent.config_path())
        .env("OUT", &out_dir)
        .env("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN);
    let status = tokio::task::spawn_blocking(move || cmd.status().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    let read = |n: &str| std::fs::read_to_string(out_dir.join(n)).unwrap_or_default();
    assert_eq!(read("first.rc").trim(), "0", "{}", read("first.log"));
    assert_ne!(read("force.rc").trim(), "0", "{}", read("force.log"));
    assert!(
        read("force.log").contains("No space left"),
        "{}",
        read("force.log")
    );
    assert_eq!(
        read("after.json"),
        read("before.json"),
        "state.json must still hold the first registration: {}",
        read("ls")
    );
}

/// `register` as a process, with the register token in the environment.
fn spawn_register(agent: &Agent) -> std::process::Child {
    let out = std::fs::File::create(agent.dir.path().join("stdout.register")).unwrap();
    let err = std::fs::File::create(agent.dir.path().join("stderr.register")).unwrap();
    clean_command()
        .arg("--config")
        .arg(agent.config_path())
        .args(register_args(&[]))
        .env("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap()
}

/// SIGTERM while the registration POST is in flight: the API registers the node either way,
/// so `register` waits for the answer and saves the token before it stops; a second
/// `register` then finds the registration instead of getting 409 for a node nothing can
/// heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_the_registration_post_waits_for_the_answer_and_saves_it() {
    let (api, agent) = setup().await;
    agent.write_config(&bare_config(&api.url()));
    api.script([Scripted::Late(Duration::from_millis(1500))]);
    let mut child = spawn_register(&agent);
    api.wait_requests(1, Duration::from_secs(10)).await;
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            started.elapsed() < slack(Duration::from_secs(10)),
            "never exited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let all = agent.all_output();
    assert_eq!(status.code(), Some(0), "{status:?}: {all}");
    assert!(all.contains("SIGTERM"), "{all}");
    assert_eq!(agent.state_json()["access_token"], "registered-SECRET-1");
    assert_eq!(agent.state_json()["node_id"], REGISTERED_ID);

    let again = agent.output_env(
        &register_args(&[]),
        &[("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)],
    );
    let again_text = text(&again);
    assert_eq!(again.status.code(), Some(1), "{again_text}");
    assert!(again_text.contains("already holds node"), "{again_text}");
    assert_eq!(api.count(), 1, "a second POST");
}

/// A 2xx whose body is cut off: the API has registered the node, the token never arrived. A
/// second POST would get 409 "already exists", inviting a registration under another name:
/// `register` stops after the first, exit 1, and says what happened and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_2xx_answer_is_not_followed_by_a_second_post() {
    let (addr, conns) =
        support::hostile::raw_server(support::hostile::Misbehaviour::ResetMidBody).await;
    let agent = Agent::new();
    agent.write_config(&bare_config(&format!("http://{addr}/v1")));
    let out = agent.output_env(
        &register_args(&[]),
        &[("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(1), "{all}");
    assert_eq!(
        conns.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "a second POST after a 2xx: {all}"
    );
    assert!(all.contains("HTTP 200"), "{all}");
    assert!(all.contains("most likely registered"), "{all}");
    assert!(all.contains("gpu-node-1"), "{all}");
    assert!(all.contains("not under another name"), "{all}");
    assert!(!agent.state_file().exists());
    assert!(!all.contains(REGISTER_TOKEN), "token leaked: {all}");
}

/// A second signal while `register` waits for the answer stops it at once, saying that the
/// node may be registered and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_at_once_and_says_the_node_may_be_registered() {
    let (api, agent) = setup().await;
    agent.write_config(&bare_config(&api.url()));
    api.script([Scripted::Late(Duration::from_secs(5))]);
    let mut child = spawn_register(&agent);
    api.wait_requests(1, Duration::from_secs(10)).await;
    let kill = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .unwrap()
    };
    kill("-TERM");
    agent
        .wait_output("waiting up to", Duration::from_secs(5))
        .await;
    let started = std::time::Instant::now();
    kill("-INT");
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            started.elapsed() < slack(Duration::from_secs(5)),
            "never exited"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(started.elapsed() < slack(Duration::from_secs(1)));
    let all = agent.all_output();
    assert_eq!(status.code(), Some(1), "{all}");
    assert!(all.contains("then SIGINT"), "{all}");
    assert!(all.contains("may now be registered"), "{all}");
    assert!(all.contains("not under another name"), "{all}");
}

/// The retries wait as the heartbeats do: at least the server's `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_wait_at_least_retry_after() {
    let (api, agent) = setup().await;
    agent.write_config(&bare_config(&api.url()));
    api.script([Scripted::StatusWithHeader(503, "retry-after", "1".into())]);
    let out = agent.output_env(
        &register_args(&[]),
        &[("EXALSIUS_REGISTER_TOKEN", REGISTER_TOKEN)],
    );
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    let seen = api.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}");
}
