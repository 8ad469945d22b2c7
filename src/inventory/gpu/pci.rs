//! GPUs from the PCI bus (`{root}/sys/bus/pci/devices/*`), for hosts without a working NVML:
//! AMD and Intel GPUs, NVIDIA GPUs whose driver is not loaded (or whose NVML hangs).
//!
//! Counted: display controllers (class 0x03xxxx) and processing accelerators (0x12xxxx) of
//! NVIDIA, AMD and Intel. Not counted: the BMC/VGA adapters every server has (ASPEED, Matrox:
//! other vendors, so they never match), GPU audio functions (class 0x0403), and Intel display
//! controllers on bus 0 (integrated graphics in the CPU package, not a compute GPU).
//!
//! Names come from the system's `pci.ids`, looked up only for the devices found (never parsed
//! whole, never fetched). Memory: amdgpu's `mem_info_vram_total` when present, else the table of
//! data-centre GPUs below, else unknown (0 with a warning).

use super::{Gpu, Vendor};
use std::path::{Path, PathBuf};

/// Where distributions install the PCI id database (Debian/Ubuntu, then RHEL/Fedora).
pub const PCI_IDS_PATHS: &[&str] = &["usr/share/misc/pci.ids", "usr/share/hwdata/pci.ids"];

const GIB: u64 = 1 << 30;

/// Data-centre GPUs by PCI device id: marketed name and memory (GiB as marketed, which rounds
/// to what NVML/amdgpu report). Used only when the driver cannot tell us.
const KNOWN: &[(Vendor, u16, &str, u64)] = &[
    // NVIDIA Volta / Turing
    (Vendor::Nvidia, 0x1db1, "Tesla V100-SXM2-16GB", 16),
    (Vendor::Nvidia, 0x1db4, "Tesla V100-PCIE-16GB", 16),
    (Vendor::Nvidia, 0x1db5, "Tesla V100-SXM2-32GB", 32),
    (Vendor::Nvidia, 0x1db6, "Tesla V100-PCIE-32GB", 32),
    (Vendor::Nvidia, 0x1eb8, "Tesla T4", 16),
    // NVIDIA Ampere
    (Vendor::Nvidia, 0x20b0, "A100-SXM4-40GB", 40),
    (Vendor::Nvidia, 0x20b2, "A100-SXM4-80GB", 80),
    (Vendor::Nvidia, 0x20b5, "A100 80GB PCIe", 80),
    (Vendor::Nvidia, 0x20f1, "A100-PCIE-40GB", 40),
    (Vendor::Nvidia, 0x20b7, "A30", 24),
    (Vendor::Nvidia, 0x2235, "A40", 48),
    (Vendor::Nvidia, 0x2236, "A10", 24),
    // NVIDIA Ada / Hopper
    (Vendor::Nvidia, 0x26b5, "L40", 48),
    (Vendor::Nvidia, 0x26b9, "L40S", 48),
    (Vendor::Nvidia, 0x27b8, "L4", 24),
    (Vendor::Nvidia, 0x2330, "H100 80GB HBM3", 80),
    (Vendor::Nvidia, 0x2331, "H100 PCIe", 80),
    (Vendor::Nvidia, 0x2321, "H100 NVL", 94),
    (Vendor::Nvidia, 0x2335, "H200", 141),
    // AMD Instinct
    (Vendor::Amd, 0x738c, "Instinct MI100", 32),
    (Vendor::Amd, 0x740c, "Instinct MI250X/MI250", 128),
    (Vendor::Amd, 0x740f, "Instinct MI210", 64),
    (Vendor::Amd, 0x74a1, "Instinct MI300X", 192),
];

/// One PCI GPU before naming.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Found {
    bus_id: String,
    vendor: Vendor,
    vendor_id: u16,
    device_id: u16,
    vram: Option<u64>,
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
pub fn scan(root: &Path) -> (Vec<Gpu>, Vec<String>) {
    let found = find(root);
    let mut notes = Vec::new();
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
        .map(|(i, f)| {
            let known = KNOWN
                .iter()
                .find(|(v, d, _, _)| *v == f.vendor && *d == f.device_id);
            let name = ids
                .as_deref()
                .and_then(|t| lookup_name(t, f.vendor_id, f.device_id))
                .map(|n| marketing_name(&n))
                .or_else(|| known.map(|k| k.2.to_string()))
                .unwrap_or_else(|| format!("device {:04x}", f.device_id));
            let prefix = match f.vendor {
                Vendor::Nvidia => "NVIDIA",
                Vendor::Amd => "AMD",
                Vendor::Intel => "Intel",
            };
            let name = if name
                .to_ascii_lowercase()
                .starts_with(&prefix.to_ascii_lowercase())
            {
                name
            } else {
                format!("{prefix} {name}")
            };
            let memory_bytes = f.vram.or_else(|| known.map(|k| k.3 * GIB));
            if memory_bytes.is_none() {
                notes.push(format!(
                    "memory of {} ({:04x}:{:04x}) at {} is unknown; reported as 0",
                    name, f.vendor_id, f.device_id, f.bus_id
                ));
            }
            Gpu {
                index: u32::try_from(i).unwrap_or(u32::MAX),
                vendor: f.vendor,
                name,
                memory_bytes,
                uuid: None,
                bus_id: f.bus_id,
                mig_enabled: None,
                source: "pci",
            }
        })
        .collect();
    (gpus, notes)
}

fn find(root: &Path) -> Vec<Found> {
    let dir = root.join("sys/bus/pci/devices");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    paths.sort();
    paths
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
            let bus_id = normalize_bus_id(&dev.file_name()?.to_string_lossy());
            if vendor == Vendor::Intel && base == 0x03 && bus_number(&bus_id) == Some(0) {
                return None; // integrated graphics
            }
            let vram = std::fs::read_to_string(dev.join("mem_info_vram_total"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .filter(|&b| b > 0);
            Some(Found {
                bus_id,
                vendor,
                vendor_id: u16::try_from(vendor_id).ok()?,
                device_id,
                vram,
            })
        })
        .collect()
}

fn bus_number(bus_id: &str) -> Option<u32> {
    let mut parts = bus_id.split(':');
    parts.next()?;
    u32::from_str_radix(parts.next()?, 16).ok()
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
        assert_eq!(bus_number("0000:c1:00.0"), Some(0xc1));
    }

    #[test]
    fn names() {
        assert_eq!(marketing_name("GH100 [H100 SXM5 80GB]"), "H100 SXM5 80GB");
        assert_eq!(marketing_name("Plain name"), "Plain name");
    }
}
