//! The arm64 build, proven rather than only built: with `EXALSIUS_ARM64_BIN` naming the
//! aarch64 binary (packaging/build.sh builds it; packaging/test-arm64.sh sets this), it runs
//! under qemu-user: `inventory --json` on every fixture host (valid against the contract),
//! `run --once` against the stand-in API on loopback (token rotated and persisted), and an
//! aarch64 build of the stub `libnvidia-ml` loaded through the real NVML bindings.
//! Without the variable every test says "skipped".
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::*;

/// The aarch64 binary and how to run it: `EXALSIUS_ARM64_RUNNER` (default
/// `qemu-aarch64-static`, empty when binfmt_misc runs it directly). Never with
/// `-L /usr/aarch64-linux-gnu`: that takes the cross toolchain's loader beside the multiarch
/// `libc6:arm64`, two glibc builds that hang at the first `pthread_create` (docs/contributing.md, "arm64").
fn arm64() -> Option<(PathBuf, Vec<String>)> {
    let bin = PathBuf::from(std::env::var("EXALSIUS_ARM64_BIN").ok()?);
    let runner = std::env::var("EXALSIUS_ARM64_RUNNER")
        .unwrap_or_else(|_| "/usr/bin/qemu-aarch64-static".to_string());
    Some((bin, runner.split_whitespace().map(String::from).collect()))
}

fn command(bin: &Path, runner: &[String]) -> Command {
    let mut c = match runner.split_first() {
        Some((first, rest)) => {
            let mut c = clean_command_for(Path::new(first));
            c.args(rest).arg(bin);
            c
        }
        None => clean_command_for(bin),
    };
    c.env("PATH", "/nonexistent");
    c
}

fn ok(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn the_arm64_binary_is_an_aarch64_executable() {
    let Some((bin, _)) = arm64() else {
        eprintln!("skipped: EXALSIUS_ARM64_BIN not set");
        return;
    };
    let head = std::fs::read(&bin).unwrap();
    // ELF, 64-bit, little-endian, e_machine = 183 (EM_AARCH64).
    assert_eq!(&head[..4], b"\x7fELF");
    assert_eq!(head[4], 2);
    assert_eq!(u16::from_le_bytes([head[18], head[19]]), 183);
}

#[test]
fn inventory_on_every_fixture_host_is_valid_against_the_contract() {
    let Some((bin, runner)) = arm64() else {
        eprintln!("skipped: EXALSIUS_ARM64_BIN not set");
        return;
    };
    for host in ["a100x8", "mi300x", "laptop", "vm-nogpu"] {
        let out = command(&bin, &runner)
            .args(["inventory", "--json", "--gpu", "pci", "--root"])
            .arg(fixture_host(host))
            .output()
            .unwrap();
        let text = ok(&out);
        let body: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{host}: {e}: {text}"));
        assert_valid("components/requests/node-patch-request.yaml", &body);
        // The same answer as the x86-64 build on the same tree.
        let native = clean_command()
            .env("PATH", "/nonexistent")
            .args(["inventory", "--json", "--gpu", "pci", "--root"])
            .arg(fixture_host(host))
            .output()
            .unwrap();
        let native: serde_json::Value = serde_json::from_slice(&native.stdout).unwrap();
        assert_eq!(body["hardware"], native["hardware"], "{host}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_rotates_and_persists_the_token() {
    let Some((bin, runner)) = arm64() else {
        eprintln!("skipped: EXALSIUS_ARM64_BIN not set");
        return;
    };
    let (api, agent) = setup_with("").await;
    let mut cmd = command(&bin, &runner);
    cmd.arg("--config")
        .arg(agent.config_path())
        .args(["run", "--once"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    ok(&out);
    let seen = api.seen();
    assert_eq!(
        seen[0].auth.as_deref(),
        Some(format!("Bearer {BOOT}").as_str())
    );
    let body: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_valid("components/requests/node-patch-request.yaml", &body);
    assert_eq!(agent.state_json()["access_token"], api.issued()[0].as_str());
}

#[test]
fn an_aarch64_stub_nvml_loads_through_the_real_bindings() {
    let Some((bin, runner)) = arm64() else {
        eprintln!("skipped: EXALSIUS_ARM64_BIN not set");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cc = std::env::var("EXALSIUS_ARM64_CC").unwrap_or_else(|_| "aarch64-linux-gnu-gcc".into());
    let lib = build_fake_nvml_with(&cc, dir.path(), "count=8\n");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!("[inventory]\nnvml_library = \"{}\"\n", lib.display()),
    )
    .unwrap();
    let out = command(&bin, &runner)
        .arg("--config")
        .arg(&cfg)
        .args(["inventory", "--json", "--gpu", "nvml"])
        .output()
        .unwrap();
    let text = ok(&out);
    let body: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(body["hardware"]["gpu_count"], 8, "{text}");
    assert_eq!(body["hardware"]["gpu_type"], "H100 80GB HBM3");
    assert_eq!(body["hardware"]["gpu_memory"], 80);
}
