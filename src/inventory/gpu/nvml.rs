//! NVIDIA GPUs through NVML (`nvml-wrapper`, loading `libnvidia-ml.so.1` at run time).
//!
//! NVML is initialised once and the handle kept (init costs tens of milliseconds with a real
//! driver). Every query runs on its own thread and is waited for at most [`NVML_TIMEOUT`]:
//! NVML can block for minutes on a faulted GPU, and the heartbeat must not wait for it. A
//! query still stuck holds the handle's lock, so later queries answer `Busy` at once instead
//! of piling up threads. A failed init (driver not loaded, library/driver version mismatch
//! after an upgrade without reboot) is retried at the next inventory refresh.

use super::pci::normalize_bus_id;
use super::{Gpu, Vendor};
use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Duration;

/// Longest wait for one NVML query (all GPUs). A healthy 8-GPU node answers in milliseconds.
pub const NVML_TIMEOUT: Duration = Duration::from_secs(5);
/// The library name the NVIDIA driver installs on the loader path.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// What NVML said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlData {
    /// GPUs, in NVML index order.
    pub gpus: Vec<Gpu>,
    /// Driver version, e.g. `550.54.15`.
    pub driver: Option<String>,
    /// CUDA driver API version, e.g. `12.4`.
    pub cuda: Option<String>,
}

impl NvmlData {
    /// `software.nvidia` from NVML.
    pub fn version_text(&self) -> Option<String> {
        let driver = self.driver.as_ref()?;
        Some(match &self.cuda {
            Some(c) => format!("DRIVER version: {driver}\nCUDA Version: {c}"),
            None => format!("DRIVER version: {driver}"),
        })
    }
}

/// The result of one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NvmlOutcome {
    /// NVML answered.
    Data(NvmlData),
    /// No NVML library on this host (normal without NVIDIA drivers).
    NoLibrary(String),
    /// The library is there but NVML failed (driver not loaded, version mismatch, …).
    Failed(String),
    /// NVML was refused the device nodes although they are world-accessible: only a device
    /// policy (the service's cgroup) refuses that.
    PolicyRefused(String),
    /// The query did not finish within the timeout.
    TimedOut,
    /// An earlier query is still stuck inside NVML.
    Busy,
}

/// A kept NVML handle and the path to load it from.
#[derive(Debug)]
pub struct NvmlProbe {
    library: OsString,
    /// The collector's root: the device nodes the diagnosis looks at are under it.
    root: std::path::PathBuf,
    handle: Arc<Mutex<Option<Nvml>>>,
    missing_reported: AtomicBool,
}

impl NvmlProbe {
    /// A probe loading `library` (default [`DEFAULT_LIBRARY`]), diagnosing against the device
    /// nodes under `root`; nothing is loaded yet.
    pub fn new(library: Option<&std::path::Path>, root: &std::path::Path) -> Self {
        Self {
            library: library.map_or_else(|| OsString::from(DEFAULT_LIBRARY), |p| p.into()),
            root: root.to_path_buf(),
            handle: Arc::new(Mutex::new(None)),
            missing_reported: AtomicBool::new(false),
        }
    }

    /// True the first time the library is found missing (to log it once, at info).
    pub fn first_missing(&self) -> bool {
        !self.missing_reported.swap(true, Ordering::AcqRel)
    }

    /// Queries all GPUs, waiting at most `timeout`.
    pub fn query(&self, timeout: Duration) -> NvmlOutcome {
        let handle = Arc::clone(&self.handle);
        let library = self.library.clone();
        let root = self.root.clone();
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("nvml".into())
            .spawn(move || {
                let _ = tx.send(query_locked(&handle, &library, &root));
            });
        if let Err(e) = spawned {
            return NvmlOutcome::Failed(format!("cannot start the NVML thread: {e}"));
        }
        match rx.recv_timeout(timeout) {
            Ok(outcome) => outcome,
            Err(mpsc::RecvTimeoutError::Timeout) => NvmlOutcome::TimedOut,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                NvmlOutcome::Failed("the NVML thread ended without an answer".into())
            }
        }
    }
}

fn query_locked(
    handle: &Mutex<Option<Nvml>>,
    library: &OsString,
    root: &std::path::Path,
) -> NvmlOutcome {
    let mut guard = match handle.try_lock() {
        Ok(g) => g,
        Err(TryLockError::WouldBlock) => return NvmlOutcome::Busy,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
    };
    if guard.is_none() {
        match Nvml::builder().lib_path(library).init() {
            Ok(n) => *guard = Some(n),
            Err(NvmlError::LibloadingError(e)) => {
                return NvmlOutcome::NoLibrary(format!(
                    "{} not loadable: {e}",
                    library.to_string_lossy()
                ));
            }
            Err(e @ NvmlError::NoPermission) => {
                let node = std::fs::metadata(control_node(root)).ok().map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    (m.mode(), m.uid(), m.gid())
                });
                let message = format!("NVML init failed: {e}: {}", no_permission_advice(node));
                return match node {
                    Some((mode, _, _)) if world_accessible(mode) => {
                        NvmlOutcome::PolicyRefused(message)
                    }
                    _ => NvmlOutcome::Failed(message),
                };
            }
            Err(e) => return NvmlOutcome::Failed(format!("NVML init failed: {e}")),
        }
    }
    let Some(nvml) = guard.as_ref() else {
        return NvmlOutcome::Failed("NVML handle missing".into());
    };
    match read(nvml) {
        Ok(data) => NvmlOutcome::Data(data),
        Err(e) => {
            // Re-initialise next time: the driver may have been reloaded or upgraded.
            *guard = None;
            NvmlOutcome::Failed(format!("NVML query failed: {e}"))
        }
    }
}

/// The node every NVML process opens first.
const CONTROL_NODE: &str = "/dev/nvidiactl";

/// [`CONTROL_NODE`] under the collector's root (a fixture tree in tests: never the host's).
fn control_node(root: &std::path::Path) -> std::path::PathBuf {
    root.join(CONTROL_NODE.trim_start_matches('/'))
}

/// What to do about NVML's "insufficient permissions", from what `/dev/nvidiactl` looks like
/// (mode, owner, group; `None`: not there). Three different causes need three different fixes.
pub fn no_permission_advice(node: Option<(u32, u32, u32)>) -> String {
    const RETRY: &str = "the agent retries at every refresh";
    match node {
        None => format!(
            "{CONTROL_NODE} does not exist and an unprivileged service cannot have it created; \
             enable nvidia-persistenced (systemctl enable --now nvidia-persistenced) or run \
             nvidia-smi once as root after boot — {RETRY}"
        ),
        // World read-write, refused all the same: only a device policy refuses that — under
        // the packaged unit, DeviceAllow=char-nvidia*, which systemd resolves against
        // /proc/devices when the service starts (a driver loaded later is not in it).
        Some((mode, _, _)) if world_accessible(mode) => format!(
            "{CONTROL_NODE} exists and is world-accessible (mode {:04o}), so this service's \
             device policy refuses it: systemd fixed the unit's DeviceAllow= list when the \
             service started, before the NVIDIA driver was loaded (or the unit is older than \
             the driver's device names) — systemctl restart exalsius-node-agent",
            mode & 0o7777
        ),
        Some((mode, uid, gid)) => format!(
            "{CONTROL_NODE} is mode {:04o}, owner {uid}, group {gid}, and this user \
             (uid {}) may not open it; make the nodes world-accessible (the driver's default, \
             NVreg_DeviceFileMode=0666) or give the service that group (SupplementaryGroups= \
             in a drop-in) — {RETRY}",
            mode & 0o7777,
            crate::perms::current_uid().map_or_else(|| "?".to_string(), |u| u.to_string())
        ),
    }
}

/// Read-write for everyone: the NVIDIA driver's default for its nodes.
fn world_accessible(mode: u32) -> bool {
    mode & 0o006 == 0o006
}

fn cuda_text(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Warned once per process: a GPU whose memory no NVML call reports and the table lacks.
static MEMORY_UNKNOWN_WARNED: AtomicBool = AtomicBool::new(false);

/// A GPU's memory: `nvmlDeviceGetMemoryInfo_v2`, else v1 (drivers before R510 lack v2; early
/// R510 builds answer FUNCTION_NOT_FOUND), else the device table by PCI id (unified-memory
/// parts such as GB10 answer NOT_SUPPORTED to both), else unknown — the GPU is counted anyway.
fn memory_total(
    nvml: &Nvml,
    device: &nvml_wrapper::Device,
    pci: Option<&nvml_wrapper::struct_wrappers::device::PciInfo>,
    name: &str,
) -> Option<u64> {
    let v2 = device.memory_info().map(|m| m.total);
    if let Ok(total) = v2
        && total > 0
    {
        return Some(total);
    }
    let v1 = super::nvml_v1::total(nvml, device);
    if let Ok(total) = v1
        && total > 0
    {
        return Some(total);
    }
    let from_table = pci.and_then(|p| {
        let device_id = u16::try_from(p.pci_device_id >> 16).ok()?;
        let subsystem = p
            .pci_sub_system_id
            .and_then(|s| u16::try_from(s >> 16).ok());
        super::pci::part(super::pci::PARTS, Vendor::Nvidia, device_id, subsystem)
    });
    match from_table {
        Some(part) => Some(part.mib << 20),
        None => {
            if !MEMORY_UNKNOWN_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "NVML reports no memory for {name} (v2: {}; v1: {}) and it is not in the device table; reported as 0",
                    v2.map_or_else(|e| e.to_string(), |t| t.to_string()),
                    v1.map_or_else(|e| e.to_string(), |t| t.to_string()),
                );
            }
            None
        }
    }
}

fn read(nvml: &Nvml) -> Result<NvmlData, NvmlError> {
    let count = nvml.device_count()?;
    let mut gpus = Vec::new();
    for i in 0..count {
        let device = match nvml.device_by_index(i) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(index = i, "NVML cannot open GPU {i}: {e}; not counted");
                continue;
            }
        };
        let name = match device.name() {
            Ok(n) => n,
            Err(NvmlError::GpuLost) => {
                tracing::warn!(index = i, "GPU {i} has fallen off the bus; not counted");
                continue;
            }
            Err(e) => {
                tracing::warn!(index = i, "NVML cannot name GPU {i}: {e}");
                "NVIDIA GPU".to_string()
            }
        };
        let pci = device.pci_info().ok();
        let memory_bytes = memory_total(nvml, &device, pci.as_ref(), &name);
        let uuid = device.uuid().ok();
        let bus_id = pci
            .as_ref()
            .map(|p| normalize_bus_id(&p.bus_id))
            .unwrap_or_default();
        let mig_enabled = match device.mig_mode() {
            Ok(m) => Some(m.current == 1),
            Err(NvmlError::NotSupported) => Some(false),
            Err(_) => None,
        };
        gpus.push(Gpu {
            index: i,
            vendor: Vendor::Nvidia,
            name,
            memory_bytes,
            uuid,
            bus_id,
            mig_enabled,
            source: "nvml",
            driver: None,
        });
    }
    Ok(NvmlData {
        gpus,
        driver: nvml.sys_driver_version().ok(),
        cuda: nvml.sys_cuda_driver_version().ok().map(cuda_text),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_versions() {
        assert_eq!(cuda_text(12040), "12.4");
        assert_eq!(cuda_text(12090), "12.9");
        assert_eq!(cuda_text(11080), "11.8");
    }

    #[test]
    fn missing_library_is_no_library() {
        let p = NvmlProbe::new(
            Some(std::path::Path::new("/nonexistent/libnvidia-ml.so.1")),
            std::path::Path::new("/"),
        );
        assert!(matches!(p.query(NVML_TIMEOUT), NvmlOutcome::NoLibrary(_)));
        assert!(p.first_missing());
        assert!(!p.first_missing());
    }

    #[test]
    fn a_permission_error_names_the_cause_that_fits_the_node() {
        let missing = no_permission_advice(None);
        assert!(missing.contains("does not exist") && missing.contains("nvidia-persistenced"));
        // Driver defaults (0666): only a device policy can refuse it — restart, not persistenced.
        let policy = no_permission_advice(Some((0o20666, 0, 0)));
        assert!(policy.contains("device policy"), "{policy}");
        assert!(
            policy.contains("systemctl restart exalsius-node-agent"),
            "{policy}"
        );
        assert!(!policy.contains("persistenced"), "{policy}");
        let group = no_permission_advice(Some((0o20660, 0, 44)));
        assert!(
            group.contains("mode 0660") && group.contains("group 44"),
            "{group}"
        );
        assert!(group.contains("SupplementaryGroups="), "{group}");
    }
}
