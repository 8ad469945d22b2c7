//! When the next heartbeat goes out: interval ± jitter, exponential backoff with equal jitter,
//! the slow schedule after a rejected token, and the cap that keeps a token from expiring
//! while the agent waits. Pure functions of their inputs (plus a random draw), tested without
//! a clock.

use crate::config::HeartbeatConfig;
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use std::time::{Duration, SystemTime};

/// What an attempt's outcome means for the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A 2xx: the normal cadence (after the very first success: the start splay).
    Ok,
    /// Transport error, timeout, 5xx, 429, unusable 2xx: exponential backoff, at least
    /// `Retry-After`.
    Retryable {
        /// The server's `Retry-After`, already capped.
        retry_after: Option<Duration>,
    },
    /// Try again at once (the configured token after a 401, a pure heartbeat after a rejected
    /// body).
    Now,
    /// 401/403 with nothing to try at once, 404: the slow schedule.
    Slow,
    /// 400/422 and other answers retrying soon will not change: the normal cadence.
    Rejected,
}

/// The heartbeat schedule: turns each outcome into the wait before the next attempt.
#[derive(Debug)]
pub struct Schedule {
    interval: Duration,
    jitter: f64,
    max_backoff: Duration,
    backoff: Backoff,
    /// The wait after the first success is a uniformly random fraction of the interval.
    splay_pending: bool,
}

impl Schedule {
    /// The schedule for `[heartbeat]`.
    pub fn new(hb: &HeartbeatConfig) -> Self {
        Self {
            interval: hb.interval,
            jitter: hb.jitter,
            max_backoff: hb.max_backoff,
            backoff: Backoff::new(hb.initial_backoff, hb.max_backoff),
            splay_pending: true,
        }
    }

    /// New settings (SIGHUP); the start splay is not repeated.
    pub fn reconfigure(&mut self, hb: &HeartbeatConfig) {
        let splay_pending = self.splay_pending;
        let jitter = self.backoff.jitter;
        *self = Self::new(hb);
        self.splay_pending = splay_pending;
        self.backoff.jitter = jitter;
    }

    /// Turns the backoff jitter off (fleet benchmark only).
    pub fn without_backoff_jitter(mut self) -> Self {
        self.backoff = self.backoff.without_jitter();
        self
    }

    /// Turns the start splay off (fleet benchmark only: shows the bunching it prevents).
    pub fn without_splay(mut self) -> Self {
        self.splay_pending = false;
        self
    }

    /// The wait after an outcome, capped so that the stored token (expiring at
    /// `expires_at`) is renewed before half of its remaining lifetime is gone.
    pub fn next(
        &mut self,
        v: Verdict,
        expires_at: Option<SystemTime>,
        now: SystemTime,
    ) -> Duration {
        let wait = match v {
            Verdict::Ok => {
                self.backoff.reset();
                if std::mem::take(&mut self.splay_pending) {
                    self.interval.mul_f64(fastrand::f64())
                } else {
                    jittered(self.interval, self.jitter)
                }
            }
            Verdict::Retryable { retry_after } => {
                let d = self.backoff.next_delay();
                retry_after.map_or(d, |ra| d.max(ra))
            }
            Verdict::Now => Duration::ZERO,
            Verdict::Slow => slow_wait(self.max_backoff, self.jitter),
            Verdict::Rejected => jittered(self.interval, self.jitter),
        };
        cap_for_token(wait, expires_at, now)
    }
}

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

    fn hb(interval: u64, initial: u64, max: u64, jitter: f64) -> HeartbeatConfig {
        HeartbeatConfig {
            interval: Duration::from_secs(interval),
            jitter,
            initial_backoff: Duration::from_secs(initial),
            max_backoff: Duration::from_secs(max),
        }
    }

    const NOW: SystemTime = SystemTime::UNIX_EPOCH;

    #[test]
    fn the_first_success_is_followed_by_a_random_fraction_of_the_interval() {
        let mut fractions = Vec::new();
        for _ in 0..2_000 {
            let mut s = Schedule::new(&hb(60, 1, 300, 0.1));
            let first = s.next(Verdict::Ok, None, NOW);
            assert!(first <= Duration::from_secs(60));
            fractions.push(first.as_secs_f64() / 60.0);
            // Then interval ± jitter.
            for _ in 0..5 {
                let d = s.next(Verdict::Ok, None, NOW);
                assert!(
                    d >= Duration::from_secs(54) && d <= Duration::from_secs(66),
                    "{d:?}"
                );
            }
        }
        // Uniform over [0, 1): each decile holds roughly a tenth.
        for decile in 0..10 {
            let lo = f64::from(decile) / 10.0;
            let n = fractions
                .iter()
                .filter(|&&f| f >= lo && f < lo + 0.1)
                .count();
            assert!((120..=280).contains(&n), "decile {decile}: {n} of 2000");
        }
        // A reload does not splay again.
        let mut s = Schedule::new(&hb(60, 1, 300, 0.0));
        s.next(Verdict::Ok, None, NOW);
        s.reconfigure(&hb(10, 1, 300, 0.0));
        assert_eq!(s.next(Verdict::Ok, None, NOW), Duration::from_secs(10));
        assert_eq!(
            Schedule::new(&hb(60, 1, 300, 0.0))
                .without_splay()
                .next(Verdict::Ok, None, NOW),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn each_outcome_has_its_wait() {
        let mut s = Schedule::new(&hb(60, 1, 300, 0.0)).without_splay();
        // Backoff grows (equal jitter: between half and all of 1, 2, 4, 8 s) up to the cap...
        for nominal in [1u64, 2, 4, 8] {
            let d = s.next(Verdict::Retryable { retry_after: None }, None, NOW);
            let n = Duration::from_secs(nominal);
            assert!(d >= n / 2 && d <= n, "{d:?} for {n:?}");
        }
        for _ in 0..20 {
            s.next(Verdict::Retryable { retry_after: None }, None, NOW);
        }
        let capped = s.next(Verdict::Retryable { retry_after: None }, None, NOW);
        assert!(capped >= Duration::from_secs(150) && capped <= Duration::from_secs(300));
        // ... Retry-After wins when longer ...
        let ra = s.next(
            Verdict::Retryable {
                retry_after: Some(Duration::from_secs(1800)),
            },
            None,
            NOW,
        );
        assert_eq!(ra, Duration::from_secs(1800));
        // ... and a success resets it.
        assert_eq!(s.next(Verdict::Ok, None, NOW), Duration::from_secs(60));
        let d = s.next(Verdict::Retryable { retry_after: None }, None, NOW);
        assert!(d <= Duration::from_secs(1), "{d:?}");
        assert_eq!(s.next(Verdict::Now, None, NOW), Duration::ZERO);
        assert_eq!(s.next(Verdict::Slow, None, NOW), Duration::from_secs(300));
        assert_eq!(
            s.next(Verdict::Rejected, None, NOW),
            Duration::from_secs(60)
        );
        // Every one of them stops short of half the token's remaining lifetime.
        let expires = Some(NOW + Duration::from_secs(100));
        for v in [
            Verdict::Ok,
            Verdict::Retryable {
                retry_after: Some(Duration::from_secs(3600)),
            },
            Verdict::Slow,
            Verdict::Rejected,
        ] {
            assert_eq!(s.next(v, expires, NOW), Duration::from_secs(50), "{v:?}");
        }
    }

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
