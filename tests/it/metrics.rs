//! `[metrics] textfile`: the file node_exporter's textfile collector reads, checked with real
//! parsers (Python's `prometheus_client` parser; `promtool check metrics` too where it is
//! installed or named by `$EXALSIUS_PROMTOOL`) after a success, after failures, and after a
//! restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::*;

/// Parses the exposition text with prometheus_client and prints `name{labels} value` lines.
const PARSE: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
text = open(sys.argv[1]).read()
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        labels = ",".join('%s="%s"' % kv for kv in sorted(s.labels.items()))
        print("%s|%s|%s{%s} %r" % (fam.type, fam.name, s.name, labels, s.value))
"#;

/// A python3 that has prometheus_client (Debian: python3-prometheus-client).
fn python() -> Option<&'static str> {
    ["python3", "/usr/bin/python3"].into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import prometheus_client"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The samples of the file as a real parser reads them: "name{labels}" → value, plus the
/// metric types. `None` (test skipped) only outside CI when no parser is installed.
pub(crate) fn parse(path: &Path) -> Option<(BTreeMap<String, f64>, BTreeMap<String, String>)> {
    let Some(py) = python() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI needs python3-prometheus-client to check the metrics file"
        );
        eprintln!(
            "skipped: no python3 with prometheus_client (apt install python3-prometheus-client)"
        );
        return None;
    };
    let out = Command::new(py)
        .args(["-c", PARSE])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the file: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(path).unwrap()
    );
    let mut samples = BTreeMap::new();
    let mut types = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let mut parts = line.splitn(3, '|');
        let (ty, family, rest) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        let (name, value) = rest.rsplit_once(' ').unwrap();
        types.insert(family.to_string(), ty.to_string());
        samples.insert(name.to_string(), value.parse().unwrap());
    }
    if let Some(promtool) = promtool() {
        let out = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(path).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some((samples, types))
}

fn promtool() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("EXALSIUS_PROMTOOL") {
        return Some(PathBuf::from(p));
    }
    Command::new("promtool")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| PathBuf::from("promtool"))
}

fn metrics_config(agent: &Agent, url: &str) -> PathBuf {
    let file = agent.dir.path().join("textfile/exalsius_node_agent.prom");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    agent.write_config(&config_text(
        url,
        &format!("[metrics]\ntextfile = \"{}\"\n", file.display()),
    ));
    file
}

fn unix(v: &serde_json::Value) -> f64 {
    let t = humantime::parse_rfc3339(v.as_str().unwrap()).unwrap();
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_success_failure_and_restart() {
    let api = StandIn::start().await;
    api.with(|s| s.expires_in = Some(3600));
    let agent = Agent::new();
    let file = metrics_config(&agent, &api.url());

    // Success.
    let out = agent.output(&["run", "--once"]);
    assert!(out.status.success(), "{out:?}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "node_exporter (another user) must read it");
    let leftovers: Vec<_> = std::fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "temp files left: {leftovers:?}");
    let Some((m, types)) = parse(&file) else {
        return;
    };
    let state = agent.state_json();
    let get = |m: &BTreeMap<String, f64>, k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("{k} missing from {m:#?}"))
    };
    assert_eq!(
        get(&m, "exalsius_node_agent_heartbeats_total{outcome=\"ok\"}"),
        1.0
    );
    assert_eq!(
        get(
            &m,
            "exalsius_node_agent_heartbeats_total{outcome=\"transient\"}"
        ),
        0.0
    );
    assert_eq!(get(&m, "exalsius_node_agent_last_http_status{}"), 200.0);
    assert_eq!(get(&m, "exalsius_node_agent_consecutive_failures{}"), 0.0);
    assert_eq!(
        get(&m, "exalsius_node_agent_heartbeat_interval_seconds{}"),
        0.1
    );
    let success = get(&m, "exalsius_node_agent_last_success_timestamp_seconds{}");
    assert!((success - unix(&state["last_success_at"])).abs() < 1.0);
    let expiry = get(&m, "exalsius_node_agent_token_expiry_timestamp_seconds{}");
    assert!((expiry - unix(&state["token_expires_at"])).abs() < 1.0);
    assert_eq!(get(&m, "exalsius_node_agent_gpus{}"), 0.0, "gpu = off");
    assert!(
        get(
            &m,
            "exalsius_node_agent_inventory_refresh_duration_seconds{}"
        ) > 0.0
    );
    assert_eq!(
        get(&m, "exalsius_node_agent_heartbeat_duration_seconds_count{}"),
        1.0
    );
    assert_eq!(
        get(
            &m,
            "exalsius_node_agent_heartbeat_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        1.0
    );
    let build = m
        .keys()
        .find(|k| k.starts_with("exalsius_node_agent_build_info{"))
        .unwrap();
    assert!(build.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))));
    assert_eq!(types["exalsius_node_agent_heartbeats"], "counter");
    assert_eq!(
        types["exalsius_node_agent_heartbeat_duration_seconds"],
        "histogram"
    );
    assert_eq!(
        types["exalsius_node_agent_last_success_timestamp_seconds"],
        "gauge"
    );

    // Failures (the API answers 503), in a restarted daemon: the last success survives the
    // restart (seeded from the state file), the counters start again.
    api.with(|s| s.always = Some(503));
    let mut agent = agent;
    agent.spawn(&[]);
    api.wait_requests(3, 10 * SECOND).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    agent.stop();
    let (m, _) = parse(&file).unwrap();
    assert!(get(&m, "exalsius_node_agent_consecutive_failures{}") >= 2.0);
    assert!(
        get(
            &m,
            "exalsius_node_agent_heartbeats_total{outcome=\"transient\"}"
        ) >= 2.0
    );
    assert_eq!(
        get(&m, "exalsius_node_agent_heartbeats_total{outcome=\"ok\"}"),
        0.0
    );
    assert_eq!(get(&m, "exalsius_node_agent_last_http_status{}"), 503.0);
    // (The state file keeps whole seconds.)
    let seeded = get(&m, "exalsius_node_agent_last_success_timestamp_seconds{}");
    assert!(
        (seeded - success).abs() < 1.0,
        "a restart must not forget the last success: {seeded} vs {success}"
    );
    let attempt = get(&m, "exalsius_node_agent_last_attempt_timestamp_seconds{}");
    assert!(attempt > success);

    // A 401 is its own outcome.
    api.with(|s| {
        s.always = None;
        s.accepted.clear();
    });
    let out = agent.output(&["run", "--once"]);
    assert!(!out.status.success());
    let (m, _) = parse(&file).unwrap();
    assert!(
        get(
            &m,
            "exalsius_node_agent_heartbeats_total{outcome=\"unauthorized\"}"
        ) >= 1.0
    );
    assert_eq!(get(&m, "exalsius_node_agent_last_http_status{}"), 401.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_metrics_file_never_stops_heartbeats() {
    let (api, mut agent) = setup().await;
    let file = agent
        .dir
        .path()
        .join("missing-dir/exalsius_node_agent.prom");
    agent.write_config(&config_text(
        &api.url(),
        &format!("[metrics]\ntextfile = \"{}\"\n", file.display()),
    ));
    agent.spawn(&[]);
    let seen = api.wait_requests(4, 10 * SECOND).await;
    agent.stop();
    assert!(seen.iter().all(|s| s.status == 200), "{seen:?}");
    let out = agent.all_output();
    assert!(out.contains("does not exist (yet)"), "{out}");
    assert_eq!(
        out.matches("metrics: cannot write").count(),
        1,
        "one warning per distinct error: {out}"
    );
}

#[test]
fn metrics_textfile_must_be_an_absolute_prom_file() {
    let agent = Agent::new();
    for (value, says) in [
        ("metrics.prom", "absolute path"),
        ("/tmp/metrics.txt", "ending in .prom"),
    ] {
        agent.write_config(&config_text(
            "http://127.0.0.1:9/v1",
            &format!("[metrics]\ntextfile = \"{value}\"\n"),
        ));
        let out = agent.output(&["check-config"]);
        assert_eq!(out.status.code(), Some(78), "{value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("metrics.textfile") && err.contains(says),
            "{err}"
        );
    }
}

/// The alert rules in docs/operator-guide.md ("Monitoring") are `packaging/prometheus/alerts.yml`,
/// and `promtool test rules` shows they fire when they should and not before.
#[test]
fn the_readme_alert_rules_are_tested_rules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules = std::fs::read_to_string(root.join("packaging/prometheus/alerts.yml")).unwrap();
    let guide = std::fs::read_to_string(root.join("docs/operator-guide.md")).unwrap();
    assert!(
        guide.contains(&format!("```yaml\n{rules}```")),
        "docs/operator-guide.md's alert rules differ from packaging/prometheus/alerts.yml"
    );
    let Some(promtool) = promtool() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI sets EXALSIUS_PROMTOOL to test the alert rules"
        );
        eprintln!("skipped: no promtool (EXALSIUS_PROMTOOL)");
        return;
    };
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new(&promtool)
            .args(args)
            .current_dir(root.join("packaging/prometheus"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A file the agent writes for others does not outlive the configuration that asked for it:
/// a reload that moves `metrics.textfile` removes the old file, one that switches metrics off
/// removes the file (node_exporter would serve its frozen figures for ever). Before this rule
/// both stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_file_goes_when_its_configuration_goes() {
    let (api, mut agent) = setup().await;
    let file = metrics_config(&agent, &api.url());
    agent.spawn(&[]);
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + slack(10 * SECOND);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}\n{}",
                agent.all_output()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    wait("no metrics file", &|| file.exists());
    let moved = file.with_file_name("moved.prom");
    agent.write_config(&config_text(
        &api.url(),
        &format!("[metrics]\ntextfile = \"{}\"\n", moved.display()),
    ));
    agent.signal("HUP");
    wait("the old file stayed after a move", &|| {
        moved.exists() && !file.exists()
    });
    agent.write_config(&config_text(&api.url(), ""));
    agent.signal("HUP");
    wait("the file stayed with metrics off", &|| !moved.exists());
    let (st, _) = agent.stop();
    assert!(st.success());
}

/// The same across restarts: the agent records the metrics file it writes (in its state
/// directory), and a start whose configuration names another file, or none, removes the one
/// an earlier run wrote. Before this rule it stayed, frozen.
#[test]
fn a_metrics_file_goes_when_a_restart_drops_it() {
    let api_url = "http://127.0.0.1:9/v1";
    let agent = Agent::new();
    let file = metrics_config(&agent, api_url);
    let out = agent.output(&["run", "--once"]);
    assert!(file.exists(), "{}", text(&out));
    let moved = file.with_file_name("moved.prom");
    agent.write_config(&config_text(
        api_url,
        &format!("[metrics]\ntextfile = \"{}\"\n", moved.display()),
    ));
    let out = agent.output(&["run", "--once"]);
    assert!(moved.exists() && !file.exists(), "{}", text(&out));
    agent.write_config(&config_text(api_url, ""));
    let out = agent.output(&["run", "--once"]);
    assert!(!moved.exists(), "{}", text(&out));
    // Dry runs write no metrics and remove nothing.
    let again = metrics_config(&agent, api_url);
    let _ = agent.output(&["run", "--once"]);
    assert!(again.exists());
    agent.write_config(&config_text(api_url, ""));
    // A dry run with no reader ends at its first body (exit 141).
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let st = clean_command()
        .arg("--config")
        .arg(agent.config_path())
        .args(["run", "--dry-run"])
        .stdout(std::process::Stdio::from(writer))
        .status()
        .unwrap();
    assert_eq!(st.code(), Some(141));
    assert!(again.exists(), "a dry run removed the metrics file");
}
