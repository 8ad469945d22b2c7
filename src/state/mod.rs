//! The state file `{state.dir}/state.json`: current token and the last heartbeat's outcome.
//!
//! Written atomically (temp file in the same directory, fsync, rename, fsync of the
//! directory), mode 0600 in a 0700 directory, so a crash at any moment leaves either the old
//! or the new file, never a torn one. Nothing here follows a symlink in place of a file
//! (`O_NOFOLLOW`; permissions fixed on the open descriptor), and files that root writes into
//! the service user's directory are given to that user.
//!
//! One writer per directory: `run` and `register` hold [`StateLock`] (`flock` on `state.lock`,
//! released by the kernel on any exit, SIGKILL included); `status` reads without it.

mod lock;

pub use lock::{LockError, StateLock};

use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use uuid::Uuid;

/// File name inside the state directory.
pub const STATE_FILE: &str = "state.json";
/// The lock file held by the one process that may write the state.
pub const LOCK_FILE: &str = "state.lock";
/// Temp files of atomic writes: `.state.json.XXXXXX.tmp`.
const TEMP_PREFIX: &str = ".state.json.";
const TEMP_SUFFIX: &str = ".tmp";
/// Only the agent's user may enter the directory.
const DIR_MODE: u32 = 0o700;
/// Only the agent's user may read the token.
const FILE_MODE: u32 = 0o600;

/// A state-file problem, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading, writing, creating or renaming failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A symlink or something else that is not a regular file is where the state file belongs.
    #[error("{path} is {what}, not a regular file; it is not read as state")]
    NotAFile { path: PathBuf, what: &'static str },
    /// The file is not a state file we understand.
    #[error("state file {path} is not valid: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What the agent remembers between runs.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    /// The node this state belongs to.
    pub node_id: Uuid,
    /// The API the token was issued by.
    pub api_url: String,
    /// The token to use for the next request.
    pub access_token: Secret,
    /// `Bearer` unless the API said otherwise.
    pub token_type: Option<String>,
    /// When the token stops being valid, if the API said.
    pub token_expires_at: Option<SystemTime>,
    /// SHA-256 of the configured bootstrap token this state descends from; `None` for a node
    /// that was registered with `register` (no bootstrap token).
    pub bootstrap_token_sha256: Option<String>,
    /// Last heartbeat attempt.
    pub last_attempt_at: Option<SystemTime>,
    /// Last successful heartbeat.
    pub last_success_at: Option<SystemTime>,
    /// Failed attempts since the last success.
    pub consecutive_failures: u32,
    /// Why the last attempt failed; `None` when it succeeded.
    pub last_error: Option<String>,
    /// Description given to `register` (the register call has no field for it; heartbeats
    /// send it unless `inventory.description` is set).
    pub description: Option<String>,
}

impl State {
    /// A fresh state for a node and token.
    pub fn new(node_id: Uuid, api_url: &str, token: Secret, bootstrap: Option<&Secret>) -> Self {
        Self {
            node_id,
            api_url: api_url.to_string(),
            access_token: token,
            token_type: None,
            token_expires_at: None,
            bootstrap_token_sha256: bootstrap.map(Secret::sha256_hex),
            last_attempt_at: None,
            last_success_at: None,
            consecutive_failures: 0,
            last_error: None,
            description: None,
        }
    }

    /// True when the token has a known expiry at or before `now`.
    pub fn token_expired(&self, now: SystemTime) -> bool {
        self.token_expires_at.is_some_and(|t| t <= now)
    }
}

/// On-disk form: plain strings, RFC 3339 timestamps.
#[derive(Serialize, Deserialize)]
struct StateFile {
    node_id: Uuid,
    api_url: String,
    access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bootstrap_token_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_attempt_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_success_at: Option<String>,
    #[serde(default)]
    consecutive_failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
}

/// Formats a time as RFC 3339 UTC with seconds.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn parse_time(s: &Option<String>) -> Option<SystemTime> {
    s.as_deref()
        .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
}

impl From<&State> for StateFile {
    fn from(s: &State) -> Self {
        Self {
            node_id: s.node_id,
            api_url: s.api_url.clone(),
            access_token: s.access_token.expose().to_string(),
            token_type: s.token_type.clone(),
            token_expires_at: s.token_expires_at.map(rfc3339),
            bootstrap_token_sha256: s.bootstrap_token_sha256.clone(),
            last_attempt_at: s.last_attempt_at.map(rfc3339),
            last_success_at: s.last_success_at.map(rfc3339),
            consecutive_failures: s.consecutive_failures,
            last_error: s.last_error.clone(),
            description: s.description.clone(),
        }
    }
}

impl From<StateFile> for State {
    fn from(f: StateFile) -> Self {
        Self {
            node_id: f.node_id,
            api_url: f.api_url,
            access_token: Secret::new(f.access_token),
            token_type: f.token_type,
            token_expires_at: parse_time(&f.token_expires_at),
            bootstrap_token_sha256: f.bootstrap_token_sha256,
            last_attempt_at: parse_time(&f.last_attempt_at),
            last_success_at: parse_time(&f.last_success_at),
            consecutive_failures: f.consecutive_failures,
            last_error: f.last_error,
            description: f.description,
        }
    }
}

/// Reads and writes `state.json` in one directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// A store for `dir`; nothing is touched until used.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Full path of `state.json`.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Loads the state; `Ok(None)` when there is none yet. Never follows a symlink and never
    /// blocks on a FIFO in place of the file ([`StateError::NotAFile`]). A state file readable
    /// by group or others is tightened to 0600 on the open descriptor (the returned warnings
    /// say so).
    pub fn load(&self) -> Result<(Option<State>, Vec<String>), StateError> {
        self.read(true)
    }

    /// Reads the state and changes nothing, not even a mode that is too open (`doctor`).
    pub fn peek(&self) -> Result<Option<State>, StateError> {
        self.read(false).map(|(s, _)| s)
    }

    fn read(&self, tighten: bool) -> Result<(Option<State>, Vec<String>), StateError> {
        let path = self.path();
        let mut warnings = Vec::new();
        let io = |action, source| StateError::Io {
            action,
            path: path.clone(),
            source,
        };
        let mut file = match crate::perms::open_read_nofollow(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, warnings)),
            Err(e) if crate::perms::is_symlink_error(&e) => {
                return Err(StateError::NotAFile {
                    path,
                    what: "a symlink",
                });
            }
            Err(e) => return Err(io("cannot read", e)),
        };
        let meta = file.metadata().map_err(|e| io("cannot read", e))?;
        if !meta.is_file() {
            return Err(StateError::NotAFile {
                path,
                what: if meta.is_dir() {
                    "a directory"
                } else {
                    "a special file"
                },
            });
        }
        let mode = meta.permissions().mode() & 0o777;
        if tighten && mode & 0o077 != 0 {
            match file.set_permissions(fs::Permissions::from_mode(FILE_MODE)) {
                Ok(()) => warnings.push(format!(
                    "state file {} had mode {mode:04o}; tightened to {FILE_MODE:04o}",
                    path.display()
                )),
                Err(e) => warnings.push(format!(
                    "state file {} has mode {mode:04o} and cannot be tightened: {e}",
                    path.display()
                )),
            }
        }
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| io("cannot read", e))?;
        let file: StateFile =
            serde_json::from_str(&text).map_err(|source| StateError::Corrupt { path, source })?;
        Ok((Some(file.into()), warnings))
    }

    /// Creates the directory (0700) or tightens an existing one that is open to group/other.
    /// Returns a warning when it had to tighten.
    pub fn ensure_dir(&self) -> Result<Option<String>, StateError> {
        let io = |action, source| StateError::Io {
            action,
            path: self.dir.clone(),
            source,
        };
        match fs::metadata(&self.dir) {
            Ok(meta) if meta.is_dir() => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    fs::set_permissions(&self.dir, fs::Permissions::from_mode(DIR_MODE))
                        .map_err(|e| io("cannot tighten permissions of", e))?;
                    return Ok(Some(format!(
                        "state directory {} had mode {mode:04o}; tightened to {DIR_MODE:04o}",
                        self.dir.display()
                    )));
                }
                Ok(None)
            }
            Ok(_) => Err(io(
                "not a directory:",
                std::io::Error::other("a file is in the way of the state directory"),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(DIR_MODE)
                    .create(&self.dir)
                    .map_err(|e| io("cannot create state directory", e))?;
                Ok(None)
            }
            Err(e) => Err(io("cannot access state directory", e)),
        }
    }

    /// Writes the state atomically: a 0600 temp file in the same directory, fsync, rename over
    /// `state.json`, fsync the directory. Creates the directory if it is missing.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        self.ensure_dir()?;
        let path = self.path();
        let io = |action, source| StateError::Io {
            action,
            path: path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(&StateFile::from(state))
            .map_err(|e| io("cannot serialize", std::io::Error::other(e)))?;
        // tempfile creates the file with mode 0600 and O_EXCL.
        let mut tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .suffix(TEMP_SUFFIX)
            .tempfile_in(&self.dir)
            .map_err(|e| io("cannot create temp file for", e))?;
        crate::perms::give_to_dir_owner(tmp.as_file(), &self.dir)
            .map_err(|e| io("cannot hand to the state directory's owner", e))?;
        tmp.write_all(&body)
            .and_then(|()| tmp.write_all(b"\n"))
            .map_err(|e| io("cannot write", e))?;
        tmp.as_file()
            .sync_all()
            .map_err(|e| io("cannot fsync", e))?;
        tmp.persist(&path)
            .map_err(|e| io("cannot rename temp file onto", e.error))?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("cannot fsync directory of", e))?;
        Ok(())
    }

    /// Writes a new registration (from `register` or `import-legacy`) under the lock; with
    /// `keep_old`, an existing state is kept as `state.json.bak` first. Returns the backup.
    pub fn replace(
        &self,
        _held: &StateLock,
        state: &State,
        keep_old: bool,
    ) -> Result<Option<PathBuf>, StateError> {
        let bak = if keep_old { self.backup()? } else { None };
        self.save(state)?;
        Ok(bak)
    }

    /// Keeps the current state file as `state.json.bak` (before `register --force` replaces it).
    pub fn backup(&self) -> Result<Option<PathBuf>, StateError> {
        let path = self.path();
        let bak = self.dir.join(format!("{STATE_FILE}.bak"));
        match fs::rename(&path, &bak) {
            Ok(()) => Ok(Some(bak)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io {
                action: "cannot back up",
                path,
                source,
            }),
        }
    }

    /// Moves an unreadable state file aside (kept for inspection) so a fresh one can be written.
    pub fn quarantine(&self) -> Option<PathBuf> {
        self.move_aside(STATE_FILE, "corrupt")
    }

    /// Moves `name` (a file, or a symlink itself: rename never follows) to
    /// `name.<why>-<unix time>`.
    pub fn move_aside(&self, name: &str, why: &str) -> Option<PathBuf> {
        let stamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let aside = self.dir.join(format!("{name}.{why}-{stamp}"));
        fs::rename(self.dir.join(name), &aside).ok().map(|()| aside)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sample() -> State {
        let mut s = State::new(
            Uuid::nil(),
            "https://api.example/v1",
            Secret::new("tok-1"),
            Some(&Secret::new("boot")),
        );
        s.token_type = Some("Bearer".into());
        s.token_expires_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000));
        s.last_success_at = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000));
        s.consecutive_failures = 3;
        s.last_error = Some("HTTP 500".into());
        s
    }

    #[test]
    fn round_trip_with_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path().join("a/b"));
        assert!(store.load().unwrap().0.is_none());
        let s = sample();
        store.save(&s).unwrap();
        let (back, warnings) = store.load().unwrap();
        assert_eq!(back.unwrap(), s);
        assert!(warnings.is_empty());
        let fmode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        let dmode = fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(fmode, 0o600);
        assert_eq!(dmode, 0o700);
        // No temp files left behind.
        let names: Vec<_> = fs::read_dir(store.dir()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn open_dir_and_file_are_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path().join("s"));
        store.save(&sample()).unwrap();
        fs::set_permissions(store.dir(), fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(store.path(), fs::Permissions::from_mode(0o644)).unwrap();
        let w = store.ensure_dir().unwrap();
        assert!(w.unwrap().contains("tightened"));
        let (_, warnings) = store.load().unwrap();
        assert_eq!(warnings.len(), 1);
        let fmode = fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(fmode, 0o600);
    }

    #[test]
    fn file_in_the_way_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("s");
        fs::write(&p, "x").unwrap();
        let e = StateStore::new(&p).save(&sample()).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
    }

    #[test]
    fn corrupt_file_is_reported_and_quarantined() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        fs::write(store.path(), "{ not json").unwrap();
        assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
        let aside = store.quarantine().unwrap();
        assert!(aside.exists());
        assert!(store.load().unwrap().0.is_none());
    }

    #[test]
    fn stale_temp_files_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        store.save(&sample()).unwrap();
        fs::write(tmp.path().join(".state.json.abc123.tmp"), "half").unwrap();
        fs::write(tmp.path().join("unrelated.tmp"), "keep").unwrap();
        let lock = store.lock().unwrap();
        assert_eq!(lock.remove_stale_temp_files(), 1);
        assert!(store.path().exists());
        assert!(tmp.path().join("unrelated.tmp").exists());
    }

    #[test]
    fn expiry() {
        let mut s = sample();
        let now = SystemTime::now();
        s.token_expires_at = Some(now - Duration::from_secs(1));
        assert!(s.token_expired(now));
        s.token_expires_at = None;
        assert!(!s.token_expired(now));
    }

    #[test]
    fn a_symlink_in_place_of_the_state_file_is_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path().join("s"));
        store.ensure_dir().unwrap();
        // The target is a valid state file outside the directory: it must not be read,
        // chmodded or written through the link.
        let outside = tmp.path().join("outside.json");
        StateStore::new(tmp.path()).save(&sample()).unwrap();
        fs::rename(tmp.path().join(STATE_FILE), &outside).unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).unwrap();
        let before = fs::read(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, store.path()).unwrap();
        let e = store.load().unwrap_err();
        assert!(
            matches!(
                e,
                StateError::NotAFile {
                    what: "a symlink",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("symlink"), "{e}");
        assert_eq!(
            fs::metadata(&outside).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // Saving replaces the link itself, not its target.
        store.save(&sample()).unwrap();
        assert!(
            !fs::symlink_metadata(store.path())
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(fs::read(&outside).unwrap(), before);
        // Moving aside moves the link, not the target.
        std::os::unix::fs::symlink(&outside, store.dir().join("x")).unwrap();
        let aside = store.move_aside("x", "symlink").unwrap();
        assert!(
            fs::symlink_metadata(aside)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(outside.exists());
    }

    #[test]
    fn a_fifo_or_directory_in_place_of_the_state_file_is_refused_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path());
        let st = std::process::Command::new("mkfifo")
            .arg(store.path())
            .status()
            .unwrap();
        assert!(st.success());
        let e = store.load().unwrap_err();
        assert!(
            matches!(
                e,
                StateError::NotAFile {
                    what: "a special file",
                    ..
                }
            ),
            "{e}"
        );
        fs::remove_file(store.path()).unwrap();
        fs::create_dir(store.path()).unwrap();
        let e = store.load().unwrap_err();
        assert!(
            matches!(
                e,
                StateError::NotAFile {
                    what: "a directory",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn one_lock_holder_per_directory_and_it_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path().join("s"));
        let held = store.lock().unwrap();
        let e = StateStore::new(tmp.path().join("s")).lock().unwrap_err();
        match &e {
            LockError::Held { pid, .. } => assert_eq!(*pid, Some(std::process::id())),
            other => panic!("{other}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("systemctl stop exalsius-node-agent"), "{msg}");
        drop(held);
        assert!(store.lock().is_ok());
        let mode = fs::metadata(store.dir().join(LOCK_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_symlinked_lock_file_is_moved_aside_and_its_target_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateStore::new(tmp.path().join("s"));
        store.ensure_dir().unwrap();
        let outside = tmp.path().join("victim");
        fs::write(&outside, "precious").unwrap();
        std::os::unix::fs::symlink(&outside, store.dir().join(LOCK_FILE)).unwrap();
        let _lock = store.lock().unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "precious");
        assert!(
            fs::symlink_metadata(store.dir().join(LOCK_FILE))
                .unwrap()
                .is_file()
        );
    }

    /// The packaged flow: root runs `register` into the directory systemd made for the service
    /// user; the files must belong to that user. Runs only as root (CI is root).
    #[test]
    fn files_root_writes_belong_to_the_directory_owner() {
        use std::os::unix::fs::MetadataExt;
        if !crate::perms::is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), Some(65533)).unwrap();
        let store = StateStore::new(&dir);
        let _lock = store.lock().unwrap();
        store.save(&sample()).unwrap();
        for name in [STATE_FILE, LOCK_FILE] {
            let m = fs::metadata(dir.join(name)).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65533), "{name}");
            assert_eq!(m.permissions().mode() & 0o777, 0o600, "{name}");
        }
        // A root-owned directory keeps root's files root's.
        let rootdir = tmp.path().join("r");
        StateStore::new(&rootdir).save(&sample()).unwrap();
        assert_eq!(fs::metadata(rootdir.join(STATE_FILE)).unwrap().uid(), 0);
    }
}
