//! The package test's driver (`packaging/test-packages.sh`, docs/contributing.md "Package
//! test"): its phase list and its refusals, which need no root. The phases themselves boot a
//! container as root and run in `.ci/run`.

use std::path::Path;
use std::process::{Command, Output};

fn driver(args: &[&str]) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    Command::new("bash")
        .arg(root.join("packaging/test-packages.sh"))
        .args(args)
        .output()
        .unwrap()
}

/// `--list` names every phase file in order with what it needs and proves, and checks that
/// each need is one `packaging/test/lib.sh` can make.
#[test]
fn list_names_every_phase_with_its_needs() {
    let out = driver(&["--list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "--list: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(root.join("packaging/test/phases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sh"))
        .map(|n| n.trim_end_matches(".sh").to_owned())
        .collect();
    files.sort();
    let listed: Vec<&str> = stdout
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(listed, files, "--list against packaging/test/phases/");
    for name in ["10-build", "50-boot", "54-reload", "90-fleet"] {
        assert!(listed.contains(&name), "{name} missing from --list");
    }
    assert!(
        stdout.lines().all(|l| l.contains("needs:") && l.len() > 60),
        "a phase without its needs or what it proves:\n{stdout}"
    );
}

/// An unknown phase or argument is refused with exit 2 before anything is built or booted,
/// naming it and the phases there are.
#[test]
fn an_unknown_phase_is_refused_naming_it() {
    let out = driver(&["--only", "reload,no-such-phase"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no phase 'no-such-phase'"), "{stderr}");
    assert!(
        stderr.contains("reload"),
        "the phases are not named: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "it started: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = driver(&["--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--frobnicate"));
}
