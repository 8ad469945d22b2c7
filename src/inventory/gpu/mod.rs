//! GPUs: discovery (NVML first, then the PCI bus for what NVML did not cover), and how a list
//! of GPUs becomes the API's four GPU fields.

pub mod health;
pub mod nvml;
mod nvml_v1;
pub mod pci;
pub mod probe;

use crate::config::GpuMode;
use health::{GpuState, Offer, RawChecks};
use nvml::{NVML_TIMEOUT, NvmlData, NvmlOutcome};
use probe::NvmlProbe;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// GPU vendors the API knows (`GpuTypeInfo.gpu_vendor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Vendor {
    /// PCI vendor 0x10de.
    Nvidia,
    /// PCI vendor 0x1002.
    Amd,
    /// PCI vendor 0x8086.
    Intel,
}

impl Vendor {
    /// The API's spelling.
    pub fn api_name(self) -> &'static str {
        match self {
            Vendor::Nvidia => "NVIDIA",
            Vendor::Amd => "AMD",
            Vendor::Intel => "INTEL",
        }
    }

    /// `gpu_type` as the platform shows it: the model without the vendor's name, which
    /// `gpu_vendor` already carries (the exalsius CLI prints "{count}x {vendor} {type}", and
    /// the platform's GPU vocabulary is "H100", "MI300X"): "NVIDIA H100 80GB HBM3" →
    /// "H100 80GB HBM3", "AMD Instinct MI300X" → "Instinct MI300X", "Intel(R) Data Center GPU
    /// Max 1550" → "Data Center GPU Max 1550". A name without the prefix is kept as it is
    /// ("Tesla V100-SXM2-16GB"), and so is one that would be left empty.
    pub fn model_of(self, name: &str) -> String {
        let prefixes: &[&str] = match self {
            Vendor::Nvidia => &["NVIDIA Corporation ", "NVIDIA "],
            Vendor::Amd => &["Advanced Micro Devices, Inc. ", "AMD/ATI ", "AMD "],
            Vendor::Intel => &["Intel Corporation ", "Intel(R) ", "Intel "],
        };
        let name = name.trim();
        for p in prefixes {
            if name.len() > p.len()
                && name.is_char_boundary(p.len())
                && name[..p.len()].eq_ignore_ascii_case(p)
            {
                let rest = name[p.len()..].trim();
                if !rest.is_empty() {
                    return rest.to_string();
                }
            }
        }
        name.to_string()
    }
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// Index in discovery order.
    pub index: u32,
    /// Vendor.
    pub vendor: Vendor,
    /// Model name ("NVIDIA H100 80GB HBM3").
    pub name: String,
    /// Total memory in bytes; `None` when unknown.
    pub memory_bytes: Option<u64>,
    /// NVML UUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// PCI bus id, `0000:17:00.0`.
    pub bus_id: String,
    /// MIG mode (NVML), `None` when not applicable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_enabled: Option<bool>,
    /// `nvml` or `pci`.
    #[serde(deserialize_with = "source_name")]
    pub source: SourceName,
    /// The kernel driver bound to it (PCI scan only; `None`: none, or not known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// NVML's raw answers to the health checks ([`health`]); `None` for the PCI scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<RawChecks>,
}

/// The name a GPU gets when NVML cannot name it (and no earlier refresh could).
pub const FALLBACK_NAME: &str = "NVIDIA GPU";

impl Gpu {
    /// Its health states ([`health::decide`]), worst first; none for the PCI scan.
    pub fn states(&self) -> Vec<GpuState> {
        self.health.as_ref().map(health::decide).unwrap_or_default()
    }

    /// It can take work now: no state that NVIDIA says needs a reset, reboot or new board.
    pub fn counted(&self) -> bool {
        self.states().iter().all(|s| s.counted())
    }

    /// "GPU 3 (GPU-…, 0000:5d:00.0)": how logs and notes name a GPU.
    pub fn label(&self) -> String {
        format!(
            "GPU {} ({}, {})",
            self.index,
            self.uuid.as_deref().unwrap_or("no UUID"),
            if self.bus_id.is_empty() {
                "no bus id"
            } else {
                &self.bus_id
            }
        )
    }
}

/// [`Gpu::source`]'s type. An alias, so that serde's derive does not see a `&str` and borrow
/// it from the input (which would require a `'static` input): [`source_name`] maps the text
/// back to the two names.
pub type SourceName = &'static str;

/// [`Gpu::source`] read back (the probe child's answer): one of the two names, else an error.
fn source_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    let s = String::deserialize(d)?;
    match s.as_str() {
        "nvml" => Ok("nvml"),
        "pci" => Ok("pci"),
        other => Err(serde::de::Error::invalid_value(
            serde::de::Unexpected::Str(other),
            &"nvml or pci",
        )),
    }
}

/// The API's GPU fields for a list of GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSummary {
    /// The GPUs that can take work ([`Gpu::counted`]), or all found with
    /// `inventory.count_unhealthy_gpus`.
    pub count: i32,
    /// Vendor of the most common model, or `UNKNOWN`.
    pub vendor: String,
    /// The most common model without the vendor's name ([`Vendor::model_of`]), or `UNKNOWN`.
    pub model: String,
    /// Memory per GPU of that model in GiB (rounded), 0 when unknown.
    pub memory_gib: i32,
    /// More than one model was found.
    pub mixed: bool,
}

/// Summarises GPUs: the count of those that can take work (see [`summarise_with`]).
pub fn summarise(gpus: &[Gpu]) -> GpuSummary {
    summarise_with(gpus, false)
}

/// Summarises GPUs: the count of those that can take work (all with `count_unhealthy`), and
/// the most common model (ties: the first found). The model and its memory come from GPUs NVML
/// could name: a GPU left out for its state never turns the node into "NVIDIA GPU", 0 GiB.
pub fn summarise_with(gpus: &[Gpu], count_unhealthy: bool) -> GpuSummary {
    let named: Vec<&Gpu> = gpus
        .iter()
        .filter(|g| g.health.as_ref().is_none_or(|h| h.name_error.is_none()))
        .collect();
    let candidates = if named.is_empty() {
        gpus.iter().collect()
    } else {
        named
    };
    let mut models: Vec<(&Gpu, usize)> = Vec::new();
    for g in candidates {
        match models
            .iter_mut()
            .find(|(m, _)| m.name == g.name && m.vendor == g.vendor)
        {
            Some((_, n)) => *n += 1,
            None => models.push((g, 1)),
        }
    }
    let best = models
        .iter()
        .enumerate()
        .max_by(|(ia, (_, a)), (ib, (_, b))| a.cmp(b).then(ib.cmp(ia)))
        .map(|(_, (g, _))| *g);
    let count = gpus
        .iter()
        .filter(|g| count_unhealthy || g.counted())
        .count();
    match best {
        None => GpuSummary {
            count: 0,
            vendor: "UNKNOWN".to_string(),
            model: "UNKNOWN".to_string(),
            memory_gib: 0,
            mixed: false,
        },
        Some(g) => GpuSummary {
            count: i32::try_from(count).unwrap_or(i32::MAX),
            vendor: g.vendor.api_name().to_string(),
            model: g.vendor.model_of(&g.name),
            memory_gib: g.memory_bytes.map_or(0, super::memory::gib_rounded),
            mixed: models.len() > 1,
        },
    }
}

/// What one GPU discovery found.
#[derive(Debug, Clone, Default)]
pub struct GpuReport {
    /// All GPUs, re-indexed in report order.
    pub gpus: Vec<Gpu>,
    /// Human-readable notes (why NVML was not used, unknown memory, …).
    pub notes: Vec<String>,
    /// `software.nvidia` from NVML, when NVML answered (now or last time).
    pub nvidia_version: Option<String>,
    /// NVML is there but failed this time (an error, a timeout): counted by the metrics.
    pub nvml_failed: bool,
    /// NVML was refused world-accessible device nodes: the service's device policy, fixed
    /// when it started, does not cover a driver loaded since (the loop may ask for a restart).
    pub device_policy_refused: bool,
}

/// GPU discovery with memory between refreshes: the kept NVML handle, the last good NVML
/// answer (sent again while NVML hangs), and the last list (to notice GPUs that vanish).
#[derive(Debug)]
pub struct GpuProbe {
    mode: GpuMode,
    root: PathBuf,
    nvml: NvmlProbe,
    last_nvml: Mutex<Option<NvmlData>>,
    last_seen: Mutex<Option<Vec<Gpu>>>,
    /// The last NVML failure warned about: one warning per distinct error, not per refresh.
    last_error: Mutex<Option<String>>,
    /// Bus ids of NVIDIA GPUs on the PCI bus that NVML cannot use, already warned about.
    unusable_warned: Mutex<Vec<String>>,
    /// The GPUs with MIG on, as last logged (logged again only when this changes).
    mig_logged: Mutex<Vec<String>>,
    /// Count GPUs whatever their state (`inventory.count_unhealthy_gpus`).
    count_unhealthy: bool,
    /// What was last logged per GPU (states, why NVML cannot name it), the health checks
    /// offered, and the mixed models: each logged again only when it changes.
    logged: Mutex<Logged>,
}

/// The GPU facts last logged, to log each once per change rather than at every refresh.
#[derive(Debug, Default)]
struct Logged {
    /// Per GPU (UUID, else bus id, else index): its states.
    states: Vec<(String, Vec<GpuState>)>,
    /// Per GPU: why NVML cannot name it.
    name_errors: Vec<(String, String)>,
    /// The "health checks this driver offers" line.
    offered: Option<String>,
    /// The "mixed GPU models" line.
    mixed: Option<String>,
}

/// What identifies a GPU across refreshes: UUID, else bus id, else index.
fn key_of(g: &Gpu) -> String {
    g.uuid.clone().unwrap_or_else(|| {
        if g.bus_id.is_empty() {
            format!("index {}", g.index)
        } else {
            g.bus_id.clone()
        }
    })
}

/// Logs `line` (at info, or warn) when it differs from `*last`; remembers it.
fn once_per_change(last: &mut Option<String>, line: Option<String>, warn: bool) {
    if *last == line {
        return;
    }
    if let Some(l) = &line {
        if warn {
            tracing::warn!("{l}");
        } else {
            tracing::info!("{l}");
        }
    }
    *last = line;
}

impl GpuProbe {
    /// A probe for `mode`, reading PCI under `root` and loading NVML from `nvml_library`.
    pub fn new(mode: GpuMode, root: &Path, nvml_library: Option<&Path>) -> Self {
        Self {
            mode,
            root: root.to_path_buf(),
            nvml: NvmlProbe::new(nvml_library, root),
            last_nvml: Mutex::new(None),
            last_seen: Mutex::new(None),
            last_error: Mutex::new(None),
            unusable_warned: Mutex::new(Vec::new()),
            mig_logged: Mutex::new(Vec::new()),
            count_unhealthy: false,
            logged: Mutex::new(Logged::default()),
        }
    }

    /// Counts every GPU whatever its health state (`inventory.count_unhealthy_gpus`); the
    /// states are still logged and reported.
    #[must_use]
    pub fn count_unhealthy_gpus(mut self, on: bool) -> Self {
        self.count_unhealthy = on;
        self
    }

    /// Discovers GPUs now. Blocking (NVML waits at most [`NVML_TIMEOUT`]).
    pub fn collect(&self) -> GpuReport {
        let mut report = GpuReport::default();
        if self.mode == GpuMode::Off {
            report
                .notes
                .push("GPU discovery is off (inventory.gpu = \"off\")".to_string());
            return report;
        }
        if matches!(self.mode, GpuMode::Auto | GpuMode::Nvml) {
            self.add_nvml(&mut report);
            self.fill_unnamed(&mut report.gpus);
        }
        // auto: the PCI scan adds what NVML did not cover: other vendors always, NVIDIA only
        // when NVML gave no answer at all (no driver, or failing since start).
        if matches!(self.mode, GpuMode::Auto | GpuMode::Pci) {
            self.add_pci(&mut report);
        }
        for (i, g) in report.gpus.iter_mut().enumerate() {
            g.index = u32::try_from(i).unwrap_or(u32::MAX);
        }
        self.log_health(&report.gpus, &mut report.notes);
        self.compare_with_last(&report.gpus);
        let summary = summarise(&report.gpus);
        let mixed = summary.mixed.then(|| {
            let models: Vec<&str> = report.gpus.iter().map(|g| g.name.as_str()).collect();
            format!(
                "mixed GPU models ({}); reporting the most common: {}",
                models.join(", "),
                summary.model
            )
        });
        if let Ok(mut l) = self.logged.lock() {
            once_per_change(&mut l.mixed, mixed, true);
        }
        report
    }

    /// NVML's GPUs, or (when it fails) its last good answer.
    fn add_nvml(&self, report: &mut GpuReport) {
        match self.nvml.query(NVML_TIMEOUT) {
            NvmlOutcome::Data(data) => {
                report.nvidia_version = data.version_text();
                report.gpus = data.gpus.clone();
                self.log_mig(&report.gpus);
                if let Ok(mut last) = self.last_nvml.lock() {
                    *last = Some(data);
                }
                if let Ok(mut e) = self.last_error.lock() {
                    *e = None;
                }
            }
            NvmlOutcome::NoLibrary(why) => {
                if self.nvml.first_missing() {
                    tracing::info!("NVML is not available ({why}); no NVIDIA driver on this host?");
                }
                report.notes.push(format!("NVML: {why}"));
            }
            // Any NVML failure — an error, a timeout, a query still stuck — keeps the last
            // good answer: a flapping driver must not make the node report 0 GPUs.
            outcome => {
                let what = match outcome {
                    NvmlOutcome::TimedOut => {
                        format!("NVML did not answer within {NVML_TIMEOUT:?}")
                    }
                    NvmlOutcome::Busy => "an earlier NVML query is still stuck".to_string(),
                    NvmlOutcome::Failed(why) => why,
                    NvmlOutcome::PolicyRefused(why) => {
                        report.device_policy_refused = true;
                        why
                    }
                    NvmlOutcome::Data(_) | NvmlOutcome::NoLibrary(_) => String::new(),
                };
                self.nvml_failed(&what, report);
            }
        }
    }

    /// The PCI scan's GPUs that NVML did not report: never an NVIDIA GPU twice, and one on the
    /// bus that a working NVML does not report is logged, not counted.
    fn add_pci(&self, report: &mut GpuReport) {
        let (pci_gpus, notes) = pci::scan(&self.root);
        report.notes.extend(notes);
        let nvml_answered =
            report.gpus.iter().any(|g| g.source == "nvml") || report.nvidia_version.is_some();
        let mut nvml_without_bus_id = report
            .gpus
            .iter()
            .filter(|g| g.source == "nvml" && g.bus_id.is_empty())
            .count();
        let mut unusable = Vec::new();
        let drivers: Vec<(String, Option<String>)> = pci_gpus
            .iter()
            .map(|g| (g.bus_id.clone(), g.driver.clone()))
            .collect();
        for g in pci_gpus {
            if report
                .gpus
                .iter()
                .any(|n| !n.bus_id.is_empty() && n.bus_id == g.bus_id)
            {
                continue;
            }
            if self.mode == GpuMode::Auto && nvml_answered && g.vendor == Vendor::Nvidia {
                // Counted by NVML without a bus id, or on the bus but unusable: never twice.
                if nvml_without_bus_id > 0 {
                    nvml_without_bus_id -= 1;
                    // NVML enumerates in PCI bus order, as the scan lists them: the k-th NVML
                    // GPU without a bus id is the k-th NVIDIA GPU on the bus NVML did not name.
                    if let Some(n) = report
                        .gpus
                        .iter_mut()
                        .find(|n| n.source == "nvml" && n.bus_id.is_empty())
                    {
                        n.bus_id.clone_from(&g.bus_id);
                        // One NVML cannot name (it needs a reset) gets the PCI scan's name,
                        // the same as NVML's for the parts in the device table.
                        if n.name == FALLBACK_NAME {
                            n.name.clone_from(&g.name);
                            n.memory_bytes = n.memory_bytes.or(g.memory_bytes);
                        }
                    }
                } else {
                    unusable.push(g.bus_id);
                }
                continue;
            }
            report.gpus.push(g);
        }
        let unusable: Vec<(String, Option<String>)> = drivers
            .into_iter()
            .filter(|(bus, _)| unusable.contains(bus))
            .collect();
        self.report_unusable(&unusable, &mut report.notes);
    }

    /// An NVML failure: the last good NVML answer if there is one (else the PCI scan stands
    /// in, in `auto` mode), and a warning when this error differs from the last one warned.
    fn nvml_failed(&self, what: &str, report: &mut GpuReport) {
        report.nvml_failed = true;
        let last = self.last_nvml.lock().ok().and_then(|l| l.clone());
        let fallback = if last.is_some() {
            "reporting the last good GPU data"
        } else {
            "no earlier NVML data, using the PCI scan"
        };
        let new_error = self
            .last_error
            .lock()
            .map(|mut e| {
                let new = e.as_deref() != Some(what);
                *e = Some(what.to_string());
                new
            })
            .unwrap_or(true);
        if new_error {
            tracing::warn!("{what}; {fallback}; retried at every inventory refresh");
        }
        match last {
            Some(data) => {
                report.nvidia_version = data.version_text();
                report.gpus = data.gpus;
                report.notes.push(format!("{what}: last good NVML data"));
            }
            None => report.notes.push(format!("{what}: PCI scan used")),
        }
    }

    /// NVIDIA GPUs on the PCI bus that NVML does not report, with the driver bound to each: not
    /// counted, logged once per bus id (with the UUID the last refresh knew, if any) and named
    /// for what the host says — bound to no driver, to another one, or lost by the driver.
    fn report_unusable(&self, gpus: &[(String, Option<String>)], notes: &mut Vec<String>) {
        let bus_ids: Vec<String> = gpus.iter().map(|(b, _)| b.clone()).collect();
        let Ok(mut warned) = self.unusable_warned.lock() else {
            return;
        };
        warned.retain(|b| bus_ids.contains(b));
        let known = self.last_seen();
        for (bus, driver) in gpus {
            let uuid = known
                .iter()
                .find(|g| &g.bus_id == bus)
                .and_then(|g| g.uuid.clone());
            let why = match driver.as_deref() {
                None => "is bound to no driver".to_string(),
                Some("nvidia") => {
                    "is on the PCI bus but NVML cannot use it (fallen off the bus?)".to_string()
                }
                Some(other) => format!("is bound to {other}, not the NVIDIA driver"),
            };
            let line = format!(
                "NVIDIA GPU at {bus}{} {why}: not counted",
                uuid.map_or_else(String::new, |u| format!(" ({u})"))
            );
            if !warned.contains(bus) {
                tracing::warn!("{line}");
                warned.push(bus.clone());
            }
            notes.push(line);
        }
    }

    /// MIG: NVML enumerates physical GPUs (MIG instances are not devices of their own), each
    /// reported with its full memory; the mode is logged when it changes.
    fn log_mig(&self, gpus: &[Gpu]) {
        let on: Vec<String> = gpus
            .iter()
            .filter(|g| g.mig_enabled == Some(true))
            .map(|g| format!("GPU {} ({})", g.index, g.bus_id))
            .collect();
        let Ok(mut last) = self.mig_logged.lock() else {
            return;
        };
        if *last == on {
            return;
        }
        if on.is_empty() {
            tracing::info!("MIG mode is off on every GPU");
        } else {
            tracing::info!(
                "MIG mode is on for {}: each is reported as one physical GPU with its full memory; MIG instances are not counted as GPUs",
                on.join(", ")
            );
        }
        *last = on;
    }

    /// The GPUs the last refresh saw (empty before the first, or if its lock was poisoned).
    fn last_seen(&self) -> Vec<Gpu> {
        self.last_seen
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .unwrap_or_default()
    }

    /// A GPU NVML cannot name (it answered RESET_REQUIRED, GPU_IS_LOST, …) keeps the name,
    /// memory, UUID and bus id an earlier refresh knew for it (matched by UUID, bus id, else
    /// NVML index): the node's model stays the node's model.
    fn fill_unnamed(&self, gpus: &mut [Gpu]) {
        let known = self.last_seen();
        for g in gpus.iter_mut() {
            // Only GPUs with a RESET_REQUIRED / GPU_IS_LOST answer (their name, UUID or bus id
            // may be missing): a healthy GPU's own answers always win.
            if g.health
                .as_ref()
                .is_none_or(|h| h.name_error.is_none() && h.fatal.is_empty())
            {
                continue;
            }
            let before =
                known
                    .iter()
                    .filter(|k| k.source == "nvml")
                    .find(|k| match (&g.uuid, &k.uuid) {
                        (Some(a), Some(b)) => a == b,
                        _ if !g.bus_id.is_empty() => g.bus_id == k.bus_id,
                        _ => g.index == k.index,
                    });
            if let Some(k) = before {
                if g.name == FALLBACK_NAME {
                    g.name.clone_from(&k.name);
                }
                g.memory_bytes = g.memory_bytes.or(k.memory_bytes);
                if g.uuid.is_none() {
                    g.uuid.clone_from(&k.uuid);
                }
                if g.bus_id.is_empty() {
                    g.bus_id.clone_from(&k.bus_id);
                }
            }
        }
    }

    /// Each GPU's health states: a note per GPU with a state (every refresh), a log line per
    /// change (a state appears: warn, with the action; a state clears: info), the checks this
    /// driver offers (info, once per change), and why NVML cannot name a GPU (once per change).
    fn log_health(&self, gpus: &[Gpu], notes: &mut Vec<String>) {
        let Ok(mut logged) = self.logged.lock() else {
            return;
        };
        let mut states_now = Vec::new();
        let mut names_now = Vec::new();
        for g in gpus.iter().filter(|g| g.health.is_some()) {
            let key = key_of(g);
            let states = g.states();
            let before: Vec<GpuState> = logged
                .states
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, s)| s.clone())
                .unwrap_or_default();
            for s in &states {
                let line = format!(
                    "{}: {} — {}; {}",
                    g.label(),
                    s.name(),
                    self.counted_text(*s),
                    s.action()
                );
                if !before.contains(s) {
                    tracing::warn!("{line}");
                }
                notes.push(line);
            }
            for s in before.iter().filter(|s| !states.contains(s)) {
                let back = if !s.counted() && g.counted() && !self.count_unhealthy {
                    "; counted again"
                } else {
                    ""
                };
                tracing::info!("{}: {} cleared{back}", g.label(), s.name());
            }
            if !states.is_empty() {
                states_now.push((key.clone(), states));
            }
            // A GPU without a name because it needs a reset is already named for that.
            let name_error = g
                .health
                .as_ref()
                .and_then(|h| h.name_error.clone())
                .filter(|_| g.counted());
            if let Some(e) = name_error {
                if !logged.name_errors.iter().any(|(k, l)| *k == key && *l == e) {
                    tracing::warn!("NVML cannot name {}: {e}", g.label());
                }
                names_now.push((key, e));
            }
        }
        logged.states = states_now;
        logged.name_errors = names_now;
        let offered = offered_line(gpus);
        once_per_change(&mut logged.offered, offered, false);
    }

    fn counted_text(&self, s: GpuState) -> &'static str {
        match (s.counted(), self.count_unhealthy) {
            (true, _) => "still counted",
            (false, false) => "not counted",
            (false, true) => "counted anyway (inventory.count_unhealthy_gpus)",
        }
    }

    /// Warns about GPUs that were there at the last refresh and are gone now.
    fn compare_with_last(&self, now: &[Gpu]) {
        let Ok(mut last) = self.last_seen.lock() else {
            return;
        };
        if let Some(before) = last.as_ref() {
            for g in before {
                let still_there = now.iter().any(|n| match (&g.uuid, &n.uuid) {
                    (Some(a), Some(b)) => a == b,
                    _ => n.bus_id == g.bus_id,
                });
                if !still_there {
                    tracing::warn!(
                        uuid = g.uuid.as_deref().unwrap_or("-"),
                        bus_id = %g.bus_id,
                        "GPU {} ({}) is gone since the last refresh (fallen off the bus?)",
                        g.index,
                        g.name
                    );
                }
            }
        }
        *last = Some(now.to_vec());
    }
}

/// "GPU health checks: offered …; NOT_SUPPORTED …; not in this NVML library …" over all NVML
/// GPUs (a check counts as offered when any GPU answers it); `None` without NVML GPUs.
fn offered_line(gpus: &[Gpu]) -> Option<String> {
    let all: Vec<[(&str, Option<Offer>); 4]> = gpus
        .iter()
        .filter_map(|g| g.health.as_ref().map(RawChecks::availability))
        .collect();
    let first = all.first()?;
    let (mut offered, mut unsupported, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (name, _)) in first.iter().enumerate() {
        let answers: Vec<Offer> = all.iter().filter_map(|a| a[i].1).collect();
        if answers.contains(&Offer::Offered) {
            offered.push(*name);
        } else if answers.contains(&Offer::NotSupported) {
            unsupported.push(*name);
        } else if answers.contains(&Offer::NotInLibrary) {
            missing.push(*name);
        }
    }
    let list = |v: &[&str]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    Some(format!(
        "GPU health checks this driver offers: {}; answered NOT_SUPPORTED (these GPUs have no such state): {}; not in this NVML library: {}",
        list(&offered),
        list(&unsupported),
        list(&missing)
    ))
}

#[cfg(test)]
mod tests;
