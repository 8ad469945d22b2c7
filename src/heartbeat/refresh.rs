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
        if let Some(m) = &mut self.metrics {
            m.inventory(inv.specs.hardware.gpu_count, took);
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
}
