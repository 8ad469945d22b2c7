//! SIGHUP: every setting that can change without a restart.

use super::*;
use reload_read::Loaded;

impl Agent {
    /// SIGHUP: applies every setting it can — logging, GPU discovery (a new collector), the
    /// API client, the schedule, the credentials; the state directory needs a restart.
    // Long: every setting a reload can apply, in the order they must be applied (all checks
    // first, so an invalid configuration changes nothing).
    pub(super) fn reload(&mut self, loaded: Loaded, collectors: Option<&CollectorFactory>) {
        // Read off the runtime (reload_read.rs): a hung file costs that read only.
        let (cfg, client) = match loaded {
            Ok(c) => c,
            Err(e) => {
                error!("reload: keeping the running configuration: {e}");
                return;
            }
        };
        if self.mode != Mode::DryRun {
            if let Some(dir) = self.sink.dir()
                && cfg.state.dir != dir
            {
                warn!(
                    "reload: state.dir changed to {}; that takes a restart (systemctl restart exalsius-node-agent); still using {}",
                    cfg.state.dir.display(),
                    dir.display()
                );
            }
            let mut creds = self.creds.clone();
            match creds.reconfigure(&cfg) {
                Ok(changed) => {
                    if let Some(why) = changed {
                        info!(node_id = %creds.state().node_id, "reload: {why}");
                        self.sink.keep_replaced(self.creds.state());
                    }
                    self.creds = creds;
                }
                Err(e) => {
                    error!("reload: keeping the running configuration: {e}");
                    return;
                }
            }
        }
        self.schedule.reconfigure(&cfg.heartbeat);
        if self.mode != Mode::DryRun && !self.fixed_sender {
            self.sender = Box::new(client);
        }
        self.reconfigure_metrics(&cfg);
        if let Err(e) = crate::logging::reconfigure(&cfg.log.level, cfg.log.format) {
            debug!("reload: logging unchanged: {e}");
        }
        let inv = (
            &cfg.inventory.gpu,
            &cfg.inventory.nvml_library,
            cfg.inventory.count_unhealthy_gpus,
        );
        let was = (
            &self.cfg.inventory.gpu,
            &self.cfg.inventory.nvml_library,
            self.cfg.inventory.count_unhealthy_gpus,
        );
        if inv != was
            && let Some(build) = collectors
        {
            info!(gpu = ?cfg.inventory.gpu, "reload: GPU discovery reconfigured");
            self.collector = build(&cfg);
        }
        for w in &cfg.warnings {
            warn!("{w}");
        }
        info!(
            interval = %secs(cfg.heartbeat.interval),
            "configuration reloaded"
        );
        let dir = self.cfg.state.dir.clone();
        self.cfg = cfg;
        // The state directory is the one setting a reload cannot change.
        self.cfg.state.dir = dir;
    }

    /// SIGHUP: a new interval, or a new (or no) metrics file.
    pub(super) fn reconfigure_metrics(&mut self, cfg: &Config) {
        if self.mode == Mode::DryRun {
            return;
        }
        match (&mut self.metrics, &cfg.metrics.textfile) {
            (Some(m), Some(p)) if m.path() == p => m.set_interval(cfg.heartbeat.interval),
            (_, Some(p)) => {
                info!(textfile = %p.display(), "reload: metrics file set");
                let old = self.metrics.replace(Metrics::new(
                    p,
                    cfg.heartbeat.interval,
                    Some(self.creds.state()),
                ));
                if let Some(old) = old {
                    old.retire();
                }
            }
            (_, None) => {
                if let Some(old) = self.metrics.take() {
                    old.retire();
                }
            }
        }
        if let Some(dir) = self.sink.dir() {
            crate::metrics::adopt_off_runtime(dir, cfg.metrics.textfile.as_deref());
        }
    }
}
