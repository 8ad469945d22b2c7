//! `doctor`'s checks of the agent itself: the config and who can read it, which token `run`
//! would use, the last heartbeat, the token's expiry, and GPU discovery.

use super::Check;
use super::unit::{ServiceUser, owner_name};
use crate::config::{Config, GpuMode};
use crate::heartbeat::credentials::Credentials;
use crate::state::{State, StateStore, rfc3339};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

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

/// How far in the future a recorded success may be and still be "just now" (slew, not a jump).
const CLOCK_SLACK: Duration = Duration::from_secs(5);

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
        &cfg.new_token_advice(),
    ));
    out
}

/// The last-heartbeat and token lines for a state, pure.
/// (Long: two checks with their wording side by side; splitting them would separate the
/// health limit from the message that quotes it.)
/// `token_advice` says where a new token goes (`Config::new_token_advice`: the environment,
/// a token file or the config file).
pub fn heartbeat_lines(
    s: &State,
    interval: Duration,
    now: SystemTime,
    token_advice: &str,
) -> Vec<Check> {
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
        format!("the token was rejected: {token_advice}; or register --force")
    } else {
        "see the service and API checks; journalctl -u exalsius-node-agent".to_string()
    };
    let beat = match s.last_success_at {
        // Recorded in the future: the clock moved back since; its age proves nothing.
        Some(t) if t.duration_since(now).is_ok_and(|d| d > CLOCK_SLACK) => Check::warn(
            "last heartbeat",
            format!(
                "last success recorded at {}, {} in the future: the clock moved back since; health is known again after the next heartbeat{failing}",
                rfc3339(t),
                ago(t, now)
            ),
            "check the clock (timedatectl); run doctor again after the next heartbeat",
        ),
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
            &hint,
        ),
        None => Check::fail(
            "last heartbeat",
            format!("no successful heartbeat yet{failing}"),
            &hint,
        ),
    };
    let token = match s.token_expires_at {
        None => Check::info("token", "expiry unknown (the API did not say)".to_string()),
        Some(t) if t <= now => Check::fail(
            "token",
            format!("the stored token expired at {}", rfc3339(t)),
            &format!(
                "the agent still tries it; if the API rejects it: {token_advice}; or register --force"
            ),
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
    )
    .count_unhealthy_gpus(cfg.inventory.count_unhealthy_gpus);
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
    // A GPU with a health state: the finding names it (the notes), the hint says what to do.
    let mut actions: Vec<String> = Vec::new();
    for g in &report.gpus {
        for s in g.states() {
            let a = format!("GPU {}: {}", g.index, s.action());
            if !actions.contains(&a) {
                actions.push(a);
            }
        }
    }
    if !actions.is_empty() {
        return Check::warn(
            "gpu",
            format!("{}{driver}{notes}", by_source.join(", ")),
            &actions.join("; "),
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
    use super::super::Status;
    use super::*;
    use crate::secret::Secret;
    use uuid::Uuid;

    const ADVICE: &str = "put a new access token in /etc/x.toml (api.access_token) and reload";

    /// A success recorded in the future (the clock moved back) is a warning that says so, not
    /// "succeeded 0s ago"; the token advice is the one given (where the token came from).
    #[test]
    fn a_success_in_the_future_is_no_health_and_the_advice_is_the_origins() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let mut s = State::new(Uuid::nil(), "http://x", Secret::new("t"), None);
        s.last_success_at = Some(now + Duration::from_secs(86_400));
        let lines = heartbeat_lines(
            &s,
            Duration::from_secs(60),
            now,
            "set EXALSIUS_ACCESS_TOKEN",
        );
        assert_eq!(lines[0].status, Status::Warn, "{:?}", lines[0]);
        assert!(lines[0].finding.contains("in the future"), "{:?}", lines[0]);
        s.last_success_at = Some(now - Duration::from_secs(3600));
        s.last_error = Some("HTTP 401 Unauthorized".into());
        s.last_attempt_at = Some(now);
        let lines = heartbeat_lines(
            &s,
            Duration::from_secs(60),
            now,
            "set EXALSIUS_ACCESS_TOKEN",
        );
        let hint = lines[0].hint.as_deref().unwrap_or("");
        assert!(
            hint.contains("EXALSIUS_ACCESS_TOKEN") && !hint.contains("api.access_token"),
            "{hint}"
        );
    }

    #[test]
    fn heartbeat_lines_judge_age_and_expiry() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let mut s = State::new(Uuid::nil(), "http://x", Secret::new("t"), None);
        s.last_success_at = Some(now - Duration::from_secs(30));
        s.token_expires_at = Some(now + Duration::from_secs(3600));
        let lines = heartbeat_lines(&s, Duration::from_secs(60), now, ADVICE);
        assert_eq!(lines[0].status, Status::Ok, "{:?}", lines[0]);
        assert_eq!(lines[1].status, Status::Ok, "{:?}", lines[1]);
        assert!(lines[1].finding.contains("in 1h"), "{}", lines[1].finding);
        s.last_success_at = Some(now - Duration::from_secs(3600));
        s.last_attempt_at = Some(now - Duration::from_secs(5));
        s.last_error = Some("HTTP 401 Unauthorized".into());
        s.consecutive_failures = 9;
        s.token_expires_at = Some(now - Duration::from_secs(1));
        let lines = heartbeat_lines(&s, Duration::from_secs(60), now, ADVICE);
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
