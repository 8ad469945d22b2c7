//! Validators for single values; each message names what is wrong (the caller adds the key).

use super::MIN_DURATION;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;
use uuid::Uuid;

/// `metrics.textfile`: an absolute `*.prom` path (node_exporter reads nothing else). A missing
/// directory is a warning, not an error: node_exporter may be installed later.
pub(super) fn validate_textfile(p: &Path) -> Result<Option<String>, String> {
    if !p.is_absolute() {
        return Err(format!("= {} must be an absolute path", p.display()));
    }
    if p.extension().is_none_or(|e| e != "prom") {
        return Err(format!(
            "= {}: node_exporter's textfile collector reads only files ending in .prom",
            p.display()
        ));
    }
    let parent = p.parent().map(Path::to_path_buf);
    let (path, dir) = (p.to_path_buf(), parent.clone());
    // The directory may sit on a mount that does not answer: that must not hold the start or
    // a reload (the metrics writes have their own thread).
    let answer = TEXTFILE_STAT.run(TEXTFILE_STAT_TIMEOUT, move || {
        (path.is_dir(), dir.is_some_and(|d| d.is_dir()))
    });
    let shown = parent.as_deref().unwrap_or(p).display();
    match answer {
        Ok((true, _)) => Err(format!(
            "= {} is a directory; name a file in it",
            p.display()
        )),
        Ok((false, true)) => Ok(None),
        Ok((false, false)) => Ok(Some(format!(
            "metrics.textfile: directory {shown} does not exist (yet); metrics are written once it does"
        ))),
        Err(e) => Ok(Some(format!(
            "metrics.textfile: directory {shown} {e} (a file system that does not answer); heartbeats go on, metrics are written once it answers"
        ))),
    }
}

/// Checks of the metrics directory, one in flight (see [`crate::bounded`]).
static TEXTFILE_STAT: crate::bounded::Kind = crate::bounded::Kind::new();
/// A local directory answers at once; a network mount that answers, in milliseconds.
const TEXTFILE_STAT_TIMEOUT: Duration = Duration::from_secs(1);

/// Mode bits of a shared directory: writable by every user, or sticky (`/tmp`, `/var/tmp`),
/// where anyone may create entries.
pub const SHARED_DIR_BITS: u32 = 0o1002;

/// True when `mode` (of a directory) marks a shared directory ([`SHARED_DIR_BITS`]).
pub fn is_shared_dir_mode(mode: u32) -> bool {
    mode & SHARED_DIR_BITS != 0
}

/// `state.dir`: never a shared directory ([`SHARED_DIR_BITS`]); directly inside one only as
/// an existing directory of the agent's own user (`mktemp -d` makes one). The directory holds
/// the node's credential: in `/tmp` every user can create a missing name first — a directory
/// of their own or a symlink — between any check and the agent's `mkdir`, and the agent must
/// not make a shared directory private (it is not its own, whoever owns it). What cannot be
/// read now is left to the state store, which reports it when used.
pub(super) fn validate_state_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = |p: &Path| {
        std::fs::symlink_metadata(p)
            .ok()
            .filter(std::fs::Metadata::is_dir)
            .map(|m| m.permissions().mode() & 0o7777)
    };
    if let Some(m) = mode(dir).filter(|&m| is_shared_dir_mode(m)) {
        return Err(format!(
            "= {} is a shared directory (mode {m:04o}: every user can create files in it, like /tmp); the node's token needs a directory of its own: name one outside it, e.g. {}",
            dir.display(),
            super::DEFAULT_STATE_DIR
        ));
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    let Some((parent, m)) = parent.and_then(|p| Some((p, mode(p)?))) else {
        return Ok(());
    };
    if !is_shared_dir_mode(m) {
        return Ok(());
    }
    let me = crate::perms::current_uid();
    let why = match std::fs::symlink_metadata(dir) {
        Ok(d) if d.is_dir() && Some(d.uid()) == me => return Ok(()),
        Ok(d) if d.is_dir() => format!("it belongs to uid {}, not to this user", d.uid()),
        Ok(_) => "it is not a directory (a symlink?)".to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            "it does not exist, and another user could create it first (or a symlink by its name)"
                .to_string()
        }
        Err(_) => return Ok(()),
    };
    Err(format!(
        "= {} lies directly in {}, a shared directory (mode {m:04o}), and {why}: the node's token could be read; create it yourself as the agent's user (install -d -m 0700 {0}) or name a directory whose parent only root or the agent can write, e.g. {}",
        dir.display(),
        parent.display(),
        super::DEFAULT_STATE_DIR
    ))
}

/// Every duration has a range; the message names it.
pub(super) fn bounded(d: Duration, max: Duration) -> Result<(), String> {
    if d.is_zero() {
        Err("must be greater than zero".to_string())
    } else if d < MIN_DURATION || d > max {
        Err(format!(
            "= {} is out of range ({} – {})",
            humantime::format_duration(d),
            humantime::format_duration(MIN_DURATION),
            humantime::format_duration(max)
        ))
    } else {
        Ok(())
    }
}

pub(super) fn parse_uuid(s: &str) -> Result<Uuid, String> {
    Uuid::parse_str(s.trim()).map_err(|e| format!("= {s:?} is not a UUID: {e}"))
}

/// Checks scheme and host, refuses cleartext HTTP to anything but loopback unless allowed, and
/// strips the trailing `/`.
pub fn validate_url(raw: &str, allow_insecure_http: bool) -> Result<String, String> {
    let url =
        reqwest::Url::parse(raw.trim()).map_err(|e| format!("= {raw:?} is not a URL: {e}"))?;
    let host = url
        .host_str()
        .ok_or_else(|| format!("= {raw:?} has no host"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials (user:password@)".to_string());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("= {raw:?} must not have a query or fragment"));
    }
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure_http || is_loopback(host) => {}
        "http" => {
            return Err(format!(
                "= {raw:?} uses cleartext http:// to a non-loopback host; use https:// or set api.allow_insecure_http = true"
            ));
        }
        other => return Err(format!("= {raw:?}: scheme {other:?} is not http or https")),
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// `state.dir` on a shared directory (`/tmp`: sticky, every user may create files) or
    /// directly inside one is refused, naming why; a directory of its own is fine.
    #[test]
    fn a_shared_state_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        for mode in [0o1777, 0o777, 0o1755, 0o773] {
            std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = validate_state_dir(&shared).unwrap_err();
            assert!(e.contains("shared directory"), "{mode:o}: {e}");
            // Missing inside it: another user could create it first.
            let inside = shared.join("agent");
            let e = validate_state_dir(&inside).unwrap_err();
            assert!(e.contains("could create it first"), "{mode:o}: {e}");
            // An existing directory of this user (`mktemp -d`): fine.
            std::fs::create_dir(&inside).unwrap();
            validate_state_dir(&inside).unwrap();
            // Another user's (root only), or a symlink: refused.
            if crate::perms::is_root() {
                std::os::unix::fs::chown(&inside, Some(65534), Some(65534)).unwrap();
                let e = validate_state_dir(&inside).unwrap_err();
                assert!(e.contains("uid 65534"), "{mode:o}: {e}");
            }
            std::fs::remove_dir(&inside).unwrap();
            std::os::unix::fs::symlink(tmp.path(), &inside).unwrap();
            let e = validate_state_dir(&inside).unwrap_err();
            assert!(e.contains("not a directory"), "{mode:o}: {e}");
            std::fs::remove_file(&inside).unwrap();
        }
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        validate_state_dir(&shared).unwrap();
        validate_state_dir(&shared.join("agent")).unwrap();
        // Not there, parent not there: created later, nothing to judge yet.
        validate_state_dir(&tmp.path().join("a/b/c")).unwrap();
        // The mode of a directory that is checked is never changed.
        assert_eq!(
            std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777,
            0o755
        );
    }
}
