//! NVIDIA GPUs through NVML (`nvml-wrapper`, loading `libnvidia-ml.so.1` at run time): what
//! one NVML answer is, and how it is read. This code runs in the short-lived probe child
//! ([`super::probe`]): the vendor library's memory, its crashes and its hangs stay there.

use super::pci::normalize_bus_id;
use super::{Gpu, Vendor};
use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;
use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Longest wait for one NVML probe (start the child, init, all GPUs). A healthy 8-GPU node
/// answers in well under a second.
pub const NVML_TIMEOUT: Duration = Duration::from_secs(5);
/// The library name the NVIDIA driver installs on the loader path.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// What NVML said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The library is there but NVML failed (driver not loaded, version mismatch, a crash, …).
    Failed(String),
    /// NVML was refused the device nodes although they are world-accessible: only a device
    /// policy (the service's cgroup) refuses that.
    PolicyRefused(String),
    /// The query did not finish within the timeout.
    TimedOut,
    /// An earlier probe is still stuck inside NVML (killed, but not dead yet).
    Busy,
}

/// The probe child's answer, as JSON on its stdout: one NVML init and query, in-process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// NVML answered.
    Data(NvmlData),
    /// The library could not be loaded.
    NoLibrary(String),
    /// `NVML_ERROR_NO_PERMISSION` at init: the parent diagnoses it from the device nodes.
    NoPermission(String),
    /// `NVML_ERROR_UNKNOWN` at init: what the real 470/535/550 libraries answer both when
    /// `/dev/nvidiactl` is not the driver's node and when a device cgroup refuses it (EPERM,
    /// the packaged unit's older device lines, packaging/proof-real-nvml.sh): the parent tells
    /// the two apart by opening the node.
    Unknown(String),
    /// Any other failure.
    Failed(String),
}

/// One NVML init and query, in this process (the probe child's work). The library stays
/// loaded until the process ends.
pub fn answer(library: &OsStr) -> Answer {
    let nvml = match Nvml::builder().lib_path(library).init() {
        Ok(n) => n,
        Err(NvmlError::LibloadingError(e)) => {
            return Answer::NoLibrary(format!("{} not loadable: {e}", library.to_string_lossy()));
        }
        Err(e @ NvmlError::NoPermission) => {
            return Answer::NoPermission(format!("NVML init failed: {e}"));
        }
        Err(e @ NvmlError::Unknown) => {
            return Answer::Unknown(format!("NVML init failed: {e} (NVML_ERROR_UNKNOWN)"));
        }
        Err(e) => return Answer::Failed(format!("NVML init failed: {e}")),
    };
    match read(&nvml) {
        Ok(data) => Answer::Data(data),
        Err(e) => Answer::Failed(format!("NVML query failed: {e}")),
    }
}

/// The child's answer as the collector sees it: a refusal is diagnosed from the control node
/// under `root` (the collector's root: a fixture tree in tests, never the host's `/dev` then).
pub fn outcome(answer: Answer, root: &Path) -> NvmlOutcome {
    match answer {
        Answer::Data(d) => NvmlOutcome::Data(d),
        Answer::NoLibrary(why) => NvmlOutcome::NoLibrary(why),
        Answer::Failed(why) => NvmlOutcome::Failed(why),
        Answer::Unknown(why) => {
            let node = control_node(root);
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&node)
                .map(drop);
            unknown_outcome(why, &opened, node_mode(&node))
        }
        Answer::NoPermission(why) => {
            let node = std::fs::metadata(control_node(root)).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.mode(), m.uid(), m.gid())
            });
            let message = format!("{why}: {}", no_permission_advice(node));
            match node {
                Some((mode, _, _)) if world_accessible(mode) => NvmlOutcome::PolicyRefused(message),
                _ => NvmlOutcome::Failed(message),
            }
        }
    }
}

/// `/dev/nvidiactl`'s mode, owner and group (`None`: not there).
fn node_mode(node: &Path) -> Option<(u32, u32, u32)> {
    std::fs::metadata(node).ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        (m.mode(), m.uid(), m.gid())
    })
}

/// NVML_ERROR_UNKNOWN at init, told apart by what opening the control node gave this process
/// (the daemon runs under the same device policy as its probe): EPERM — a device cgroup
/// refuses the node (the real libraries say UNKNOWN then, not NO_PERMISSION); otherwise the
/// node opens (or is missing) but no NVIDIA driver answers on it.
fn unknown_outcome(
    why: String,
    opened: &std::io::Result<()>,
    node: Option<(u32, u32, u32)>,
) -> NvmlOutcome {
    match opened {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => NvmlOutcome::PolicyRefused(format!(
            "{why}: opening {CONTROL_NODE} is not permitted (EPERM): {}",
            no_permission_advice(node)
        )),
        _ => NvmlOutcome::Failed(format!(
            "{why}: {CONTROL_NODE} opens but the NVIDIA driver does not answer on it — check \
             that it is the driver's node (character device 195:255) and that the loaded module \
             matches the library (nvidia-smi shows the same error)"
        )),
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
            // "Unable to determine the device handle for GPU …: GPU is lost": listed, not
            // counted, named once per change (super::health).
            Err(e @ (NvmlError::GpuLost | NvmlError::ResetRequired)) => {
                gpus.push(super::health::without_handle(i, &e));
                continue;
            }
            Err(e) => {
                tracing::warn!(index = i, "NVML cannot open GPU {i}: {e}; not counted");
                continue;
            }
        };
        // Health checks (super::health): a GPU answering RESET_REQUIRED or GPU_IS_LOST to any
        // query stays in the list with that state (not counted, named, logged once per change
        // by the probe), never a nameless "NVIDIA GPU" with 0 GiB.
        let mut health = super::health::query(nvml, &device);
        let name = device.name().unwrap_or_else(|e| {
            health.saw("name", &e);
            health.name_error = Some(e.to_string());
            super::FALLBACK_NAME.to_string()
        });
        let pci = device
            .pci_info()
            .map_err(|e| health.saw("PCI info", &e))
            .ok();
        let memory_bytes = match health.name_error {
            None => memory_total(nvml, &device, pci.as_ref(), &name),
            Some(_) => None,
        };
        let uuid = device.uuid().map_err(|e| health.saw("UUID", &e)).ok();
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
            health: Some(health),
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
        let a = answer(OsStr::new("/nonexistent/libnvidia-ml.so.1"));
        assert!(matches!(a, Answer::NoLibrary(_)), "{a:?}");
    }

    #[test]
    fn a_refusal_is_diagnosed_from_the_node_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let why = || Answer::NoPermission("NVML init failed: no permission".into());
        // No node under the root: the persistenced advice, whatever the host has.
        let o = outcome(why(), dir.path());
        assert!(
            matches!(&o, NvmlOutcome::Failed(m) if m.contains("does not exist")),
            "{o:?}"
        );
        std::fs::create_dir(dir.path().join("dev")).unwrap();
        let node = dir.path().join("dev/nvidiactl");
        std::fs::write(&node, "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o666)).unwrap();
        let o = outcome(why(), dir.path());
        assert!(
            matches!(&o, NvmlOutcome::PolicyRefused(m) if m.contains("device policy")),
            "{o:?}"
        );
    }

    /// The real libraries answer UNKNOWN under a device cgroup that refuses the node (seen in
    /// the booted proof, packaging/proof-real-nvml.sh): EPERM on opening it names the device
    /// policy and the restart; a node that opens names the driver check.
    #[test]
    fn unknown_is_a_device_policy_when_opening_the_node_is_not_permitted() {
        let eperm = Err(std::io::Error::from_raw_os_error(libc::EPERM));
        let o = unknown_outcome("NVML init failed".into(), &eperm, Some((0o20666, 0, 0)));
        assert!(
            matches!(&o, NvmlOutcome::PolicyRefused(m) if m.contains("device policy refuses it") && m.contains("systemctl restart")),
            "{o:?}"
        );
        let o = unknown_outcome("NVML init failed".into(), &Ok(()), Some((0o20666, 0, 0)));
        assert!(
            matches!(&o, NvmlOutcome::Failed(m) if m.contains("does not answer on it")),
            "{o:?}"
        );
        let enxio = Err(std::io::Error::from_raw_os_error(libc::ENXIO));
        let o = unknown_outcome("NVML init failed".into(), &enxio, Some((0o20666, 0, 0)));
        assert!(matches!(&o, NvmlOutcome::Failed(_)), "{o:?}");
    }

    #[test]
    fn an_answer_survives_the_pipe() {
        let data = NvmlData {
            gpus: vec![Gpu {
                index: 0,
                vendor: Vendor::Nvidia,
                name: "NVIDIA H100 80GB HBM3".into(),
                memory_bytes: Some(85_520_809_984),
                uuid: Some("GPU-1".into()),
                bus_id: "0000:18:00.0".into(),
                mig_enabled: Some(false),
                source: "nvml",
                driver: None,
                // The health answers travel with the GPU (a state decided in the daemon).
                health: Some(super::super::health::RawChecks {
                    remapped_rows: super::super::health::Answer::ResetRequired,
                    retired_pages_pending: super::super::health::Answer::Value(true),
                    mig_mode: super::super::health::Answer::NotInLibrary,
                    fabric: super::super::health::Answer::NotSupported,
                    fatal: vec![],
                    name_error: Some("GPU requires reset".into()),
                }),
            }],
            driver: Some("550.54.15".into()),
            cuda: Some("12.4".into()),
        };
        let a = Answer::Data(data);
        let text = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Answer>(&text).unwrap(), a);
        assert!(serde_json::from_str::<Answer>(r#"{"data":{"gpus":[{"index":0,"vendor":"NVIDIA","name":"x","memory_bytes":null,"bus_id":"","source":"elsewhere"}],"driver":null,"cuda":null}}"#).is_err());
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
