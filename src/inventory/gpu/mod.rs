//! GPUs: what was found, and how a list of GPUs becomes the API's four GPU fields.

use serde::Serialize;

/// GPU vendors the API knows (`GpuTypeInfo.gpu_vendor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
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
}

/// One GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    pub source: &'static str,
}

/// The API's GPU fields for a list of GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuSummary {
    /// All GPUs found.
    pub count: i32,
    /// Vendor of the most common model, or `UNKNOWN`.
    pub vendor: String,
    /// The most common model, or `UNKNOWN`.
    pub model: String,
    /// Memory per GPU of that model in GiB (rounded), 0 when unknown.
    pub memory_gib: i32,
    /// More than one model was found.
    pub mixed: bool,
}

/// Summarises GPUs: count of all, and the most common model (ties: the first found).
pub fn summarise(gpus: &[Gpu]) -> GpuSummary {
    let mut models: Vec<(&Gpu, usize)> = Vec::new();
    for g in gpus {
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
    match best {
        None => GpuSummary {
            count: 0,
            vendor: "UNKNOWN".to_string(),
            model: "UNKNOWN".to_string(),
            memory_gib: 0,
            mixed: false,
        },
        Some(g) => GpuSummary {
            count: i32::try_from(gpus.len()).unwrap_or(i32::MAX),
            vendor: g.vendor.api_name().to_string(),
            model: g.name.clone(),
            memory_gib: g.memory_bytes.map_or(0, super::memory::gib_rounded),
            mixed: models.len() > 1,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(i: u32, vendor: Vendor, name: &str, gib: u64) -> Gpu {
        Gpu {
            index: i,
            vendor,
            name: name.into(),
            memory_bytes: Some(gib << 30),
            uuid: None,
            bus_id: format!("0000:{i:02x}:00.0"),
            mig_enabled: None,
            source: "pci",
        }
    }

    #[test]
    fn none_is_unknown() {
        let s = summarise(&[]);
        assert_eq!(
            (s.count, s.vendor.as_str(), s.model.as_str(), s.memory_gib),
            (0, "UNKNOWN", "UNKNOWN", 0)
        );
    }

    #[test]
    fn most_common_model_wins() {
        let gpus = vec![
            gpu(0, Vendor::Nvidia, "NVIDIA L4", 22),
            gpu(1, Vendor::Nvidia, "NVIDIA H100 80GB HBM3", 80),
            gpu(2, Vendor::Nvidia, "NVIDIA H100 80GB HBM3", 80),
        ];
        let s = summarise(&gpus);
        assert_eq!(s.count, 3);
        assert_eq!(s.model, "NVIDIA H100 80GB HBM3");
        assert_eq!(s.memory_gib, 80);
        assert!(s.mixed);
    }

    #[test]
    fn tie_goes_to_first_found() {
        let gpus = vec![
            gpu(0, Vendor::Amd, "MI300X", 192),
            gpu(1, Vendor::Nvidia, "L4", 22),
        ];
        assert_eq!(summarise(&gpus).vendor, "AMD");
    }
}
