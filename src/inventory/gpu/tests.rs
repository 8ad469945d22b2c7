//! GPU summary and naming tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

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
        driver: None,
        health: None,
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
    assert_eq!(s.model, "H100 80GB HBM3");
    assert_eq!(s.memory_gib, 80);
    assert!(s.mixed);
}

#[test]
fn the_model_is_sent_without_the_vendor_name() {
    for (vendor, full, model) in [
        (Vendor::Nvidia, "NVIDIA H100 80GB HBM3", "H100 80GB HBM3"),
        (Vendor::Nvidia, "NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB"),
        (Vendor::Nvidia, "nvidia L4", "L4"),
        (
            Vendor::Nvidia,
            "Tesla V100-SXM2-16GB",
            "Tesla V100-SXM2-16GB",
        ),
        (Vendor::Nvidia, "NVIDIA", "NVIDIA"),
        (Vendor::Nvidia, "NVIDIA ", "NVIDIA"),
        (Vendor::Nvidia, "NVIDIAX 1", "NVIDIAX 1"),
        (Vendor::Amd, "AMD Instinct MI300X", "Instinct MI300X"),
        (
            Vendor::Amd,
            "AMD Instinct MI250X/MI250",
            "Instinct MI250X/MI250",
        ),
        (
            Vendor::Intel,
            "Intel(R) Data Center GPU Max 1550",
            "Data Center GPU Max 1550",
        ),
        (Vendor::Intel, "Intel Arc A770", "Arc A770"),
        (Vendor::Nvidia, "NVIDIA device 28e0", "device 28e0"),
        (Vendor::Nvidia, "NVIDIAé", "NVIDIAé"),
    ] {
        assert_eq!(vendor.model_of(full), model, "{full}");
    }
    let s = summarise(&[gpu(0, Vendor::Nvidia, "NVIDIA H100 80GB HBM3", 80)]);
    assert_eq!(
        (s.vendor.as_str(), s.model.as_str()),
        ("NVIDIA", "H100 80GB HBM3")
    );
}

#[test]
fn tie_goes_to_first_found() {
    let gpus = vec![
        gpu(0, Vendor::Amd, "MI300X", 192),
        gpu(1, Vendor::Nvidia, "L4", 22),
    ];
    assert_eq!(summarise(&gpus).vendor, "AMD");
}

/// An NVML GPU whose answers put it in `state` (or healthy with `None`); `unnamed`: NVML could
/// not name it.
fn nvml_gpu(i: u32, reset: bool, unnamed: bool) -> Gpu {
    use health::{Answer, RawChecks};
    let mut g = gpu(i, Vendor::Nvidia, "NVIDIA H100 80GB HBM3", 80);
    g.source = "nvml";
    let mut h = RawChecks {
        remapped_rows: Answer::NotSupported,
        retired_pages_pending: Answer::NotSupported,
        mig_mode: Answer::NotSupported,
        fabric: Answer::NotInLibrary,
        fatal: Vec::new(),
        name_error: None,
    };
    if reset {
        h.saw("name", &nvml_wrapper::error::NvmlError::ResetRequired);
    }
    if unnamed {
        h.name_error = Some("device requires a reset".into());
        g.name = FALLBACK_NAME.into();
        g.memory_bytes = None;
    }
    g.health = Some(h);
    g
}

#[test]
fn gpus_that_cannot_take_work_are_not_counted_and_do_not_name_the_model() {
    let gpus: Vec<Gpu> = (0..8).map(|i| nvml_gpu(i, i == 5, i == 5)).collect();
    let s = summarise(&gpus);
    assert_eq!(
        (s.count, s.model.as_str(), s.memory_gib, s.mixed),
        (7, "H100 80GB HBM3", 80, false)
    );
    assert_eq!(summarise_with(&gpus, true).count, 8);
    // All eight need a reset and none was ever named: 0, never "8x NVIDIA GPU".
    let gpus: Vec<Gpu> = (0..8).map(|i| nvml_gpu(i, true, true)).collect();
    assert_eq!(summarise(&gpus).count, 0);
}
