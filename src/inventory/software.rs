//! Software versions: docker, the NVIDIA driver, AMD's tools.
//!
//! Each tool is looked up on `PATH` first (absent → empty string, no process spawned), then the
//! present ones run concurrently, each under [`COMMAND_TIMEOUT`], so the total is the slowest
//! one rather than the sum, and a hung tool cannot hold the inventory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A version command that takes longer than this is broken (a hung docker daemon socket does
/// not affect `docker --version`, but a wedged driver can hang `nvidia-smi`).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Version output longer than this is not a version.
const MAX_OUTPUT: u64 = 4096;

/// Finds an executable named `name` on `path` (a `PATH`-style list).
pub fn which(name: &str, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = path?;
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Probe children still running, so that shutdown can kill them: the blocking thread that
/// waits for one is abandoned at exit, and its child must not outlive the agent.
static RUNNING: Mutex<Vec<(u64, Arc<Mutex<Child>>)>> = Mutex::new(Vec::new());
static NEXT_PROBE: AtomicU64 = AtomicU64::new(0);

fn running() -> std::sync::MutexGuard<'static, Vec<(u64, Arc<Mutex<Child>>)>> {
    RUNNING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Registers a probe child started elsewhere (the NVML probe), so that exit kills it too;
/// returns the id for [`untrack`].
pub(crate) fn track(child: Arc<Mutex<Child>>) -> u64 {
    let id = NEXT_PROBE.fetch_add(1, Ordering::Relaxed);
    running().push((id, child));
    id
}

/// Forgets a child registered with [`track`] (it has been reaped).
pub(crate) fn untrack(id: u64) {
    running().retain(|(i, _)| *i != id);
}

/// Kills and reaps every probe child still running (at exit).
pub fn kill_running_probes() {
    let children = std::mem::take(&mut *running());
    for (_, child) in children {
        let mut c = child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Runs `program args…` and returns its trimmed stdout, or `None` on failure or timeout. A
/// child that outlives `timeout` is killed and reaped.
pub fn run_with_timeout(program: &Path, args: &[&str], timeout: Duration) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Children must not talk to systemd on our behalf.
        .env_remove("NOTIFY_SOCKET")
        .spawn()
        .ok()?;
    let stdout = child.stdout.take();
    let id = NEXT_PROBE.fetch_add(1, Ordering::Relaxed);
    let child = Arc::new(Mutex::new(child));
    running().push((id, Arc::clone(&child)));
    let status = wait_with_deadline(&child, Instant::now() + timeout);
    running().retain(|(i, _)| *i != id);
    let Some(status) = status else {
        tracing::warn!(
            "{} {} did not finish within {timeout:?}; killed",
            program.display(),
            args.join(" ")
        );
        return None;
    };
    let mut out = String::new();
    stdout?.take(MAX_OUTPUT).read_to_string(&mut out).ok()?;
    let out = out.trim().to_string();
    (status.success() && !out.is_empty()).then_some(out)
}

/// Polls the child until it exits (its status) or the deadline passes (killed, reaped: `None`).
fn wait_with_deadline(child: &Mutex<Child>, deadline: Instant) -> Option<ExitStatus> {
    let mut pause = Duration::from_micros(200);
    loop {
        let mut c = child
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match c.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            Ok(None) => {}
            Err(_) => return None,
        }
        drop(c);
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// One version probe: the program and its arguments.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Executable name looked up on PATH.
    pub program: &'static str,
    /// Arguments.
    pub args: &'static [&'static str],
}

/// `docker --version`
pub const DOCKER: Probe = Probe {
    program: "docker",
    args: &["--version"],
};
/// `nvidia-smi --version`
pub const NVIDIA_SMI: Probe = Probe {
    program: "nvidia-smi",
    args: &["--version"],
};
/// `amd-smi version`
pub const AMD_SMI: Probe = Probe {
    program: "amd-smi",
    args: &["version"],
};

/// Runs the probes concurrently; each result is the output or an empty string.
pub fn run_probes(probes: &[Probe]) -> Vec<String> {
    let path = std::env::var_os("PATH");
    std::thread::scope(|scope| {
        let handles: Vec<_> = probes
            .iter()
            .map(|p| {
                let exe = which(p.program, path.as_deref());
                scope.spawn(move || {
                    exe.and_then(|exe| run_with_timeout(&exe, p.args, COMMAND_TIMEOUT))
                        .unwrap_or_default()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_program_is_empty_without_spawning() {
        let out = run_probes(&[Probe {
            program: "definitely-not-installed-xyz",
            args: &[],
        }]);
        assert_eq!(out, vec![String::new()]);
    }

    #[test]
    fn output_and_timeout() {
        let sh = Path::new("/bin/sh");
        assert_eq!(
            run_with_timeout(sh, &["-c", "echo '  v1.2 '"], COMMAND_TIMEOUT).as_deref(),
            Some("v1.2")
        );
        let t = Instant::now();
        assert_eq!(
            run_with_timeout(sh, &["-c", "sleep 5"], Duration::from_millis(200)),
            None
        );
        assert!(t.elapsed() < Duration::from_secs(3));
        assert_eq!(
            run_with_timeout(sh, &["-c", "echo x; exit 3"], COMMAND_TIMEOUT),
            None
        );
    }
}
