//! The node's specs: one file per source, combined here into the API's `NodeSpecs` plus the
//! details the `inventory` command shows.
//!
//! Collection is blocking (sysfs reads, subprocesses, NVML); the daemon runs it in
//! `spawn_blocking` under a timeout. Every probe degrades to empty/zero with a warning: the
//! heartbeat must go out even when a probe fails.

pub mod cpu;
pub mod gpu;
pub mod memory;
pub mod software;
pub mod storage;
pub mod system;

use crate::api::{NodeHardware, NodeSoftware, NodeSpecs, NodeSystem};
use crate::config::GpuMode;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Everything collected, for the human and verbose views.
#[derive(Debug, Clone, Serialize)]
pub struct Details {
    /// CPU facts.
    pub cpu: cpu::CpuInfo,
    /// Total RAM in bytes.
    pub memory_bytes: u64,
    /// Physical disks counted for `storage_gb`.
    pub disks: Vec<storage::Disk>,
    /// Bytes counted for `storage_gb` (disks, or the root filesystem as a fallback).
    pub storage_bytes: u64,
    /// `disks` or `root-filesystem`.
    pub storage_source: &'static str,
    /// GPUs found.
    pub gpus: Vec<gpu::Gpu>,
    /// Notes on GPU discovery ("NVML: library not found", …).
    pub gpu_notes: Vec<String>,
    /// `inventory.count_unhealthy_gpus`: GPUs in a not-counted health state are counted.
    pub count_unhealthy_gpus: bool,
    /// NVML is there but failed in this collection (counted by the metrics).
    #[serde(skip)]
    pub nvml_failed: bool,
    /// NVML was refused world-accessible device nodes (the service's device policy).
    #[serde(skip)]
    pub device_policy_refused: bool,
}

/// One collection: what the API gets and what the operator sees.
#[derive(Debug, Clone, Serialize)]
pub struct Inventory {
    /// The API body parts.
    pub specs: NodeSpecs,
    /// Everything else.
    pub details: Details,
}

/// A source of inventories. Blocking; implementations must be safe to call from
/// `spawn_blocking` repeatedly.
pub trait Collector: Send + Sync + 'static {
    /// Collects the node's specs now.
    fn collect(&self) -> Inventory;
}

/// Reads this host (or a fixture tree standing in for it).
#[derive(Debug)]
pub struct HostCollector {
    root: PathBuf,
    gpu: gpu::GpuProbe,
    count_unhealthy: bool,
}

impl HostCollector {
    /// A collector for the host rooted at `/`.
    pub fn new(gpu_mode: GpuMode, nvml_library: Option<&Path>) -> Self {
        Self::with_root(Path::new("/"), gpu_mode, nvml_library)
    }

    /// A collector reading `/proc`, `/sys` and `/etc` below `root` (fixture trees in tests).
    /// Memory and the root-filesystem fallback still come from the running host.
    pub fn with_root(root: &Path, gpu_mode: GpuMode, nvml_library: Option<&Path>) -> Self {
        Self {
            root: root.to_path_buf(),
            gpu: gpu::GpuProbe::new(gpu_mode, root, nvml_library),
            count_unhealthy: false,
        }
    }

    /// Counts every GPU in `gpu_count` whatever its health (`inventory.count_unhealthy_gpus`).
    #[must_use]
    pub fn count_unhealthy_gpus(mut self, on: bool) -> Self {
        self.gpu = self.gpu.count_unhealthy_gpus(on);
        self.count_unhealthy = on;
        self
    }
}

impl Collector for HostCollector {
    // Long: assembles every source into the API's shape in one place.
    fn collect(&self) -> Inventory {
        // Version commands run beside GPU discovery: the total is the slower of the two.
        let (gpu_report, versions) = std::thread::scope(|scope| {
            let versions =
                scope.spawn(|| software::run_probes(&[software::DOCKER, software::AMD_SMI]));
            let report = self.gpu.collect();
            let versions = versions.join().unwrap_or_default();
            (report, versions)
        });
        let mut versions = versions.into_iter();
        let docker = versions.next().unwrap_or_default();
        let amd = versions.next().unwrap_or_default();
        let nvidia = match &gpu_report.nvidia_version {
            Some(v) => v.clone(),
            // No NVML: nvidia-smi may still be there (and is skipped at once when it is not).
            None => software::run_probes(&[software::NVIDIA_SMI])
                .pop()
                .unwrap_or_default(),
        };

        let cpu = cpu::collect(&self.root);
        let memory_bytes = memory::total_bytes();
        let disks = storage::disks(&self.root);
        let (storage_bytes, storage_source) = if disks.is_empty() {
            (storage::root_filesystem_bytes(), "root-filesystem")
        } else {
            (disks.iter().map(|d| d.bytes).sum(), "disks")
        };
        let summary = gpu::summarise_with(&gpu_report.gpus, self.count_unhealthy);
        let specs = NodeSpecs {
            hardware: NodeHardware {
                gpu_count: summary.count,
                gpu_vendor: summary.vendor,
                gpu_type: summary.model,
                gpu_memory: summary.memory_gib,
                cpu_cores: i32::try_from(cpu.logical).unwrap_or(i32::MAX),
                memory_gb: memory::gib_rounded(memory_bytes),
                storage_gb: storage::gb_rounded(storage_bytes),
            },
            software: NodeSoftware {
                docker,
                nvidia,
                amd,
            },
            system: NodeSystem {
                os: system::os_name(&self.root),
                kernel: system::kernel_release(&self.root),
            },
        };
        Inventory {
            specs,
            details: Details {
                cpu,
                memory_bytes,
                disks,
                storage_bytes,
                storage_source,
                gpus: gpu_report.gpus,
                gpu_notes: gpu_report.notes,
                count_unhealthy_gpus: self.count_unhealthy,
                nvml_failed: gpu_report.nvml_failed,
                device_policy_refused: gpu_report.device_policy_refused,
            },
        }
    }
}

/// A collector that always returns the same inventory (benchmarks and fleet simulations).
#[derive(Debug, Clone)]
pub struct FixedCollector(pub Inventory);

impl Collector for FixedCollector {
    fn collect(&self) -> Inventory {
        self.0.clone()
    }
}
