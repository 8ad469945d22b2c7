//! `doctor`'s checks on this machine: the config and who can read it, the service user, the
//! state directory and file (owner, mode), the lock holder (from `/proc/locks`, without taking
//! the lock), the systemd unit, the last heartbeat, the token, and GPU discovery.

use super::{Check, Status};
use crate::config::{Config, GpuMode};
use crate::heartbeat::credentials::Credentials;
use crate::state::{LOCK_FILE, STATE_FILE, State, StateStore, rfc3339};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

/// The packaged unit's name.
pub const UNIT: &str = "exalsius-node-agent.service";

fn run(cmd: &str, args: &[&str]) -> Option<String> {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// The installed unit, as systemd sees it (or as its files say where systemd is not running).
#[derive(Debug, Default)]
pub struct Unit {
    systemd: bool,
    /// `systemctl show` properties, or `User`/`Environment` read from the unit files.
    props: Vec<(String, String)>,
    /// Where the unit file is, when one is installed.
    path: Option<PathBuf>,
}

impl Unit {
    /// Finds the unit.
    pub fn find() -> Self {
        if Path::new("/run/systemd/system").is_dir() {
            let props = run(
                "systemctl",
                &[
                    "show",
                    "-p",
                    "LoadState,FragmentPath,User,Environment,ActiveState,SubState,ExecMainStatus,MainPID",
                    UNIT,
                ],
            )
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>();
            let get = |k: &str| props.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let path = (get("LoadState").as_deref() == Some("loaded"))
                .then(|| get("FragmentPath").map(PathBuf::from))
                .flatten();
            return Self {
                systemd: true,
                props,
                path,
            };
        }
        Self::from_files()
    }

    /// Without a running systemd: the unit file and its drop-ins, last setting wins.
    fn from_files() -> Self {
        let dirs = [
            "/etc/systemd/system",
            "/usr/lib/systemd/system",
            "/lib/systemd/system",
        ];
        let Some(path) = dirs
            .iter()
            .map(|d| Path::new(d).join(UNIT))
            .find(|p| p.is_file())
        else {
            return Self::default();
        };
        let mut files = vec![path.clone()];
        for d in dirs.iter().rev() {
            let Ok(entries) = std::fs::read_dir(Path::new(d).join(format!("{UNIT}.d"))) else {
                continue;
            };
            let mut confs: Vec<PathBuf> = entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "conf"))
                .collect();
            confs.sort();
            files.extend(confs);
        }
        let mut props = Vec::new();
        let mut env = Vec::new();
        for f in files {
            for line in std::fs::read_to_string(&f).unwrap_or_default().lines() {
                match line.trim().split_once('=') {
                    Some(("User", v)) => props.push(("User".to_string(), v.trim().to_string())),
                    Some(("Environment", v)) if v.trim().is_empty() => env.clear(),
                    Some(("Environment", v)) => env.push(v.trim().to_string()),
                    _ => {}
                }
            }
        }
        props.push(("Environment".to_string(), env.join(" ")));
        Self {
            systemd: false,
            props,
            path: Some(path),
        }
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.props
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The unit's `Environment=` as pairs; `None` without a unit.
    pub fn environment(&self) -> Option<Vec<(String, String)>> {
        self.path.as_ref()?;
        Some(split_environment(
            self.get("Environment").unwrap_or_default(),
        ))
    }
}

/// `A=1 "B=two words"` → pairs (systemd's quoting, simplified: double quotes only).
pub fn split_environment(value: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in value.chars().chain(std::iter::once(' ')) {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if let Some((k, v)) = cur.split_once('=') {
                    out.push((k.to_string(), v.to_string()));
                }
                cur.clear();
            }
            c => cur.push(c),
        }
    }
    out
}

/// Who the service runs as.
#[derive(Debug, Clone)]
pub struct ServiceUser {
    name: String,
    uid: Option<u32>,
    gids: Vec<u32>,
    source: String,
}

/// `--service-user`, else `User=` of the installed unit, else the current user.
pub fn service_user(flag: Option<&str>, unit: &Unit) -> ServiceUser {
    let (name, source) = match (flag, unit.get("User").filter(|u| !u.is_empty()), &unit.path) {
        (Some(f), _, _) => (f.to_string(), "--service-user".to_string()),
        (None, Some(u), Some(p)) => (u.to_string(), format!("User= of {}", p.display())),
        (None, None, Some(p)) => ("root".to_string(), format!("{} sets no User=", p.display())),
        _ => (
            run("id", &["-un"]).unwrap_or_else(|| "root".to_string()),
            "no unit installed: the current user".to_string(),
        ),
    };
    let uid = run("id", &["-u", &name]).and_then(|u| u.parse().ok());
    let gids = run("id", &["-G", &name])
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    ServiceUser {
        name,
        uid,
        gids,
        source,
    }
}

impl ServiceUser {
    /// The "service user" line.
    pub fn check(&self) -> Check {
        match self.uid {
            Some(uid) => Check::info(
                "service user",
                format!("{} (uid {uid}), {}", self.name, self.source),
            ),
            None => Check::fail(
                "service user",
                format!("user {:?} ({}) does not exist", self.name, self.source),
                "reinstall the package (it creates exalsius-agent) or fix User= in the unit",
            ),
        }
    }

    fn can_read(&self, meta: &std::fs::Metadata) -> bool {
        let mode = meta.mode();
        match self.uid {
            Some(0) => true,
            Some(uid) if uid == meta.uid() => mode & 0o400 != 0,
            Some(_) if self.gids.contains(&meta.gid()) => mode & 0o040 != 0,
            _ => mode & 0o004 != 0,
        }
    }
}

fn owner_name(uid: u32) -> String {
    run("id", &["-nu", &uid.to_string()]).unwrap_or_else(|| format!("uid {uid}"))
}

/// Valid, and readable by the service user.
pub fn config_check(cfg: &Config, user: &ServiceUser) -> Check {
    if let Err(e) = crate::api::ApiClient::new(&cfg.api) {
        return Check::fail(
            "config",
            e.to_string(),
            "fix it; `exalsius-node-agent check-config` shows the effective values",
        );
    }
    let Some(path) = &cfg.source else {
        return Check::info(
            "config",
            format!(
                "no config file ({} not found): defaults and environment only",
                crate::config::DEFAULT_CONFIG_PATH
            ),
        );
    };
    if let Ok(meta) = std::fs::metadata(path)
        && !user.can_read(&meta)
    {
        return Check::fail(
            "config",
            format!(
                "{} is valid but {} cannot read it (mode {:04o}, {}:{})",
                path.display(),
                user.name,
                meta.mode() & 0o7777,
                owner_name(meta.uid()),
                meta.gid()
            ),
            &format!(
                "chown root:{0} {1} && chmod 640 {1}",
                user.name,
                path.display()
            ),
        );
    }
    if cfg.warnings.is_empty() {
        Check::ok("config", format!("valid: {}", path.display()))
    } else {
        Check::warn(
            "config",
            format!("valid: {}; {}", path.display(), cfg.warnings.join("; ")),
            "see the warning",
        )
    }
}

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
    out
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

fn ago(now: SystemTime, t: SystemTime) -> String {
    let d = now.duration_since(t).unwrap_or_default();
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Which token `run` would use, the last heartbeat, and the token's expiry.
pub fn heartbeat_checks(cfg: &Config) -> Vec<Check> {
    let stored = StateStore::new(&cfg.state.dir).peek().ok().flatten();
    let mut out = vec![match Credentials::start(cfg, stored.clone()) {
        Ok((_, why)) => Check::ok("credentials", why.to_string()),
        Err(e) => Check::fail(
            "credentials",
            e,
            "see the message: the agent cannot start without a node id and a token",
        ),
    }];
    let Some(s) = stored else {
        out.push(Check::info("last heartbeat", "none recorded".to_string()));
        return out;
    };
    out.extend(heartbeat_lines(
        &s,
        cfg.heartbeat.interval,
        SystemTime::now(),
    ));
    out
}

/// The last-heartbeat and token lines for a state, pure.
pub fn heartbeat_lines(s: &State, interval: Duration, now: SystemTime) -> Vec<Check> {
    let limit = interval.saturating_mul(3);
    let limit_text = humantime::format_duration(limit);
    let failing = match (&s.last_error, s.last_attempt_at) {
        (Some(e), Some(t)) => format!(
            "; last attempt {} ago failed: {e} ({} in a row)",
            ago(now, t),
            s.consecutive_failures
        ),
        _ => String::new(),
    };
    let hint = if s
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("401") || e.contains("403"))
    {
        "the token was rejected: a new api.access_token (then systemctl reload exalsius-node-agent), or register --force"
    } else {
        "see the service and API checks; journalctl -u exalsius-node-agent"
    };
    let beat = match s.last_success_at {
        Some(t) if now.duration_since(t).unwrap_or_default() < limit => Check::ok(
            "last heartbeat",
            format!(
                "succeeded {} ago (healthy within 3 × interval = {limit_text}){failing}",
                ago(now, t)
            ),
        ),
        Some(t) => Check::fail(
            "last heartbeat",
            format!(
                "last success {} ago ({}), older than 3 × interval = {limit_text}{failing}",
                ago(now, t),
                rfc3339(t)
            ),
            hint,
        ),
        None => Check::fail(
            "last heartbeat",
            format!("no successful heartbeat yet{failing}"),
            hint,
        ),
    };
    let token = match s.token_expires_at {
        None => Check::info("token", "expiry unknown (the API did not say)".to_string()),
        Some(t) if t <= now => Check::fail(
            "token",
            format!("the stored token expired at {}", rfc3339(t)),
            "the agent still tries it; if the API rejects it: a new api.access_token and a reload, or register --force",
        ),
        Some(t) => Check::ok(
            "token",
            format!(
                "expires {} (in {})",
                rfc3339(t),
                ago(t, now).replace('-', "")
            ),
        ),
    };
    vec![beat, token]
}

/// What GPU discovery finds, as the agent would report it.
pub fn gpu_check(cfg: &Config) -> Check {
    if cfg.inventory.gpu == GpuMode::Off {
        return Check::info(
            "gpu",
            "GPU discovery is off (inventory.gpu = \"off\")".to_string(),
        );
    }
    let probe = crate::inventory::gpu::GpuProbe::new(
        cfg.inventory.gpu,
        Path::new("/"),
        cfg.inventory.nvml_library.as_deref(),
    );
    let report = probe.collect();
    let mut by_source: Vec<String> = Vec::new();
    for source in ["nvml", "pci"] {
        let gpus: Vec<&crate::inventory::gpu::Gpu> =
            report.gpus.iter().filter(|g| g.source == source).collect();
        if let Some(first) = gpus.first() {
            by_source.push(format!(
                "{}: {} × {}",
                source.to_uppercase(),
                gpus.len(),
                first.name
            ));
        }
    }
    let driver = report
        .nvidia_version
        .as_deref()
        .map_or_else(String::new, |v| {
            format!(" ({})", v.lines().next().unwrap_or(v))
        });
    let notes = if report.notes.is_empty() {
        String::new()
    } else {
        format!("; {}", report.notes.join("; "))
    };
    if report.nvml_failed || report.notes.iter().any(|n| n.contains("cannot use it")) {
        return Check::warn(
            "gpu",
            format!("{}{driver}{notes}", by_source.join(", ")),
            "NVML is failing: check nvidia-smi and the driver (dmesg for Xid errors)",
        );
    }
    if by_source.is_empty() {
        Check::info("gpu", format!("no GPUs found{notes}"))
    } else {
        Check::ok("gpu", format!("{}{driver}{notes}", by_source.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use uuid::Uuid;

    #[test]
    fn lock_holders_from_proc_locks() {
        let text = "1: POSIX  ADVISORY  WRITE 77 00:1b:999 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 4343 fd:01:1234567 0 EOF\n";
        assert_eq!(lock_holder(text, 1_234_567), Some(4242));
        assert_eq!(lock_holder(text, 999), None, "POSIX locks are not ours");
        assert_eq!(lock_holder(text, 5), None);
    }

    #[test]
    fn unit_environment_is_split_like_systemd() {
        assert_eq!(
            split_environment("HTTPS_PROXY=http://p:3128 \"NO_PROXY=a b\" junk"),
            vec![
                ("HTTPS_PROXY".to_string(), "http://p:3128".to_string()),
                ("NO_PROXY".to_string(), "a b".to_string())
            ]
        );
    }

    #[test]
    fn heartbeat_lines_judge_age_and_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let mut s = State::new(Uuid::nil(), "http://x", Secret::new("t"), None);
        s.last_success_at = Some(now - Duration::from_secs(30));
        s.token_expires_at = Some(now + Duration::from_secs(3600));
        let lines = heartbeat_lines(&s, Duration::from_secs(60), now);
        assert_eq!(lines[0].status, Status::Ok, "{:?}", lines[0]);
        assert_eq!(lines[1].status, Status::Ok, "{:?}", lines[1]);
        assert!(lines[1].finding.contains("in 1h"), "{}", lines[1].finding);
        s.last_success_at = Some(now - Duration::from_secs(3600));
        s.last_attempt_at = Some(now - Duration::from_secs(5));
        s.last_error = Some("HTTP 401 Unauthorized".into());
        s.consecutive_failures = 9;
        s.token_expires_at = Some(now - Duration::from_secs(1));
        let lines = heartbeat_lines(&s, Duration::from_secs(60), now);
        assert_eq!(lines[0].status, Status::Fail);
        assert!(lines[0].finding.contains("1h ago") && lines[0].finding.contains("9 in a row"));
        assert!(
            lines[0]
                .hint
                .as_deref()
                .unwrap_or("")
                .contains("api.access_token")
        );
        assert_eq!(lines[1].status, Status::Fail);
    }
}
