//! The service: who holds the state lock (from `/proc/locks`, never taking it) and the unit's
//! state as systemd reports it.

use super::Check;
use super::state_dir::lock_holder;
use super::unit::{UNIT, Unit};
use crate::state::LOCK_FILE;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Who holds the state lock, and the unit's state.
pub fn service_checks(dir: &Path, unit: &Unit) -> Vec<Check> {
    let holder = std::fs::symlink_metadata(dir.join(LOCK_FILE))
        .ok()
        .and_then(|m| {
            let locks = std::fs::read_to_string("/proc/locks").ok()?;
            lock_holder(&locks, m.ino())
        });
    let held = holder.map_or_else(
        || "no agent holds the state lock".to_string(),
        |pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            format!("pid {pid} ({}) holds the state lock", comm.trim())
        },
    );
    let mut out = vec![Check::info("state lock", held)];
    if !unit.systemd {
        out.push(Check::info(
            "service",
            match &unit.path {
                Some(p) => format!("systemd is not running here (container or foreground setup); unit installed at {}", p.display()),
                None => "systemd is not running here (container or foreground setup)".to_string(),
            },
        ));
        return out;
    }
    if unit.path.is_none() {
        out.push(Check::info(
            "service",
            format!("{UNIT} is not installed (foreground setup?)"),
        ));
        return out;
    }
    let state = unit.get("ActiveState").unwrap_or("unknown");
    let sub = unit.get("SubState").unwrap_or("");
    let status = unit.get("ExecMainStatus").unwrap_or("0");
    let journal = "journalctl -u exalsius-node-agent -n 50 shows why; fix it, then: systemctl restart exalsius-node-agent";
    out.push(match state {
        "active" => Check::ok("service", format!("{UNIT} is active ({sub}), pid {}", unit.get("MainPID").unwrap_or("?"))),
        "failed" if status == "78" => Check::fail(
            "service",
            format!("{UNIT} failed with exit status 78: a configuration error (systemd does not restart it)"),
            journal,
        ),
        "failed" => Check::fail("service", format!("{UNIT} failed (exit status {status})"), journal),
        "activating" => Check::warn("service", format!("{UNIT} is restarting ({sub})"), journal),
        _ if holder.is_some() => Check::info("service", format!("{UNIT} is {state}; an agent runs outside it")),
        _ => Check::fail(
            "service",
            format!("{UNIT} is {state}: no heartbeats are sent"),
            "systemctl enable --now exalsius-node-agent",
        ),
    });
    out
}
