//! Never stalls: exit within a second whatever blocking call is stuck, and stuck calls do not
//! pile up threads. The real binary, with the real `getaddrinfo` against a DNS server that
//! swallows queries, inside a network + mount namespace the test makes itself (the host's
//! resolver configuration is never touched), and a version probe that hangs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

fn threads(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["--net", "--mount", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts `run` inside a new network + mount namespace whose /etc/resolv.conf points at a
/// local UDP socket that never answers.
fn spawn_with_hanging_resolver(agent: &mut Agent) {
    let resolv = agent.dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.1\noptions timeout:30 attempts:5\n",
    )
    .unwrap();
    let script = r#"
        set -e
        ip link set lo up
        mount --bind "$1" /etc/resolv.conf
        timeout 120 python3 -c 'import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
time.sleep(120)' &
        sleep 0.3
        exec "$2" --config "$3" run
    "#;
    let out = std::fs::File::create(agent.dir.path().join("stdout.0")).unwrap();
    let err = std::fs::File::create(agent.dir.path().join("stderr.0")).unwrap();
    let child = Command::new("unshare")
        .args(["--net", "--mount", "sh", "-c", script, "sh"])
        .arg(&resolv)
        .arg(bin())
        .arg(agent.config_path())
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap();
    agent.child = Some(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_that_never_answers_neither_holds_the_exit_nor_piles_up_threads() {
    if !can_unshare() {
        eprintln!("skipped: needs root for unshare --net --mount");
        return;
    }
    let mut agent = Agent::new();
    agent.write_config(
        &config_text("https://api.hang.test/v1", "")
            .replace("connect_timeout = \"500ms\"", "connect_timeout = \"300ms\"")
            .replace("max_backoff = \"400ms\"", "max_backoff = \"200ms\""),
    );
    spawn_with_hanging_resolver(&mut agent);
    // Every attempt fails naming the phase and the host.
    agent
        .wait_output("resolving api.hang.test timed out after 0.3s", 10 * SECOND)
        .await;
    // ~40 attempts in 8 s; the stuck lookups are bounded.
    tokio::time::sleep(8 * SECOND).await;
    let n = threads(agent.pid());
    let attempts = agent.all_output().matches("heartbeat failed").count();
    assert!(attempts >= 15, "{attempts} attempts");
    assert!(
        n <= 8,
        "{n} threads after {attempts} attempts against a hanging resolver"
    );
    // SIGTERM: out within a second although getaddrinfo is still stuck.
    let (status, took) = agent.stop();
    assert_eq!(status.code(), Some(0), "{}", agent.all_output());
    assert!(took < slack(SECOND), "stop took {took:?}");
    eprintln!("{attempts} attempts, {n} threads, stop in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_version_probe_neither_holds_the_exit_nor_outlives_the_agent() {
    let (api, mut agent) = setup().await;
    let tools = agent.dir.path().join("bin");
    std::fs::create_dir(&tools).unwrap();
    let pidfile = agent.dir.path().join("docker.pid");
    let docker = tools.join("docker");
    std::fs::write(
        &docker,
        format!(
            "#!/bin/sh\necho $$ > {}\nexec /bin/sleep 30\n",
            pidfile.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&docker, std::fs::Permissions::from_mode(0o755)).unwrap();
    agent.write_config(&config_text(&api.url(), ""));
    agent.spawn_env(&[], &[("PATH", tools.to_str().unwrap())]);
    // The first inventory waits for `docker --version` (up to 3 s): stop in the middle of it.
    for _ in 0..200 {
        if pidfile.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let (status, took) = agent.stop();
    assert_eq!(status.code(), Some(0));
    assert!(took < slack(SECOND), "stop took {took:?}");
    // The probe's child was killed and reaped with the agent, not left behind.
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "docker probe (pid {pid}) outlived the agent"
    );
}
