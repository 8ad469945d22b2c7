//! The command line as an operator meets it: config errors, usage errors, inventory output.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::*;

fn fixtures(kind: &str) -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/config")
        .join(kind);
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

fn agent_cmd() -> Command {
    clean_command()
}

/// The key each invalid fixture must name.
fn expected_key(name: &str) -> &'static str {
    match name {
        "bad-uuid.toml" => "api.node_id",
        "jitter-out-of-range.toml" => "heartbeat.jitter",
        "zero-interval.toml" => "heartbeat.interval",
        "insecure-http.toml" => "api.url",
        "unknown-key.toml" => "surprise",
        "bad-type.toml" => "heartbeat.interval",
        "syntax.toml" => "syntax.toml:1:",
        "bad-gpu-mode.toml" => "inventory.gpu",
        "backoff-order.toml" => "heartbeat.max_backoff",
        "bad-log-format.toml" => "log.format",
        "huge-refresh.toml" => "inventory.refresh_interval",
        "huge-interval.toml" => "heartbeat.interval",
        other => panic!("no expectation for fixture {other}"),
    }
}

#[test]
fn invalid_configs_exit_78_with_one_clear_line() {
    for path in fixtures("invalid") {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        for cmd in [
            &["check-config"][..],
            &["run"],
            &["run", "--once"],
            &["status"],
        ] {
            let out = agent_cmd()
                .arg("--config")
                .arg(&path)
                .args(cmd)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(78), "{name} {cmd:?}: {stderr}");
            let lines: Vec<_> = stderr.lines().collect();
            assert_eq!(lines.len(), 1, "{name} {cmd:?}: one line, got: {stderr}");
            assert!(stderr.contains(expected_key(&name)), "{name}: {stderr}");
            assert!(
                stderr.contains(&path.display().to_string()),
                "{name} names the file: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
    }
}

#[test]
fn valid_configs_pass_check_config_and_redact_tokens() {
    for path in fixtures("valid") {
        let out = agent_cmd()
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("[heartbeat]"), "{stdout}");
        if stdout.contains("access_token =") {
            assert!(stdout.contains("access_token = \"<redacted>\""), "{stdout}");
        }
    }
}

#[test]
fn missing_explicit_config_is_78_and_env_overrides_apply() {
    let out = agent_cmd()
        .args(["check-config", "--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml not found"));

    let out = agent_cmd()
        .args(["check-config"])
        .env("EXALSIUS_AGENT_CONFIG", "/nonexistent/env.toml")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("EXALSIUS_AGENT_CONFIG"));

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("a.toml");
    std::fs::write(&cfg, "[api]\nurl = \"https://file.example\"\n").unwrap();
    let out = agent_cmd()
        .arg("check-config")
        .env("EXALSIUS_AGENT_CONFIG", &cfg)
        .env("EXALSIUS_API_URL", "https://env.example/v1")
        .env("EXALSIUS_ACCESS_TOKEN", "env-SECRET-token")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("url = \"https://env.example/v1\""),
        "{stdout}"
    );
    assert!(!stdout.contains("env-SECRET-token"), "{stdout}");
    // Flags beat the environment.
    let out = agent_cmd()
        .args(["check-config", "--api-url", "https://flag.example"])
        .env("EXALSIUS_AGENT_CONFIG", &cfg)
        .env("EXALSIUS_API_URL", "https://env.example/v1")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("url = \"https://flag.example\""));
}

#[test]
fn usage_errors_keep_exit_code_2() {
    let out = agent_cmd().args(["run", "--bogus"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = agent_cmd().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = agent_cmd().args(["--version"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    for cmd in ["run", "inventory", "status", "check-config"] {
        let out = agent_cmd().args([cmd, "--help"]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{cmd} --help");
    }
}

#[test]
fn inventory_json_is_exactly_the_patch_body_and_validates() {
    let out = agent_cmd()
        .args(["inventory", "--json", "--config", "/dev/null"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_valid("components/requests/node-patch-request.yaml", &body);
    for part in ["hardware", "software", "system"] {
        assert!(body.get(part).is_some(), "{part} missing");
    }
    let h = &body["hardware"];
    let nproc = Command::new("nproc").arg("--all").output().unwrap();
    let nproc: i64 = String::from_utf8_lossy(&nproc.stdout)
        .trim()
        .parse()
        .unwrap();
    assert_eq!(h["cpu_cores"], nproc);
    assert!(h["memory_gb"].as_i64().unwrap() >= 1);
    let uname = Command::new("uname").arg("-r").output().unwrap();
    assert_eq!(
        body["system"]["kernel"],
        String::from_utf8_lossy(&uname.stdout).trim()
    );
}

#[test]
fn inventory_needs_no_config_and_prints_a_table() {
    let out = agent_cmd()
        .arg("inventory")
        .env("EXALSIUS_AGENT_CONFIG", "/nonexistent/x.toml")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for section in [
        "SYSTEM",
        "CPU",
        "MEMORY",
        "STORAGE",
        "GPU",
        "SOFTWARE",
        "SENT TO THE API",
    ] {
        assert!(stdout.contains(section), "{section}: {stdout}");
    }
    let out = agent_cmd()
        .args(["inventory", "--verbose-json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["details"]["cpu"]["logical"].as_u64().unwrap() >= 1);
}

#[test]
fn the_contract_check_rejects_bodies_the_spec_does_not_allow() {
    let good = serde_json::json!({
        "hardware": {"gpu_count": 0, "gpu_vendor": "UNKNOWN", "gpu_type": "UNKNOWN", "gpu_memory": 0,
                     "cpu_cores": 2, "memory_gb": 4, "storage_gb": 10},
        "software": {"docker": "", "nvidia": "", "amd": ""},
        "system": {"os": "Linux", "kernel": "6.1"}
    });
    assert_valid("components/requests/node-patch-request.yaml", &good);
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("system");
    let mut extra = good.clone();
    extra["hardware"]["gpu_mem"] = 80.into();
    let mut wrong_type = good.clone();
    wrong_type["hardware"]["cpu_cores"] = "2".into();
    let mut too_big = good.clone();
    too_big["hardware"]["storage_gb"] = (i64::from(i32::MAX) + 1).into();
    for bad in [missing, extra, wrong_type, too_big] {
        let r = std::panic::catch_unwind(|| {
            assert_valid("components/requests/node-patch-request.yaml", &bad)
        });
        assert!(r.is_err(), "accepted {bad}");
    }
}

/// `check-config` says where each value came from: flag > environment > file > default.
#[test]
fn check_config_names_the_origin_of_each_value() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("a.toml");
    std::fs::write(
        &cfg,
        "[api]\nurl = \"https://file.example\"\n[heartbeat]\ninterval = \"30s\"\n[log]\nlevel = \"debug\"\n",
    )
    .unwrap();
    let out = agent_cmd()
        .args(["check-config", "--state-dir", "/var/lib/flag-state"])
        .env("EXALSIUS_AGENT_CONFIG", &cfg)
        .env("EXALSIUS_API_URL", "https://env.example/v1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let origin = |key: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("#   {key} ")))
            .map(|l| l.split_whitespace().last().unwrap().to_string())
            .unwrap_or_else(|| panic!("no origin line for {key}: {stdout}"))
    };
    assert_eq!(origin("api.url"), "EXALSIUS_API_URL");
    assert_eq!(origin("state.dir"), "--state-dir");
    assert_eq!(origin("heartbeat.interval"), cfg.display().to_string());
    assert_eq!(origin("log.level"), cfg.display().to_string());
    assert!(
        !stdout.contains("#   heartbeat.jitter"),
        "defaults are not listed: {stdout}"
    );
}

/// The class of exit codes: 78 only for what the operator must edit (systemd does not restart
/// it, `RestartPreventExitStatus=78`); a fault of the machine — a config file that cannot be
/// read now, a state directory that cannot be written, a file in its way — is exit 1, which
/// systemd retries. Run as `nobody`, as the packaged service is (root would read anything).
#[test]
fn machine_faults_exit_1_and_what_the_operator_must_edit_exits_78() {
    use std::os::unix::fs::PermissionsExt;
    let Some(home) = NobodyHome::new() else {
        return;
    };
    let base = |state: &std::path::Path| {
        format!(
            "[api]\nurl = \"http://127.0.0.1:9/v1\"\nnode_id = \"0d9c2f4e-8a51-4c1b-9e62-3f7a1b2c4d5e\"\naccess_token = \"t\"\n[inventory]\ngpu = \"off\"\n[state]\ndir = \"{}\"\n",
            state.display()
        )
    };
    let root_owned = home.dir.path().join("root-owned");
    std::fs::create_dir(&root_owned).unwrap();
    std::fs::set_permissions(&root_owned, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file_in_the_way = home.dir.path().join("a-file");
    std::fs::write(&file_in_the_way, "x").unwrap();
    let cases: Vec<(&str, PathBuf, i32, &str)> = vec![
        // The config file cannot be read now (mode 0600, root's): a fault, retried.
        (
            "config unreadable",
            {
                let p = home.write_config(&base(&home.dir.path().join("s1")));
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
                p
            },
            1,
            "cannot read config file",
        ),
        // A directory where the config file should be: the operator's to fix.
        (
            "config is a directory",
            root_owned.clone(),
            78,
            "configuration error",
        ),
        // A state directory the service user cannot write (root's, 0755).
        (
            "state dir not writable",
            {
                let p = home.dir.path().join("c2.toml");
                std::fs::write(&p, base(&root_owned)).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
                p
            },
            1,
            "state",
        ),
        // A file in the way of the state directory.
        (
            "file in the way",
            {
                let p = home.dir.path().join("c3.toml");
                std::fs::write(&p, base(&file_in_the_way)).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
                p
            },
            1,
            "not a directory",
        ),
    ];
    for (name, cfg, code, says) in cases {
        for args in [&["run", "--once"][..], &["run"]] {
            let out = home.command(&cfg, args).output().unwrap();
            let t = text(&out);
            assert_eq!(out.status.code(), Some(code), "{name} {args:?}: {t}");
            assert!(t.contains(says), "{name} {args:?}: {t}");
            assert!(!t.contains("panicked"), "{name}: {t}");
        }
    }
}

/// A reader that goes away (`| head -c10`) ends every command that prints quietly: exit 141
/// (128 + SIGPIPE, what the shell reports for any Unix tool a closed pipe stops), no panic
/// (101), no error line; `run --dry-run` stops instead of running on. Before this rule:
/// `status`, `status --json`, `check-config`, `doctor`, `inventory` exited 101 and dry-run
/// never exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_every_command_quietly() {
    use std::process::Stdio;
    let (_api, agent) = setup_with("").await;
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["check-config"],
        &["doctor"],
        &["doctor", "--json"],
        &["inventory"],
        &["inventory", "--json"],
        &["run", "--dry-run"],
    ] {
        // The reader is gone before the command starts: no race with its first write.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut child = clean_command()
            .arg("--config")
            .arg(agent.config_path())
            .args(args)
            .stdout(Stdio::from(writer))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + slack(20 * SECOND);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                panic!("{args:?} ran on with its reader gone");
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(141), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Exit 78 (the operator must edit) for every file the configuration names when its content
/// or shape is wrong — missing, a directory, not a certificate — and 1 (a fault of the
/// machine, retried by systemd) when it cannot be read now. Run as `nobody`, as the packaged
/// service is. Before this rule an unreadable token or CA file exited 78.
#[test]
fn files_the_config_names_exit_78_for_what_to_edit_and_1_for_a_fault() {
    use std::os::unix::fs::PermissionsExt;
    let Some(home) = NobodyHome::new() else {
        return;
    };
    let dir = home.dir.path();
    let file = |name: &str, body: &str, mode: u32| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let token_ok = file("token", "t\n", 0o644);
    let unreadable_token = file("token-root", "t\n", 0o600);
    let unreadable_ca = file("ca-root.pem", "x", 0o600);
    let garbage_ca = file("ca-garbage.pem", "not a certificate", 0o644);
    let open_dir = dir.join("open");
    std::fs::create_dir(&open_dir).unwrap();
    std::fs::set_permissions(&open_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let closed = dir.join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::write(closed.join("ca.pem"), "x").unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let cases = [
        (
            "token file unreadable",
            format!("access_token_file = \"{}\"", unreadable_token.display()),
            1,
        ),
        (
            "token file missing",
            format!("access_token_file = \"{}\"", dir.join("nope").display()),
            78,
        ),
        (
            "token file is a directory",
            format!("access_token_file = \"{}\"", open_dir.display()),
            78,
        ),
        (
            "CA file unreadable",
            format!(
                "access_token_file = \"{}\"\nca_file = \"{}\"",
                token_ok.display(),
                unreadable_ca.display()
            ),
            1,
        ),
        (
            "CA file behind a closed directory",
            format!(
                "access_token_file = \"{}\"\nca_file = \"{}\"",
                token_ok.display(),
                closed.join("ca.pem").display()
            ),
            1,
        ),
        (
            "CA file not a certificate",
            format!(
                "access_token_file = \"{}\"\nca_file = \"{}\"",
                token_ok.display(),
                garbage_ca.display()
            ),
            78,
        ),
        (
            "CA file missing",
            format!(
                "access_token_file = \"{}\"\nca_file = \"{}\"",
                token_ok.display(),
                dir.join("nope.pem").display()
            ),
            78,
        ),
    ];
    for (i, (name, api, code)) in cases.iter().enumerate() {
        let cfg = home.write_config(&format!(
            "[api]\nurl = \"http://127.0.0.1:9/v1\"\nnode_id = \"0d9c2f4e-8a51-4c1b-9e62-3f7a1b2c4d5e\"\n{api}\n[inventory]\ngpu = \"off\"\n[state]\ndir = \"{}\"\n",
            dir.join(format!("s{i}")).display()
        ));
        for args in [&["run", "--once"][..], &["check-config"]] {
            let out = home.command(&cfg, args).output().unwrap();
            let t = text(&out);
            assert_eq!(out.status.code(), Some(*code), "{name} {args:?}: {t}");
            assert!(!t.contains("panicked"), "{name}: {t}");
        }
    }
}
