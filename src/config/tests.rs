//! Config tests: key paths and line:column in errors, precedence, ranges, origins.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use std::collections::HashMap;

const ID: &str = "123e4567-e89b-12d3-a456-426614174000";

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let map: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let lookup = move |k: &str| map.get(k).cloned();
    Config::from_toml(
        text,
        Path::new("/etc/test.toml"),
        &Overrides::default(),
        &lookup,
    )
}

fn err(text: &str) -> String {
    match load(text, &[("HOME", "/home/x")]) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn example_config_parses() {
    let text = include_str!("../../config.example.toml");
    let cfg = load(text, &[("HOME", "/home/x")]).expect("config.example.toml must be valid");
    assert_eq!(cfg.heartbeat.interval, DEFAULT_INTERVAL);
    assert_eq!(cfg.heartbeat.jitter, DEFAULT_JITTER);
    assert_eq!(cfg.api.timeout, DEFAULT_TIMEOUT);
    assert_eq!(cfg.api.url, DEFAULT_API_URL);
    assert_eq!(cfg.inventory.gpu, GpuMode::Auto);
}

/// The packaged conffile (`/etc/exalsius/node-agent.toml`) is 0.1.0's file, byte for byte: dpkg
/// asks "keep or replace?" at an upgrade on every host whose config was edited when the
/// package's conffile changed, and an unattended `apt-get upgrade -y` stops at that question
/// (the fleet test upgrades 0.1.0 → this one over an edited config). New keys are documented in
/// `config.example.toml`, shipped beside the operator's guide. Changing this file is a
/// decision to make every fleet answer that question once.
#[test]
fn packaged_conffile_is_the_previous_releases_and_parses() {
    use sha2::Digest;
    let text = include_str!("../../packaging/node-agent.toml");
    assert_eq!(
        hex::encode(sha2::Sha256::digest(text.as_bytes())),
        "7ad78c34970c9b372f768357beed3450f6edb2fb209be922876c87c06f77e5b6",
        "packaging/node-agent.toml changed: see this test's comment"
    );
    let packaged = load(text, &[("HOME", "/home/x")]).expect("the packaged conffile must be valid");
    let example = load(
        include_str!("../../config.example.toml"),
        &[("HOME", "/home/x")],
    )
    .unwrap();
    assert_eq!(
        format!("{:?}", packaged.to_redacted_toml()),
        format!("{:?}", example.to_redacted_toml()),
        "the packaged conffile and config.example.toml must give the same effective configuration"
    );
}

#[test]
fn defaults_when_empty() {
    let cfg = load("", &[("HOME", "/home/x")]).unwrap();
    assert_eq!(cfg.heartbeat.max_backoff, DEFAULT_MAX_BACKOFF);
    assert!(cfg.api.node_id.is_none());
    assert!(cfg.api.access_token.is_none());
    assert_eq!(cfg.log.level, "info");
}

#[test]
fn unknown_key_names_key_and_line() {
    let e = err("[api]\nurl = \"https://x.example\"\n\n[heartbeat]\nintervall = \"5s\"\n");
    assert!(e.starts_with("/etc/test.toml:5:"), "{e}");
    assert!(e.contains("intervall"), "{e}");
}

#[test]
fn bad_type_names_key() {
    let e = err("[heartbeat]\ninterval = 5\n");
    assert!(e.contains("heartbeat.interval"), "{e}");
    assert!(e.starts_with("/etc/test.toml:2:"), "{e}");
}

#[test]
fn bad_duration_names_key() {
    let e = err("[heartbeat]\ninitial_backoff = \"soon\"\n");
    assert!(e.contains("heartbeat.initial_backoff"), "{e}");
}

#[test]
fn bad_uuid() {
    let e = err("[api]\nnode_id = \"not-a-uuid\"\n");
    assert!(e.contains("api.node_id"), "{e}");
}

#[test]
fn jitter_out_of_range() {
    let e = err("[heartbeat]\njitter = 0.7\n");
    assert!(e.contains("heartbeat.jitter"), "{e}");
    assert!(e.contains("out of range"), "{e}");
    assert!(err("[heartbeat]\njitter = -0.1\n").contains("heartbeat.jitter"));
}

#[test]
fn every_duration_has_a_range_named_in_the_error() {
    for (section, key, value) in [
        ("inventory", "refresh_interval", "300000000000years"),
        ("inventory", "refresh_interval", "8days"),
        ("heartbeat", "interval", "18446744073709551615s"),
        ("heartbeat", "interval", "25h"),
        ("heartbeat", "interval", "500us"),
        ("heartbeat", "initial_backoff", "2days"),
        ("heartbeat", "max_backoff", "100years"),
        ("api", "timeout", "11m"),
        ("api", "connect_timeout", "1year"),
    ] {
        let text = format!("[{section}]\n{key} = \"{value}\"\n");
        let e = err(&text);
        assert!(e.contains(&format!("{section}.{key}")), "{text}: {e}");
        assert!(e.contains("out of range"), "{text}: {e}");
    }
    // The bounds themselves are accepted.
    load(
        "[heartbeat]\ninterval = \"24h\"\ninitial_backoff = \"1ms\"\nmax_backoff = \"24h\"\n\
         [inventory]\nrefresh_interval = \"7days\"\n[api]\ntimeout = \"10m\"\n",
        &[],
    )
    .unwrap();
}

#[test]
fn zero_interval() {
    let e = err("[heartbeat]\ninterval = \"0s\"\n");
    assert!(
        e.contains("heartbeat.interval must be greater than zero"),
        "{e}"
    );
}

#[test]
fn http_to_remote_host_refused() {
    let e = err("[api]\nurl = \"http://api.example.com/v1\"\n");
    assert!(e.contains("api.url"), "{e}");
    assert!(e.contains("allow_insecure_http"), "{e}");
    load(
        "[api]\nurl = \"http://api.example.com/v1\"\nallow_insecure_http = true\n",
        &[],
    )
    .unwrap();
    for ok in [
        "http://127.0.0.1:8080/v1/",
        "http://localhost:1",
        "http://[::1]:9/x",
    ] {
        let cfg = load(&format!("[api]\nurl = \"{ok}\"\n"), &[]).unwrap();
        assert!(!cfg.api.url.ends_with('/'));
    }
}

#[test]
fn node_url_strips_trailing_slash() {
    let cfg = load(
        &format!("[api]\nurl = \"https://api.example.com/v1/\"\nnode_id = \"{ID}\"\n"),
        &[],
    )
    .unwrap();
    let id = cfg.api.node_id.unwrap();
    assert_eq!(
        cfg.node_url(&id),
        format!("https://api.example.com/v1/node/{ID}")
    );
}

#[test]
fn env_beats_file_and_flags_beat_env() {
    let text = format!("[api]\nurl = \"https://file.example\"\nnode_id = \"{ID}\"\n");
    let cfg = load(&text, &[(ENV_API_URL, "https://env.example")]).unwrap();
    assert_eq!(cfg.api.url, "https://env.example");
    let map: HashMap<&str, &str> = [(ENV_API_URL, "https://env.example")].into();
    let lookup = move |k: &str| map.get(k).map(|v| v.to_string());
    let flags = Overrides {
        api_url: Some("https://flag.example".into()),
        ..Default::default()
    };
    let cfg = Config::from_toml(&text, Path::new("/x.toml"), &flags, &lookup).unwrap();
    assert_eq!(cfg.api.url, "https://flag.example");
}

#[test]
fn bad_env_uuid_names_the_variable() {
    let e = load("", &[(ENV_NODE_ID, "nope")]).unwrap_err().to_string();
    assert!(e.starts_with(ENV_NODE_ID), "{e}");
}

#[test]
fn token_from_file_is_trimmed_and_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let tf = dir.path().join("token");
    std::fs::write(&tf, "  tok-from-file\n").unwrap();
    let cfg = load(
        &format!("[api]\naccess_token_file = \"{}\"\n", tf.display()),
        &[],
    )
    .unwrap();
    assert_eq!(
        cfg.api.access_token.as_ref().unwrap().expose(),
        "tok-from-file"
    );
    let shown = cfg.to_redacted_toml();
    assert!(!shown.contains("tok-from-file"), "{shown}");
    let cfg = load("[api]\naccess_token = \"abc\"\n", &[]).unwrap();
    let shown = cfg.to_redacted_toml();
    assert!(shown.contains("access_token = \"<redacted>\""), "{shown}");
    assert!(!shown.contains("abc"), "{shown}");
}

#[test]
fn world_readable_token_files_are_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("c.toml");
    std::fs::write(&cfg_path, "[api]\naccess_token = \"x\"\n").unwrap();
    std::fs::set_permissions(&cfg_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = Config::load(
        &Overrides {
            config: Some(cfg_path.clone()),
            ..Default::default()
        },
        &|_| None,
    )
    .unwrap();
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    assert!(cfg.warnings[0].contains("readable by every user"));
    std::fs::set_permissions(&cfg_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = Config::load(
        &Overrides {
            config: Some(cfg_path),
            ..Default::default()
        },
        &|_| None,
    )
    .unwrap();
    assert!(cfg.warnings.is_empty());
}

#[test]
fn both_token_sources_refused() {
    let e = err("[api]\naccess_token = \"a\"\naccess_token_file = \"/x\"\n");
    assert!(e.contains("both"), "{e}");
}

#[test]
fn unreadable_token_file() {
    let e = err("[api]\naccess_token_file = \"/nonexistent/token\"\n");
    assert!(e.contains("api.access_token_file"), "{e}");
}

#[test]
fn state_dir_precedence() {
    let cfg = load("", &[("STATE_DIRECTORY", "/run/sd:/other")]).unwrap();
    assert_eq!(cfg.state.dir, PathBuf::from("/run/sd"));
    let cfg = load(
        "[state]\ndir = \"/from/file\"\n",
        &[("STATE_DIRECTORY", "/run/sd")],
    )
    .unwrap();
    assert_eq!(cfg.state.dir, PathBuf::from("/from/file"));
    let cfg = load(
        "[state]\ndir = \"/from/file\"\n",
        &[(ENV_STATE_DIR, "/env")],
    )
    .unwrap();
    assert_eq!(cfg.state.dir, PathBuf::from("/env"));
}

#[test]
fn bad_log_level() {
    let e = err("[log]\nlevel = \"info,[[[\"\n");
    assert!(e.contains("log.level"), "{e}");
    let e = err("[log]\nformat = \"xml\"\n");
    assert!(e.contains("log.format"), "{e}");
}

#[test]
fn backoff_order() {
    let e = err("[heartbeat]\ninitial_backoff = \"10s\"\nmax_backoff = \"1s\"\n");
    assert!(e.contains("heartbeat.max_backoff"), "{e}");
}

#[test]
fn gpu_modes() {
    for (s, m) in [
        ("auto", GpuMode::Auto),
        ("nvml", GpuMode::Nvml),
        ("pci", GpuMode::Pci),
        ("off", GpuMode::Off),
    ] {
        let cfg = load(&format!("[inventory]\ngpu = \"{s}\"\n"), &[]).unwrap();
        assert_eq!(cfg.inventory.gpu, m);
    }
    assert!(err("[inventory]\ngpu = \"cuda\"\n").contains("inventory.gpu"));
}

#[test]
fn count_unhealthy_gpus_is_off_unless_the_file_says_true() {
    let cfg = load("", &[]).unwrap();
    assert!(!cfg.inventory.count_unhealthy_gpus);
    assert!(
        !cfg.origins
            .iter()
            .any(|(k, _)| *k == "inventory.count_unhealthy_gpus")
    );
    let cfg = load("[inventory]\ncount_unhealthy_gpus = true\n", &[]).unwrap();
    assert!(cfg.inventory.count_unhealthy_gpus);
    assert!(
        cfg.origins
            .iter()
            .any(|(k, o)| *k == "inventory.count_unhealthy_gpus" && o.contains("/etc/test.toml")),
        "{:?}",
        cfg.origins
    );
    let e = err("[inventory]\ncount_unhealthy_gpus = \"yes\"\n");
    assert!(e.contains("count_unhealthy_gpus"), "{e}");
}

/// After a rejected token, the advice names where the token came from: the environment
/// (a reload does not change a process's environment: restart), a token file, or the config
/// file. Before this rule it always named the config file.
#[test]
fn new_token_advice_names_where_the_token_came_from() {
    let text =
        format!("[api]\nurl = \"https://x.example\"\nnode_id = \"{ID}\"\naccess_token = \"t\"\n");
    let c = load(&text, &[("HOME", "/home/x")]).unwrap();
    let a = c.new_token_advice();
    assert!(
        a.contains("/etc/test.toml (api.access_token)") && a.contains("reload"),
        "{a}"
    );

    let c = load(&text, &[("HOME", "/home/x"), (ENV_ACCESS_TOKEN, "e")]).unwrap();
    let a = c.new_token_advice();
    assert!(
        a.contains("EXALSIUS_ACCESS_TOKEN") && a.contains("restart"),
        "{a}"
    );
    assert!(!a.contains("/etc/test.toml"), "{a}");
    let c = load(&text, &[("HOME", "/home/x"), (ENV_NODE_ID, ID)]).unwrap();
    assert_eq!(c.origin_of("api.node_id"), ENV_NODE_ID);
    assert_eq!(c.origin_of("api.url"), "/etc/test.toml");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "f\n").unwrap();
    let text = format!(
        "[api]\nurl = \"https://x.example\"\nnode_id = \"{ID}\"\naccess_token_file = \"{}\"\n",
        file.display()
    );
    let c = load(&text, &[("HOME", "/home/x")]).unwrap();
    let a = c.new_token_advice();
    assert!(
        a.contains(&format!("{} (api.access_token_file)", file.display())),
        "{a}"
    );
}
