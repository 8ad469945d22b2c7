//! NVIDIA's real libnvidia-ml (470, 535, 550: Debian non-free, fetched by
//! packaging/fetch-nvidia.sh, never installed) through the agent's own NVML path — the
//! `nvml-probe` child and the `inventory` command — in private mount namespaces whose `/dev`,
//! `/sys/module` and `/proc/driver` are fixtures, run as an unprivileged user: never against
//! the host's `/dev`, never as root where the library would create device nodes.
//!
//! Needs root (for the namespaces) and the cache. Without them these tests say why and pass;
//! with `EXALSIUS_NVIDIA_CACHE` set (as .ci/run does) a missing library fails them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const AGENT: &str = env!("CARGO_BIN_EXE_exalsius-node-agent");
const GENERATIONS: [&str; 3] = ["470", "535", "550"];

/// Sets up a private `/dev` (and, for `loaded`, a driver that looks loaded) in a new mount
/// namespace, then execs the rest of the command line. `$1`: the situation.
const NAMESPACE: &str = r#"set -e
situation=$1; version=$2; shift 2
mount --make-rprivate /
old=$(mktemp -d)
mount --rbind /dev "$old"
mount -t tmpfs -o mode=755 tmpfs /dev
for n in null zero full random urandom tty; do touch /dev/$n; mount --bind "$old/$n" /dev/$n; done
ln -s /proc/self/fd /dev/fd
case $situation in
  not-loaded) ;;
  no-driver-behind-node) mknod -m 666 /dev/nvidiactl c 195 255 ;;
  node-refused) mknod -m 600 /dev/nvidiactl c 195 255 ;;
  node-not-nvidias) touch /dev/nvidiactl; mount --bind "$old/null" /dev/nvidiactl ;;
  looks-loaded)
    mknod -m 666 /dev/nvidiactl c 195 255; mknod -m 666 /dev/nvidia0 c 195 0
    mount -t tmpfs tmpfs /sys/module; mkdir -p /sys/module/nvidia
    echo live >/sys/module/nvidia/initstate; echo "$version" >/sys/module/nvidia/version
    mount -t tmpfs tmpfs /proc/driver; mkdir -p /proc/driver/nvidia
    printf 'NVRM version: NVIDIA UNIX x86_64 Kernel Module  %s  Release Build\nGCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n' "$version" >/proc/driver/nvidia/version
    printf 'ModifyDeviceFiles: 1\nDeviceFileUID: 0\nDeviceFileGID: 0\nDeviceFileMode: 438\n' >/proc/driver/nvidia/params ;;
esac
# The library runs as nobody (uid 65534).
exec setpriv --reuid=65534 --regid=65534 --clear-groups "$@""#;

/// One situation: what the real library must answer (the child's JSON) and what the operator
/// must read (the inventory's note).
struct Situation {
    name: &'static str,
    answer: &'static str,
    warning: &'static [&'static str],
}

const SITUATIONS: [Situation; 5] = [
    Situation {
        name: "not-loaded",
        answer: r#"{"failed":"NVML init failed: NVIDIA driver is not loaded"}"#,
        warning: &["NVIDIA driver is not loaded", "PCI scan used"],
    },
    Situation {
        name: "no-driver-behind-node",
        answer: r#"{"failed":"NVML init failed: NVIDIA driver is not loaded"}"#,
        warning: &["NVIDIA driver is not loaded"],
    },
    Situation {
        name: "node-refused",
        answer: r#"{"no_permission":"NVML init failed: the current user does not have permission to perform this operation"}"#,
        warning: &[
            "/dev/nvidiactl is mode 0600, owner 0, group 0",
            "(uid 65534) may not open it",
            "SupplementaryGroups=",
        ],
    },
    Situation {
        name: "node-not-nvidias",
        // The child reports UNKNOWN; the collector opens the node (it opens: not a device
        // policy) and names the driver check.
        answer: r#"{"unknown":"NVML init failed: an internal driver error occurred (NVML_ERROR_UNKNOWN)"}"#,
        warning: &["opens but the NVIDIA driver does not answer on it"],
    },
    Situation {
        name: "looks-loaded",
        answer: r#"{"failed":"NVML init failed: NVIDIA driver is not loaded"}"#,
        warning: &["NVIDIA driver is not loaded"],
    },
];

/// The cache, or `None` (with the reason printed) when these tests cannot run here.
fn cache() -> Option<PathBuf> {
    let required = std::env::var_os("EXALSIUS_NVIDIA_CACHE");
    let dir = required.clone().map_or_else(
        || PathBuf::from("/var/cache/exalsius-ci/nvidia"),
        PathBuf::from,
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        assert!(
            required.is_none(),
            "EXALSIUS_NVIDIA_CACHE is set but the real-NVML tests need root for their namespaces"
        );
        eprintln!("SKIPPED: the real-NVML tests need root (private mount namespaces)");
        return None;
    }
    if !dir.is_dir() {
        assert!(
            required.is_none(),
            "EXALSIUS_NVIDIA_CACHE={} is not a directory: run packaging/fetch-nvidia.sh",
            dir.display()
        );
        eprintln!(
            "SKIPPED: no real libnvidia-ml in {} (packaging/fetch-nvidia.sh fetches them)",
            dir.display()
        );
        return None;
    }
    Some(dir)
}

/// `libnvidia-ml.so.1` of one generation in the cache (panics when it is missing).
fn library(cache: &Path, generation: &str) -> PathBuf {
    fn find(dir: &Path) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == "libnvidia-ml.so.1") {
                return Some(p);
            }
            if e.file_type().is_ok_and(|t| t.is_dir())
                && let Some(found) = find(&p)
            {
                return Some(found);
            }
        }
        None
    }
    find(&cache.join(generation)).unwrap_or_else(|| {
        panic!(
            "no libnvidia-ml.so.1 for {generation} under {}: run packaging/fetch-nvidia.sh",
            cache.display()
        )
    })
}

/// Runs `args` as nobody in a namespace set up for `situation`.
fn run_in(situation: &str, version: &str, args: &[&std::ffi::OsStr]) -> Output {
    Command::new("unshare")
        .args(["--mount", "sh", "-c", NAMESPACE, "sh", situation, version])
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A config for `inventory` naming the library, readable by nobody.
fn config_for(dir: &Path, lib: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!("[inventory]\nnvml_library = \"{}\"\n", lib.display()),
    )
    .unwrap();
    path
}

#[test]
fn real_libraries_answer_each_situation_with_the_warning_the_operator_needs() {
    let Some(cache) = cache() else { return };
    let dir = tempfile::tempdir().unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut table = Vec::new();
    for generation in GENERATIONS {
        let lib = library(&cache, generation);
        let gen_dir = dir.path().join(generation);
        std::fs::create_dir(&gen_dir).unwrap();
        let config = config_for(&gen_dir, &lib);
        for s in &SITUATIONS {
            // The child alone: what the real library answered.
            let probe = run_in(
                s.name,
                generation,
                &[
                    AGENT.as_ref(),
                    "nvml-probe".as_ref(),
                    "--library".as_ref(),
                    lib.as_os_str(),
                ],
            );
            let answer = String::from_utf8_lossy(&probe.stdout).into_owned();
            table.push(format!("{generation} {:<22} {answer}", s.name));
            assert_eq!(
                answer,
                s.answer,
                "{generation}, {}: {}",
                s.name,
                text(&probe)
            );
            // The whole path: what the operator reads.
            let inv = run_in(
                s.name,
                generation,
                &[
                    AGENT.as_ref(),
                    "inventory".as_ref(),
                    "--config".as_ref(),
                    config.as_os_str(),
                    "--gpu".as_ref(),
                    "nvml".as_ref(),
                ],
            );
            let out = text(&inv);
            assert!(inv.status.success(), "{generation}, {}: {out}", s.name);
            assert!(
                out.contains("gpu_count 0"),
                "{generation}, {}: {out}",
                s.name
            );
            for w in s.warning {
                assert!(
                    out.contains(w),
                    "{generation}, {}: no {w:?} in:\n{out}",
                    s.name
                );
            }
        }
    }
    eprintln!("what the real libraries answered:\n{}", table.join("\n"));
}

/// 470 lacks `nvmlDeviceGetMemoryInfo_v2`, which the agent calls: the library still loads and
/// inits through the agent's path (a missing symbol degrades that one query, not NVML).
#[test]
fn the_470_library_lacks_memory_v2_and_still_loads() {
    let Some(cache) = cache() else { return };
    let has = |generation: &str| {
        let bytes = std::fs::read(library(&cache, generation)).unwrap();
        bytes
            .windows(27)
            .any(|w| w == b"nvmlDeviceGetMemoryInfo_v2\0")
    };
    assert!(!has("470"), "470 has nvmlDeviceGetMemoryInfo_v2 after all");
    assert!(has("535"));
    let lib = library(&cache, "470");
    let probe = run_in(
        "not-loaded",
        "470",
        &[
            AGENT.as_ref(),
            "nvml-probe".as_ref(),
            "--library".as_ref(),
            lib.as_os_str(),
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout),
        r#"{"failed":"NVML init failed: NVIDIA driver is not loaded"}"#,
        "{}",
        text(&probe)
    );
}
