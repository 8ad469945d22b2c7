//! systemd notifications (`Type=notify`): READY, STATUS, WATCHDOG, RELOADING, STOPPING.
//!
//! Everything is a no-op outside systemd (no `NOTIFY_SOCKET`). A failed notification is logged
//! at debug and otherwise ignored: it must never stop the heartbeat.

use sd_notify::NotifyState;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

fn send(states: &[NotifyState<'_>]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut msg = String::new();
    for s in states {
        let _ = writeln!(msg, "{s}");
    }
    if let Err(e) = send_nonblocking(&path, msg.as_bytes()) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// Sends one datagram without ever blocking: when the reader's queue is full (a busy or hung
/// service manager; the kernel's default queue is 10 datagrams), the notification is dropped
/// rather than the loop stopped — a stalled loop would stop the heartbeats, too. (The
/// sd-notify crate's own `notify` uses a blocking send.)
fn send_nonblocking(path: &OsStr, msg: &[u8]) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg, &addr)?;
        }
        None => {
            sock.send_to(msg, Path::new(path))?;
        }
    }
    Ok(())
}

/// Started by systemd as a notify service (`NOTIFY_SOCKET` is set): what systemd started, it
/// restarts (`Restart=on-failure`).
pub fn supervised() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// The configuration is loaded and the loop is running.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// One line for `systemctl status`.
pub fn status(line: &str) {
    // The last gate: one assignment, whatever the line holds.
    let line = crate::text::one_line(line, 400);
    send(&[NotifyState::Status(&line)]);
}

/// SIGHUP received: re-reading the configuration.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The scheduling loop is alive.
pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, as sd_watchdog_enabled(3) advises;
/// `None` when systemd runs no watchdog for us.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}
