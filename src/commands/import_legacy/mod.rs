//! `import-legacy`: take over a node from client-hw-info, exalsius's earlier one-shot tool,
//! without registering it again.
//!
//! client-hw-info keeps `NODE_ID`, `API_URL` and `AUTH_TOKEN` (the latest rotated token) in
//! `config.env` and runs from `client-hw-info.timer`. Two programs rotating one token lock each
//! other out, so the order is: validate everything; stop and disable the legacy timer (and
//! its service); read the file again (a run that was in progress may have rotated the token);
//! write the state exactly as `register` does; rename the file to `config.env.migrated`. If the
//! state cannot be written, the legacy timer is enabled again: the node never goes quiet.

mod plan;

pub use plan::{Existing, Legacy, Plan, decide, imported_state, parse_legacy};

use super::Exit;
use crate::cli::ImportLegacyArgs;
use crate::config::{Config, Overrides};
use crate::state::{LockError, StateStore};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;
/// Where client-hw-info keeps root's credentials.
pub const DEFAULT_LEGACY_FILE: &str = "/root/.config/exalsius/config.env";
/// The legacy timer and the service it starts.
pub const LEGACY_TIMER: &str = "client-hw-info.timer";
/// The legacy one-shot service.
pub const LEGACY_SERVICE: &str = "client-hw-info.service";
/// A legacy file larger than this is not a config.env.
const MAX_LEGACY_BYTES: u64 = 64 * 1024;

/// The legacy units, through `systemctl` when systemd runs this machine.
#[derive(Debug)]
struct Units {
    systemd: bool,
}

impl Units {
    fn detect() -> Self {
        Self {
            systemd: Path::new("/run/systemd/system").is_dir(),
        }
    }

    fn systemctl(args: &[&str]) -> Result<String, String> {
        let out = Command::new("systemctl")
            .args(args)
            .output()
            .map_err(|e| format!("systemctl {}: {e}", args.join(" ")))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(format!(
                "systemctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Whether systemd knows the legacy timer.
    fn timer_installed(&self) -> bool {
        if self.systemd {
            Self::systemctl(&["show", "-p", "LoadState", "--value", LEGACY_TIMER])
                .is_ok_and(|s| s == "loaded")
        } else {
            Path::new("/etc/systemd/system").join(LEGACY_TIMER).exists()
        }
    }

    /// Stops the timer and the service (waiting for a run in progress) and disables the timer.
    /// On any failure the timer is enabled and started again before the error is returned
    /// (a stop that worked followed by a disable that failed must not leave the node with
    /// neither agent running); the error says whether that worked.
    fn stop_and_disable(&self) -> Result<(), String> {
        let result = Self::systemctl(&["stop", LEGACY_TIMER, LEGACY_SERVICE])
            .and_then(|_| Self::systemctl(&["disable", LEGACY_TIMER]));
        let Err(e) = result else {
            return Ok(());
        };
        Err(match self.restore() {
            Ok(()) => format!("{e}; {LEGACY_TIMER} is enabled and running again"),
            Err(r) => format!(
                "{e}; and {LEGACY_TIMER} could not be started again ({r}): this node sends no heartbeats until one of the two runs (systemctl enable --now {LEGACY_TIMER})"
            ),
        })
    }

    /// Undoes `stop_and_disable` (the import failed after it).
    fn restore(&self) -> Result<(), String> {
        Self::systemctl(&["enable", "--now", LEGACY_TIMER]).map(|_| ())
    }
}

fn read_legacy(path: &Path) -> Result<Legacy, Exit> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Exit::runtime(format!(
            "{}: not found; nothing to import (name another file with --from)",
            path.display()
        )),
        _ => Exit::runtime(format!("cannot read {}: {e}", path.display())),
    })?;
    if !meta.is_file() || meta.len() > MAX_LEGACY_BYTES {
        return Err(Exit::config(format!(
            "{} is not a client-hw-info config.env (not a regular file of at most 64 KiB)",
            path.display()
        )));
    }
    // Bytes that are not text are the file's content (78); a read that fails now is a fault (1).
    let text = std::fs::read_to_string(path).map_err(|e| {
        let message = format!("cannot read {}: {e}", path.display());
        if e.kind() == std::io::ErrorKind::InvalidData {
            Exit::config(message)
        } else {
            Exit::runtime(message)
        }
    })?;
    parse_legacy(&text, path).map_err(Exit::config)
}

fn load_existing(store: &StateStore, legacy: &Legacy) -> Existing {
    Existing::of(
        store.load().map(|(s, _)| s).map_err(|e| e.to_string()),
        legacy,
    )
}

/// What one import works with.
struct Import<'a> {
    cfg: Config,
    args: &'a ImportLegacyArgs,
    from: PathBuf,
    store: StateStore,
    units: Units,
}

/// Runs `import-legacy`: check, then (unless `--dry-run`) lock, stop the legacy timer, take
/// the token over, rename the legacy file.
pub fn run(overrides: &Overrides, args: &ImportLegacyArgs) -> Result<(), Exit> {
    let cfg = super::load_config(overrides)?;
    crate::logging::init(&cfg.log.level, cfg.log.format);
    let from = args
        .from
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LEGACY_FILE));
    let legacy = read_legacy(&from)?;
    let store = StateStore::new(&cfg.state.dir);
    let plan = decide(&legacy, &cfg, &load_existing(&store, &legacy), args.force)?;
    let import = Import {
        cfg,
        args,
        from,
        store,
        units: Units::detect(),
    };
    if args.dry_run {
        import.print_plan(&legacy, &plan);
        return Ok(());
    }
    // One writer per state directory, as for `register`.
    let lock = import.store.lock().map_err(|e| match e {
        e @ LockError::Held { .. } => Exit::runtime(format!("{e}; then run import-legacy again")),
        LockError::State(e) => Exit::runtime(format!(
            "cannot write the state in {}: {e}; nothing was imported",
            import.store.dir().display()
        )),
    })?;
    let stopped = import.stop_legacy()?;
    let plan = match import.take_over(&legacy, &lock) {
        Ok(p) => p,
        Err(mut f) => {
            if stopped {
                f.message = match import.units.restore() {
                    Ok(()) => format!("{}; {LEGACY_TIMER} is enabled again", f.message),
                    Err(e) => format!(
                        "{}; and {LEGACY_TIMER} could not be enabled again ({e}): this node sends no heartbeats until one of the two runs",
                        f.message
                    ),
                };
            }
            return Err(f);
        }
    };
    import.finish(&legacy, &plan);
    Ok(())
}

impl Import<'_> {
    fn print_plan(&self, legacy: &Legacy, plan: &Plan) {
        crate::sayln!("import-legacy --dry-run: nothing is changed");
        crate::sayln!(
            "legacy node {} at {} (token from {})",
            legacy.node_id,
            legacy.api_url,
            self.from.display()
        );
        match (self.units.timer_installed(), self.units.systemd) {
            (true, true) => {
                crate::sayln!("would stop and disable {LEGACY_TIMER} and stop {LEGACY_SERVICE}")
            }
            (true, false) => crate::sayln!(
                "{LEGACY_TIMER} is installed but systemd is not running here: disable it yourself"
            ),
            (false, _) => crate::sayln!("{LEGACY_TIMER} is not installed: nothing to stop"),
        }
        let path = self.store.path();
        match (plan.write_state, plan.keep_old) {
            (true, true) => crate::sayln!(
                "would write {} (the old one kept as state.json.bak)",
                path.display()
            ),
            (true, false) => crate::sayln!("would write {}", path.display()),
            (false, _) => crate::sayln!("{} already holds this node and token", path.display()),
        }
        crate::sayln!(
            "would rename {} to {}",
            self.from.display(),
            migrated_path(&self.from).display()
        );
    }

    /// Stops and disables the legacy timer where systemd runs; whether it did.
    fn stop_legacy(&self) -> Result<bool, Exit> {
        match (self.units.timer_installed(), self.units.systemd) {
            (true, true) => {
                self.units.stop_and_disable().map_err(|e| {
                    Exit::runtime(format!(
                        "{e}; nothing was imported (two programs must never rotate one token): fix that, then run import-legacy again"
                    ))
                })?;
                crate::sayln!("stopped and disabled {LEGACY_TIMER} (and stopped {LEGACY_SERVICE})");
                Ok(true)
            }
            (true, false) => {
                crate::sayln!(
                    "note: {LEGACY_TIMER} is installed but systemd is not running here; make sure client-hw-info does not run any more"
                );
                Ok(false)
            }
            (false, _) => Ok(false),
        }
    }

    /// Reads the file again (a legacy run that was in progress may have rotated the token; now
    /// nothing writes it), decides again, and writes the state.
    fn take_over(&self, legacy: &Legacy, lock: &crate::state::StateLock) -> Result<Plan, Exit> {
        let now = read_legacy(&self.from)?;
        if now.node_id != legacy.node_id || now.api_url != legacy.api_url {
            return Err(Exit::runtime(format!(
                "{} changed while importing (another node or API); nothing was imported",
                self.from.display()
            )));
        }
        let plan = decide(
            &now,
            &self.cfg,
            &load_existing(&self.store, &now),
            self.args.force,
        )?;
        if plan.write_state {
            let state = imported_state(&now, &plan, SystemTime::now());
            match self.store.replace(lock, &state, plan.keep_old) {
                Ok(Some(bak)) => crate::sayln!("previous state kept as {}", bak.display()),
                Ok(None) => {}
                Err(e) => {
                    return Err(Exit::runtime(format!(
                        "cannot write the state: {e}; nothing was imported"
                    )));
                }
            }
        }
        Ok(plan)
    }

    /// Says what was done, renames the legacy file, says what to run next.
    fn finish(&self, legacy: &Legacy, plan: &Plan) {
        let path = self.store.path();
        if plan.write_state {
            crate::sayln!(
                "imported node {} ({}) into {}",
                legacy.node_id,
                legacy.api_url,
                path.display()
            );
        } else {
            crate::sayln!(
                "{} already holds node {} with this token",
                path.display(),
                legacy.node_id
            );
        }
        let migrated = migrated_path(&self.from);
        match std::fs::rename(&self.from, &migrated) {
            Ok(()) => crate::sayln!("renamed {} to {}", self.from.display(), migrated.display()),
            Err(e) => crate::sayln!(
                "warning: cannot rename {} to {}: {e}; remove it so that client-hw-info cannot use the token again",
                self.from.display(),
                migrated.display()
            ),
        }
        crate::sayln!("next: systemctl enable --now exalsius-node-agent");
        crate::sayln!("   or: exalsius-node-agent run   (in the foreground)");
    }
}

fn migrated_path(from: &Path) -> PathBuf {
    let mut name = from.file_name().unwrap_or_default().to_os_string();
    name.push(".migrated");
    from.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrated_name() {
        assert_eq!(
            migrated_path(Path::new("/root/.config/exalsius/config.env")),
            PathBuf::from("/root/.config/exalsius/config.env.migrated")
        );
    }
}
