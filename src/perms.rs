//! File ownership and permission helpers shared by the config and the state file: who we run
//! as, opening without following symlinks, and handing files root creates in the service
//! user's directory to that user.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// True when this process runs as root (the owner of `/proc/self` is the effective user).
pub fn is_root() -> bool {
    current_uid() == Some(0)
}

/// The effective uid: `/proc/self` belongs to it (no `unsafe` getuid needed). `None` without
/// `/proc`.
pub fn current_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Opens `path` for reading without following a symlink in its last component and without
/// blocking on a FIFO; `Err` with `ELOOP` for a symlink. The caller checks the file type
/// on the descriptor.
pub fn open_read_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Opens (creating with `mode`) `path` for reading and writing, never through a symlink.
pub fn open_rw_nofollow(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// True when an open error means "a symlink is in the way" (`O_NOFOLLOW`).
pub fn is_symlink_error(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

/// When root creates a file in a directory that belongs to another user (the packaged
/// service's `exalsius-agent`), gives the file to that user, on the open descriptor, so the
/// service can read and replace it. Does nothing for other users or root-owned directories.
pub fn give_to_dir_owner(file: &File, dir: &Path) -> io::Result<()> {
    if !is_root() {
        return Ok(());
    }
    let dir_meta = std::fs::metadata(dir)?;
    let file_meta = file.metadata()?;
    if dir_meta.uid() == 0 || (file_meta.uid(), file_meta.gid()) == (dir_meta.uid(), dir_meta.gid())
    {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, Some(dir_meta.uid()), Some(dir_meta.gid()))
}

/// Why a file holding a secret is too open, if it is: readable by others, or by a group that is
/// not the agent's own (the package installs the config `0640 root:exalsius-agent`, which is
/// fine).
pub fn secret_file_exposure(path: &Path) -> Option<String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o004 != 0 {
        return Some(format!(
            "{} is readable by every user (mode {mode:04o}); chmod o-r it",
            path.display()
        ));
    }
    if mode & 0o040 != 0 && Some(meta.gid()) != effective_gid() {
        return Some(format!(
            "{} is readable by group {} (mode {mode:04o}), which is not the agent's group; chmod g-r it",
            path.display(),
            meta.gid()
        ));
    }
    None
}

/// The effective gid from `/proc/self/status` (`Gid: real effective saved fs`).
fn effective_gid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Gid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}
