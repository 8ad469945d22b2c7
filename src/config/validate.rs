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
    if p.is_dir() {
        return Err(format!(
            "= {} is a directory; name a file in it",
            p.display()
        ));
    }
    Ok(p.parent().filter(|d| !d.is_dir()).map(|d| {
        format!(
            "metrics.textfile: directory {} does not exist (yet); metrics are written once it does",
            d.display()
        )
    }))
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
