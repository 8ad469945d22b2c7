//! What the transport says: a response body read within a size limit, a transport error turned
//! into one line that names the phase (DNS, connect, TLS, timeout), `Retry-After`.
//!
//! It knows nothing of the client: `client.rs` uses it, never the other way round.

use reqwest::header::HeaderValue;
use std::time::{Duration, SystemTime};

/// A `Retry-After` above this is treated as this: an hour without a heartbeat is already an
/// outage, and a typo on the server must not silence the node for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

pub(super) enum BodyError {
    TooLarge(String),
    Transport(reqwest::Error),
}

/// Reads at most `limit` bytes of body; more is an error (and the rest is never read).
pub(super) async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    if let Some(len) = resp.content_length()
        && len > limit as u64
    {
        return Err(BodyError::TooLarge(format!(
            "body too large: {len} bytes, exceeds the {limit}-byte limit"
        )));
    }
    let mut buf = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > limit {
                    return Err(BodyError::TooLarge(format!(
                        "body too large: exceeds the {limit}-byte limit"
                    )));
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(buf),
            Err(e) => return Err(BodyError::Transport(e)),
        }
    }
}

/// The phase message for a transport error's text (`chain`, its causes on one line).
pub(super) fn phase_message(
    chain: &str,
    connect: bool,
    timeout: bool,
    target: &str,
    host: &str,
    request_timeout: Duration,
    connect_timeout: Duration,
) -> String {
    let t = |d: Duration| format!("{}s", d.as_secs_f64());
    if let Some(i) = chain.find("resolving ") {
        // The resolver's own message names the host and the timeout.
        return chain[i..].to_string();
    }
    let lower = chain.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        let why = if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
            "the server's certificate is not signed by a trusted CA (unknown issuer); if the API or a TLS-inspecting proxy uses a private CA, name it in api.ca_file"
        } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
            "the server's certificate is not valid for this host name (name mismatch); check api.url"
        } else if lower.contains("expired") {
            "the server's certificate has expired (or this machine's clock is wrong)"
        } else if lower.contains("notvalidyet") || lower.contains("not valid yet") {
            "the server's certificate is not valid yet (or this machine's clock is wrong)"
        } else {
            "the handshake failed"
        };
        return format!("TLS handshake with {host} failed: {why} ({chain})");
    }
    if connect && timeout {
        return format!(
            "cannot connect to {target}: timed out after {} ({chain})",
            t(connect_timeout)
        );
    }
    if connect {
        let reason = if lower.contains("refused") {
            "connection refused"
        } else if lower.contains("unreachable") {
            "network unreachable"
        } else {
            "connect failed"
        };
        return format!("cannot connect to {target}: {reason} ({chain})");
    }
    if timeout {
        return format!(
            "no response within api.timeout ({}): timed out ({chain})",
            t(request_timeout)
        );
    }
    chain.to_string()
}

/// `Retry-After` as delta-seconds or an HTTP date, capped at [`MAX_RETRY_AFTER`]. A date is
/// measured against the response's `Date` header (`date`: the server's clock on both sides,
/// so a node whose own clock is wrong — before NTP, a bad RTC — waits what the server meant).
/// Without a readable `Date` it is measured against `now` (the local clock), and a date more
/// than [`MAX_RETRY_AFTER`] ahead is not believed (a wrong local clock, most likely): `None`,
/// the usual backoff applies. A date in the past is zero.
pub fn retry_after(
    value: Option<&HeaderValue>,
    date: Option<&HeaderValue>,
    now: SystemTime,
) -> Option<Duration> {
    let s = value?.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let when = httpdate::parse_http_date(s).ok()?;
    let server_now = date
        .and_then(|d| d.to_str().ok())
        .and_then(|d| httpdate::parse_http_date(d.trim()).ok());
    match server_now {
        Some(server_now) => Some(
            when.duration_since(server_now)
                .unwrap_or(Duration::ZERO)
                .min(MAX_RETRY_AFTER),
        ),
        None => {
            let d = when.duration_since(now).unwrap_or(Duration::ZERO);
            (d <= MAX_RETRY_AFTER).then_some(d)
        }
    }
}

/// The error and its causes on one line ("error sending request …: connection refused").
pub(super) fn transport_error(e: &reqwest::Error) -> String {
    let mut msg = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    let mut last = String::new();
    while let Some(s) = source {
        let text = s.to_string();
        if text != last && !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        last = text;
        source = s.source();
    }
    msg
}
