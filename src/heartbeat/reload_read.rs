//! SIGHUP's reads, off the runtime: the config file, the token file and the CA file are paths
//! the operator chose, and any of them may sit on a mount that stops answering (NFS, a FUSE
//! daemon). They are read on a blocking thread, awaited for at most [`RELOAD_READ_TIMEOUT`];
//! one read is in flight at a time (a thread stuck in the kernel cannot be cancelled, so they
//! must not pile up), and the loop's heartbeats, watchdog and SIGTERM go on meanwhile.

use super::*;

/// A reload whose reads take longer is given up and the running configuration kept: a local
/// file or a network mount that answers takes milliseconds, so 5 s is a file system that
/// stopped answering (short enough that `systemctl reload`, which waits for the answer, does
/// not look hung).
pub const RELOAD_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What a reload read: the configuration and the API client built from it (which read the CA
/// file), or why the running configuration is kept.
pub(super) type Loaded = Result<(Config, ApiClient), String>;

/// The reloads of one run: the reloader, and the read in flight.
pub(super) struct Reloads {
    /// `None` while its read is in flight (it travels with the read and comes back with it),
    /// or when the agent was started without one.
    reloader: Option<Reloader>,
    pending: Option<Pending>,
    /// A SIGHUP came while a read was in flight: read again when it ends (the files may have
    /// changed after they were read).
    again: bool,
}

struct Pending {
    handle: tokio::task::JoinHandle<(Reloader, Loaded)>,
    started: Instant,
    /// Given up (reported); its result, when it comes, is not applied.
    overdue: bool,
}

/// What a SIGHUP started.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Requested {
    /// A read is on its way: [`Reloads::next`] has its result.
    Started,
    /// A read is in flight already; another follows it.
    Queued,
    /// A read given up earlier has not returned: nothing is read until it does.
    Stuck,
    /// No reloader (tests, or one lost with a panicked read): nothing to read.
    Unavailable,
}

impl Reloads {
    pub(super) fn new(reloader: Option<Reloader>) -> Self {
        Self {
            reloader,
            pending: None,
            again: false,
        }
    }

    /// A read is in flight (or stuck).
    pub(super) fn busy(&self) -> bool {
        self.pending.is_some()
    }

    /// SIGHUP: starts a read unless one is in flight.
    pub(super) fn request(&mut self) -> Requested {
        match &self.pending {
            Some(p) if p.overdue => {
                warn!(
                    "reload: the previous reload's reads have not returned for {} (a file system that does not answer); this SIGHUP is ignored, send it again once they have",
                    secs(p.started.elapsed())
                );
                return Requested::Stuck;
            }
            Some(_) => {
                self.again = true;
                return Requested::Queued;
            }
            None => {}
        }
        let Some(reloader) = self.reloader.take() else {
            return Requested::Unavailable;
        };
        let handle = tokio::task::spawn_blocking(move || {
            let loaded = read(&reloader);
            (reloader, loaded)
        });
        self.pending = Some(Pending {
            handle,
            started: Instant::now(),
            overdue: false,
        });
        Requested::Started
    }

    /// Waits for the read in flight (never returns when there is none). `Some`: it ended in
    /// time, to be applied. `None`: it was given up now (logged), or it ended after it was given
    /// up (not applied; the reloader is back for the next SIGHUP). Cancel-safe: nothing
    /// changes until it returns.
    pub(super) async fn next(&mut self) -> Option<Loaded> {
        let Some(p) = &mut self.pending else {
            return std::future::pending().await;
        };
        let joined = if p.overdue {
            Some((&mut p.handle).await)
        } else {
            tokio::select! {
                j = &mut p.handle => Some(j),
                () = tokio::time::sleep_until(p.started + RELOAD_READ_TIMEOUT) => None,
            }
        };
        let Some(joined) = joined else {
            p.overdue = true;
            self.again = false;
            error!(
                "reload: reading the configuration and the files it names (api.access_token_file, api.ca_file) did not finish within {}: a file system there does not answer; keeping the running configuration, heartbeats go on",
                secs(RELOAD_READ_TIMEOUT)
            );
            return None;
        };
        let (overdue, took) = (p.overdue, p.started.elapsed());
        self.pending = None;
        let loaded = match joined {
            Ok((reloader, loaded)) => {
                self.reloader = Some(reloader);
                loaded
            }
            Err(e) => {
                error!(
                    "reload: reading the configuration failed: {e}; a restart is needed to reload"
                );
                return None;
            }
        };
        if overdue {
            warn!(
                "reload: the reads given up earlier returned after {}; what they read is not applied: send SIGHUP again (systemctl reload exalsius-node-agent)",
                secs(took)
            );
            return None;
        }
        if std::mem::take(&mut self.again) {
            self.request();
        }
        Some(loaded)
    }
}

/// The blocking part of a reload: the files read, the client built.
fn read(reloader: &Reloader) -> Loaded {
    let cfg = reloader().map_err(|e| e.to_string())?;
    let client = ApiClient::new(&cfg.api).map_err(|e| e.to_string())?;
    Ok((cfg, client))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overrides;
    use std::sync::Mutex;
    use std::sync::mpsc as std_mpsc;

    fn config() -> Result<Config, ConfigError> {
        Config::from_toml(
            "[api]\nurl = \"http://127.0.0.1:9/v1\"\nnode_id = \"0d9c2f4e-8a51-4c1b-9e62-3f7a1b2c4d5e\"\naccess_token = \"t\"\n",
            std::path::Path::new("/t.toml"),
            &Overrides::default(),
            &|_| None,
        )
    }

    /// A reloader whose first read hangs until `release` is sent; later reads answer at once.
    fn hanging_once() -> (Reloader, std_mpsc::Sender<()>) {
        let (release, wait) = std_mpsc::channel::<()>();
        let wait = Mutex::new(Some(wait));
        let reloader: Reloader = Box::new(move || {
            if let Some(w) = wait.lock().unwrap().take() {
                let _ = w.recv();
            }
            config()
        });
        (reloader, release)
    }

    /// Polls `fut` once, so that its timer is registered before time is advanced.
    async fn poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> Option<F::Output> {
        tokio::select! {
            biased;
            v = fut => Some(v),
            () = tokio::task::yield_now() => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_read_is_given_up_never_doubled_and_never_applied_late() {
        let (reloader, release) = hanging_once();
        let mut reloads = Reloads::new(Some(reloader));
        assert_eq!(reloads.request(), Requested::Started);
        {
            let mut next = Box::pin(reloads.next());
            assert!(poll_once(&mut next).await.is_none(), "answered while hung");
            // Auto-advance waits for blocking tasks: the test moves the clock itself.
            tokio::time::advance(RELOAD_READ_TIMEOUT).await;
            assert!(next.await.is_none(), "given up after the timeout");
        }
        assert!(reloads.busy(), "the hung read is still tracked");
        // No second thread while the first is stuck.
        assert_eq!(reloads.request(), Requested::Stuck);
        release.send(()).unwrap();
        assert!(
            reloads.next().await.is_none(),
            "a late answer is not applied"
        );
        assert!(!reloads.busy());
        // The reloader came back with it: the next SIGHUP reads again, and in time.
        assert_eq!(reloads.request(), Requested::Started);
        let loaded = reloads.next().await.expect("read in time");
        assert!(loaded.is_ok(), "{:?}", loaded.err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_sighup_during_a_read_reads_again_after_it() {
        let (reloader, release) = hanging_once();
        let mut reloads = Reloads::new(Some(reloader));
        assert_eq!(reloads.request(), Requested::Started);
        assert_eq!(reloads.request(), Requested::Queued);
        release.send(()).unwrap();
        assert!(reloads.next().await.is_some_and(|l| l.is_ok()));
        assert!(reloads.busy(), "the queued read follows");
        assert!(reloads.next().await.is_some_and(|l| l.is_ok()));
        assert!(!reloads.busy());
        assert_eq!(Reloads::new(None).request(), Requested::Unavailable);
    }
}
