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
pub mod reserve;

pub use lock::{LockError, StateLock};
pub use reserve::{RESERVE_FILE, Reserve, ReserveEntry, ReserveError, read_replaced};

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

/// The state file's format, written as `"format"`. A file without it is format 1 too (written
/// before the field existed). A newer agent may write a higher number and fields this version
/// does not know: this version reads what it knows, keeps every other field as it found it,
/// never writes a lower number — a rollback must not lose what the newer version stored.
pub const STATE_FORMAT: u32 = 1;

/// Fields of a newer format that this version does not know, kept as they were (their values
/// are never shown: they may be credentials).
#[derive(Clone, Default, PartialEq)]
pub struct Unknown(pub serde_json::Map<String, serde_json::Value>);

impl std::fmt::Debug for Unknown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&String> = self.0.keys().collect();
        write!(f, "Unknown({keys:?})")
    }
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
    /// SHA-256 of the configured token this state descends from; `None` for a node
    /// that was registered with `register` (no configured token).
    pub configured_token_sha256: Option<String>,
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
    /// The format the file was written in ([`STATE_FORMAT`] for a new state).
    pub format: u32,
    /// Fields of a newer format, written back as they were.
    pub unknown: Unknown,
}

impl State {
    /// A fresh state for a node and token.
    pub fn new(node_id: Uuid, api_url: &str, token: Secret, configured: Option<&Secret>) -> Self {
        Self {
            node_id,
            api_url: api_url.to_string(),
            access_token: token,
            token_type: None,
            token_expires_at: None,
            configured_token_sha256: configured.map(Secret::sha256_hex),
            last_attempt_at: None,
            last_success_at: None,
            consecutive_failures: 0,
            last_error: None,
            description: None,
            format: STATE_FORMAT,
            unknown: Unknown::default(),
        }
    }

    /// True when a newer agent wrote this state (a rollback): its fields this version does not
    /// know are kept as they are.
    pub fn from_newer_version(&self) -> bool {
        self.format > STATE_FORMAT
    }

    /// True when the token has a known expiry at or before `now`.
    pub fn token_expired(&self, now: SystemTime) -> bool {
        self.token_expires_at.is_some_and(|t| t <= now)
    }
}

/// On-disk form: plain strings, RFC 3339 timestamps.
#[derive(Serialize, Deserialize)]
pub(crate) struct StateFile {
    node_id: Uuid,
    api_url: String,
    access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_expires_at: Option<String>,
    /// Named so on disk since format 1 (the code says "configured token" everywhere else).
    #[serde(
        default,
        rename = "bootstrap_token_sha256",
        skip_serializing_if = "Option::is_none"
    )]
    configured_token_sha256: Option<String>,
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
    #[serde(default = "first_format")]
    format: u32,
    /// Every field this version does not know (a newer format's), kept.
    #[serde(flatten)]
    unknown: serde_json::Map<String, serde_json::Value>,
}

fn first_format() -> u32 {
    1
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
            configured_token_sha256: s.configured_token_sha256.clone(),
            last_attempt_at: s.last_attempt_at.map(rfc3339),
            last_success_at: s.last_success_at.map(rfc3339),
            consecutive_failures: s.consecutive_failures,
            last_error: s.last_error.clone(),
            description: s.description.clone(),
            // Never lower than what was read: a rollback keeps the newer shape.
            format: s.format.max(STATE_FORMAT),
            unknown: s.unknown.0.clone(),
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
            configured_token_sha256: f.configured_token_sha256,
            last_attempt_at: parse_time(&f.last_attempt_at),
            last_success_at: parse_time(&f.last_success_at),
            consecutive_failures: f.consecutive_failures,
            // Read back from a file anyone with root may have edited: one line, as written.
            last_error: f.last_error.map(|e| crate::text::one_line(&e, 1000)),
            description: f.description,
            format: f.format,
            unknown: Unknown(f.unknown),
        }
    }
}

/// What a read of the state directory found.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The newest state: the reserve's when it is newer than `state.json`.
    pub state: Option<State>,
    /// What `state.json` itself holds.
    pub on_disk: Option<State>,
    /// The reserve's entry, when it is newer than `state.json`.
    pub reserve_seq: Option<u64>,
    /// What the caller should log.
    pub warnings: Vec<String>,
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
    ///
    /// The token reserve ([`reserve`]) is read beside it: while it holds a state newer than
    /// `state.json` (a save failed since), that state is the one returned — its token is the
    /// one the agent presents next.
    pub fn load(&self) -> Result<(Option<State>, Vec<String>), StateError> {
        self.load_parts().map(|l| (l.state, l.warnings))
    }

    /// [`StateStore::load`], with what `state.json` itself holds and whether the reserve was
    /// newer.
    pub fn load_parts(&self) -> Result<Loaded, StateError> {
        self.read(true)
    }

    /// Reads the state (the reserve's when it is newer) and changes nothing, not even a mode
    /// that is too open (`status`, `doctor`).
    pub fn peek(&self) -> Result<Option<State>, StateError> {
        self.read(false).map(|l| l.state)
    }

    /// [`StateStore::peek`], with the parts (`status`, `doctor`).
    pub fn peek_parts(&self) -> Result<Loaded, StateError> {
        self.read(false)
    }

    fn read(&self, tighten: bool) -> Result<Loaded, StateError> {
        let (on_disk, mut warnings) = self.read_file(tighten)?;
        let entry = match reserve::read(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                warnings.push(format!("{e}"));
                None
            }
        };
        let newer = entry.filter(|e| e.supersedes(on_disk.as_ref()));
        let state = match &newer {
            Some(e) => {
                warnings.push(format!(
                    "{} could not be saved since the last token was issued: the newest token is in {} (entry {}) and is the one used",
                    self.path().display(),
                    self.dir.join(RESERVE_FILE).display(),
                    e.seq
                ));
                Some(e.state.clone())
            }
            None => on_disk.clone(),
        };
        Ok(Loaded {
            state,
            reserve_seq: newer.map(|e| e.seq),
            on_disk,
            warnings,
        })
    }

    fn read_file(&self, tighten: bool) -> Result<(Option<State>, Vec<String>), StateError> {
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
        // Only a file of ours is changed (another user's is read as it is).
        let open = tighten && mode & 0o077 != 0;
        if open && crate::perms::current_uid() == Some(std::os::unix::fs::MetadataExt::uid(&meta)) {
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
            serde_json::from_str(&text).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
            })?;
        let state: State = file.into();
        if state.from_newer_version() {
            warnings.push(format!(
                "state file {} has format {}, newer than this version's {STATE_FORMAT} (written by a newer exalsius-node-agent): its token is used, and the {} field(s) this version does not know are kept as they are",
                path.display(),
                state.format,
                state.unknown.0.len()
            ));
        }
        Ok((Some(state), warnings))
    }

    /// Creates the directory (0700) or tightens an existing one of ours that is open to
    /// group/other. A directory another user owns is never changed: used as it is (with a
    /// warning) when others can only read it — the state file itself is 0600 — and refused
    /// when others can write to it (they could put their own state file there). Returns a
    /// warning when it tightened or left an open directory as it is.
    pub fn ensure_dir(&self) -> Result<Option<String>, StateError> {
        use std::os::unix::fs::MetadataExt;
        let io = |action, source| StateError::Io {
            action,
            path: self.dir.clone(),
            source,
        };
        match fs::metadata(&self.dir) {
            Ok(meta) if meta.is_dir() => {
                let mode = meta.permissions().mode() & 0o777;
                // Whose it is matters only when it is open (save runs this every heartbeat:
                // no extra system call on the usual path).
                let ours = mode & 0o077 == 0 || crate::perms::current_uid() == Some(meta.uid());
                if !ours && mode & 0o022 != 0 {
                    return Err(io(
                        "refusing to use",
                        std::io::Error::other(format!(
                            "it belongs to uid {} and has mode {mode:04o}: others can write to it; give it to the user the agent runs as (chown) or chmod 700 it",
                            meta.uid()
                        )),
                    ));
                }
                if !ours && mode & 0o077 != 0 {
                    return Ok(Some(format!(
                        "state directory {} has mode {mode:04o} and belongs to uid {}; used as it is (the state file itself is 0600)",
                        self.dir.display(),
                        meta.uid()
                    )));
                }
                let full = meta.permissions().mode() & 0o7777;
                if crate::config::is_shared_dir_mode(full) {
                    // `/tmp` is root's, yet never the agent's to make private.
                    return Err(io(
                        "refusing to use",
                        std::io::Error::other(format!(
                            "it is a shared directory (mode {full:04o}, like /tmp): its mode is not the agent's to change; name a directory of its own as state.dir"
                        )),
                    ));
                }
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
    /// A copy (a hard link): `state.json` stays in place until the new state replaces it
    /// atomically, so a failed write (a full disk) leaves the node's token where it was.
    pub fn backup(&self) -> Result<Option<PathBuf>, StateError> {
        self.keep_copy("bak")
    }

    /// Keeps the current state file's bytes as `state.json.<suffix>` (a hard link, swapped in
    /// atomically over an older copy of that name); `state.json` itself is not touched.
    /// `Ok(None)` when there is no state file.
    pub fn keep_copy(&self, suffix: &str) -> Result<Option<PathBuf>, StateError> {
        let path = self.path();
        let copy = self.dir.join(format!("{STATE_FILE}.{suffix}"));
        let staging = self.dir.join(format!(
            "{TEMP_PREFIX}{suffix}-{}{TEMP_SUFFIX}",
            std::process::id()
        ));
        let _ = fs::remove_file(&staging);
        match fs::hard_link(&path, &staging) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Io {
                    action: "cannot keep a copy of",
                    path,
                    source,
                });
            }
        }
        fs::rename(&staging, &copy).map_err(|source| {
            let _ = fs::remove_file(&staging);
            StateError::Io {
                action: "cannot keep a copy of",
                path: path.clone(),
                source,
            }
        })?;
        Ok(Some(copy))
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
mod tests;
