//! Per-GPU health from NVML: whether a GPU can take work now, decided by NVIDIA's own guidance.
//!
//! Two halves: [`query`] asks NVML for the raw answers of one device (remapped rows, retired
//! pages pending, MIG mode, fabric state; plain data with serde derives, so they travel in the
//! per-GPU record through whatever process asked NVML), and [`decide`] is a pure function from
//! those answers to the GPU's states. A state either takes the GPU out of `gpu_count` (it
//! cannot run work until something is done) or keeps it counted with an action to take at the
//! next opportunity. A check NVML answers NOT_SUPPORTED, or whose symbol the loaded library
//! lacks (the 470 library has no fabric calls), is "not available": the GPU counts.
//!
//! Two calls have no nvml-wrapper method (`nvmlDeviceGetRemappedRows`, the fabric calls):
//! they go through the symbols nvml-wrapper already loaded, with NVIDIA's structs as
//! nvml-wrapper-sys generates them from nvml.h (layouts checked against the header below).
#![allow(unsafe_code)]

use nvml_wrapper::error::{NvmlError, nvml_try};
use nvml_wrapper::{Device, Nvml};
use nvml_wrapper_sys::bindings::{nvmlGpuFabricInfo_t, nvmlGpuFabricInfoV_t};
use serde::{Deserialize, Serialize};

/// `NVML_SUCCESS`.
const NVML_SUCCESS: i32 = 0;
/// `NVML_GPU_FABRIC_STATE_NOT_SUPPORTED`: not an NVSwitch / multi-node NVLink system.
const FABRIC_STATE_NOT_SUPPORTED: u8 = 0;
/// `NVML_GPU_FABRIC_STATE_COMPLETED`: registered with the fabric manager; `status` is valid.
const FABRIC_STATE_COMPLETED: u8 = 3;
/// `sizeof(nvmlGpuFabricInfo_v2_t)` in nvml.h (driver 550's `nvmlGpuFabricInfoV_t`): version,
/// clusterUuid[16], status, cliqueId, state (unsigned char, padded), healthMask.
const FABRIC_INFO_V2_SIZE: u32 = 36;
/// `nvmlGpuFabricInfo_v2` = `NVML_STRUCT_VERSION(GpuFabricInfo, 2)`: size | version << 24. The
/// v2 layout is what 550 defines; later libraries accept it too (a versioned struct).
const FABRIC_INFO_V2: u32 = FABRIC_INFO_V2_SIZE | (2 << 24);

/// One check's raw answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer<T> {
    /// NVML answered.
    Value(T),
    /// NOT_SUPPORTED: this GPU (or this configuration) has no such thing.
    NotSupported,
    /// The loaded library lacks the symbol (an older driver), or FUNCTION_NOT_FOUND.
    NotInLibrary,
    /// NVML_ERROR_RESET_REQUIRED.
    ResetRequired,
    /// NVML_ERROR_GPU_IS_LOST.
    GpuLost,
    /// Any other error, as NVML words it.
    Failed(String),
}

impl<T> Answer<T> {
    fn from_result(r: Result<T, NvmlError>) -> Self {
        match r {
            Ok(v) => Answer::Value(v),
            Err(e) => Self::from_error(&e),
        }
    }

    fn from_error(e: &NvmlError) -> Self {
        match e {
            NvmlError::NotSupported => Answer::NotSupported,
            NvmlError::FailedToLoadSymbol(_) | NvmlError::FunctionNotFound => Answer::NotInLibrary,
            NvmlError::ResetRequired => Answer::ResetRequired,
            NvmlError::GpuLost => Answer::GpuLost,
            other => Answer::Failed(other.to_string()),
        }
    }

    /// The check exists for this GPU and driver (it answered, or failed in a way that is not
    /// "no such check").
    pub fn available(&self) -> bool {
        !matches!(self, Answer::NotSupported | Answer::NotInLibrary)
    }

    /// Short text for tables and `bench/gpu-check.sh`.
    pub fn describe(&self) -> String
    where
        T: std::fmt::Debug,
    {
        match self {
            Answer::Value(v) => format!("{v:?}"),
            Answer::NotSupported => "NOT_SUPPORTED".to_string(),
            Answer::NotInLibrary => "not in this library".to_string(),
            Answer::ResetRequired => "RESET_REQUIRED".to_string(),
            Answer::GpuLost => "GPU_IS_LOST".to_string(),
            Answer::Failed(e) => format!("error: {e}"),
        }
    }
}

/// `nvmlDeviceGetRemappedRows(device, *corrRows, *uncRows, *isPending, *failureOccurred)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemappedRows {
    /// Rows remapped for correctable errors.
    pub correctable: u32,
    /// Rows remapped for uncorrectable errors.
    pub uncorrectable: u32,
    /// A remap waits for the next GPU reset.
    pub pending: bool,
    /// A remap failed: the board needs replacing.
    pub failure: bool,
}

/// `nvmlDeviceGetMigMode(device, *currentMode, *pendingMode)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigModes {
    /// Mode in effect.
    pub current: u32,
    /// Mode after the next reset.
    pub pending: u32,
}

/// `nvmlDeviceGetGpuFabricInfo[V]`: the GPU's registration with the NVLink fabric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fabric {
    /// `NVML_GPU_FABRIC_STATE_*`: 0 not supported, 1 not started, 2 in progress, 3 completed.
    pub state: u8,
    /// The probe's `nvmlReturn_t`, valid once `state` is completed (0: success).
    pub status: i32,
}

/// The raw answers for one GPU, as NVML gave them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawChecks {
    /// `nvmlDeviceGetRemappedRows`.
    pub remapped_rows: Answer<RemappedRows>,
    /// `nvmlDeviceGetRetiredPagesPendingStatus`.
    pub retired_pages_pending: Answer<bool>,
    /// `nvmlDeviceGetMigMode`.
    pub mig_mode: Answer<MigModes>,
    /// `nvmlDeviceGetGpuFabricInfoV`, else `nvmlDeviceGetGpuFabricInfo`.
    pub fabric: Answer<Fabric>,
    /// The other per-device queries (name, PCI info, UUID, memory) that answered
    /// RESET_REQUIRED or GPU_IS_LOST: `(query, answer)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fatal: Vec<(String, Answer<()>)>,
    /// Why NVML could not name this GPU, when it could not (logged once per change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name_error: Option<String>,
}

impl RawChecks {
    /// Records another per-device query's error: RESET_REQUIRED and GPU_IS_LOST decide the
    /// GPU's state; anything else is that query's own business.
    pub fn saw(&mut self, query: &str, e: &NvmlError) {
        let a = Answer::<()>::from_error(e);
        if matches!(a, Answer::ResetRequired | Answer::GpuLost) {
            self.fatal.push((query.to_string(), a));
        }
    }

    /// The checks and whether each is available on this GPU with this library; `None` where
    /// the answer says nothing about that (RESET_REQUIRED, GPU_IS_LOST, another error).
    pub fn availability(&self) -> [(&'static str, Option<Offer>); 4] {
        fn of<T>(a: &Answer<T>) -> Option<Offer> {
            match a {
                Answer::Value(_) => Some(Offer::Offered),
                Answer::NotSupported => Some(Offer::NotSupported),
                Answer::NotInLibrary => Some(Offer::NotInLibrary),
                Answer::ResetRequired | Answer::GpuLost | Answer::Failed(_) => None,
            }
        }
        // A fabric answer of state NOT_SUPPORTED: this GPU is on no NVLink fabric.
        let fabric = match &self.fabric {
            Answer::Value(f) if f.state == FABRIC_STATE_NOT_SUPPORTED => Some(Offer::NotSupported),
            other => of(other),
        };
        [
            ("remapped rows", of(&self.remapped_rows)),
            ("retired pages", of(&self.retired_pages_pending)),
            ("MIG mode", of(&self.mig_mode)),
            ("fabric state", fabric),
        ]
    }
}

/// Whether a check is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// The check answered.
    Offered,
    /// NOT_SUPPORTED: this GPU has no such state to report.
    NotSupported,
    /// The loaded library lacks the call.
    NotInLibrary,
}

/// A GPU state NVIDIA's guidance names, with what to do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuState {
    /// A per-device query answered RESET_REQUIRED: not counted.
    ResetRequired,
    /// A per-device query answered GPU_IS_LOST: not counted.
    GpuLost,
    /// `failureOccurred` from the row remapper: not counted, replace the board.
    RowRemapFailed,
    /// NVLink fabric registration not completed (NVSwitch / GB200-class): not counted (CUDA
    /// answers 802 "system not yet initialized").
    FabricNotReady,
    /// Fabric registration completed with an error status: not counted.
    FabricFailed,
    /// A row remap waits for a reset: counted (new work can still launch on A100/H100).
    RowRemapPending,
    /// Retired pages wait for a reset: counted.
    RetiredPagesPending,
    /// A MIG mode change waits for a reset: counted.
    MigChangePending,
}

/// Every state, in a stable order (metrics, tests).
pub const ALL_STATES: [GpuState; 8] = [
    GpuState::ResetRequired,
    GpuState::GpuLost,
    GpuState::RowRemapFailed,
    GpuState::FabricNotReady,
    GpuState::FabricFailed,
    GpuState::RowRemapPending,
    GpuState::RetiredPagesPending,
    GpuState::MigChangePending,
];

impl GpuState {
    /// False: the GPU cannot run work until the action is taken, and is left out of
    /// `gpu_count` (unless `inventory.count_unhealthy_gpus`).
    pub fn counted(self) -> bool {
        matches!(
            self,
            GpuState::RowRemapPending | GpuState::RetiredPagesPending | GpuState::MigChangePending
        )
    }

    /// The name in logs, tables and the metrics label.
    pub fn name(self) -> &'static str {
        match self {
            GpuState::ResetRequired => "reset_required",
            GpuState::GpuLost => "gpu_lost",
            GpuState::RowRemapFailed => "row_remap_failed",
            GpuState::FabricNotReady => "fabric_not_ready",
            GpuState::FabricFailed => "fabric_failed",
            GpuState::RowRemapPending => "row_remap_pending",
            GpuState::RetiredPagesPending => "retired_pages_pending",
            GpuState::MigChangePending => "mig_change_pending",
        }
    }

    /// What the operator does about it (NVIDIA's guidance).
    pub fn action(self) -> &'static str {
        match self {
            GpuState::ResetRequired | GpuState::GpuLost => {
                "reset the GPU (nvidia-smi -r) or reboot"
            }
            GpuState::RowRemapFailed => "replace the board",
            GpuState::FabricNotReady | GpuState::FabricFailed => {
                "check the NVLink fabric (nvidia-fabricmanager / NVLink subnet manager), then reset the GPU or reboot"
            }
            GpuState::RowRemapPending
            | GpuState::RetiredPagesPending
            | GpuState::MigChangePending => "reset when drained",
        }
    }
}

/// The pure decision: NVML's raw answers for one GPU → its states, worst (not counted) first.
/// NOT_SUPPORTED and missing symbols add nothing; any answer of RESET_REQUIRED / GPU_IS_LOST
/// (from these checks or any other per-device query) means the GPU needs a reset.
pub fn decide(raw: &RawChecks) -> Vec<GpuState> {
    let mut states = Vec::new();
    let fatal = [
        fatal_state(&raw.remapped_rows),
        fatal_state(&raw.retired_pages_pending),
        fatal_state(&raw.mig_mode),
        fatal_state(&raw.fabric),
    ]
    .into_iter()
    .chain(raw.fatal.iter().map(|(_, a)| fatal_state(a)))
    .flatten();
    for s in fatal {
        if !states.contains(&s) {
            states.push(s);
        }
    }
    if let Answer::Value(r) = &raw.remapped_rows {
        if r.failure {
            states.push(GpuState::RowRemapFailed);
        } else if r.pending {
            states.push(GpuState::RowRemapPending);
        }
    }
    if let Answer::Value(f) = &raw.fabric
        && f.state != FABRIC_STATE_NOT_SUPPORTED
    {
        if f.state != FABRIC_STATE_COMPLETED {
            states.push(GpuState::FabricNotReady);
        } else if f.status != NVML_SUCCESS {
            states.push(GpuState::FabricFailed);
        }
    }
    if raw.retired_pages_pending == Answer::Value(true) {
        states.push(GpuState::RetiredPagesPending);
    }
    if let Answer::Value(m) = &raw.mig_mode
        && m.current != m.pending
    {
        states.push(GpuState::MigChangePending);
    }
    states.sort();
    states
}

fn fatal_state<T>(a: &Answer<T>) -> Option<GpuState> {
    match a {
        Answer::ResetRequired => Some(GpuState::ResetRequired),
        Answer::GpuLost => Some(GpuState::GpuLost),
        _ => None,
    }
}

/// A GPU NVML lists but gives no handle for, because it answered RESET_REQUIRED or
/// GPU_IS_LOST: every check carries that answer (so it is not counted); name, memory, UUID and
/// bus id are unknown here (the probe fills them from an earlier refresh or the PCI scan).
pub fn without_handle(index: u32, e: &NvmlError) -> super::Gpu {
    let mut raw = RawChecks {
        remapped_rows: Answer::from_error(e),
        retired_pages_pending: Answer::from_error(e),
        mig_mode: Answer::from_error(e),
        fabric: Answer::from_error(e),
        fatal: Vec::new(),
        name_error: Some(e.to_string()),
    };
    raw.saw("handle", e);
    super::Gpu {
        index,
        vendor: super::Vendor::Nvidia,
        name: super::FALLBACK_NAME.to_string(),
        memory_bytes: None,
        uuid: None,
        bus_id: String::new(),
        mig_enabled: None,
        source: "nvml",
        driver: None,
        health: Some(raw),
    }
}

/// Asks NVML the health questions for one device. Blocking, as every NVML call; the caller
/// runs it under the NVML timeout with the rest of the per-GPU queries.
pub fn query(nvml: &Nvml, device: &Device) -> RawChecks {
    RawChecks {
        remapped_rows: Answer::from_result(remapped_rows(nvml, device)),
        retired_pages_pending: Answer::from_result(device.are_pages_pending_retired()),
        mig_mode: Answer::from_result(device.mig_mode().map(|m| MigModes {
            current: m.current,
            pending: m.pending,
        })),
        fabric: Answer::from_result(fabric(nvml, device)),
        fatal: Vec::new(),
        name_error: None,
    }
}

fn remapped_rows(nvml: &Nvml, device: &Device) -> Result<RemappedRows, NvmlError> {
    let Ok(get) = &nvml.lib().nvmlDeviceGetRemappedRows else {
        return Err(NvmlError::FunctionNotFound);
    };
    let (mut corr, mut unc, mut pending, mut failure) = (0u32, 0u32, 0u32, 0u32);
    // SAFETY: `get` is NVML's nvmlDeviceGetRemappedRows, resolved from the library `nvml` keeps
    // loaded while `device` (which borrows it) lives; the handle is the live one NVML gave; the
    // four pointers are to distinct, writable unsigned ints that NVML fills and does not keep.
    let code = unsafe {
        get(
            device.handle(),
            &mut corr,
            &mut unc,
            &mut pending,
            &mut failure,
        )
    };
    nvml_try(code)?;
    Ok(RemappedRows {
        correctable: corr,
        uncorrectable: unc,
        pending: pending != 0,
        failure: failure != 0,
    })
}

/// The versioned call (550 and later) with the v2 struct, else the unversioned one (535).
fn fabric(nvml: &Nvml, device: &Device) -> Result<Fabric, NvmlError> {
    if let Ok(get) = &nvml.lib().nvmlDeviceGetGpuFabricInfoV {
        // The v3 struct is the larger; NVML fills only the v2 part that `version` names.
        let mut info = nvmlGpuFabricInfoV_t {
            version: FABRIC_INFO_V2,
            clusterUuid: [0; 16],
            status: 0,
            cliqueId: 0,
            state: 0,
            healthMask: 0,
            healthSummary: 0,
        };
        // SAFETY: `get` is NVML's nvmlDeviceGetGpuFabricInfoV from the library `nvml` keeps
        // loaded; the handle is live; `info` is a writable struct at least as large as the v2
        // layout its `version` field announces, which is all NVML writes.
        let code = unsafe { get(device.handle(), &mut info) };
        nvml_try(code)?;
        return Ok(Fabric {
            state: info.state,
            status: i32::try_from(info.status).unwrap_or(i32::MAX),
        });
    }
    let Ok(get) = &nvml.lib().nvmlDeviceGetGpuFabricInfo else {
        return Err(NvmlError::FunctionNotFound);
    };
    let mut info = nvmlGpuFabricInfo_t {
        clusterUuid: [0; 16],
        status: 0,
        cliqueId: 0,
        state: 0,
    };
    // SAFETY: `get` is NVML's nvmlDeviceGetGpuFabricInfo (unversioned layout, 535) from the
    // library `nvml` keeps loaded; the handle is live; `info` is a writable nvmlGpuFabricInfo_t.
    let code = unsafe { get(device.handle(), &mut info) };
    nvml_try(code)?;
    Ok(Fabric {
        state: info.state,
        status: i32::try_from(info.status).unwrap_or(i32::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> RawChecks {
        RawChecks {
            remapped_rows: Answer::Value(RemappedRows {
                correctable: 0,
                uncorrectable: 0,
                pending: false,
                failure: false,
            }),
            retired_pages_pending: Answer::NotSupported,
            mig_mode: Answer::Value(MigModes {
                current: 0,
                pending: 0,
            }),
            fabric: Answer::Value(Fabric {
                state: FABRIC_STATE_NOT_SUPPORTED,
                status: 0,
            }),
            fatal: Vec::new(),
            name_error: None,
        }
    }

    fn rows(pending: bool, failure: bool) -> Answer<RemappedRows> {
        Answer::Value(RemappedRows {
            correctable: 1,
            uncorrectable: 2,
            pending,
            failure,
        })
    }

    #[test]
    fn a_healthy_gpu_has_no_state() {
        assert!(decide(&healthy()).is_empty());
    }

    #[test]
    fn remapped_rows_failed_is_not_counted_and_pending_is() {
        let mut r = healthy();
        r.remapped_rows = rows(false, true);
        assert_eq!(decide(&r), vec![GpuState::RowRemapFailed]);
        assert!(!GpuState::RowRemapFailed.counted());
        assert_eq!(GpuState::RowRemapFailed.action(), "replace the board");
        // A failure outranks the pending remap NVML may report beside it.
        r.remapped_rows = rows(true, true);
        assert_eq!(decide(&r), vec![GpuState::RowRemapFailed]);
        r.remapped_rows = rows(true, false);
        assert_eq!(decide(&r), vec![GpuState::RowRemapPending]);
        assert!(GpuState::RowRemapPending.counted());
        assert_eq!(GpuState::RowRemapPending.action(), "reset when drained");
    }

    #[test]
    fn reset_required_or_lost_on_any_query_is_not_counted() {
        let mut r = healthy();
        r.retired_pages_pending = Answer::ResetRequired;
        assert_eq!(decide(&r), vec![GpuState::ResetRequired]);
        let mut r = healthy();
        r.saw("name", &NvmlError::ResetRequired);
        assert_eq!(decide(&r), vec![GpuState::ResetRequired]);
        let mut r = healthy();
        r.saw("PCI info", &NvmlError::GpuLost);
        r.mig_mode = Answer::GpuLost;
        assert_eq!(decide(&r), vec![GpuState::GpuLost]);
        assert_eq!(
            GpuState::ResetRequired.action(),
            "reset the GPU (nvidia-smi -r) or reboot"
        );
        // Other errors of other queries decide nothing.
        let mut r = healthy();
        r.saw("name", &NvmlError::Unknown);
        assert!(decide(&r).is_empty());
    }

    #[test]
    fn fabric_not_completed_or_failed_is_not_counted() {
        for state in [1, 2] {
            let mut r = healthy();
            r.fabric = Answer::Value(Fabric { state, status: 0 });
            assert_eq!(decide(&r), vec![GpuState::FabricNotReady], "state {state}");
        }
        let mut r = healthy();
        r.fabric = Answer::Value(Fabric {
            state: FABRIC_STATE_COMPLETED,
            status: 999,
        });
        assert_eq!(decide(&r), vec![GpuState::FabricFailed]);
        r.fabric = Answer::Value(Fabric {
            state: FABRIC_STATE_COMPLETED,
            status: 0,
        });
        assert!(decide(&r).is_empty());
        // Not an NVSwitch system: the status field is meaningless.
        r.fabric = Answer::Value(Fabric {
            state: FABRIC_STATE_NOT_SUPPORTED,
            status: 999,
        });
        assert!(decide(&r).is_empty());
    }

    #[test]
    fn pending_work_is_counted_with_an_action() {
        let mut r = healthy();
        r.retired_pages_pending = Answer::Value(true);
        r.mig_mode = Answer::Value(MigModes {
            current: 0,
            pending: 1,
        });
        let s = decide(&r);
        assert_eq!(
            s,
            vec![GpuState::RetiredPagesPending, GpuState::MigChangePending]
        );
        assert!(s.iter().all(|s| s.counted()));
    }

    #[test]
    fn checks_not_available_count_the_gpu() {
        let r = RawChecks {
            remapped_rows: Answer::NotSupported,
            retired_pages_pending: Answer::NotSupported,
            mig_mode: Answer::NotInLibrary,
            fabric: Answer::NotInLibrary,
            fatal: Vec::new(),
            name_error: None,
        };
        assert!(decide(&r).is_empty());
        let a = r.availability();
        assert_eq!(a[0], ("remapped rows", Some(Offer::NotSupported)));
        assert_eq!(a[3], ("fabric state", Some(Offer::NotInLibrary)));
        // A GPU needing a reset says nothing about which checks the driver offers.
        let mut r = healthy();
        r.fabric = Answer::ResetRequired;
        assert_eq!(r.availability()[3], ("fabric state", None));
        // Another error of a check is not a state either (it is shown, not decided on).
        let mut r = healthy();
        r.remapped_rows = Answer::Failed("Unknown".into());
        assert!(decide(&r).is_empty());
    }

    #[test]
    fn the_raw_answers_survive_json() {
        let mut r = healthy();
        r.remapped_rows = rows(true, false);
        r.saw("name", &NvmlError::ResetRequired);
        let back: RawChecks = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }

    /// The struct layouts nvml.h defines (sizes the versioned call depends on).
    #[test]
    fn fabric_struct_layouts_match_nvml_h() {
        assert_eq!(
            std::mem::size_of::<nvml_wrapper_sys::bindings::nvmlGpuFabricInfo_v2_t>(),
            FABRIC_INFO_V2_SIZE as usize
        );
        assert!(std::mem::size_of::<nvmlGpuFabricInfoV_t>() >= FABRIC_INFO_V2_SIZE as usize);
        assert_eq!(std::mem::size_of::<nvmlGpuFabricInfo_t>(), 28);
        assert_eq!(FABRIC_INFO_V2, 0x0200_0024);
    }
}
