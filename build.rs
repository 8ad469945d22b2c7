//! Puts the git commit of the build into `EXALSIUS_BUILD_COMMIT` (the metrics' build_info);
//! "unknown" outside a git checkout. An `EXALSIUS_BUILD_COMMIT` in the environment wins.
//!
//! Release builds on Linux: also links the binary with a script that gathers the functions `run`
//! executes (`packaging/hot-text.txt`, made by `bench/hot-text.py`) into `.text.hot` before
//! `.text`, so the code `run` never executes stays unmapped (docs/benchmarks.md, "Where the resident memory goes").

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    hot_text();
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

/// Writes `$OUT_DIR/hot-text.ld` from `packaging/hot-text.txt` and links the binaries with it:
/// one output section `.text.hot` inserted before `.text`, one input description per group of the
/// list (in its order), each symbol matched as `.text.NAME` and `.text.unlikely.NAME` (LLVM's
/// section for a cold function), and with LLVM's `.N` suffix of local copies. GNU ld, gold and
/// lld (rust-lld, zig's) all read `INSERT BEFORE`.
fn hot_text() {
    let list = Path::new("packaging/hot-text.txt");
    println!("cargo:rerun-if-changed={}", list.display());
    // EXALSIUS_NO_HOT_TEXT=1: link without it (bench/footprint.py measures what it buys).
    println!("cargo:rerun-if-env-changed=EXALSIUS_NO_HOT_TEXT");
    let off = std::env::var_os("EXALSIUS_NO_HOT_TEXT").is_some_and(|v| !v.is_empty());
    let linux = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    // Release builds only: matching the ~1,660 names costs a debug link ≈ 1.7 s (of 2.3 s).
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let (Ok(text), Some(out)) = (
        std::fs::read_to_string(list),
        std::env::var_os("OUT_DIR").map(PathBuf::from),
    ) else {
        return;
    };
    if !linux || off || !release {
        return;
    }
    let mut script = String::from("SECTIONS\n{\n  .text.hot :\n  {\n");
    let mut group = String::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with("# group:") {
            close_group(&mut script, &mut group);
        } else if !line.is_empty() && !line.starts_with('#') {
            group.push_str(&format!("      .text.{line} .text.unlikely.{line}\n"));
            if !line.ends_with('*') {
                // LLVM's numbered copies of a local function: NAME.288
                group.push_str(&format!("      .text.{line}.* .text.unlikely.{line}.*\n"));
            }
        }
    }
    close_group(&mut script, &mut group);
    script.push_str("  }\n}\nINSERT BEFORE .text;\n");
    let path = out.join("hot-text.ld");
    match std::fs::write(&path, script) {
        Ok(()) => println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", path.display()),
        Err(e) => println!(
            "cargo:warning=linking without .text.hot: {}: {e}",
            path.display()
        ),
    }
}

fn close_group(script: &mut String, group: &mut String) {
    if !group.is_empty() {
        script.push_str("    *(\n");
        script.push_str(group);
        script.push_str("    )\n");
        group.clear();
    }
}
