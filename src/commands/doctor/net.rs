//! `doctor`'s path to the API, phase by phase: the proxy in effect, DNS, TCP, TLS (with the
//! configured trust, showing the certificate), an HTTP answer without the token, and the clock
//! offset from the answer's `Date`. Every phase is bounded by `api.connect_timeout` /
//! `api.timeout`.

use super::{Check, Status};
use crate::api::ApiClient;
use crate::config::Config;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

/// A clock further off than this is worth a warning.
pub const MAX_CLOCK_OFFSET: Duration = Duration::from_secs(60);
/// Environment variables reqwest reads for proxies (both spellings).
const PROXY_VARS: [&str; 8] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// `user:password@` in a proxy URL never reaches the output.
pub fn redact_userinfo(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://<redacted>@{}", &url[..s], &url[at + 1..]),
        (None, Some(at)) => format!("<redacted>@{}", &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// The proxy variables of an environment (`NAME=value` pairs), redacted.
pub fn proxy_settings(env: &[(String, String)]) -> Vec<String> {
    PROXY_VARS
        .iter()
        .filter_map(|k| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| format!("{k}={}", redact_userinfo(v)))
        })
        .collect()
}

/// Whether `host` is excluded by a `NO_PROXY` list (suffix match, `*` for all).
fn no_proxy_matches(list: &str, host: &str) -> bool {
    list.split(',').map(str::trim).any(|e| {
        !e.is_empty()
            && (e == "*"
                || host == e.trim_start_matches('.')
                || host.ends_with(&format!(".{}", e.trim_start_matches('.'))))
    })
}

/// The proxy this process would use for `url` (what reqwest does with the environment).
fn proxy_for(url: &reqwest::Url, env: &[(String, String)]) -> Option<String> {
    let get = |names: &[&str]| {
        names.iter().find_map(|n| {
            env.iter()
                .find(|(k, v)| k == n && !v.is_empty())
                .map(|(_, v)| v.clone())
        })
    };
    let host = url.host_str().unwrap_or_default();
    if get(&["NO_PROXY", "no_proxy"]).is_some_and(|l| no_proxy_matches(&l, host)) {
        return None;
    }
    match url.scheme() {
        "https" => get(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]),
        _ => get(&["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]),
    }
}

/// Everything network, in order; later phases are skipped once one fails.
pub async fn checks(cfg: &Config, unit_env: Option<Vec<(String, String)>>) -> Vec<Check> {
    let mut out = Vec::new();
    let Ok(url) = reqwest::Url::parse(&cfg.api.url) else {
        return out;
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    let proxy = proxy_for(&url, &env);
    out.push(proxy_check(&env, unit_env.as_deref(), proxy.as_deref()));
    // With a proxy, DNS and TCP are about the proxy; TLS to the API runs inside its tunnel and
    // is proved by the HTTP phase.
    let target = match &proxy {
        Some(p) => reqwest::Url::parse(p)
            .or_else(|_| reqwest::Url::parse(&format!("http://{p}")))
            .ok(),
        None => Some(url.clone()),
    };
    let Some(target) = target else {
        out.push(Check::fail(
            "proxy",
            "the proxy setting is not a URL".to_string(),
            "fix HTTPS_PROXY / HTTP_PROXY",
        ));
        return out;
    };
    let host = target.host_str().unwrap_or_default().to_string();
    let port = target.port_or_known_default().unwrap_or(443);
    let what = if proxy.is_some() { "proxy" } else { "API" };
    let Some(addrs) = dns(&host, port, cfg.api.connect_timeout, what, &mut out).await else {
        return out;
    };
    let Some(addr) = tcp(&addrs, &host, cfg.api.connect_timeout, what, &mut out).await else {
        return out;
    };
    if proxy.is_none() && url.scheme() == "https" {
        if !super::tls::tls(cfg, &host, addr, &mut out).await {
            return out;
        }
    } else if proxy.is_none() {
        out.push(Check::info(
            "tls",
            format!("{} is plain http: no TLS", cfg.api.url),
        ));
    }
    http(cfg, &mut out).await;
    out
}

fn proxy_check(
    env: &[(String, String)],
    unit_env: Option<&[(String, String)]>,
    proxy: Option<&str>,
) -> Check {
    let mine = proxy_settings(env);
    let finding = match proxy {
        Some(p) => format!("requests go through {}", redact_userinfo(p)),
        None if mine.is_empty() => "none (direct connection)".to_string(),
        None => format!("none for the API ({})", mine.join(", ")),
    };
    match unit_env.map(proxy_settings) {
        Some(unit) if unit != mine => Check::warn(
            "proxy",
            format!(
                "{finding}; but the service's unit sets {}",
                if unit.is_empty() {
                    "no proxy".to_string()
                } else {
                    unit.join(", ")
                }
            ),
            "run doctor with the service's proxy environment to test its path",
        ),
        _ => Check::ok("proxy", finding),
    }
}

async fn dns(
    host: &str,
    port: u16,
    timeout: Duration,
    what: &str,
    out: &mut Vec<Check>,
) -> Option<Vec<SocketAddr>> {
    if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    {
        out.push(Check::ok("dns", format!("{ip} is an address: no lookup")));
        return Some(vec![SocketAddr::new(ip, port)]);
    }
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            let shown: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            out.push(Check::ok("dns", format!("{host} → {}", shown.join(", "))));
            Some(addrs)
        }
        Ok(Err(e)) => {
            out.push(Check::fail(
                "dns",
                format!("cannot resolve the {what} host {host}: {e}"),
                "check the host name in api.url and this machine's resolver (/etc/resolv.conf, resolvectl status)",
            ));
            None
        }
        Err(_) => {
            out.push(Check::fail(
                "dns",
                format!(
                    "resolving {host} did not answer within {}s",
                    timeout.as_secs_f64()
                ),
                "the resolver hangs: check /etc/resolv.conf and the DNS server",
            ));
            None
        }
    }
}

async fn tcp(
    addrs: &[SocketAddr],
    host: &str,
    timeout: Duration,
    what: &str,
    out: &mut Vec<Check>,
) -> Option<SocketAddr> {
    let mut errors = Vec::new();
    for addr in addrs {
        let started = std::time::Instant::now();
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => {
                out.push(Check::ok(
                    "tcp",
                    format!(
                        "connected to {addr} in {} ms",
                        started.elapsed().as_millis()
                    ),
                ));
                return Some(*addr);
            }
            Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
            Err(_) => errors.push(format!(
                "{addr}: timed out after {}s",
                timeout.as_secs_f64()
            )),
        }
    }
    out.push(Check::fail(
        "tcp",
        format!(
            "cannot connect to the {what} ({host}): {}",
            errors.join("; ")
        ),
        "check that the host and port in api.url are right and that no firewall blocks the way out",
    ));
    None
}

async fn http(cfg: &Config, out: &mut Vec<Check>) {
    let client = match ApiClient::new(&cfg.api) {
        Ok(c) => c,
        Err(e) => {
            out.push(Check::fail(
                "http",
                e.to_string(),
                "fix [api] in the config",
            ));
            return;
        }
    };
    match client.probe(&format!("{}/", cfg.api.url)).await {
        Ok(p) => {
            out.push(Check::ok(
                "http",
                format!(
                    "HTTP {} from {} in {} ms (any answer proves the path; no token sent)",
                    p.status,
                    cfg.api.url,
                    p.latency.as_millis()
                ),
            ));
            out.push(clock(p.date, SystemTime::now()));
        }
        Err(e) => out.push(Check::fail(
            "http",
            e,
            "the lower phases worked: check a proxy's rules and api.timeout",
        )),
    }
}

/// The clock offset from the server's `Date` (whole seconds, so ±1 s is noise).
pub fn clock(date: Option<SystemTime>, now: SystemTime) -> Check {
    let Some(date) = date else {
        return Check::info(
            "clock",
            "the API sent no Date header: offset unknown".to_string(),
        );
    };
    let (ahead, offset) = match now.duration_since(date) {
        Ok(d) => (true, d),
        Err(e) => (false, e.duration()),
    };
    let text = format!(
        "this machine is {}s {} the API's clock",
        offset.as_secs(),
        if ahead { "ahead of" } else { "behind" }
    );
    if offset > MAX_CLOCK_OFFSET {
        Check::warn(
            "clock",
            text,
            "enable time synchronisation (timedatectl set-ntp true); token expiry and TLS depend on the clock",
        )
    } else {
        Check {
            status: Status::Ok,
            ..Check::info("clock", text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn proxies_as_reqwest_reads_them_and_never_their_passwords() {
        let url = reqwest::Url::parse("https://api.exalsius.ai/v1").unwrap();
        let e = env(&[("HTTPS_PROXY", "http://user:pw@proxy:3128")]);
        assert_eq!(
            proxy_for(&url, &e).as_deref(),
            Some("http://user:pw@proxy:3128")
        );
        assert_eq!(
            proxy_settings(&e),
            vec!["HTTPS_PROXY=http://<redacted>@proxy:3128"]
        );
        let e = env(&[("https_proxy", "http://p:1"), ("NO_PROXY", ".exalsius.ai")]);
        assert_eq!(proxy_for(&url, &e), None);
        let e = env(&[("HTTP_PROXY", "http://p:1")]);
        assert_eq!(proxy_for(&url, &e), None, "http_proxy is not for https");
        assert_eq!(redact_userinfo("http://proxy:3128"), "http://proxy:3128");
    }

    #[test]
    fn clock_offsets() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(clock(Some(now), now).status, Status::Ok);
        let c = clock(Some(now - Duration::from_secs(300)), now);
        assert_eq!(c.status, Status::Warn);
        assert!(c.finding.contains("300s ahead"), "{}", c.finding);
        let c = clock(Some(now + Duration::from_secs(61)), now);
        assert!(c.finding.contains("61s behind"), "{}", c.finding);
        assert_eq!(clock(None, now).status, Status::Info);
    }
}
