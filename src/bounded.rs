//! File-system calls that only ask (is this a directory?) on paths whose mount may stop
//! answering, made on a thread of their own and awaited for a bounded time. A thread stuck in
//! the kernel cannot be cancelled, so each kind of call has at most one in flight: while one is
//! stuck, the next is not made and the caller hears so at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Why a bounded call has no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Stalled {
    /// It did not return in time (it goes on, abandoned).
    #[error("did not answer within {0:?}")]
    TimedOut(Duration),
    /// An earlier call of this kind has not returned: this one was not made.
    #[error("has not answered an earlier call yet")]
    StillStuck,
    /// No thread could be started for it.
    #[error("no thread could be started for it")]
    NoThread,
}

/// One kind of bounded call (one in flight at a time).
#[derive(Debug)]
pub struct Kind {
    busy: AtomicBool,
}

impl Kind {
    /// A kind with nothing in flight.
    pub const fn new() -> Self {
        Self {
            busy: AtomicBool::new(false),
        }
    }

    /// Runs `f` on a thread without waiting for it (unless one of this kind is in flight).
    pub fn spawn(&'static self, f: impl FnOnce() + Send + 'static) -> Result<(), Stalled> {
        self.run(Duration::ZERO, f).or_else(|e| match e {
            Stalled::TimedOut(_) => Ok(()),
            other => Err(other),
        })
    }

    /// Runs `f` on a thread and waits at most `timeout` for its answer.
    pub fn run<T: Send + 'static>(
        &'static self,
        timeout: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Stalled> {
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(Stalled::StillStuck);
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("bounded-fs".into())
            .spawn(move || {
                let answer = f();
                self.busy.store(false, Ordering::Release);
                let _ = tx.send(answer);
            });
        if spawned.is_err() {
            self.busy.store(false, Ordering::Release);
            return Err(Stalled::NoThread);
        }
        rx.recv_timeout(timeout)
            .map_err(|_| Stalled::TimedOut(timeout))
    }
}

impl Default for Kind {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_stuck_call_blocks_the_next_of_its_kind_only() {
        static STUCK: Kind = Kind::new();
        static OTHER: Kind = Kind::new();
        let (release, wait) = mpsc::channel::<()>();
        let first = STUCK.run(Duration::from_millis(20), move || {
            let _ = wait.recv();
        });
        assert_eq!(first, Err(Stalled::TimedOut(Duration::from_millis(20))));
        assert_eq!(
            STUCK.run(Duration::from_secs(5), || 1),
            Err(Stalled::StillStuck)
        );
        assert_eq!(OTHER.run(Duration::from_secs(5), || 2), Ok(2));
        release.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match STUCK.run(Duration::from_secs(5), || 3) {
                Ok(v) => break assert_eq!(v, 3),
                Err(Stalled::StillStuck) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}
