//! What the loop resumes from at start-up: what is read (`state.json`, and the token reserve
//! beside it when it is newer), what is moved aside, and what stops the agent rather than lose
//! a token (the rule is in ARCHITECTURE.md, "The rule for the stored token"). A state that
//! credentials replace is kept by the sink (`persist.rs`).

use super::*;

/// Reads the state file (under the lock). A file that is not valid state, or a symlink or
/// special file in its place, is moved aside with its bytes intact (kept for inspection) and
/// the agent starts fresh. A state file that cannot be read as it is (permission denied, an
/// I/O error) may hold the only token the API still accepts: it is neither replaced nor moved,
/// and `run` stops with exit 1 naming the file and the fix (systemd retries).
///
/// Returns the state to resume from (the token reserve's when it is newer) and what
/// `state.json` itself holds.
pub(super) fn load(store: &StateStore) -> Result<(Option<State>, Option<State>), RunError> {
    match store.load_parts() {
        Ok(loaded) => {
            for w in loaded.warnings {
                warn!("{w}");
            }
            Ok((loaded.state, loaded.on_disk))
        }
        Err(e @ crate::state::StateError::Corrupt { .. }) => {
            let aside = store.quarantine();
            error!("{e}; moved aside to {}; starting fresh", shown(aside));
            Ok((None, None))
        }
        Err(e @ crate::state::StateError::NotAFile { .. }) => {
            let aside = store.move_aside(crate::state::STATE_FILE, "notafile");
            error!("{e}; moved aside to {}; starting fresh", shown(aside));
            Ok((None, None))
        }
        Err(e) => Err(RunError::State(unreadable_state_message(store, &e))),
    }
}

/// What to do about a state file that cannot be read: it is kept, and the message says how
/// to give it back to the user the agent runs as.
fn unreadable_state_message(store: &StateStore, e: &crate::state::StateError) -> String {
    use std::os::unix::fs::MetadataExt;
    let path = store.path();
    let me = crate::perms::current_uid().unwrap_or(u32::MAX);
    let owner = std::fs::symlink_metadata(&path).map(|m| (m.uid(), m.mode() & 0o7777));
    let fix = match owner {
        Ok((uid, mode)) if uid != me => format!(
            "it belongs to uid {uid} (mode {mode:04o}), this agent runs as uid {me}: chown {me}: {} (for the packaged service: chown exalsius-agent: {0}; chmod 600 {0})",
            path.display()
        ),
        Ok((_, mode)) => format!("mode {mode:04o}: chmod 600 {}", path.display()),
        Err(_) => "check the file system".to_string(),
    };
    format!(
        "{e}: it may hold the node's only valid token, so it is kept as it is and the agent does not start; {fix}"
    )
}

fn shown(p: Option<std::path::PathBuf>) -> String {
    p.map_or_else(
        || "(could not move)".to_string(),
        |p| p.display().to_string(),
    )
}
