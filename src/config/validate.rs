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
