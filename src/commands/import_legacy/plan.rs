//! The pure half of `import-legacy`: client-hw-info's `config.env` parsed and validated, the
//! decision what to do given the agent's config and state, and the state to write. No I/O.

use super::super::Exit;
use crate::api::Issued;
use crate::config::Config;
use crate::heartbeat::credentials::registered_state;
use crate::secret::Secret;
use crate::state::State;
use std::path::Path;
use std::time::SystemTime;
use uuid::Uuid;

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
    refuse_expansions(text, &file.to_string())?;
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

/// The three values are taken exactly as written or not at all: dotenv (like a shell) expands
/// `$NAME` and backslash escapes outside single quotes, which would silently turn a token that
/// holds a `$` or `\` into another one. Such a line is refused, naming the key (never the value).
fn refuse_expansions(text: &str, file: &str) -> Result<(), String> {
    for line in text.lines() {
        let line = line.trim_start();
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if !matches!(key, "NODE_ID" | "API_URL" | "AUTH_TOKEN") {
            continue;
        }
        let value = value.trim();
        let single_quoted = value.len() >= 2 && value.starts_with('\'') && {
            // The value ends at the closing quote (a comment may follow).
            value[1..].contains('\'')
        };
        if !single_quoted && (value.contains('$') || value.contains('\\')) {
            return Err(format!(
                "{file}: {key} holds a `$` or `\\` outside single quotes, which dotenv expands: it would not be imported exactly as written; nothing was changed (put the value in single quotes)"
            ));
        }
    }
    Ok(())
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
    /// What a state read (`StateStore::load`) means for importing `legacy`.
    pub fn of(stored: Result<Option<State>, String>, legacy: &Legacy) -> Self {
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
    /// SHA-256 of the configured token for the same node, so `run` tries the imported
    /// token first and keeps the configured one as its fallback.
    pub configured_sha256: Option<String>,
}

/// The decision, pure: refuses what `run` would refuse later (another API URL, another
/// configured node) and what would lose a token (another node's state) unless forced.
pub fn decide(
    legacy: &Legacy,
    cfg: &Config,
    existing: &Existing,
    force: bool,
) -> Result<Plan, Exit> {
    let file = cfg.file_hint();
    if legacy.api_url != cfg.api.url {
        return Err(Exit::config(format!(
            "the legacy node talks to API_URL={} but this agent is configured for {}; \
             set api.url = \"{}\" in {file} (or EXALSIUS_API_URL) and run import-legacy again",
            legacy.api_url, cfg.api.url, legacy.api_url
        )));
    }
    if let Some(id) = cfg.api.node_id
        && id != legacy.node_id
    {
        return Err(Exit::config(format!(
            "api.node_id = {id} in {} differs from the legacy NODE_ID {}; \
             remove api.node_id (the state will hold it) or fix it",
            cfg.origin_of("api.node_id"),
            legacy.node_id
        )));
    }
    let configured_sha256 = match (cfg.api.node_id, &cfg.api.access_token) {
        (Some(_), Some(t)) => Some(t.sha256_hex()),
        _ => None,
    };
    let refuse = |why: String| {
        Err(Exit::runtime(format!(
            "{why}; use --force to replace it with the legacy node (the old state is kept as state.json.bak); nothing was changed"
        )))
    };
    let keep_old = match existing {
        Existing::None => false,
        Existing::Imported => {
            return Ok(Plan {
                write_state: false,
                keep_old: false,
                configured_sha256,
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
        configured_sha256,
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
    state.configured_token_sha256 = plan.configured_sha256.clone();
    state
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
    fn values_are_taken_exactly_as_written_or_refused() {
        // In single quotes nothing is expanded: the token as written.
        let l = parse(&format!(
            "NODE_ID={ID}\nAPI_URL=https://api.exalsius.ai/v1\nAUTH_TOKEN='tok$HOME\\n' # note\n"
        ))
        .unwrap();
        assert_eq!(l.token.expose(), "tok$HOME\\n");
        // Elsewhere `$NAME` and escapes would be expanded: refused, the value never shown.
        for token in ["tok$HOME", "\"tok${X}\"", "tok\\x", "\"a\\\"b\""] {
            let text = format!(
                "NODE_ID={ID}\nAPI_URL=https://api.exalsius.ai/v1\nexport AUTH_TOKEN={token}\n"
            );
            let e = parse(&text).unwrap_err();
            assert!(
                e.contains("AUTH_TOKEN") && e.contains("exactly as written"),
                "{token}: {e}"
            );
            assert!(!e.contains(token), "{e}");
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
            configured_sha256: None,
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
        // A configured token for the same node stays the fallback.
        let c = cfg(&format!("node_id = \"{ID}\"\naccess_token = \"boot\"\n"));
        let plan = decide(&l, &c, &Existing::None, false).unwrap();
        assert_eq!(
            plan.configured_sha256,
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
        assert_eq!(s.configured_token_sha256, None);
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
}
