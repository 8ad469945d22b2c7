//! `run`: the daemon (and `--once`, `--dry-run`).

use super::{Exit, load_config, runtime};
use crate::cli::RunArgs;
use crate::config::{Config, Overrides, process_env};
use crate::heartbeat::{self, Control, Mode, RunError};
use crate::inventory::{Collector, HostCollector};
use std::sync::Arc;

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

/// Runs `run`.
pub fn run(overrides: &Overrides, args: &RunArgs) -> Result<(), Exit> {
    let cfg = load_config(overrides)?;
    crate::footprint::mark("configuration loaded");
    crate::logging::init(&cfg.log.level, cfg.log.format);
    crate::footprint::mark("logging");
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let mode = if args.once {
        Mode::Once
    } else if args.dry_run {
        Mode::DryRun
    } else {
        Mode::Daemon
    };
    let runtime = runtime()?;
    crate::footprint::mark("runtime");
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
    let first = collector(&cfg);
    let reload_overrides = overrides.clone();
    let result = runtime.block_on(async move {
        let (shutdown, reload) = crate::shutdown::install();
        if mode == Mode::DryRun {
            // A dry run whose reader went away (`| head`) stops, as a SIGTERM would stop it.
            let stop = shutdown.clone();
            tokio::spawn(async move {
                crate::heartbeat::sender::stdout_gone().cancelled().await;
                stop.cancel();
            });
        }
        let agent = heartbeat::prepare(cfg, mode, first)?;
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
    });
    // Exit is never held by blocking work: a getaddrinfo, a version probe, a /sys read or an
    // NVML call stuck in a blocking thread is abandoned (the process exit ends it) instead of
    // being waited for, as dropping the runtime would. Probe children are killed first.
    runtime.shutdown_background();
    crate::inventory::software::kill_running_probes();
    if let Some(e) = crate::heartbeat::sender::stdout_error() {
        return Err(crate::output::write_error(e));
    }
    result.map_err(Exit::from)
}
