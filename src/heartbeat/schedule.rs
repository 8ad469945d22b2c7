//! When the next heartbeat goes out: interval ± jitter, exponential backoff with equal jitter,
//! the slow schedule after a rejected token, and the cap that keeps a token from expiring
//! while the agent waits. Pure functions of their inputs (plus a random draw), tested without
//! a clock.

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use std::time::{Duration, SystemTime};

/// A short-lived token never makes the agent heartbeat more often than this (unless the
/// configured interval is itself shorter): a server that issues tokens valid for 0–1 s must
/// not turn the agent into a request storm.
pub const MIN_TOKEN_REFRESH_WAIT: Duration = Duration::from_secs(1);

/// `interval × (1 ± jitter)`, uniformly.
pub fn jittered(interval: Duration, jitter: f64) -> Duration {
    let factor = 1.0 + jitter * (2.0 * fastrand::f64() - 1.0);
    interval.mul_f64(factor.max(0.0))
}

/// "Equal jitter": `d/2 + random(0, d/2)` — never above `d`, never below half of it.
pub fn equal_jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + half.mul_f64(fastrand::f64())
}

/// The slow schedule (after a 401/403 or a 404): `max_backoff × (1 − jitter × random)`, so a
/// fleet whose tokens were all rejected at once does not retry in lockstep, and no node waits
/// longer than `max_backoff`.
pub fn slow_wait(max_backoff: Duration, jitter: f64) -> Duration {
    max_backoff.mul_f64((1.0 - jitter * fastrand::f64()).clamp(0.0, 1.0))
}

/// Caps `wait` so that the next attempt goes out before half of the token's remaining
/// lifetime is gone (never sooner than [`MIN_TOKEN_REFRESH_WAIT`], unless `wait` is shorter).
/// A token whose expiry is unknown or already past by the wall clock (which can be wrong early
/// at boot) does not cap anything: only the API can say it is no longer valid.
pub fn cap_for_token(wait: Duration, expires_at: Option<SystemTime>, now: SystemTime) -> Duration {
    match expires_at.and_then(|t| t.duration_since(now).ok()) {
        Some(left) if !left.is_zero() => wait.min((left / 2).max(MIN_TOKEN_REFRESH_WAIT)),
        _ => wait,
    }
}

/// Exponential retry delays: `min(max, initial × 2^n)` from backon (without its own jitter,
/// which adds up to +100 % and can overshoot the cap), then equal jitter.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
    jitter: bool,
}

impl Backoff {
    /// Delays from `initial` doubling up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(initial)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        Self {
            builder,
            delays: builder.build(),
            max,
            jitter: true,
        }
    }

    /// The nominal delay of the next retry (before jitter).
    pub fn next_nominal(&mut self) -> Duration {
        // without_max_times: the iterator never ends; the fallback is the cap.
        self.delays.next().unwrap_or(self.max)
    }

    /// The next retry delay, jittered.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next_nominal();
        if self.jitter { equal_jitter(d) } else { d }
    }

    /// Turns the jitter off: for the fleet benchmark, which shows what a fleet without it does
    /// to the API when it comes back. Never used by the agent itself.
    pub fn without_jitter(mut self) -> Self {
        self.jitter = false;
        self
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

/// A duration for log lines: `1.5s`.
pub fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_jitter_bounds() {
        for _ in 0..10_000 {
            let d = Duration::from_secs(10);
            let j = equal_jitter(d);
            assert!(j >= Duration::from_secs(5) && j <= d, "{j:?}");
        }
    }

    #[test]
    fn interval_jitter_bounds() {
        let i = Duration::from_secs(60);
        for _ in 0..10_000 {
            let j = jittered(i, 0.1);
            assert!(
                j >= Duration::from_secs(54) && j <= Duration::from_secs(66),
                "{j:?}"
            );
        }
        assert_eq!(jittered(i, 0.0), i);
    }

    #[test]
    fn slow_wait_never_exceeds_the_cap_and_spreads_by_the_jitter() {
        let max = Duration::from_secs(300);
        let draws: Vec<Duration> = (0..10_000).map(|_| slow_wait(max, 0.1)).collect();
        assert!(
            draws
                .iter()
                .all(|&d| d <= max && d >= Duration::from_secs(270))
        );
        // Spread: a fleet does not retry in lockstep.
        let min = draws.iter().min().copied().unwrap_or_default();
        let top = draws.iter().max().copied().unwrap_or_default();
        assert!(top - min > Duration::from_secs(25), "{min:?}..{top:?}");
        assert_eq!(slow_wait(max, 0.0), max);
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let nominal: Vec<u64> = (0..6).map(|_| b.next_nominal().as_secs()).collect();
        assert_eq!(nominal, vec![1, 2, 4, 8, 10, 10]);
        for _ in 0..200 {
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(10) && d >= Duration::from_secs(5));
        }
        b.reset();
        assert_eq!(b.next_nominal(), Duration::from_secs(1));
    }

    #[test]
    fn no_wait_runs_past_half_the_remaining_token_lifetime() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let hour = Duration::from_secs(3600);
        // 10 minutes left: at most 5 minutes, whatever asked for an hour (Retry-After,
        // backoff, the normal cadence).
        let left = Some(now + Duration::from_secs(600));
        assert_eq!(cap_for_token(hour, left, now), Duration::from_secs(300));
        // A shorter wait is kept.
        assert_eq!(
            cap_for_token(Duration::from_secs(60), left, now),
            Duration::from_secs(60)
        );
        // A token about to expire does not cause a storm.
        let soon = Some(now + Duration::from_millis(300));
        assert_eq!(cap_for_token(hour, soon, now), MIN_TOKEN_REFRESH_WAIT);
        // Unknown expiry, or already past by the wall clock: no cap.
        assert_eq!(cap_for_token(hour, None, now), hour);
        assert_eq!(
            cap_for_token(hour, Some(now - Duration::from_secs(5)), now),
            hour
        );
        assert_eq!(cap_for_token(hour, Some(now), now), hour);
    }
}
