//! Where the loop puts the state after every attempt: the daemon and `--once` write it to the
//! state directory ([`Disk`]: `state.json`, or the token reserve when that save fails);
//! `--dry-run` keeps nothing ([`Nothing`]). The loop does not ask which mode it runs in.

use crate::state::{Reserve, State, StateLock, StateStore};
use std::path::Path;
use tracing::{info, warn};

/// Where a save put the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    /// In `state.json`.
    StateFile,
    /// Only in the token reserve: `state.json` could not be saved (`why`).
    Reserve { seq: u64, why: String },
    /// Nowhere (`why`): the newest token lives in memory only.
    Nowhere { why: String },
    /// Not kept, by design (`--dry-run`).
    NotKept,
}

impl Saved {
    /// The `token_persisted` gauge: 2 `state.json`, 1 the reserve, 0 nowhere.
    pub fn level(&self) -> Option<u8> {
        match self {
            Saved::StateFile => Some(2),
            Saved::Reserve { .. } => Some(1),
            Saved::Nowhere { .. } => Some(0),
            Saved::NotKept => None,
        }
    }
}

/// What the loop persists through.
pub trait Persist: Send {
    /// Persists `state` (its token is the one presented next).
    fn save(&mut self, state: &State) -> Saved;
    /// Credentials replaced `previous` (the operator configured another token, another
    /// node): keeps it beside the state — `state.json`'s bytes as they are, or, when
    /// `previous` is newer than `state.json` (a full disk), in the reserve's third slot.
    fn keep_replaced(&mut self, previous: &State);
    /// The state directory, when there is one.
    fn dir(&self) -> Option<&Path>;
}

/// `--dry-run`: no state is kept.
#[derive(Debug, Default)]
pub struct Nothing;

impl Persist for Nothing {
    fn save(&mut self, _state: &State) -> Saved {
        Saved::NotKept
    }

    fn keep_replaced(&mut self, _previous: &State) {}

    fn dir(&self) -> Option<&Path> {
        None
    }
}

/// The state directory, held under its lock for the agent's lifetime.
#[derive(Debug)]
pub struct Disk {
    store: StateStore,
    _lock: StateLock,
    reserve: Option<Reserve>,
    /// What `state.json` holds now (the reserve's base).
    on_disk: Option<State>,
}

impl Disk {
    /// The store under `lock`, with `on_disk` as `state.json` holds it; opens the reserve (a
    /// reserve that cannot be opened is opened again at the first failed save).
    pub fn new(store: StateStore, lock: StateLock, on_disk: Option<State>) -> Self {
        let reserve = open_reserve(&store);
        Self {
            store,
            _lock: lock,
            reserve,
            on_disk,
        }
    }
}

fn open_reserve(store: &StateStore) -> Option<Reserve> {
    match Reserve::open(store.dir()) {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(
                "{e}; without the token reserve a full disk leaves the newest token in memory only"
            );
            None
        }
    }
}

impl Persist for Disk {
    fn save(&mut self, state: &State) -> Saved {
        let why = match self.store.save(state) {
            Ok(()) => {
                self.on_disk = Some(state.clone());
                return Saved::StateFile;
            }
            Err(e) => e.to_string(),
        };
        if self.reserve.is_none() {
            self.reserve = open_reserve(&self.store);
        }
        let Some(reserve) = &mut self.reserve else {
            return Saved::Nowhere { why };
        };
        match reserve.write(state, self.on_disk.as_ref()) {
            Ok(seq) => Saved::Reserve { seq, why },
            Err(e) => Saved::Nowhere {
                why: format!("{why}; {e}"),
            },
        }
    }

    fn keep_replaced(&mut self, previous: &State) {
        let on_disk = self
            .on_disk
            .as_ref()
            .is_some_and(|s| s.access_token == previous.access_token);
        if !on_disk {
            // Only in the reserve or in memory: state.json holds an older token (or none).
            if previous.configured_token_sha256.as_deref()
                == Some(previous.access_token.sha256_hex().as_str())
            {
                // The configured token itself: the operator holds it, and the slot may hold a
                // rotated token only the agent had.
                return;
            }
            match self.reserve.as_mut().map(|r| r.keep_replaced(previous)) {
                Some(Ok(())) => info!(
                    "the previous state (node {}) is kept in the token reserve's third slot (state.json could not be saved since it was issued)",
                    previous.node_id
                ),
                Some(Err(e)) => warn!("{e}; the previous state is lost"),
                None => warn!("no token reserve: the previous state is lost"),
            }
            return;
        }
        // Nanoseconds: two replacements within a second must not share a name (the second copy
        // would take the place of the first).
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or_else(
                |_| "0".to_string(),
                |d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()),
            );
        match self.store.keep_copy(&format!("replaced-{stamp}")) {
            Ok(Some(copy)) => info!(
                "the previous state (node {}) is kept as {}",
                previous.node_id,
                copy.display()
            ),
            Ok(None) => {}
            Err(e) => warn!("{e}; the previous state will be overwritten by the next save"),
        }
    }

    fn dir(&self) -> Option<&Path> {
        Some(self.store.dir())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::secret::Secret;
    use uuid::Uuid;

    #[test]
    fn a_failed_save_goes_to_the_reserve_and_then_nowhere_says_so() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let store = StateStore::new(&dir);
        let lock = store.lock().unwrap();
        let mut disk = Disk::new(store.clone(), lock, None);
        let mut state = State::new(Uuid::nil(), "https://a.example", Secret::new("t1"), None);
        assert_eq!(disk.save(&state), Saved::StateFile);
        assert_eq!(Saved::StateFile.level(), Some(2));
        // state.json cannot be written any more (the directory moved, a file in its place):
        // the reserve, open since the start, takes the newest token.
        std::fs::rename(&dir, tmp.path().join("moved")).unwrap();
        std::fs::write(&dir, "in the way").unwrap();
        state.access_token = Secret::new("t2");
        let saved = disk.save(&state);
        assert!(matches!(saved, Saved::Reserve { seq: 1, .. }), "{saved:?}");
        assert_eq!(saved.level(), Some(1));
        let moved = StateStore::new(tmp.path().join("moved"))
            .peek()
            .unwrap()
            .unwrap();
        assert_eq!(
            moved.access_token.expose(),
            "t2",
            "the reserve is read beside it"
        );
        // The reserve cannot take it either (too large for a slot): nowhere, said so.
        state.description = Some("x".repeat(crate::state::reserve::SLOT_LEN));
        let saved = disk.save(&state);
        assert!(matches!(saved, Saved::Nowhere { .. }), "{saved:?}");
        assert_eq!(saved.level(), Some(0));
        assert_eq!(Nothing.save(&state), Saved::NotKept);
    }
}
