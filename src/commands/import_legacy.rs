//! `import-legacy`: take over a node from client-hw-info, exalsius's earlier one-shot tool,
//! without registering it again.
//!
//! client-hw-info keeps `NODE_ID`, `API_URL` and `AUTH_TOKEN` (the latest rotated token) in
//! `config.env` and runs from `client-hw-info.timer`. Two programs rotating one token lock each
//! other out, so the order is: validate everything; stop and disable the legacy timer (and
//! its service); read the file again (a run that was in progress may have rotated the token);
//! write the state exactly as `register` does; rename the file to `config.env.migrated`. If the
//! state cannot be written, the legacy timer is enabled again: the node never goes quiet.

use super::Failure;
use crate::api::Issued;
use crate::cli::ImportLegacyArgs;
use crate::config::{Config, Overrides};
use crate::heartbeat::credentials::registered_state;
use crate::secret::Secret;
use crate::state::{LockError, State, StateStore};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;
use uuid::Uuid;

/// Where client-hw-info keeps root's credentials.
pub const DEFAULT_LEGACY_FILE: &str = "/root/.config/exalsius/config.env";
/// The legacy timer and the service it starts.
pub const LEGACY_TIMER: &str = "client-hw-info.timer";
/// The legacy one-shot service.
pub const LEGACY_SERVICE: &str = "client-hw-info.service";
/// A legacy file larger than this is not a config.env.
const MAX_LEGACY_BYTES: u64 = 64 * 1024;

/// What client-hw-info left, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Legacy {
    /// `NODE_ID`.
    pub node_id: Uuid,
    /// `API_URL`, normalised as `api.url` is.
    pub api_url: String,
    /// `AUTH_TOKEN`: the latest rotated token.
    pub token: Secret,
}

/// Parses a `config.env` (dotenv syntax: quotes, comments, `export`); every message names the
/// file and the key.
pub fn parse_legacy(text: &str, path: &Path) -> Result<Legacy, String> {
    let file = path.display();
    let mut node_id = None;
    let mut api_url = None;
    let mut token = None;
    for item in dotenvy::from_read_iter(text.as_bytes()) {
        let (key, value) =
            item.map_err(|e| format!("{file}: not a dotenv file: {}", parse_error(&e)))?;
        match key.as_str() {
            "NODE_ID" => node_id = Some(value),
            "API_URL" => api_url = Some(value),
            "AUTH_TOKEN" => token = Some(Secret::new(value)),
            _ => {}
        }
    }
    let missing: Vec<&str> = [
        ("NODE_ID", node_id.is_none()),
        ("API_URL", api_url.is_none()),
        ("AUTH_TOKEN", token.is_none()),
    ]
    .into_iter()
    .filter_map(|(k, m)| m.then_some(k))
    .collect();
    if !missing.is_empty() {
        return Err(format!("{file}: {} missing", missing.join(", ")));
    }
    let (Some(node_id), Some(api_url), Some(token)) = (node_id, api_url, token) else {
        return Err(format!("{file}: NODE_ID, API_URL or AUTH_TOKEN missing"));
    };
    for (key, empty) in [
        ("NODE_ID", node_id.trim().is_empty()),
        ("API_URL", api_url.trim().is_empty()),
        ("AUTH_TOKEN", token.is_blank()),
    ] {
        if empty {
            return Err(format!("{file}: {key} is empty"));
        }
    }
    let node_id = Uuid::parse_str(node_id.trim())
        .map_err(|e| format!("{file}: NODE_ID {node_id:?} is not a UUID: {e}"))?;
    let api_url =
        crate::config::validate_url(&api_url, true).map_err(|m| format!("{file}: API_URL {m}"))?;
    let raw = token.expose();
    if raw.trim() != raw || raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        // Never echo the token; say what is wrong with it.
        return Err(format!(
            "{file}: AUTH_TOKEN contains whitespace or control characters; it cannot be a token"
        ));
    }
    Ok(Legacy {
        node_id,
        api_url,
        token,
    })
}

/// A dotenv error without the line's text (it may hold the token): the key, if the line has a
/// plausible one.
fn parse_error(e: &dotenvy::Error) -> String {
    match e {
        dotenvy::Error::LineParse(line, _) => {
            let key = line
                .split('=')
                .next()
                .unwrap_or_default()
                .trim()
                .trim_start_matches("export ")
                .trim();
            let plausible = !key.is_empty()
                && key.len() <= 64
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if plausible && line.contains('=') {
                format!("the line for {key} cannot be parsed (an unclosed quote?)")
            } else {
                "a line cannot be parsed".to_string()
            }
        }
        dotenvy::Error::Io(e) => e.to_string(),
        _ => "cannot be parsed".to_string(),
    }
}

/// What the agent already holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Existing {
    /// No state yet.
    None,
    /// This node, with exactly the legacy token: imported before.
    Imported,
    /// This node, another token (the agent ran; one of the two tokens is stale).
    SameNodeOtherToken,
    /// Another node.
    OtherNode(Uuid),
    /// A state file that cannot be read.
    Unreadable(String),
}

impl Existing {
    fn of(stored: Result<Option<State>, String>, legacy: &Legacy) -> Self {
        match stored {
            Ok(None) => Self::None,
            Ok(Some(s)) if s.node_id != legacy.node_id => Self::OtherNode(s.node_id),
            Ok(Some(s)) if s.access_token.expose() == legacy.token.expose() => Self::Imported,
            Ok(Some(_)) => Self::SameNodeOtherToken,
            Err(e) => Self::Unreadable(e),
        }
    }
}

/// Whether the state is written, and what it descends from.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// False when the state already holds exactly this node and token.
    pub write_state: bool,
    /// Keep an existing state as `state.json.bak` (with `--force`).
    pub keep_old: bool,
    /// SHA-256 of the configured bootstrap token for the same node, so `run` tries the imported
    /// token first and keeps the configured one as its fallback.
    pub bootstrap_sha256: Option<String>,
}

/// The decision, pure: refuses what `run` would refuse later (another API URL, another
/// configured node) and what would lose a token (another node's state) unless forced.
pub fn decide(
    legacy: &Legacy,
    cfg: &Config,
    existing: &Existing,
    force: bool,
) -> Result<Plan, Failure> {
    let file = cfg.file_hint();
    if legacy.api_url != cfg.api.url {
        return Err(Failure::config(format!(
            "the legacy node talks to API_URL={} but this agent is configured for {}; \
             set api.url = \"{}\" in {file} (or EXALSIUS_API_URL) and run import-legacy again",
            legacy.api_url, cfg.api.url, legacy.api_url
        )));
    }
    if let Some(id) = cfg.api.node_id
        && id != legacy.node_id
    {
        return Err(Failure::config(format!(
            "api.node_id = {id} in {file} differs from the legacy NODE_ID {}; \
             remove api.node_id (the state will hold it) or fix it",
            legacy.node_id
        )));
    }
    let bootstrap_sha256 = match (cfg.api.node_id, &cfg.api.access_token) {
        (Some(_), Some(t)) => Some(t.sha256_hex()),
        _ => None,
    };
    let refuse = |why: String| {
        Err(Failure::runtime(format!(
            "{why}; use --force to replace it with the legacy node (the old state is kept as state.json.bak); nothing was changed"
        )))
    };
    let keep_old = match existing {
        Existing::None => false,
        Existing::Imported => {
            return Ok(Plan {
                write_state: false,
                keep_old: false,
                bootstrap_sha256,
            });
        }
        _ if force => true,
        Existing::OtherNode(id) => {
            return refuse(format!("this agent already holds another node, {id}"));
        }
        Existing::SameNodeOtherToken => {
            return refuse(format!(
                "this agent already holds node {} with a different token (it has run before; \
                 only one of the two tokens is still valid)",
                legacy.node_id
            ));
        }
        Existing::Unreadable(e) => return refuse(e.clone()),
    };
    Ok(Plan {
        write_state: true,
        keep_old,
        bootstrap_sha256,
    })
}

/// The state the import writes: the same path as `register` (`registered_state`).
pub fn imported_state(legacy: &Legacy, plan: &Plan, now: SystemTime) -> State {
    let issued = Issued {
        token: legacy.token.clone(),
        expires_in: None,
        token_type: Some("Bearer".to_string()),
    };
    let mut state = registered_state(legacy.node_id, &legacy.api_url, issued, now);
    state.bootstrap_token_sha256 = plan.bootstrap_sha256.clone();
    state
}

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
    fn stop_and_disable(&self) -> Result<(), String> {
        Self::systemctl(&["stop", LEGACY_TIMER, LEGACY_SERVICE])?;
        Self::systemctl(&["disable", LEGACY_TIMER])?;
        Ok(())
    }

    /// Undoes `stop_and_disable` (the import failed after it).
    fn restore(&self) -> Result<(), String> {
        Self::systemctl(&["enable", "--now", LEGACY_TIMER]).map(|_| ())
    }
}

fn read_legacy(path: &Path) -> Result<Legacy, Failure> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Failure::runtime(format!(
            "{}: not found; nothing to import (name another file with --from)",
            path.display()
        )),
        _ => Failure::runtime(format!("cannot read {}: {e}", path.display())),
    })?;
    if !meta.is_file() || meta.len() > MAX_LEGACY_BYTES {
        return Err(Failure::config(format!(
            "{} is not a client-hw-info config.env (not a regular file of at most 64 KiB)",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::runtime(format!("cannot read {}: {e}", path.display())))?;
    parse_legacy(&text, path).map_err(Failure::config)
}

fn load_existing(store: &StateStore, legacy: &Legacy) -> Existing {
    Existing::of(
        store.load().map(|(s, _)| s).map_err(|e| e.to_string()),
        legacy,
    )
}

/// Runs `import-legacy`.
pub fn run(overrides: &Overrides, args: &ImportLegacyArgs) -> Result<(), Failure> {
    let cfg = super::load_config(overrides)?;
    crate::logging::init(&cfg.log.level, cfg.log.format);
    let from = args
        .from
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LEGACY_FILE));
    let legacy = read_legacy(&from)?;
    let store = StateStore::new(&cfg.state.dir);
    let plan = decide(&legacy, &cfg, &load_existing(&store, &legacy), args.force)?;
    let units = Units::detect();
    let timer = units.timer_installed();
    let migrated = migrated_path(&from);
    if args.dry_run {
        println!("import-legacy --dry-run: nothing is changed");
        println!(
            "legacy node {} at {} (token from {})",
            legacy.node_id,
            legacy.api_url,
            from.display()
        );
        match (timer, units.systemd) {
            (true, true) => {
                println!("would stop and disable {LEGACY_TIMER} and stop {LEGACY_SERVICE}")
            }
            (true, false) => println!(
                "{LEGACY_TIMER} is installed but systemd is not running here: disable it yourself"
            ),
            (false, _) => println!("{LEGACY_TIMER} is not installed: nothing to stop"),
        }
        if plan.write_state {
            println!(
                "would write {}{}",
                store.path().display(),
                if plan.keep_old {
                    " (the old one kept as state.json.bak)"
                } else {
                    ""
                }
            );
        } else {
            println!(
                "{} already holds this node and token",
                store.path().display()
            );
        }
        println!("would rename {} to {}", from.display(), migrated.display());
        return Ok(());
    }

    // One writer per state directory, as for `register`.
    let lock = store.lock().map_err(|e| match e {
        e @ LockError::Held { .. } => {
            Failure::runtime(format!("{e}; then run import-legacy again"))
        }
        LockError::State(e) => Failure::runtime(format!(
            "cannot write the state in {}: {e}; nothing was imported",
            store.dir().display()
        )),
    })?;
    let stopped = match (timer, units.systemd) {
        (true, true) => {
            units.stop_and_disable().map_err(|e| {
                Failure::runtime(format!(
                    "{e}; nothing was imported (two programs must never rotate one token): stop {LEGACY_TIMER} yourself and run import-legacy again"
                ))
            })?;
            println!("stopped and disabled {LEGACY_TIMER} (and stopped {LEGACY_SERVICE})");
            true
        }
        (true, false) => {
            println!(
                "note: {LEGACY_TIMER} is installed but systemd is not running here; make sure client-hw-info does not run any more"
            );
            false
        }
        (false, _) => false,
    };
    // A legacy run that was in progress may have rotated the token: read the file again now
    // that nothing writes it.
    let finish = || -> Result<Plan, Failure> {
        let legacy_now = read_legacy(&from)?;
        if legacy_now.node_id != legacy.node_id || legacy_now.api_url != legacy.api_url {
            return Err(Failure::runtime(format!(
                "{} changed while importing (another node or API); nothing was imported",
                from.display()
            )));
        }
        let plan = decide(
            &legacy_now,
            &cfg,
            &load_existing(&store, &legacy_now),
            args.force,
        )?;
        if plan.write_state {
            let state = imported_state(&legacy_now, &plan, SystemTime::now());
            match store.replace(&lock, &state, plan.keep_old) {
                Ok(Some(bak)) => println!("previous state kept as {}", bak.display()),
                Ok(None) => {}
                Err(e) => {
                    return Err(Failure::runtime(format!(
                        "cannot write the state: {e}; nothing was imported"
                    )));
                }
            }
        }
        Ok(plan)
    };
    let plan = match finish() {
        Ok(p) => p,
        Err(mut f) => {
            if stopped {
                f.message = match units.restore() {
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
    if plan.write_state {
        println!(
            "imported node {} ({}) into {}",
            legacy.node_id,
            legacy.api_url,
            store.path().display()
        );
    } else {
        println!(
            "{} already holds node {} with this token",
            store.path().display(),
            legacy.node_id
        );
    }
    match std::fs::rename(&from, &migrated) {
        Ok(()) => println!("renamed {} to {}", from.display(), migrated.display()),
        Err(e) => println!(
            "warning: cannot rename {} to {}: {e}; remove it so that client-hw-info cannot use the token again",
            from.display(),
            migrated.display()
        ),
    }
    println!("next: systemctl enable --now exalsius-node-agent");
    println!("   or: exalsius-node-agent run   (in the foreground)");
    Ok(())
}

fn migrated_path(from: &Path) -> PathBuf {
    let mut name = from.file_name().unwrap_or_default().to_os_string();
    name.push(".migrated");
    from.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;

    const ID: &str = "3f1e2d4c-5b6a-4798-8a9b-0c1d2e3f4a5b";

    fn parse(text: &str) -> Result<Legacy, String> {
        parse_legacy(text, Path::new("/root/.config/exalsius/config.env"))
    }

    #[test]
    fn every_shape_the_old_tool_wrote() {
        for text in [
            format!("NODE_ID={ID}\nAPI_URL=https://api.exalsius.ai/v1\nAUTH_TOKEN=tok-1\n"),
            format!(
                "# written by client-hw-info\nexport NODE_ID=\"{ID}\"\nexport API_URL='https://api.exalsius.ai/v1/'\nexport AUTH_TOKEN=\"tok-1\"\n"
            ),
            format!(
                "\n  NODE_ID={ID}   # the node\nAPI_URL=\"https://api.exalsius.ai/v1\"\nOTHER=x\nAUTH_TOKEN='tok-1'"
            ),
            // CRLF line ends (edited on Windows) and a later value winning, as in a shell.
            format!(
                "NODE_ID={ID}\r\nAPI_URL=https://api.exalsius.ai/v1\r\nAUTH_TOKEN=old\r\nAUTH_TOKEN=tok-1\r\n"
            ),
        ] {
            let l = parse(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            assert_eq!(l.node_id.to_string(), ID, "{text:?}");
            assert_eq!(l.api_url, "https://api.exalsius.ai/v1", "{text:?}");
            assert_eq!(l.token.expose(), "tok-1", "{text:?}");
        }
    }

    #[test]
    fn broken_files_say_what_is_wrong_and_never_show_the_token() {
        for (text, says) in [
            (
                format!("NODE_ID={ID}\nAPI_URL=https://a/v1\n"),
                "AUTH_TOKEN missing",
            ),
            (
                "AUTH_TOKEN=SECRETTOKEN\n".to_string(),
                "NODE_ID, API_URL missing",
            ),
            (
                format!("NODE_ID={ID}\nAPI_URL=https://a/v1\nAUTH_TOKEN=\n"),
                "AUTH_TOKEN is empty",
            ),
            (
                "NODE_ID=\nAPI_URL=https://a/v1\nAUTH_TOKEN=SECRETTOKEN\n".to_string(),
                "NODE_ID is empty",
            ),
            (
                "NODE_ID=node-7\nAPI_URL=https://a/v1\nAUTH_TOKEN=SECRETTOKEN\n".to_string(),
                "not a UUID",
            ),
            (
                format!("NODE_ID={ID}\nAPI_URL=ftp://a\nAUTH_TOKEN=SECRETTOKEN\n"),
                "API_URL",
            ),
            (
                format!("NODE_ID={ID}\nAPI_URL=https://a/v1\nAUTH_TOKEN=\"SECRET TOKEN\"\n"),
                "whitespace",
            ),
            (
                format!("NODE_ID={ID}\nAPI_URL=https://a/v1\nAUTH_TOKEN=\"SECRETTOKEN\n"),
                "not a dotenv file",
            ),
        ] {
            let e = parse(&text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
            assert!(e.contains("config.env"), "names the file: {e}");
            assert!(!e.contains("SECRET"), "token in the message: {e}");
        }
    }

    fn cfg(extra: &str) -> Config {
        let text = format!("[api]\nurl = \"https://api.exalsius.ai/v1\"\n{extra}");
        Config::from_toml(
            &text,
            Path::new("/etc/x.toml"),
            &Overrides::default(),
            &|_| None,
        )
        .unwrap()
    }

    fn legacy() -> Legacy {
        parse(&format!(
            "NODE_ID={ID}\nAPI_URL=https://api.exalsius.ai/v1\nAUTH_TOKEN=tok-1\n"
        ))
        .unwrap()
    }

    #[test]
    fn decisions() {
        let l = legacy();
        let other = Uuid::from_u128(7);
        let c = cfg("");
        let write = |keep_old| Plan {
            write_state: true,
            keep_old,
            bootstrap_sha256: None,
        };
        assert_eq!(decide(&l, &c, &Existing::None, false), Ok(write(false)));
        assert_eq!(
            decide(&l, &c, &Existing::Imported, false).map(|p| p.write_state),
            Ok(false)
        );
        for existing in [
            Existing::OtherNode(other),
            Existing::SameNodeOtherToken,
            Existing::Unreadable("state file x is not valid".into()),
        ] {
            let e = decide(&l, &c, &existing, false).unwrap_err();
            assert_eq!(e.code, 1, "{existing:?}");
            assert!(e.message.contains("--force"), "{}", e.message);
            assert_eq!(decide(&l, &c, &existing, true), Ok(write(true)));
        }
        // What `run` would refuse later is refused now, with the key to change.
        let e = decide(
            &l,
            &cfg("").clone_with_url("https://other/v1"),
            &Existing::None,
            true,
        );
        assert!(
            e.unwrap_err()
                .message
                .contains("set api.url = \"https://api.exalsius.ai/v1\"")
        );
        let e = decide(
            &l,
            &cfg(&format!("node_id = \"{other}\"\n")),
            &Existing::None,
            true,
        );
        assert_eq!(e.unwrap_err().code, 78);
        // A configured bootstrap token for the same node stays the fallback.
        let c = cfg(&format!("node_id = \"{ID}\"\naccess_token = \"boot\"\n"));
        let plan = decide(&l, &c, &Existing::None, false).unwrap();
        assert_eq!(
            plan.bootstrap_sha256,
            Some(Secret::new("boot").sha256_hex())
        );
        let state = imported_state(&l, &plan, SystemTime::now());
        let (creds, why) =
            crate::heartbeat::credentials::Credentials::start(&c, Some(state)).unwrap();
        assert_eq!(creds.token().expose(), "tok-1", "{why}");
    }

    #[test]
    fn the_imported_state_is_the_registered_shape() {
        let l = legacy();
        let plan = decide(&l, &cfg(""), &Existing::None, false).unwrap();
        let s = imported_state(&l, &plan, SystemTime::now());
        assert_eq!(s.node_id, l.node_id);
        assert_eq!(s.api_url, "https://api.exalsius.ai/v1");
        assert_eq!(s.access_token.expose(), "tok-1");
        assert_eq!(s.bootstrap_token_sha256, None);
        assert_eq!(s.token_expires_at, None, "the old tool kept no expiry");
        let (creds, _) =
            crate::heartbeat::credentials::Credentials::start(&cfg(""), Some(s)).unwrap();
        assert_eq!(creds.token().expose(), "tok-1");
    }

    trait WithUrl {
        fn clone_with_url(&self, url: &str) -> Config;
    }
    impl WithUrl for Config {
        fn clone_with_url(&self, url: &str) -> Config {
            let mut c = self.clone();
            c.api.url = url.to_string();
            c
        }
    }

    #[test]
    fn migrated_name() {
        assert_eq!(
            migrated_path(Path::new("/root/.config/exalsius/config.env")),
            PathBuf::from("/root/.config/exalsius/config.env.migrated")
        );
    }
}
