//! `status`: the last heartbeat from the state file, as a health check.

use super::{Exit, load_config};
use crate::cli::StatusArgs;
use crate::config::Overrides;
use crate::state::{State, StateStore, rfc3339};
use serde::Serialize;
use std::time::{Duration, SystemTime};

/// `status --json` (never the token).
#[derive(Debug, Serialize)]
struct StatusView {
    node_id: String,
    api_url: String,
    last_attempt_at: Option<String>,
    last_result: &'static str,
    last_error: Option<String>,
    last_success_at: Option<String>,
    last_success_age_seconds: Option<u64>,
    consecutive_failures: u32,
    token_type: String,
    token_expires_at: Option<String>,
    healthy: bool,
    healthy_if_success_within_seconds: u64,
    /// Why health cannot be judged from the timestamps (the clock moved back).
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
    /// `state.json`, or `reserve` while `state.json` could not be saved since the newest token
    /// was issued (that token is in `state.reserve` and is the one presented next).
    token_saved_in: &'static str,
}

/// Runs `status`: 0 when the last success is younger than 3 × `heartbeat.interval`, else 1
/// (a health check; the view is printed either way).
pub fn run(overrides: &Overrides, args: &StatusArgs) -> Result<(), Exit> {
    let cfg = load_config(overrides)?;
    let store = StateStore::new(&cfg.state.dir);
    // Read only: `status` changes nothing, not even a mode that is too open.
    let loaded = store.peek_parts();
    let in_reserve = loaded.as_ref().is_ok_and(|l| l.reserve_seq.is_some());
    let state = match loaded.map(|l| l.state) {
        Ok(Some(s)) => s,
        Ok(None) => {
            if args.json {
                crate::outln!("{{\"healthy\":false,\"message\":\"no heartbeat recorded yet\"}}")?;
            } else {
                crate::outln!(
                    "no heartbeat recorded yet ({} does not exist)",
                    store.path().display()
                )?;
            }
            return Err(Exit::quiet());
        }
        Err(e) => return Err(Exit::runtime(e.to_string())),
    };
    let now = SystemTime::now();
    let mut view = view(&state, cfg.heartbeat.interval.saturating_mul(3), now);
    if in_reserve {
        view.token_saved_in = "reserve";
    }
    if args.json {
        let s = serde_json::to_string_pretty(&view)
            .map_err(|e| Exit::runtime(format!("cannot render the status: {e}")))?;
        crate::outln!("{s}")?;
    } else {
        crate::out!("{}", render(&view, &state, now))?;
    }
    if view.healthy {
        Ok(())
    } else {
        // The view says UNHEALTHY (or `"healthy": false`); the exit code is for scripts.
        Err(Exit::quiet())
    }
}

/// How far in the future a recorded success may be and still count as "just now": clock slew
/// and the write itself, not a jump.
const FUTURE_SLACK: Duration = Duration::from_secs(5);

/// The status of a state at `now`, healthy when the last success is younger than `limit`. A
/// success recorded in the future (the local clock moved back since) has no age: not healthy
/// until the next heartbeat records one by the clock as it is now.
fn view(state: &State, limit: Duration, now: SystemTime) -> StatusView {
    let ahead = state
        .last_success_at
        .and_then(|t| t.duration_since(now).ok())
        .filter(|d| *d > FUTURE_SLACK);
    let age = state
        .last_success_at
        .filter(|_| ahead.is_none())
        .map(|t| now.duration_since(t).unwrap_or_default());
    StatusView {
        node_id: state.node_id.to_string(),
        api_url: state.api_url.clone(),
        last_attempt_at: state.last_attempt_at.map(rfc3339),
        last_result: match (&state.last_attempt_at, &state.last_error) {
            (None, _) => "none",
            (Some(_), None) => "ok",
            (Some(_), Some(_)) => "failed",
        },
        last_error: state.last_error.clone(),
        last_success_at: state.last_success_at.map(rfc3339),
        last_success_age_seconds: age.map(|a| a.as_secs()),
        consecutive_failures: state.consecutive_failures,
        token_type: state
            .token_type
            .clone()
            .unwrap_or_else(|| "Bearer".to_string()),
        token_expires_at: state.token_expires_at.map(rfc3339),
        healthy: age.is_some_and(|a| a < limit),
        token_saved_in: "state.json",
        healthy_if_success_within_seconds: limit.as_secs(),
        note: ahead.map(|d| {
            format!(
                "the last success is recorded {} in the future: the clock moved back since; health is known again after the next heartbeat",
                short(d)
            )
        }),
    }
}

/// The human view.
fn render(view: &StatusView, state: &State, now: SystemTime) -> String {
    let ago = |t: Option<SystemTime>| match t {
        None => "never".to_string(),
        Some(t) => format!(
            "{} ({} ago)",
            rfc3339(t),
            short(now.duration_since(t).unwrap_or_default())
        ),
    };
    let result = match &view.last_error {
        Some(e) => format!("failed: {e}"),
        None if state.last_attempt_at.is_some() => "ok".to_string(),
        None => "-".to_string(),
    };
    let expiry = match state.token_expires_at {
        None => "expiry unknown".to_string(),
        Some(t) => match t.duration_since(now) {
            Ok(left) => format!("expires {} (in {})", rfc3339(t), short(left)),
            Err(_) => format!("EXPIRED at {}", rfc3339(t)),
        },
    };
    let limit = short(Duration::from_secs(view.healthy_if_success_within_seconds));
    let saved = if view.token_saved_in == "reserve" {
        "state file:           NOT SAVED since the newest token was issued (a full disk?): it is in state.reserve, which the agent reads beside state.json\n"
    } else {
        ""
    };
    let health = if let Some(note) = &view.note {
        format!("UNKNOWN ({note})")
    } else if view.healthy {
        format!("ok (last success within 3 × interval = {limit})")
    } else {
        format!("UNHEALTHY (no success within 3 × interval = {limit})")
    };
    format!(
        "node:                 {}\napi:                  {}\nlast attempt:         {}: {result}\n\
         last success:         {}\nconsecutive failures: {}\ntoken:                {}, {expiry}\n\
         {saved}health:               {health}\n",
        view.node_id,
        view.api_url,
        ago(state.last_attempt_at),
        ago(state.last_success_at),
        view.consecutive_failures,
        view.token_type,
    )
}

fn short(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::secret::Secret;

    /// A last success in the future (the clock moved back since: NTP after a bad RTC) proves
    /// nothing about now: not healthy, and the view says why. Before this rule its age was 0
    /// and the node read healthy for as long as the clock was behind, even with the agent dead.
    #[test]
    fn a_success_in_the_future_is_not_health() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut s = State::new(uuid::Uuid::nil(), "http://x", Secret::new("t"), None);
        let limit = Duration::from_secs(180);
        s.last_success_at = Some(now - Duration::from_secs(30));
        assert!(view(&s, limit, now).healthy);
        s.last_success_at = Some(now + Duration::from_secs(86_400));
        let v = view(&s, limit, now);
        assert!(!v.healthy);
        assert_eq!(v.last_success_age_seconds, None);
        assert!(
            v.note.as_deref().is_some_and(|n| n.contains("clock")),
            "{:?}",
            v.note
        );
        assert!(render(&v, &s, now).contains("in the future"));
        // A second of slew is no jump.
        s.last_success_at = Some(now + Duration::from_secs(1));
        assert!(view(&s, limit, now).healthy);
    }
}
