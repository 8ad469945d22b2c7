//! The state directory and file (owner, mode, contents) and who holds the state lock, read
//! from `/proc/locks` without taking it.

use super::unit::{ServiceUser, owner_name};
use super::{Check, Status};
use crate::state::{STATE_FILE, StateStore};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn unreadable(what: &'static str, path: &Path, e: &std::io::Error) -> Check {
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        Check::fail(
            what,
            format!("cannot look at {}: permission denied", path.display()),
            "run doctor as root: sudo exalsius-node-agent doctor",
        )
    } else {
        Check::fail(
            what,
            format!("cannot read {}: {e}", path.display()),
            "check the path (state.dir)",
        )
    }
}

/// Directory and file: present, owned by the service user, closed to others.
pub fn state_checks(dir: &Path, user: &ServiceUser) -> Vec<Check> {
    let start_hint = "register this node (exalsius-node-agent register …) or set api.node_id and api.access_token, then: systemctl enable --now exalsius-node-agent";
    let meta = match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => m,
        Ok(_) => {
            return vec![Check::fail(
                "state directory",
                format!("{} is not a directory", dir.display()),
                "move it away; the agent creates the directory",
            )];
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return vec![Check::fail(
                "state directory",
                format!(
                    "{} does not exist: no agent has run or registered here",
                    dir.display()
                ),
                start_hint,
            )];
        }
        Err(e) => return vec![unreadable("state directory", dir, &e)],
    };
    let mut out = vec![owned_and_closed("state directory", dir, &meta, user, 0o700)];
    let file = dir.join(STATE_FILE);
    out.push(match std::fs::symlink_metadata(&file) {
        Ok(m) if m.file_type().is_symlink() => Check::fail(
            "state file",
            format!("{} is a symlink; the agent does not follow it", file.display()),
            "remove the symlink; the agent writes a real file",
        ),
        Ok(m) => match StateStore::new(dir).peek() {
            Ok(Some(s)) => {
                let c = owned_and_closed("state file", &file, &m, user, 0o600);
                if c.status == Status::Ok {
                    Check::ok("state file", format!("{}; node {}", c.finding, s.node_id))
                } else {
                    c
                }
            }
            Ok(None) => Check::fail("state file", format!("{} vanished", file.display()), start_hint),
            Err(e) => Check::fail(
                "state file",
                e.to_string(),
                "the agent moves an unreadable state aside and starts from the configured token at its next start",
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::fail(
            "state file",
            format!("{} does not exist: no heartbeat or registration yet", file.display()),
            start_hint,
        ),
        Err(e) => unreadable("state file", &file, &e),
    });
    if let Some(c) = reserve_check(dir, user) {
        out.push(c);
    }
    out
}

/// The token reserve (`state.reserve`): owned and closed like the state file, and an alarm
/// while it holds a newer token than `state.json` (the state could not be saved since).
fn reserve_check(dir: &Path, user: &ServiceUser) -> Option<Check> {
    let path = dir.join(crate::state::RESERVE_FILE);
    let meta = std::fs::symlink_metadata(&path).ok()?;
    if !meta.is_file() {
        return Some(Check::fail(
            "token reserve",
            format!(
                "{} is not a regular file; the agent does not use it",
                path.display()
            ),
            "remove it; the agent creates the reserve at its next start",
        ));
    }
    let c = owned_and_closed("token reserve", &path, &meta, user, 0o600);
    if c.status != Status::Ok {
        return Some(c);
    }
    Some(match StateStore::new(dir).peek_parts() {
        Ok(l) if l.reserve_seq.is_some() => Check::warn(
            "token reserve",
            format!(
                "{} holds a newer token than state.json: state.json could not be saved since it was issued",
                path.display()
            ),
            "free space on the state disk (the agent saves state.json again at its next heartbeat); do not delete state.reserve",
        ),
        _ => Check::ok("token reserve", c.finding),
    })
}

fn owned_and_closed(
    what: &'static str,
    path: &Path,
    meta: &std::fs::Metadata,
    user: &ServiceUser,
    want: u32,
) -> Check {
    let mode = meta.mode() & 0o7777;
    let owner = owner_name(meta.uid());
    if let Some(uid) = user.uid
        && uid != meta.uid()
    {
        let fix = if what == "state directory" {
            format!(
                "chown -R {0}: {1} (systemd does this itself at the next start: systemctl restart exalsius-node-agent)",
                user.name,
                path.display()
            )
        } else {
            format!("chown {}: {}", user.name, path.display())
        };
        return Check::fail(
            what,
            format!(
                "{} is owned by {owner}, but the service runs as {}",
                path.display(),
                user.name
            ),
            &fix,
        );
    }
    if mode & 0o077 != 0 {
        return Check::fail(
            what,
            format!(
                "{} has mode {mode:04o}: open to other users (the token!)",
                path.display()
            ),
            &format!("chmod {want:o} {}", path.display()),
        );
    }
    if mode & 0o200 == 0 {
        return Check::fail(
            what,
            format!(
                "{} has mode {mode:04o}: its owner cannot write it",
                path.display()
            ),
            &format!("chmod {want:o} {}", path.display()),
        );
    }
    Check::ok(
        what,
        format!("{}: {owner}, mode {mode:04o}", path.display()),
    )
}

/// The pid holding an flock on the file with inode `ino`, from `/proc/locks` (never taking it).
pub fn lock_holder(proc_locks: &str, ino: u64) -> Option<u32> {
    proc_locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" after the index.
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let id = fields.get(5)?;
        let file_ino: u64 = id.rsplit(':').next()?.parse().ok()?;
        (file_ino == ino).then(|| fields.get(4)?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_holders_from_proc_locks() {
        let text = "1: POSIX  ADVISORY  WRITE 77 00:1b:999 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 4343 fd:01:1234567 0 EOF\n";
        assert_eq!(lock_holder(text, 1_234_567), Some(4242));
        assert_eq!(lock_holder(text, 999), None, "POSIX locks are not ours");
        assert_eq!(lock_holder(text, 5), None);
    }
}
