//! The token reserve `{state.dir}/state.reserve`: where the newest token goes when the atomic
//! save of `state.json` fails (a full disk), so that a token is on disk before it is sent.
//!
//! An atomic save needs new blocks (a temp file); a full file system has none. The reserve is
//! preallocated at start and then only overwritten in place (`pwrite` + `fdatasync`), which
//! needs no new blocks on ext4, xfs and tmpfs, and on btrfs only with the no-CoW attribute,
//! set on the empty file ([`Reserve::open`]; docs/benchmarks.md has the measurements).
//!
//! Two slots of [`SLOT_LEN`] bytes, each `magic | sequence | length | SHA-256 | payload`, and
//! a third where a state the operator's change replaced is kept while it cannot be kept as a
//! file ([`Reserve::keep_replaced`]). A write goes to the slot the newest one is not in, so a write torn by a crash leaves the
//! other slot intact (its checksum tells which one is whole). The payload is the state, plus
//! the SHA-256 of the token `state.json` held when it was written (its *base*): the reserve is
//! newer than `state.json` only while `state.json` still holds that token — a later successful
//! save (by this or an older version of the agent) makes it stale without touching it.

use super::{FILE_MODE, State, StateFile};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// File name inside the state directory.
pub const RESERVE_FILE: &str = "state.reserve";
/// One slot: room for the longest token the agent accepts (16 KiB) and the state around it.
pub const SLOT_LEN: usize = 20 * 1024;
/// The whole file: two slots for the newest state, one for a replaced one.
pub const RESERVE_LEN: u64 = 3 * SLOT_LEN as u64;
/// Where the replaced state is kept.
const REPLACED_AT: u64 = 2 * SLOT_LEN as u64;
const MAGIC: &[u8; 8] = b"XNAGRSV1";
/// magic (8) + sequence (8) + length (4) + SHA-256 (32).
const HEADER_LEN: usize = 8 + 8 + 4 + 32;

/// A reserve problem, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// Opening, preallocating, writing or syncing failed.
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Something that is not a regular file is where the reserve belongs.
    #[error("{path} is not a regular file; the token reserve is not used")]
    NotAFile { path: PathBuf },
    /// The state does not fit in a slot.
    #[error("the state ({len} bytes) does not fit in a slot of {path} ({SLOT_LEN} bytes)")]
    TooLarge { path: PathBuf, len: usize },
}

/// What one slot holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Payload {
    /// SHA-256 of the token in `state.json` when this was written; `None`: no `state.json`.
    base: Option<String>,
    state: StateFile,
}

/// The newest whole entry of a reserve.
#[derive(Debug, Clone)]
pub struct ReserveEntry {
    /// Its sequence number (one more per write).
    pub seq: u64,
    /// SHA-256 of the token `state.json` held when it was written.
    pub base: Option<String>,
    /// The state it holds.
    pub state: State,
}

impl ReserveEntry {
    /// Whether this entry is newer than a `state.json` holding `on_disk` (`None`: no file).
    pub fn supersedes(&self, on_disk: Option<&State>) -> bool {
        self.base == on_disk.map(|s| s.access_token.sha256_hex())
    }
}

/// The open reserve of a running agent (under the state lock).
#[derive(Debug)]
pub struct Reserve {
    file: File,
    path: PathBuf,
    /// The sequence number of the newest slot written.
    seq: u64,
}

impl Reserve {
    /// Opens (creating) the reserve in `dir`: 0600, never through a symlink, handed to the
    /// directory's owner like `state.json`; on an empty file the no-CoW attribute is set first
    /// (ignored where the file system has none), then the two slots are allocated by writing
    /// them, and the file is rewritten in place once — the write check: a reserve that cannot
    /// be overwritten now will not be when the disk is full.
    pub fn open(dir: &Path) -> Result<Self, ReserveError> {
        let path = dir.join(RESERVE_FILE);
        let io_err = |action, source| ReserveError::Io {
            action,
            path: path.clone(),
            source,
        };
        let file = crate::perms::open_rw_nofollow(&path, FILE_MODE).map_err(|e| {
            if crate::perms::is_symlink_error(&e) {
                ReserveError::NotAFile { path: path.clone() }
            } else {
                io_err("cannot open", e)
            }
        })?;
        let meta = file.metadata().map_err(|e| io_err("cannot open", e))?;
        if !meta.is_file() {
            return Err(ReserveError::NotAFile { path });
        }
        crate::perms::give_to_dir_owner(&file, dir)
            .map_err(|e| io_err("cannot hand to the state directory's owner", e))?;
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
                .map_err(|e| io_err("cannot tighten permissions of", e))?;
        }
        if meta.len() == 0 {
            set_nocow(&file);
        }
        let mut bytes = vec![0u8; RESERVE_LEN as usize];
        let have = read_up_to(&file, &mut bytes).map_err(|e| io_err("cannot read", e))?;
        if have < bytes.len() {
            // A new (or short) file: the zeros after what is there allocate the slots.
            bytes[have..].fill(0);
        }
        // The write check, which also allocates a new file's blocks.
        file.write_all_at(&bytes, 0)
            .and_then(|()| file.sync_all())
            .map_err(|e| io_err("cannot write (the write check at start)", e))?;
        let seq = newest(&bytes).map_or(0, |(seq, _)| seq);
        Ok(Self { file, path, seq })
    }

    /// The path of the reserve.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `state` in place into the older slot, then `fdatasync`. `base` is the state
    /// `state.json` holds now (`None`: there is none).
    pub fn write(&mut self, state: &State, base: Option<&State>) -> Result<u64, ReserveError> {
        let seq = self.seq + 1;
        self.write_slot(state, base, seq, (seq % 2) * SLOT_LEN as u64)?;
        self.seq = seq;
        Ok(seq)
    }

    /// Keeps `state`, which the operator's change replaces and which is newer than any file
    /// (it lived in the reserve or in memory), in the third slot ([`read_replaced`]).
    pub fn keep_replaced(&mut self, state: &State) -> Result<(), ReserveError> {
        self.write_slot(state, None, self.seq, REPLACED_AT)
    }

    fn write_slot(
        &mut self,
        state: &State,
        base: Option<&State>,
        seq: u64,
        offset: u64,
    ) -> Result<(), ReserveError> {
        let payload = Payload {
            base: base.map(|s| s.access_token.sha256_hex()),
            state: StateFile::from(state),
        };
        let body = serde_json::to_vec(&payload).map_err(|e| ReserveError::Io {
            action: "cannot serialize for",
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        if body.len() > SLOT_LEN - HEADER_LEN {
            return Err(ReserveError::TooLarge {
                path: self.path.clone(),
                len: body.len(),
            });
        }
        let mut slot = vec![0u8; SLOT_LEN];
        slot[..8].copy_from_slice(MAGIC);
        slot[8..16].copy_from_slice(&seq.to_le_bytes());
        // Fits: checked against SLOT_LEN above.
        slot[16..20].copy_from_slice(&(body.len() as u32).to_le_bytes());
        slot[20..52].copy_from_slice(&Sha256::digest(&body));
        slot[HEADER_LEN..HEADER_LEN + body.len()].copy_from_slice(&body);
        self.file
            .write_all_at(&slot, offset)
            .and_then(|()| self.file.sync_data())
            .map_err(|source| ReserveError::Io {
                action: "cannot write in place",
                path: self.path.clone(),
                source,
            })
    }
}

/// Reads the newest whole entry of the reserve in `dir`; `Ok(None)` when there is no reserve
/// or no whole entry in it. Never follows a symlink and never blocks on a FIFO.
pub fn read(dir: &Path) -> Result<Option<ReserveEntry>, ReserveError> {
    let bytes = read_bytes(dir)?;
    Ok(newest(&bytes[..bytes.len().min(REPLACED_AT as usize)]).and_then(entry))
}

/// Reads the state kept by [`Reserve::keep_replaced`], if any.
pub fn read_replaced(dir: &Path) -> Result<Option<State>, ReserveError> {
    let bytes = read_bytes(dir)?;
    Ok(bytes
        .get(REPLACED_AT as usize..)
        .and_then(slot)
        .and_then(entry)
        .map(|e| e.state))
}

fn entry((seq, payload): (u64, &[u8])) -> Option<ReserveEntry> {
    let p: Payload = serde_json::from_slice(payload).ok()?;
    Some(ReserveEntry {
        seq,
        base: p.base,
        state: p.state.into(),
    })
}

fn read_bytes(dir: &Path) -> Result<Vec<u8>, ReserveError> {
    let path = dir.join(RESERVE_FILE);
    let file = match crate::perms::open_read_nofollow(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if crate::perms::is_symlink_error(&e) => {
            return Err(ReserveError::NotAFile { path });
        }
        Err(source) => {
            return Err(ReserveError::Io {
                action: "cannot read",
                path,
                source,
            });
        }
    };
    let io_err = |source| ReserveError::Io {
        action: "cannot read",
        path: path.clone(),
        source,
    };
    if !file.metadata().map_err(io_err)?.is_file() {
        return Err(ReserveError::NotAFile { path });
    }
    let mut bytes = vec![0u8; RESERVE_LEN as usize];
    let have = read_up_to(&file, &mut bytes).map_err(io_err)?;
    bytes.truncate(have);
    Ok(bytes)
}

/// The newest slot whose checksum holds: its sequence number and payload.
fn newest(bytes: &[u8]) -> Option<(u64, &[u8])> {
    bytes
        .chunks(SLOT_LEN)
        .filter_map(slot)
        .max_by_key(|(seq, _)| *seq)
}

fn slot(s: &[u8]) -> Option<(u64, &[u8])> {
    if s.len() < HEADER_LEN || &s[..8] != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(s[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(s[16..20].try_into().ok()?) as usize;
    let payload = s.get(HEADER_LEN..HEADER_LEN.checked_add(len)?)?;
    (Sha256::digest(payload).as_slice() == &s[20..52]).then_some((seq, payload))
}

fn read_up_to(file: &File, buf: &mut [u8]) -> io::Result<usize> {
    let mut have = 0;
    while have < buf.len() {
        match file.read_at(&mut buf[have..], have as u64) {
            Ok(0) => break,
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(have)
}

/// `chattr +C`: on a copy-on-write file system (btrfs) an in-place overwrite needs new blocks
/// unless the file is no-CoW, which can be set only while it is empty. File systems without
/// the flag refuse it (ENOTTY, EOPNOTSUPP, EINVAL): nothing to do there.
fn set_nocow(file: &File) {
    use rustix::fs::{IFlags, ioctl_getflags, ioctl_setflags};
    if let Ok(flags) = ioctl_getflags(file)
        && !flags.contains(IFlags::NOCOW)
        && let Err(e) = ioctl_setflags(file, flags | IFlags::NOCOW)
    {
        tracing::debug!("no-CoW attribute not set on the token reserve: {e}");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::secret::Secret;
    use uuid::Uuid;

    fn state(token: &str) -> State {
        State::new(Uuid::nil(), "https://a.example", Secret::new(token), None)
    }

    #[test]
    fn newest_whole_slot_wins_and_a_torn_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap().is_none());
        let mut r = Reserve::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::metadata(r.path()).unwrap().len(),
            RESERVE_LEN,
            "preallocated"
        );
        assert!(read(dir.path()).unwrap().is_none(), "zeros hold no entry");
        let base = state("t0");
        r.write(&state("t1"), Some(&base)).unwrap();
        r.write(&state("t2"), Some(&base)).unwrap();
        let e = read(dir.path()).unwrap().unwrap();
        assert_eq!((e.seq, e.state.access_token.expose()), (2, "t2"));
        assert!(e.supersedes(Some(&base)));
        assert!(!e.supersedes(Some(&state("t2"))), "state.json saved since");
        assert!(!e.supersedes(None));
        // A torn write of slot 2 (seq 2 lives at offset 0): slot 1 is whole and wins.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(r.path())
            .unwrap();
        f.write_all_at(b"garbage", 100).unwrap();
        let e = read(dir.path()).unwrap().unwrap();
        assert_eq!((e.seq, e.state.access_token.expose()), (1, "t1"));
        // Reopened, it goes on from the newest sequence and keeps the whole slot.
        let mut r = Reserve::open(dir.path()).unwrap();
        assert_eq!(read(dir.path()).unwrap().unwrap().seq, 1);
        r.write(&state("t3"), None).unwrap();
        let e = read(dir.path()).unwrap().unwrap();
        assert_eq!((e.seq, e.state.access_token.expose()), (2, "t3"));
        assert!(e.supersedes(None));
        // A replaced state has its own slot: the newest is not disturbed.
        assert!(read_replaced(dir.path()).unwrap().is_none());
        r.keep_replaced(&state("t-old")).unwrap();
        r.write(&state("t4"), None).unwrap();
        assert_eq!(
            read_replaced(dir.path())
                .unwrap()
                .unwrap()
                .access_token
                .expose(),
            "t-old"
        );
        assert_eq!(
            read(dir.path())
                .unwrap()
                .unwrap()
                .state
                .access_token
                .expose(),
            "t4"
        );
    }

    #[test]
    fn the_store_reads_the_reserve_while_it_is_newer_than_state_json() {
        use crate::state::StateStore;
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        let mut saved = state("t1");
        saved.consecutive_failures = 0;
        store.save(&saved).unwrap();
        let mut r = Reserve::open(dir.path()).unwrap();
        // state.json cannot be saved: t2 goes to the reserve, with the attempts since.
        let mut newer = state("t2");
        newer.consecutive_failures = 3;
        newer.last_error = Some("HTTP 503".into());
        r.write(&newer, Some(&saved)).unwrap();
        let loaded = store.peek_parts().unwrap();
        let got = loaded.state.unwrap();
        assert_eq!(got.access_token.expose(), "t2");
        assert_eq!(got.consecutive_failures, 3, "status tells the truth");
        assert_eq!(loaded.on_disk.unwrap().access_token.expose(), "t1");
        assert_eq!(loaded.reserve_seq, Some(1));
        assert!(loaded.warnings.iter().any(|w| w.contains("state.reserve")));
        assert_eq!(store.load().unwrap().0.unwrap().access_token.expose(), "t2");
        // state.json saved again (with t2 or anything newer): the reserve is stale.
        store.save(&state("t3")).unwrap();
        let loaded = store.peek_parts().unwrap();
        assert_eq!(loaded.state.unwrap().access_token.expose(), "t3");
        assert_eq!(loaded.reserve_seq, None);
    }

    /// bench/reserve-full-disk.sh: on the (empty) file system at `EXALSIUS_RESERVE_BENCH_DIR`,
    /// opens the reserve, fills the file system, then overwrites the reserve 200 times and
    /// prints how many writes worked (and the median time of one).
    #[test]
    #[ignore = "run by bench/reserve-full-disk.sh on a loop-mounted file system"]
    fn bench_overwrites_on_a_full_file_system() {
        use std::io::Write;
        let Some(dir) = std::env::var_os("EXALSIUS_RESERVE_BENCH_DIR") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let mut r = Reserve::open(&dir).unwrap();
        let mut filler = std::fs::File::create(dir.join("filler")).unwrap();
        let chunk = vec![1u8; 64 * 1024];
        while filler.write_all(&chunk).is_ok() {}
        let small = [1u8; 512];
        while filler.write_all(&small).is_ok() {}
        while filler.write_all(&small[..1]).is_ok() {}
        let _ = filler.sync_all();
        let full = std::fs::write(dir.join("probe"), b"x")
            .and_then(|()| std::fs::File::open(dir.join("probe")).and_then(|f| f.sync_all()));
        let (mut ok, mut first_error, mut took) = (0, None, Vec::new());
        for i in 0..200 {
            let t = format!("token-{i}-{}", "x".repeat(i % 64));
            let start = std::time::Instant::now();
            match r.write(&state(&t), None) {
                Ok(_) => {
                    ok += 1;
                    took.push(start.elapsed());
                }
                Err(e) => {
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        took.sort();
        let last = read(&dir)
            .ok()
            .flatten()
            .map(|e| e.state.access_token.expose().to_string());
        println!(
            "RESULT ok={ok}/200 full={} median_us={} last_read_back={last:?} first_error={first_error:?}",
            full.is_err(),
            took.get(took.len() / 2).map_or(0, |d| d.as_micros())
        );
    }

    #[test]
    fn mode_and_symlinks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let r = Reserve::open(dir.path()).unwrap();
        let mode = std::fs::metadata(r.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_file(r.path()).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join(RESERVE_FILE)).unwrap();
        assert!(matches!(
            Reserve::open(dir.path()),
            Err(ReserveError::NotAFile { .. })
        ));
        assert!(matches!(
            read(dir.path()),
            Err(ReserveError::NotAFile { .. })
        ));
    }

    #[test]
    fn a_state_too_large_for_a_slot_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Reserve::open(dir.path()).unwrap();
        let mut s = state("t");
        s.description = Some("x".repeat(SLOT_LEN));
        assert!(matches!(
            r.write(&s, None),
            Err(ReserveError::TooLarge { .. })
        ));
    }
}
