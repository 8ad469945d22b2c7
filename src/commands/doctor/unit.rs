//! The installed unit as systemd sees it (or as its files say), and the user it runs as.

use super::Check;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The packaged unit's name.
pub const UNIT: &str = "exalsius-node-agent.service";

pub(super) fn run(cmd: &str, args: &[&str]) -> Option<String> {
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
    pub(super) systemd: bool,
    /// `systemctl show` properties, or `User`/`Environment` read from the unit files.
    props: Vec<(String, String)>,
    /// Where the unit file is, when one is installed.
    pub(super) path: Option<PathBuf>,
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

    pub(super) fn get(&self, key: &str) -> Option<&str> {
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
    pub(super) name: String,
    pub(super) uid: Option<u32>,
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

    pub(super) fn can_read(&self, meta: &std::fs::Metadata) -> bool {
        let mode = meta.mode();
        match self.uid {
            Some(0) => true,
            Some(uid) if uid == meta.uid() => mode & 0o400 != 0,
            Some(_) if self.gids.contains(&meta.gid()) => mode & 0o040 != 0,
            _ => mode & 0o004 != 0,
        }
    }
}

pub(super) fn owner_name(uid: u32) -> String {
    run("id", &["-nu", &uid.to_string()]).unwrap_or_else(|| format!("uid {uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
