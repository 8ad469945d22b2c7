//! The inventory the heartbeats carry: collected off the runtime under a timeout, the last good
//! specs kept when a collection fails or hangs, changes logged.

use super::*;

impl Agent {
    /// Starts a collection in the blocking pool unless one is still stuck there.
    pub(super) fn spawn_collection(
        &self,
    ) -> Option<tokio::task::JoinHandle<(Inventory, Duration)>> {
        if self.collecting.swap(true, Ordering::AcqRel) {
            warn!("previous inventory collection is still running; skipping this refresh");
            return None;
        }
        let collector = Arc::clone(&self.collector);
        let flag = Arc::clone(&self.collecting);
        Some(tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let inv = collector.collect();
            flag.store(false, Ordering::Release);
            (inv, started.elapsed())
        }))
    }

    pub(super) async fn refresh_inventory_now(&mut self) {
        let Some(handle) = self.spawn_collection() else {
            return;
        };
        match tokio::time::timeout(COLLECT_TIMEOUT, handle).await {
            Ok(Ok((inv, took))) => self.apply_inventory(inv, took),
            Ok(Err(e)) => {
                self.inventory_error();
                warn!("inventory collection failed: {e}");
            }
            Err(_) => {
                self.inventory_error();
                warn!(
                    "inventory collection did not finish within {COLLECT_TIMEOUT:?}; heartbeats carry no specs until it does"
                );
            }
        }
    }

    pub(super) fn inventory_error(&mut self) {
        if let Some(m) = &mut self.metrics {
            m.inventory_error("collection");
        }
    }

    pub(super) fn apply_inventory(&mut self, inv: Inventory, took: Duration) {
        if inv.details.device_policy_refused {
            self.device_policy_restart();
        }
        if let Some(m) = &mut self.metrics {
            m.inventory(inv.specs.hardware.gpu_count, took);
            m.gpu_states(&inv.details.gpus);
            if inv.details.nvml_failed {
                m.inventory_error("nvml");
            }
        }
        let new = Arc::new(inv.specs);
        if let Some(old) = &self.specs {
            if old.hardware.gpu_count > new.hardware.gpu_count {
                warn!(
                    before = old.hardware.gpu_count,
                    now = new.hardware.gpu_count,
                    "GPU count dropped"
                );
            }
            if **old != *new {
                info!("node specs changed");
            }
        }
        debug!(specs = ?new, took_ms = took.as_millis() as u64, "inventory refreshed");
        self.specs = Some(new);
    }

    /// NVML was refused world-accessible NVIDIA device nodes: the service's device policy
    /// (`DeviceAllow=char-nvidia*`, resolved against /proc/devices when the service started)
    /// predates the driver. A new start resolves it again, so a daemon started by systemd
    /// stops with exit 1 and `Restart=on-failure` starts it again 5 s later — once per boot
    /// (a marker in the state directory holds the boot id), so a policy that stays closed for
    /// another reason (a drop-in) cannot cause a restart loop. In the foreground, `--once`,
    /// `--dry-run`, or when the marker cannot be written, the GPU warning says what to do.
    fn device_policy_restart(&mut self) {
        if self.mode != Mode::Daemon || !systemd::supervised() || self.restart_for_devices.is_some()
        {
            return;
        }
        let Some(dir) = self.sink.dir() else {
            return;
        };
        let marker = dir.join(DEVICE_RESTART_MARKER);
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|b| b.trim().to_string())
            .unwrap_or_default();
        if boot.is_empty() {
            return;
        }
        if std::fs::read_to_string(&marker).is_ok_and(|m| m.trim() == boot) {
            warn!(
                "NVML is still refused the NVIDIA device nodes after the restart that re-read the device policy; not restarting again this boot (check drop-ins: systemctl cat exalsius-node-agent)"
            );
            return;
        }
        if let Err(e) = std::fs::write(&marker, format!("{boot}\n")) {
            warn!(
                "cannot write {}: {e}; not restarting for the device policy (restart the service by hand)",
                marker.display()
            );
            return;
        }
        let why = "NVML is refused the NVIDIA device nodes by this service's device policy, which systemd fixed when the service started, before the driver was loaded: stopping so that systemd starts the service again (once per boot)";
        error!("{why}");
        self.restart_for_devices = Some(why.to_string());
    }
}

/// In the state directory: the boot id of the last restart for the device policy.
const DEVICE_RESTART_MARKER: &str = "device-policy-restart";
