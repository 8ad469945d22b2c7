//! systemd notifications (`Type=notify`): READY, STATUS, WATCHDOG, RELOADING, STOPPING.
//!
//! Everything is a no-op outside systemd (no `NOTIFY_SOCKET`). A failed notification is logged
//! at debug and otherwise ignored: it must never stop the heartbeat.

use sd_notify::NotifyState;
use std::time::Duration;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify failed: {e}");
    }
}

/// The configuration is loaded and the loop is running.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// One line for `systemctl status`.
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
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
