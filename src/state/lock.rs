//! One writer per state directory: `flock` on `state.lock` (released by the kernel on any
//! exit, SIGKILL included), taken by `run` and `register`; `status` and `doctor` read without
//! it. The lock file holds the pid, for the message the next process shows.

use super::{FILE_MODE, LOCK_FILE, StateError, StateStore, TEMP_PREFIX, TEMP_SUFFIX};
use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;

impl StateStore {
    /// Takes the directory's write lock, creating the directory first. `Err(Held)` names the
    /// process that holds it.
    pub fn lock(&self) -> Result<StateLock, LockError> {
        if let Some(w) = self.ensure_dir()? {
            tracing::warn!("{w}");
        }
        let path = self.dir.join(LOCK_FILE);
        let io = |action, source| {
            LockError::State(StateError::Io {
                action,
                path: path.clone(),
                source,
            })
        };
        let file = match crate::perms::open_rw_nofollow(&path, FILE_MODE) {
            Err(e) if crate::perms::is_symlink_error(&e) => {
                let aside = self.move_aside(LOCK_FILE, "symlink");
                tracing::warn!(
                    "{} was a symlink; moved aside to {}",
                    path.display(),
                    aside
                        .as_deref()
                        .map_or_else(|| "(could not move)".into(), |p| p.display().to_string())
                );
                crate::perms::open_rw_nofollow(&path, FILE_MODE)
            }
            other => other,
        }
        .map_err(|e| io("cannot open lock file", e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let pid = (&file)
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(LockError::Held { path, pid });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io("cannot lock", e)),
        }
        crate::perms::give_to_dir_owner(&file, &self.dir)
            .map_err(|e| io("cannot hand to the state directory's owner", e))?;
        // The pid is information for the next process that finds the lock held.
        let _ = file.set_len(0);
        let _ = (&file).write_all(format!("{}\n", std::process::id()).as_bytes());
        Ok(StateLock {
            _file: file,
            dir: self.dir.clone(),
        })
    }
}

/// Why the state directory's lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("another exalsius-node-agent{} is using the state in {}; stop it first (systemctl stop exalsius-node-agent)", pid.map_or_else(String::new, |p| format!(" (pid {p})")), path.parent().map_or_else(|| path.display().to_string(), |d| d.display().to_string()))]
    Held { path: PathBuf, pid: Option<u32> },
    /// The directory or the lock file cannot be used.
    #[error(transparent)]
    State(#[from] StateError),
}

/// Held for as long as this process may write the state; the kernel releases it on exit.
#[derive(Debug)]
pub struct StateLock {
    _file: fs::File,
    dir: PathBuf,
}

impl StateLock {
    /// Removes temp files left by a write that was interrupted (SIGKILL, power loss); called
    /// under the lock, so never while another process writes. Returns how many were removed.
    pub fn remove_stale_temp_files(&self) -> usize {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return 0;
        };
        entries
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX)
            })
            .filter(|e| fs::remove_file(e.path()).is_ok())
            .count()
    }
}
