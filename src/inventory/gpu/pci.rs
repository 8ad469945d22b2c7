//! GPUs from the PCI bus (`{root}/sys/bus/pci/devices/*`), for hosts without a working NVML:
//! AMD and Intel GPUs, NVIDIA GPUs whose driver is not loaded (or whose NVML hangs).
//!
//! Counted: display controllers (class 0x03xxxx) and processing accelerators (0x12xxxx) of
//! NVIDIA, AMD and Intel. Not counted: the BMC/VGA adapters every server has (ASPEED, Matrox:
//! other vendors, so they never match), GPU audio functions (class 0x0403), integrated graphics
//! (the GPU in the CPU package, which the pool cannot schedule: AMD APUs' by device id in
//! [`AMD_INTEGRATED`], Intel's at the address Intel fixes for its integrated graphics device,
//! `00:02.0`, unless its device id is one of Intel's discrete families in [`INTEL_DISCRETE`];
//! never by bus position alone, since a hypervisor puts passed-through discrete GPUs on bus 0
//! of a VM with no root port between), SR-IOV virtual functions (a `physfn` link in the
//! device's directory: slices of a physical GPU — vGPU, passthrough — already counted as that
//! GPU; summed in one note), and GPUs bound to `vfio-pci` (passed through to a virtual
//! machine). NVIDIA's integrated parts (GH200, GB10) are the compute GPU and always count,
//! wherever the bus puts them.
//!
//! Names: for the data-centre and workstation parts in [`PARTS`], the name the driver reports
//! (NVML's, so `gpu_type` does not change when the driver stops or starts answering); else the
//! system's `pci.ids`, looked up only for the devices found (never parsed whole, never
//! fetched); else the device id. Memory: amdgpu's `mem_info_vram_total` when present (except
//! for unified-memory APUs, whose VRAM figure is only a carve-out), else the table, else
//! unknown (0 with a warning).

use super::{Gpu, Vendor};
use std::path::{Path, PathBuf};

/// Where distributions install the PCI id database (Debian/Ubuntu, then RHEL/Fedora).
pub const PCI_IDS_PATHS: &[&str] = &["usr/share/misc/pci.ids", "usr/share/hwdata/pci.ids"];

/// A GPU model the PCI path knows by device id: the name its driver reports (NVML's
/// `nvmlDeviceGetName`; for AMD the Instinct name) and the memory NVML reports, so a host
/// whose NVML stops answering reports exactly what it reported before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    /// Vendor.
    pub vendor: Vendor,
    /// PCI device id.
    pub device: u16,
    /// PCI subsystem device id, where one device id covers two memory sizes; `None` matches
    /// any subsystem (an exact subsystem entry wins).
    pub subsystem: Option<u16>,
    /// The driver's name for it.
    pub name: &'static str,
    /// Memory per PCI function as the driver reports it, in MiB (NVML's `memory.total`; per
    /// die for AMD's multi-die parts, each die being its own PCI function).
    pub mib: u64,
    /// Unified memory (an APU): the driver's VRAM figure is only a carve-out, the table wins.
    pub unified: bool,
}

const fn nv(device: u16, name: &'static str, mib: u64) -> Part {
    Part {
        vendor: Vendor::Nvidia,
        device,
        subsystem: None,
        name,
        mib,
        unified: false,
    }
}

const fn amd(device: u16, name: &'static str, gib: u64, unified: bool) -> Part {
    Part {
        vendor: Vendor::Amd,
        device,
        subsystem: None,
        name,
        mib: gib * 1024,
        unified,
    }
}

/// Data-centre and workstation GPUs. Device ids from pci.ids (pciutils; Debian 12's 2023
/// copy lacks the 2024+ parts, which is why they are here); names and MiB as NVML reports
/// them on real machines (nvidia-smi `name, memory.total` seen in public logs). Where the MiB
/// figure varies by board or driver (A100 40GB: 40960 or 40536), both round to the same GiB,
/// which is what the API receives.
pub const PARTS: &[Part] = &[
    // Volta / Turing
    nv(0x1db1, "Tesla V100-SXM2-16GB", 16_160),
    nv(0x1db4, "Tesla V100-PCIE-16GB", 16_160),
    nv(0x1db5, "Tesla V100-SXM2-32GB", 32_768),
    nv(0x1db6, "Tesla V100-PCIE-32GB", 32_768),
    nv(0x1eb8, "Tesla T4", 15_360),
    // Ampere
    nv(0x20b0, "NVIDIA A100-SXM4-40GB", 40_960),
    nv(0x20b2, "NVIDIA A100-SXM4-80GB", 81_920),
    nv(0x20b5, "NVIDIA A100 80GB PCIe", 81_920),
    nv(0x20f1, "NVIDIA A100-PCIE-40GB", 40_960),
    nv(0x20b7, "NVIDIA A30", 24_576),
    nv(0x2235, "NVIDIA A40", 46_068),
    nv(0x2236, "NVIDIA A10", 23_028),
    nv(0x2230, "NVIDIA RTX A6000", 49_140),
    // Ada
    nv(0x26b1, "NVIDIA RTX 6000 Ada Generation", 49_140),
    nv(0x26b5, "NVIDIA L40", 46_068),
    nv(0x26b9, "NVIDIA L40S", 46_068),
    nv(0x26ba, "NVIDIA L20", 46_068),
    nv(0x27b8, "NVIDIA L4", 23_034),
    // Hopper
    nv(0x2330, "NVIDIA H100 80GB HBM3", 81_559),
    nv(0x2331, "NVIDIA H100 PCIe", 81_559),
    nv(0x2321, "NVIDIA H100 NVL", 95_830),
    nv(0x2322, "NVIDIA H800 PCIe", 81_559),
    nv(0x2324, "NVIDIA H800", 81_559),
    nv(0x2329, "NVIDIA H20", 97_871),
    nv(0x2335, "NVIDIA H200", 143_771),
    nv(0x233b, "NVIDIA H200 NVL", 143_771),
    nv(0x2342, "NVIDIA GH200 480GB", 97_871),
    nv(0x2348, "NVIDIA GH200 144G HBM3e", 146_831),
    // Blackwell
    nv(0x2901, "NVIDIA B200", 183_359),
    // AMD Instinct (per PCI function: MI250/MI250X are two dies, each its own function)
    amd(0x738c, "AMD Instinct MI100", 32, false),
    amd(0x740f, "AMD Instinct MI210", 64, false),
    amd(0x7408, "AMD Instinct MI250X", 64, false),
    amd(0x740c, "AMD Instinct MI250X/MI250", 64, false),
    amd(0x74a0, "AMD Instinct MI300A", 128, true),
    amd(0x74a1, "AMD Instinct MI300X", 192, false),
    amd(0x74a5, "AMD Instinct MI325X", 256, false),
];

/// The table entry for a device: an exact subsystem match first, then the device's general
/// entry.
pub fn part(table: &[Part], vendor: Vendor, device: u16, subsystem: Option<u16>) -> Option<Part> {
    let of_device = || {
        table
            .iter()
            .filter(|p| p.vendor == vendor && p.device == device)
    };
    of_device()
        .find(|p| p.subsystem.is_some() && p.subsystem == subsystem)
        .or_else(|| of_device().find(|p| p.subsystem.is_none()))
        .copied()
}

/// One PCI GPU before naming.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    bus_id: String,
    vendor: Vendor,
    vendor_id: u16,
    device_id: u16,
    subsystem_id: Option<u16>,
    vram: Option<u64>,
    /// The bound kernel driver (`driver` link's name).
    driver: Option<String>,
    /// Integrated graphics (see the module docs): named in a note, not counted.
    integrated: bool,
}

/// AMD APUs' integrated graphics, by PCI device id (pci.ids names): Kaveri, Carrizo, Stoney,
/// Raven/Picasso, Renoir, Cezanne, Lucienne, Barcelo, Van Gogh, Rembrandt, Raphael, Phoenix,
/// Mendocino, Strix, Strix Halo, Granite Ridge. The data-centre APU (MI300A) is not here: its
/// GPU is the compute part, in [`PARTS`].
pub const AMD_INTEGRATED: &[u16] = &[
    0x1304, 0x1305, 0x1306, 0x1307, 0x1309, 0x130a, 0x130b, 0x130c, 0x130d, 0x130e, 0x130f, 0x1310,
    0x1311, 0x1312, 0x1313, 0x1315, 0x1316, 0x1317, 0x1318, 0x131b, 0x131c, 0x131d, 0x9874, 0x98e4,
    0x15dd, 0x15d8, 0x1636, 0x1638, 0x164c, 0x15e7, 0x163f, 0x1681, 0x164d, 0x164e, 0x15bf, 0x15c8,
    0x164f, 0x1506, 0x150e, 0x1586, 0x13c0,
];

/// Intel's discrete GPU families, by PCI device id range (i915/xe driver tables): DG1, DG2
/// (Arc A-series, Data Center GPU Flex), Ponte Vecchio (Data Center GPU Max), Battlemage (Arc
/// B-series). Any of them at `00:02.0` (a VM's choice) is still a discrete card.
pub const INTEL_DISCRETE: &[(u16, u16)] = &[
    (0x4905, 0x4909),
    (0x5690, 0x56cf),
    (0x0b69, 0x0b69),
    (0x0b6e, 0x0b6e),
    (0x0bd0, 0x0bdb),
    (0xe200, 0xe22f),
];

/// Bus, device and function of Intel's integrated graphics device (IGD): Intel's chipsets fix
/// it there, and hypervisors passing an IGD through must keep it there (its firmware expects
/// it), so the address marks the part, not the bus topology.
const INTEL_IGD_ADDRESS: &str = "00:02.0";

/// True for integrated graphics (see the module docs). `bus_id` in sysfs form.
fn is_integrated(bus_id: &str, vendor: Vendor, device_id: u16, base_class: u32) -> bool {
    match vendor {
        Vendor::Nvidia => false,
        Vendor::Amd => AMD_INTEGRATED.contains(&device_id),
        Vendor::Intel => {
            base_class == 0x03
                && bus_id
                    .split_once(':')
                    .is_some_and(|(_, rest)| rest == INTEL_IGD_ADDRESS)
                && !INTEL_DISCRETE
                    .iter()
                    .any(|&(lo, hi)| (lo..=hi).contains(&device_id))
        }
    }
}

/// True for an SR-IOV virtual function: the kernel links each VF to its physical function
/// (`physfn`). Inside a guest a passed-through VF has no such link and is the guest's GPU.
fn is_virtual_function(dev: &Path) -> bool {
    std::fs::symlink_metadata(dev.join("physfn")).is_ok()
}

fn read_hex(path: &Path) -> Option<u32> {
    let s = std::fs::read_to_string(path).ok()?;
    u32::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

fn vendor_of(id: u32) -> Option<Vendor> {
    match id {
        0x10de => Some(Vendor::Nvidia),
        0x1002 => Some(Vendor::Amd),
        0x8086 => Some(Vendor::Intel),
        _ => None,
    }
}

/// Normalises a PCI bus id to sysfs form, `dddd:bb:dd.f` in lower case (NVML says
/// `00000000:17:00.0`).
pub fn normalize_bus_id(id: &str) -> String {
    let id = id.trim().to_ascii_lowercase();
    match id.split_once(':') {
        Some((domain, rest)) if rest.contains(':') => match u32::from_str_radix(domain, 16) {
            Ok(d) => format!("{d:04x}:{rest}"),
            Err(_) => id,
        },
        _ => id,
    }
}

/// GPUs on the PCI bus under `root`, with names from the first `pci.ids` found there.
// Long: naming and memory rules per device are read best side by side.
pub fn scan(root: &Path) -> (Vec<Gpu>, Vec<String>) {
    let (found, virtual_functions) = find(root);
    let mut notes = Vec::new();
    if virtual_functions > 0 {
        notes.push(format!(
            "{virtual_functions} SR-IOV virtual functions of GPUs (vGPU or passthrough slices of a GPU already counted): not counted"
        ));
    }
    if found.is_empty() {
        return (Vec::new(), notes);
    }
    let ids = PCI_IDS_PATHS
        .iter()
        .map(|p| root.join(p))
        .find_map(|p| std::fs::read_to_string(p).ok());
    if ids.is_none() {
        notes.push("no pci.ids found (install pciutils or hwdata for GPU names)".to_string());
    }
    let gpus = found
        .into_iter()
        .enumerate()
        .filter_map(|(i, f)| {
            let known = part(PARTS, f.vendor, f.device_id, f.subsystem_id);
            // The driver's own name for a known part (what NVML says, so a driver restart
            // does not change gpu_type); else pci.ids' marketing name; else the id.
            let name = known
                .map(|k| k.name.to_string())
                .or_else(|| {
                    ids.as_deref()
                        .and_then(|t| lookup_name(t, f.vendor_id, f.device_id))
                        .map(|n| marketing_name(&n))
                })
                .unwrap_or_else(|| format!("device {:04x}", f.device_id));
            let prefix = match f.vendor {
                Vendor::Nvidia => "NVIDIA",
                Vendor::Amd => "AMD",
                Vendor::Intel => "Intel",
            };
            let name = if known.is_some()
                || name
                    .to_ascii_lowercase()
                    .starts_with(&prefix.to_ascii_lowercase())
            {
                name
            } else {
                format!("{prefix} {name}")
            };
            if f.integrated {
                notes.push(format!(
                    "{name} at {} is integrated graphics (the CPU's): not counted",
                    f.bus_id
                ));
                return None;
            }
            if f.driver.as_deref() == Some("vfio-pci") {
                notes.push(format!(
                    "{name} at {} is bound to vfio-pci (passed through to a virtual machine): not counted",
                    f.bus_id
                ));
                return None;
            }
            let table = known.map(|k| k.mib << 20);
            let memory_bytes = match known {
                Some(k) if k.unified => table,
                _ => f.vram.or(table),
            };
            if memory_bytes.is_none() {
                notes.push(format!(
                    "memory of {} ({:04x}:{:04x}) at {} is unknown; reported as 0",
                    name, f.vendor_id, f.device_id, f.bus_id
                ));
            }
            Some(Gpu {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                vendor: f.vendor,
                name,
                memory_bytes,
                uuid: None,
                bus_id: f.bus_id,
                mig_enabled: None,
                source: "pci",
                health: None,
                driver: f.driver,
            })
        })
        .collect();
    (gpus, notes)
}

/// The GPUs on the bus, and how many SR-IOV virtual functions of GPUs were left out.
fn find(root: &Path) -> (Vec<Found>, usize) {
    let dir = root.join("sys/bus/pci/devices");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return (Vec::new(), 0);
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    paths.sort();
    let mut virtual_functions = 0;
    let found = paths
        .into_iter()
        .filter_map(|dev| {
            let class = read_hex(&dev.join("class"))?;
            let base = class >> 16;
            if base != 0x03 && base != 0x12 {
                return None;
            }
            let vendor_id = read_hex(&dev.join("vendor"))?;
            let vendor = vendor_of(vendor_id)?;
            let device_id = u16::try_from(read_hex(&dev.join("device"))?).ok()?;
            if is_virtual_function(&dev) {
                virtual_functions += 1;
                return None;
            }
            let bus_id = normalize_bus_id(&dev.file_name()?.to_string_lossy());
            let integrated = is_integrated(&bus_id, vendor, device_id, base);
            let driver = std::fs::read_link(dev.join("driver"))
                .ok()
                .and_then(|l| Some(l.file_name()?.to_string_lossy().into_owned()));
            let vram = std::fs::read_to_string(dev.join("mem_info_vram_total"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .filter(|&b| b > 0);
            let subsystem_id =
                read_hex(&dev.join("subsystem_device")).and_then(|s| u16::try_from(s).ok());
            Some(Found {
                bus_id,
                vendor,
                vendor_id: u16::try_from(vendor_id).ok()?,
                device_id,
                subsystem_id,
                vram,
                driver,
                integrated,
            })
        })
        .collect();
    (found, virtual_functions)
}

/// Finds `device` under `vendor` in pci.ids text without parsing the rest: vendor lines are
/// `vvvv  Name` at column 0, device lines `\tdddd  Name` below them.
pub fn lookup_name(text: &str, vendor: u16, device: u16) -> Option<String> {
    let vendor_key = format!("\n{vendor:04x}  ");
    let start = text.find(&vendor_key)? + vendor_key.len();
    let block = &text[start..];
    let first_line_len = block.find('\n').map_or(block.len(), |i| i + 1);
    let rest = &block[first_line_len..];
    // The vendor block ends at the next line that does not start with a tab or '#'.
    let mut end = rest.len();
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        if !(line.starts_with('\t') || line.starts_with('#') || line.trim().is_empty()) {
            end = offset;
            break;
        }
        offset += line.len();
    }
    let devices = &rest[..end];
    let device_key = format!("\t{device:04x}  ");
    devices.lines().find_map(|l| {
        l.strip_prefix(&device_key)
            .map(|name| name.trim().to_string())
    })
}

/// `GH100 [H100 SXM5 80GB]` → `H100 SXM5 80GB`: the bracket holds the marketing name.
fn marketing_name(name: &str) -> String {
    match (name.find('['), name.rfind(']')) {
        (Some(a), Some(b)) if b > a + 1 => name[a + 1..b].trim().to_string(),
        _ => name.trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: &str = "# pci.ids excerpt\n\
1002  Advanced Micro Devices, Inc. [AMD/ATI]\n\
\t74a1  Aqua Vanjaram [Instinct MI300X]\n\
10de  NVIDIA Corporation\n\
\t20b2  GA100 [A100 SXM4 80GB]\n\
\t\t10de 1463  A100-SXM4-80GB\n\
\t2330  GH100 [H100 SXM5 80GB]\n\
1a03  ASPEED Technology, Inc.\n\
\t2000  ASPEED Graphics Family\n\
\t2330  not an nvidia device\n";

    #[test]
    fn a_subsystem_entry_wins_over_the_general_one() {
        let table = [
            nv(0x1234, "NVIDIA Test 40GB", 40_960),
            Part {
                subsystem: Some(0x0042),
                ..nv(0x1234, "NVIDIA Test 80GB", 81_920)
            },
        ];
        let name = |s| part(&table, Vendor::Nvidia, 0x1234, s).map(|p| p.name);
        assert_eq!(name(Some(0x0042)), Some("NVIDIA Test 80GB"));
        assert_eq!(name(Some(0x0001)), Some("NVIDIA Test 40GB"));
        assert_eq!(name(None), Some("NVIDIA Test 40GB"));
        assert_eq!(part(&table, Vendor::Amd, 0x1234, None), None);
    }

    #[test]
    fn the_table_has_one_entry_per_device_and_driver_style_names() {
        for (i, p) in PARTS.iter().enumerate() {
            assert!(
                !PARTS[..i]
                    .iter()
                    .any(|q| (q.vendor, q.device, q.subsystem) == (p.vendor, p.device, p.subsystem)),
                "{:04x} twice",
                p.device
            );
            let prefix = match p.vendor {
                Vendor::Nvidia => ["NVIDIA ", "Tesla "].iter().any(|x| p.name.starts_with(x)),
                Vendor::Amd => p.name.starts_with("AMD Instinct "),
                Vendor::Intel => true,
            };
            assert!(prefix && p.mib >= 1024, "{p:?}");
        }
        // The parts issue 15 names, present.
        for device in [
            0x20b0, 0x20b2, 0x20b5, 0x20f1, 0x2331, 0x2330, 0x2321, 0x2335, 0x233b, 0x2324, 0x2329,
            0x2342, 0x2901, 0x26b5, 0x26b9, 0x27b8, 0x26ba, 0x2236, 0x20b7, 0x2235, 0x26b1, 0x2230,
        ] {
            assert!(
                part(PARTS, Vendor::Nvidia, device, None).is_some(),
                "{device:04x}"
            );
        }
        for device in [0x740f, 0x740c, 0x74a1, 0x74a0, 0x74a5] {
            assert!(
                part(PARTS, Vendor::Amd, device, None).is_some(),
                "{device:04x}"
            );
        }
    }

    #[test]
    fn looks_up_only_inside_the_vendor_block() {
        assert_eq!(
            lookup_name(IDS, 0x10de, 0x2330).as_deref(),
            Some("GH100 [H100 SXM5 80GB]")
        );
        assert_eq!(
            lookup_name(IDS, 0x1002, 0x74a1).as_deref(),
            Some("Aqua Vanjaram [Instinct MI300X]")
        );
        assert_eq!(lookup_name(IDS, 0x10de, 0x2000), None);
        assert_eq!(
            lookup_name(IDS, 0x1a03, 0x2330).as_deref(),
            Some("not an nvidia device")
        );
        assert_eq!(lookup_name(IDS, 0x8086, 0x0bd5), None);
    }

    #[test]
    fn bus_ids() {
        assert_eq!(normalize_bus_id("00000000:17:00.0"), "0000:17:00.0");
        assert_eq!(normalize_bus_id("0000:C1:00.0"), "0000:c1:00.0");
    }

    #[test]
    fn names() {
        assert_eq!(marketing_name("GH100 [H100 SXM5 80GB]"), "H100 SXM5 80GB");
        assert_eq!(marketing_name("Plain name"), "Plain name");
    }
}
