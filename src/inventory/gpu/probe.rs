//! The process boundary around NVML: every query runs in a short-lived child — this same
//! binary in the hidden `nvml-probe` mode — that loads the vendor library, answers one
//! [`Answer`] as JSON on its stdout and exits.
//!
//! Why a child: NVIDIA's library is three quarters of a GPU host's agent once loaded (its
//! zero-filled data segment, 12–15 MiB, is touched by init even when init fails), it can crash
//! (a library/driver mismatch after an upgrade without reboot segfaults inside it), and it can
//! block for minutes in the driver. In a child, its memory lives only for the probe's life, a
//! crash or a hang is the child's, and the daemon keeps heartbeating with the last good data.
//!
//! The child is this binary (its path, or `/proc/self/exe` once a package upgrade replaced the
//! file: the very image the daemon runs, so parent and child speak the same JSON); it inherits
//! the unit's sandbox. It dies with the thread that started it (`PR_SET_PDEATHSIG`), is killed at the
//! probe timeout and reaped, and is killed at exit with the other probe children.
#![allow(unsafe_code)]

use super::nvml::{Answer, DEFAULT_LIBRARY, NvmlOutcome, outcome};
use crate::inventory::software;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "nvml-probe";
/// An answer longer than this is not an answer (8 GPUs take about 3 KiB).
const MAX_ANSWER: u64 = 1 << 20;
/// The child's warnings kept, at most (a log line each).
const MAX_WARNINGS: u64 = 16 << 10;
/// How long a killed child may take to die before it counts as stuck in the driver (an
/// uninterruptible sleep there outlives SIGKILL); later probes answer `Busy` until it is gone.
const KILL_GRACE: Duration = Duration::from_millis(500);

/// The program to run as the probe child; see [`set_program`].
static PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// Runs `program` instead of `/proc/self/exe` as the probe child: for a process that is not
/// the agent (the integration tests' harness runs the collector in-process and names the
/// agent binary). First call wins.
pub fn set_program(program: &Path) {
    let _ = PROGRAM.set(program.to_path_buf());
}

/// This binary: its path while that still names it (so qemu-user with binfmt_misc, which
/// fakes `/proc/self/exe`'s link but not the exec through it, runs the guest binary), else
/// `/proc/self/exe` — after a package upgrade replaced the file the link reads
/// "… (deleted)", and the image the daemon runs is still there to start.
fn program() -> PathBuf {
    if let Some(p) = PROGRAM.get() {
        return p.clone();
    }
    std::env::current_exe()
        .ok()
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"))
}

/// NVML queries through the probe child.
#[derive(Debug)]
pub struct NvmlProbe {
    library: OsString,
    /// The collector's root: the device nodes the diagnosis looks at are under it.
    root: PathBuf,
    missing_reported: AtomicBool,
    /// A child killed at a timeout that had not died within [`KILL_GRACE`].
    stuck: Mutex<Option<Arc<Mutex<Child>>>>,
    /// The child's warnings logged at the last probe (logged again only when they change).
    warned: Mutex<Vec<String>>,
}

impl NvmlProbe {
    /// A probe loading `library` (default [`DEFAULT_LIBRARY`]), diagnosing against the device
    /// nodes under `root`; nothing is started yet.
    pub fn new(library: Option<&Path>, root: &Path) -> Self {
        Self {
            library: library.map_or_else(|| OsString::from(DEFAULT_LIBRARY), |p| p.into()),
            root: root.to_path_buf(),
            missing_reported: AtomicBool::new(false),
            stuck: Mutex::new(None),
            warned: Mutex::new(Vec::new()),
        }
    }

    /// True the first time the library is found missing (to log it once, at info).
    pub fn first_missing(&self) -> bool {
        !self.missing_reported.swap(true, Ordering::AcqRel)
    }

    /// Queries all GPUs through a child, waiting at most `timeout`. Blocking.
    pub fn query(&self, timeout: Duration) -> NvmlOutcome {
        if self.still_stuck() {
            return NvmlOutcome::Busy;
        }
        let deadline = Instant::now() + timeout;
        let mut command = Command::new(program());
        command
            .arg(SUBCOMMAND)
            .arg("--library")
            .arg(&self.library)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // The child must not talk to systemd on the daemon's behalf.
            .env_remove("NOTIFY_SOCKET");
        // SAFETY: between fork and exec only prctl(2), async-signal-safe, runs; it makes the
        // kernel kill the child when the thread that started it ends (the daemon killed).
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = match command.spawn() {
            Ok(c) => c,
            Err(e) => return NvmlOutcome::Failed(format!("cannot start the NVML probe: {e}")),
        };
        let answer = read_in_thread(child.stdout.take(), MAX_ANSWER);
        let warnings = read_in_thread(child.stderr.take(), MAX_WARNINGS);
        let pid = child.id();
        let child = Arc::new(Mutex::new(child));
        let tracked = software::track(Arc::clone(&child));
        let status = wait_until(&child, deadline);
        let status = match status {
            Some(s) => s,
            None => {
                let died = kill_and_reap(&child);
                software::untrack(tracked);
                if !died {
                    tracing::warn!(
                        pid,
                        "the NVML probe did not die within {KILL_GRACE:?} of SIGKILL (stuck in the driver); no new probe until it is gone"
                    );
                    if let Ok(mut s) = self.stuck.lock() {
                        *s = Some(child);
                    }
                }
                return NvmlOutcome::TimedOut;
            }
        };
        software::untrack(tracked);
        let grace = deadline.saturating_duration_since(Instant::now()) + KILL_GRACE;
        let warnings = warnings.recv_timeout(grace).unwrap_or_default();
        self.log_warnings(&warnings);
        let answer = answer.recv_timeout(grace).unwrap_or_default();
        match serde_json::from_slice::<Answer>(&answer) {
            Ok(a) => outcome(a, &self.root),
            Err(e) => NvmlOutcome::Failed(format!(
                "the NVML probe (pid {pid}) {} without an answer ({e}){}",
                ended(status),
                last_words(&warnings)
            )),
        }
    }

    /// True while a child killed earlier has not died; reaps it once it has.
    fn still_stuck(&self) -> bool {
        let Ok(mut stuck) = self.stuck.lock() else {
            return false;
        };
        let Some(child) = stuck.as_ref() else {
            return false;
        };
        let alive = child
            .lock()
            .map(|mut c| matches!(c.try_wait(), Ok(None)))
            .unwrap_or(false);
        if !alive {
            *stuck = None;
        }
        alive
    }

    /// The child's stderr lines (its warnings: a GPU lost, memory unknown) at warn, each once
    /// while it repeats from probe to probe.
    fn log_warnings(&self, text: &[u8]) {
        let lines: Vec<String> = String::from_utf8_lossy(text)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        let Ok(mut warned) = self.warned.lock() else {
            return;
        };
        for l in lines.iter().filter(|l| !warned.contains(l)) {
            tracing::warn!("NVML probe: {l}");
        }
        *warned = lines;
    }
}

/// Reads `from` to its end (at most `limit` bytes) on a thread of its own, so that a child
/// writing more than a pipe holds never blocks on a parent that waits for it to exit.
fn read_in_thread<R: Read + Send + 'static>(
    from: Option<R>,
    limit: u64,
) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(from) = from {
        let spawned = std::thread::Builder::new()
            .name("nvml-probe-io".into())
            .spawn(move || {
                let mut out = Vec::new();
                let _ = from.take(limit).read_to_end(&mut out);
                let _ = tx.send(out);
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot read the NVML probe's output: {e}");
        }
    }
    rx
}

/// Polls the child until it exits (its status) or the deadline passes (`None`).
fn wait_until(child: &Mutex<Child>, deadline: Instant) -> Option<ExitStatus> {
    let mut pause = Duration::from_micros(200);
    loop {
        let done = child.lock().map(|mut c| c.try_wait());
        match done {
            Ok(Ok(Some(status))) => return Some(status),
            Ok(Ok(None)) if Instant::now() < deadline => {}
            _ => return None,
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// SIGKILL, then reap within [`KILL_GRACE`]: true when the child is gone.
fn kill_and_reap(child: &Mutex<Child>) -> bool {
    if let Ok(mut c) = child.lock() {
        let _ = c.kill();
    }
    wait_until(child, Instant::now() + KILL_GRACE).is_some()
}

/// How the child ended, for the log: "was killed by signal 11 (SIGSEGV)", "exited with 1".
fn ended(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with {code}"),
        (None, Some(sig)) => {
            let name = match sig {
                libc::SIGSEGV => {
                    " (SIGSEGV: a crash inside the NVML library — a library/driver version mismatch?)"
                }
                libc::SIGBUS => " (SIGBUS)",
                libc::SIGABRT => " (SIGABRT)",
                libc::SIGILL => " (SIGILL)",
                libc::SIGSYS => " (SIGSYS: a system call the service's SystemCallFilter= forbids)",
                libc::SIGKILL => " (SIGKILL)",
                _ => "",
            };
            format!("was killed by signal {sig}{name}")
        }
        (None, None) => "ended".to_string(),
    }
}

/// The child's last stderr line, if any, to quote.
fn last_words(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map_or_else(String::new, |l| format!(": {}", l.trim()))
}

/// The child's side (`exalsius-node-agent nvml-probe`): one NVML answer as JSON on stdout,
/// warnings on stderr; exit 0 when the answer was written.
pub fn child_main(library: Option<&Path>) -> u8 {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_level(false)
        .with_target(false)
        .with_max_level(tracing::Level::WARN)
        .try_init();
    let library = library.map_or_else(|| OsString::from(DEFAULT_LIBRARY), |p| p.into());
    let answer = super::nvml::answer(&library);
    let text = match serde_json::to_vec(&answer) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot encode the NVML answer: {e}");
            return 1;
        }
    };
    let mut out = std::io::stdout().lock();
    match std::io::Write::write_all(&mut out, &text).and_then(|()| std::io::Write::flush(&mut out))
    {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("cannot write the NVML answer: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn how_a_child_ended_reads_for_an_operator() {
        let segv = ExitStatus::from_raw(libc::SIGSEGV);
        assert!(ended(segv).contains("SIGSEGV"), "{}", ended(segv));
        assert_eq!(ended(ExitStatus::from_raw(1 << 8)), "exited with 1");
        assert_eq!(last_words(b"first\nlast line\n\n"), ": last line");
        assert_eq!(last_words(b""), "");
    }
}
