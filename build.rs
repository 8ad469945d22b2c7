//! Puts the git commit of the build into `EXALSIUS_BUILD_COMMIT` (the metrics' build_info);
//! "unknown" outside a git checkout. An `EXALSIUS_BUILD_COMMIT` in the environment wins.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=EXALSIUS_BUILD_COMMIT");
    let commit = std::env::var("EXALSIUS_BUILD_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| {
            Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| String::from_utf8(o.stdout).ok())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=EXALSIUS_BUILD_COMMIT={commit}");
    // A new commit moves the branch ref (or packed-refs); only watch what exists, or cargo
    // would rerun this on every build.
    let mut watched = false;
    for p in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
            watched = true;
        }
    }
    if !watched {
        println!("cargo:rerun-if-changed=build.rs");
    }
}
