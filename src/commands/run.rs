//! `run`: the daemon (and `--once`, `--dry-run`).

use super::{Exit, load_config, runtime};
use crate::cli::RunArgs;
use crate::config::{Config, Overrides, process_env};
use crate::heartbeat::{self, Control, Mode, RunError};
use crate::inventory::{Collector, HostCollector};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

impl From<RunError> for Exit {
    fn from(e: RunError) -> Self {
        Self {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }
}

fn collector(cfg: &Config) -> Arc<dyn Collector> {
    Arc::new(
        HostCollector::new(cfg.inventory.gpu, cfg.inventory.nvml_library.as_deref())
            .count_unhealthy_gpus(cfg.inventory.count_unhealthy_gpus),
    )
}

/// A start whose reads (the config file, the token file, the CA file, the state) take longer
/// fails with exit 1 and says why: a slow network mount at boot answers within seconds, and
/// this is well inside systemd's start timeout (90 s), which would only say "timed out".
pub const START_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `f` (reads of files the operator chose) on a blocking thread: `Ok(None)` when SIGTERM
/// came first, exit 1 when `deadline` passed.
async fn off_runtime<T: Send + 'static>(
    shutdown: &CancellationToken,
    deadline: tokio::time::Instant,
    f: impl FnOnce() -> Result<T, Exit> + Send + 'static,
) -> Result<Option<T>, Exit> {
    let task = tokio::task::spawn_blocking(f);
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Ok(None),
        done = tokio::time::timeout_at(deadline, task) => match done {
            Ok(Ok(result)) => result.map(Some),
            Ok(Err(e)) => Err(Exit::runtime(format!("start failed: {e}"))),
            Err(_) => Err(Exit::runtime(format!(
                "reading the configuration (the file, api.access_token_file, api.ca_file) or the state directory did not finish within {}s: a file system there does not answer; fix the mount (systemd starts the agent again)",
                START_READ_TIMEOUT.as_secs()
            ))),
        },
    }
}

/// Everything before the loop: the configuration and every file it names read, logging, the
/// state directory's lock and state — read off the runtime, so that SIGTERM still stops a
/// start whose reads hang. `None`: stopped before it was done.
async fn start(
    shutdown: &CancellationToken,
    overrides: Overrides,
    mode: Mode,
) -> Result<Option<heartbeat::Agent>, Exit> {
    let deadline = tokio::time::Instant::now() + START_READ_TIMEOUT;
    let Some(cfg) = off_runtime(shutdown, deadline, move || {
        let cfg = load_config(&overrides)?;
        crate::footprint::mark("configuration loaded");
        crate::logging::init(&cfg.log.level, cfg.log.format);
        crate::footprint::mark("logging");
        Ok(cfg)
    })
    .await?
    else {
        return Ok(None);
    };
    // Logged from this thread: its first log line sets up its thread-locals now, not later
    // while a `dlopen` on a hung mount may hold the loader lock that needs.
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    match cfg.source.as_deref() {
        Some(p) => {
            tracing::info!(config = %p.display(), version = env!("CARGO_PKG_VERSION"), "starting")
        }
        None => tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            "starting without a config file ({} not found): defaults and environment only",
            crate::config::DEFAULT_CONFIG_PATH
        ),
    }
    off_runtime(shutdown, deadline, move || {
        let first = collector(&cfg);
        Ok(heartbeat::prepare(cfg, mode, first)?)
    })
    .await
}

/// Runs `run`.
pub fn run(overrides: &Overrides, args: &RunArgs) -> Result<(), Exit> {
    let mode = if args.once {
        Mode::Once
    } else if args.dry_run {
        Mode::DryRun
    } else {
        Mode::Daemon
    };
    let runtime = runtime()?;
    crate::footprint::mark("runtime");
    let start_overrides = overrides.clone();
    let reload_overrides = overrides.clone();
    let result = runtime.block_on(async move {
        // Signals first: SIGTERM stops a start whose reads hang on a mount that does not
        // answer (they run on a blocking thread, abandoned at exit).
        let (shutdown, reload) = crate::shutdown::install();
        if mode == Mode::DryRun {
            // A dry run whose reader went away (`| head`) stops, as a SIGTERM would stop it.
            let stop = shutdown.clone();
            tokio::spawn(async move {
                crate::heartbeat::sender::stdout_gone().cancelled().await;
                stop.cancel();
            });
        }
        let Some(agent) = start(&shutdown, start_overrides, mode).await? else {
            eprintln!(
                "exalsius-node-agent: stopped while starting: reading the configuration or a file it names had not finished"
            );
            return match mode {
                Mode::Once => Err(Exit::runtime("heartbeat failed: interrupted")),
                Mode::Daemon | Mode::DryRun => Ok(()),
            };
        };
        agent
            .run(Control {
                shutdown,
                reload: Some(reload),
                reloader: Some(Box::new(move || {
                    Config::load(&reload_overrides, &process_env)
                })),
                collectors: Some(Box::new(collector)),
            })
            .await
            .map_err(Exit::from)
    });
    // Exit is never held by blocking work: a getaddrinfo, a version probe, a /sys read, an
    // NVML call or a read on a hung mount stuck in a blocking thread is abandoned (the process
    // exit ends it) instead of being waited for, as dropping the runtime would. Probe children
    // are killed first.
    runtime.shutdown_background();
    crate::inventory::software::kill_running_probes();
    if let Some(e) = crate::heartbeat::sender::stdout_error() {
        return Err(crate::output::write_error(e));
    }
    result
}
