//! GPU discovery through the real nvml-wrapper bindings and a stub `libnvidia-ml` built from C,
//! and the PCI / block-device scanners against fixture trees.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::support;

use exalsius_node_agent::config::GpuMode;
use exalsius_node_agent::inventory::{Collector, HostCollector, Inventory};
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

fn collect(root: &Path, mode: GpuMode, nvml: Option<&Path>) -> Inventory {
    HostCollector::with_root(root, mode, nvml).collect()
}

/// The test config with GPU discovery through the stub NVML at `lib`.
fn nvml_config(url: &str, lib: &Path, mode: &str, refresh: Option<&str>) -> String {
    let refresh = refresh.map_or(String::new(), |r| format!("refresh_interval = \"{r}\"\n"));
    config_text(url, "").replace(
        "[inventory]\ngpu = \"off\"\n",
        &format!(
            "[inventory]\ngpu = \"{mode}\"\n{refresh}nvml_library = \"{}\"\n",
            lib.display()
        ),
    )
}

fn body(inv: &Inventory) -> serde_json::Value {
    serde_json::to_value(exalsius_node_agent::api::NodePatchRequest::new(
        &inv.specs, None,
    ))
    .unwrap()
}

#[test]
fn eight_h100_through_nvml() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake_nvml(dir.path(), "count=8\nmig_index=2\n");
    let inv = collect(&fixture_host("vm-nogpu"), GpuMode::Nvml, Some(&lib));
    let h = &inv.specs.hardware;
    assert_eq!(h.gpu_count, 8);
    assert_eq!(h.gpu_vendor, "NVIDIA");
    assert_eq!(h.gpu_type, "H100 80GB HBM3");
    assert_eq!(h.gpu_memory, 80, "81559 MiB = 79.6 GiB rounds to 80");
    assert_eq!(
        inv.specs.software.nvidia,
        "DRIVER version: 550.54.15\nCUDA Version: 12.4"
    );
    let gpus = &inv.details.gpus;
    assert_eq!(gpus[0].bus_id, "0000:18:00.0");
    assert_eq!(gpus[7].bus_id, "0000:db:00.0");
    assert_eq!(
        gpus[3].uuid.as_deref(),
        Some("GPU-f00dfeed-0000-4000-8000-000000000003")
    );
    assert_eq!(gpus[2].mig_enabled, Some(true));
    assert_eq!(gpus[1].mig_enabled, Some(false));
    assert!(gpus.iter().all(|g| g.source == "nvml"));
    assert_valid("components/requests/node-patch-request.yaml", &body(&inv));
}

#[test]
fn auto_adds_other_vendors_but_takes_nvidia_from_nvml_only() {
    let dir = tempfile::tempdir().unwrap();
    // NVML sees 2 H100s; the MI300X host's PCI bus has 8 AMD GPUs: all counted.
    let lib = build_fake_nvml(dir.path(), "count=2\n");
    let inv = collect(&fixture_host("mi300x"), GpuMode::Auto, Some(&lib));
    assert_eq!(inv.specs.hardware.gpu_count, 10);
    assert_eq!(inv.specs.hardware.gpu_vendor, "AMD", "most common model");
    let idx: Vec<u32> = inv.details.gpus.iter().map(|g| g.index).collect();
    assert_eq!(idx, (0..10).collect::<Vec<_>>());
    // When NVML works, NVIDIA GPUs on the bus that NVML does not report are not counted.
    let inv = collect(&fixture_host("a100x8"), GpuMode::Auto, Some(&lib));
    assert_eq!(inv.specs.hardware.gpu_count, 2);
    assert_eq!(inv.specs.hardware.gpu_type, "H100 80GB HBM3");
    let unusable = inv
        .details
        .gpu_notes
        .iter()
        .filter(|n| n.contains("on the PCI bus but NVML cannot use it"))
        .count();
    assert_eq!(unusable, 8, "{:?}", inv.details.gpu_notes);
}

/// A GPU NVML reports lost (GPU_IS_LOST) while it stays on the PCI bus is not counted, and is
/// named with its bus id and the UUID the last refresh knew.
#[test]
fn a_lost_gpu_still_on_the_bus_is_not_counted() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake_nvml(dir.path(), "count=8\n");
    let collector = HostCollector::with_root(&fixture_host("h100x8"), GpuMode::Auto, Some(&lib));
    assert_eq!(
        collector.collect().specs.hardware.gpu_count,
        8,
        "no GPU counted twice"
    );
    set_fake_nvml(dir.path(), "count=8\nlost_index=3\n");
    let inv = collector.collect();
    assert_eq!(inv.specs.hardware.gpu_count, 7);
    let note = inv.details.gpu_notes.join("\n");
    assert!(
        note.contains("NVIDIA GPU at 0000:5d:00.0 (GPU-f00dfeed-0000-4000-8000-000000000003) is on the PCI bus but NVML cannot use it"),
        "{note}"
    );
}

#[test]
fn driver_not_loaded_falls_back_to_pci() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake_nvml(dir.path(), "init_result=9\n");
    let inv = collect(&fixture_host("a100x8"), GpuMode::Auto, Some(&lib));
    let h = &inv.specs.hardware;
    assert_eq!(h.gpu_count, 8);
    assert_eq!(h.gpu_vendor, "NVIDIA");
    assert_eq!(h.gpu_type, "A100-SXM4-80GB");
    assert_eq!(h.gpu_memory, 80);
    assert!(
        inv.details
            .gpu_notes
            .iter()
            .any(|n| n.contains("NVML init failed")),
        "{:?}",
        inv.details.gpu_notes
    );
    // nvml mode does not scan PCI.
    let inv = collect(&fixture_host("a100x8"), GpuMode::Nvml, Some(&lib));
    assert_eq!(inv.specs.hardware.gpu_count, 0);
}

/// An NVML query that starts failing with an error (not a timeout) keeps the last good answer;
/// with none yet, the PCI scan stands in.
#[test]
fn an_nvml_error_keeps_the_last_good_data() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake_nvml(dir.path(), "count=8\n");
    let collector = HostCollector::with_root(&fixture_host("vm-nogpu"), GpuMode::Auto, Some(&lib));
    assert_eq!(collector.collect().specs.hardware.gpu_count, 8);
    // NVML_ERROR_UNKNOWN (999), then NVML_ERROR_GPU_IS_LOST (15) from the device count.
    for code in [999, 15] {
        set_fake_nvml(dir.path(), &format!("count=8\ncount_result={code}\n"));
        let inv = collector.collect();
        let h = &inv.specs.hardware;
        assert_eq!(h.gpu_count, 8, "error {code}: last good data");
        assert_eq!(h.gpu_type, "H100 80GB HBM3");
        assert!(
            inv.details
                .gpu_notes
                .iter()
                .any(|n| n.contains("last good NVML data")),
            "{:?}",
            inv.details.gpu_notes
        );
    }
    // It recovers: the fresh answer is used again.
    set_fake_nvml(dir.path(), "count=4\n");
    assert_eq!(collector.collect().specs.hardware.gpu_count, 4);
    // No good answer yet: the PCI scan of the host stands in (8 A100 on this fixture).
    let fresh = HostCollector::with_root(
        &fixture_host("a100x8"),
        GpuMode::Auto,
        Some(&build_fake_nvml(
            tempfile::tempdir().unwrap().path(),
            "count_result=999\n",
        )),
    );
    let inv = fresh.collect();
    assert_eq!(inv.specs.hardware.gpu_count, 8);
    assert_eq!(inv.specs.hardware.gpu_type, "A100-SXM4-80GB");
}

/// Under the packaged unit NVML cannot create missing /dev/nvidia* nodes: init fails with
/// NVML_ERROR_NO_PERMISSION (4) until something else creates them. One clear warning, retried
/// at every refresh, and the GPUs appear once the nodes exist.
#[test]
fn nvml_without_permission_says_what_to_do_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake_nvml(dir.path(), "init_result=4\n");
    let collector = HostCollector::with_root(&fixture_host("vm-nogpu"), GpuMode::Nvml, Some(&lib));
    let inv = collector.collect();
    assert_eq!(inv.specs.hardware.gpu_count, 0);
    let note = inv.details.gpu_notes.join("\n");
    assert!(note.contains("nvidia-persistenced"), "{note}");
    assert!(note.contains("retries at every refresh"), "{note}");
    // nvidia-persistenced has started: the next refresh sees the GPUs.
    set_fake_nvml(dir.path(), "init_result=0\ncount=8\n");
    assert_eq!(collector.collect().specs.hardware.gpu_count, 8);
}

#[test]
fn blocking_nvml_is_abandoned_and_the_last_good_data_reported() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake_nvml(dir.path(), "count=8\n");
    let collector = HostCollector::with_root(&fixture_host("vm-nogpu"), GpuMode::Auto, Some(&lib));
    assert_eq!(collector.collect().specs.hardware.gpu_count, 8);
    set_fake_nvml(dir.path(), "count=8\nblock_secs=30\n");
    let t = Instant::now();
    let inv = collector.collect();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "collection waited {took:?} for a stuck NVML"
    );
    assert_eq!(inv.specs.hardware.gpu_count, 8, "last good data");
    assert!(
        inv.details
            .gpu_notes
            .iter()
            .any(|n| n.contains("did not answer"))
    );
    // The stuck query still holds NVML: the next refresh answers at once, still with 8.
    let t = Instant::now();
    let inv = collector.collect();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(inv.specs.hardware.gpu_count, 8);
    assert!(
        inv.details
            .gpu_notes
            .iter()
            .any(|n| n.contains("still stuck"))
    );
}

#[test]
fn a_lost_gpu_is_not_counted() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake_nvml(dir.path(), "count=8\n");
    let collector = HostCollector::with_root(&fixture_host("vm-nogpu"), GpuMode::Nvml, Some(&lib));
    assert_eq!(collector.collect().specs.hardware.gpu_count, 8);
    set_fake_nvml(dir.path(), "count=8\nlost_index=5\n");
    let inv = collector.collect();
    assert_eq!(inv.specs.hardware.gpu_count, 7);
    assert!(!inv.details.gpus.iter().any(|g| g.bus_id == "0000:ab:00.0"));
}

#[test]
fn fixture_a100_server() {
    let inv = collect(&fixture_host("a100x8"), GpuMode::Pci, None);
    let h = &inv.specs.hardware;
    assert_eq!(
        (h.gpu_count, h.gpu_vendor.as_str(), h.gpu_memory),
        (8, "NVIDIA", 80)
    );
    assert_eq!(h.gpu_type, "A100-SXM4-80GB");
    assert!(
        !inv.details.gpus.iter().any(|g| g.bus_id == "0000:03:00.0"),
        "ASPEED BMC skipped"
    );
    assert_eq!(h.cpu_cores, 128);
    // Two 1.92 TB NVMe disks; loop, dm, md, sr and the removable USB stick are not counted.
    assert_eq!(h.storage_gb, 3841);
    let names: Vec<&str> = inv.details.disks.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["nvme0n1", "nvme1n1"]);
    assert_eq!(inv.specs.system.os, "Ubuntu 22.04.4 LTS");
    assert_eq!(inv.specs.system.kernel, "6.8.0-fixture");
}

#[test]
fn fixture_mi300x_box() {
    let inv = collect(
        &fixture_host("mi300x"),
        GpuMode::Auto,
        Some(Path::new("/nonexistent/libnvidia-ml.so.1")),
    );
    let h = &inv.specs.hardware;
    assert_eq!((h.gpu_count, h.gpu_vendor.as_str()), (8, "AMD"));
    assert_eq!(h.gpu_type, "Instinct MI300X");
    assert_eq!(h.gpu_memory, 192, "from amdgpu's mem_info_vram_total");
    assert_eq!(h.storage_gb, 3841);
    assert_valid("components/requests/node-patch-request.yaml", &body(&inv));
}

#[test]
fn fixture_laptop_skips_the_igpu_and_reports_unknown_memory() {
    let inv = collect(&fixture_host("laptop"), GpuMode::Pci, None);
    let h = &inv.specs.hardware;
    assert_eq!(h.gpu_count, 1, "{:?}", inv.details.gpus);
    assert_eq!(h.gpu_vendor, "NVIDIA");
    assert_eq!(h.gpu_type, "device 28e0", "no pci.ids, not in the table");
    assert_eq!(h.gpu_memory, 0);
    assert!(inv.details.gpu_notes.iter().any(|n| n.contains("unknown")));
}

#[test]
fn fixture_vm_without_gpu() {
    let inv = collect(
        &fixture_host("vm-nogpu"),
        GpuMode::Auto,
        Some(Path::new("/nonexistent/x.so")),
    );
    let h = &inv.specs.hardware;
    assert_eq!(
        (
            h.gpu_count,
            h.gpu_vendor.as_str(),
            h.gpu_type.as_str(),
            h.gpu_memory
        ),
        (0, "UNKNOWN", "UNKNOWN", 0)
    );
    assert_eq!(h.storage_gb, 54);
    assert_eq!(h.cpu_cores, 4);
    assert_valid("components/requests/node-patch-request.yaml", &body(&inv));
}

#[test]
fn gpu_off_reports_none() {
    let inv = collect(&fixture_host("a100x8"), GpuMode::Off, None);
    assert_eq!(inv.specs.hardware.gpu_count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_keeps_heartbeating_on_time_while_nvml_hangs() {
    let (api, mut agent) = setup().await;
    let lib = build_agent_nvml(agent.dir.path(), "count=8\n");
    agent.write_config(&nvml_config(&api.url(), &lib, "auto", Some("200ms")));
    agent.spawn(&[]);
    let seen = api.wait_requests(2, Duration::from_secs(10)).await;
    let first: serde_json::Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(first["hardware"]["gpu_count"], 8);
    assert_eq!(first["hardware"]["gpu_type"], "H100 80GB HBM3");

    set_fake_nvml(agent.dir.path(), "count=8\nblock_secs=60\n");
    let before = api.count();
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let seen = api.seen();
    // Interval 100 ms: ~65 heartbeats in 6.5 s; demand at least half, all with 8 GPUs.
    assert!(
        seen.len() - before >= 30,
        "only {} heartbeats while NVML hung",
        seen.len() - before
    );
    for s in &seen[before..] {
        let b: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(b["hardware"]["gpu_count"], 8);
    }
    agent
        .wait_output("NVML did not answer", Duration::from_secs(5))
        .await;
    let (status, took) = agent.stop();
    assert!(status.success());
    assert!(
        took < slack(Duration::from_secs(2)),
        "shutdown waited for the stuck NVML (60 s): {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_heartbeats_when_the_driver_is_not_loaded() {
    let (api, mut agent) = setup().await;
    let lib = build_agent_nvml(agent.dir.path(), "init_result=9\n");
    agent.write_config(&nvml_config(&api.url(), &lib, "auto", None));
    agent.spawn(&[]);
    let seen = api.wait_requests(3, Duration::from_secs(10)).await;
    agent.stop();
    assert!(seen.iter().all(|s| s.status == 200));
    assert!(
        agent.all_output().contains("NVML init failed"),
        "{}",
        agent.all_output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_that_falls_off_the_bus_is_logged_and_the_count_drops() {
    let (api, mut agent) = setup().await;
    let lib = build_agent_nvml(agent.dir.path(), "count=8\n");
    agent.write_config(&nvml_config(&api.url(), &lib, "nvml", Some("200ms")));
    agent.spawn(&[]);
    api.wait_requests(1, Duration::from_secs(10)).await;
    set_fake_nvml(agent.dir.path(), "count=8\nlost_index=5\n");
    agent
        .wait_output(
            "GPU 5 (NVIDIA H100 80GB HBM3) is gone",
            Duration::from_secs(5),
        )
        .await;
    // The next heartbeats report 7 (the log line comes from the collection, a moment before
    // the loop takes its result).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let seen = api.seen();
        let last: serde_json::Value = serde_json::from_slice(&seen.last().unwrap().body).unwrap();
        if last["hardware"]["gpu_count"] == 7 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "count never dropped to 7: {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.stop();
    let out = agent.all_output();
    assert!(
        out.contains("GPU-f00dfeed-0000-4000-8000-000000000005"),
        "uuid logged: {out}"
    );
    assert!(out.contains("0000:ab:00.0"), "bus id logged: {out}");
}

/// One name per GPU model, whichever path saw it: the PCI scan of a host without a driver
/// reports what NVML reports for the same part, so a driver restart (NVML failing, then
/// answering again) never changes gpu_type or gpu_memory.
#[test]
fn pci_names_and_memory_equal_nvml_across_a_driver_restart() {
    for (host, nvml_conf) in [
        ("a100x8", "name=NVIDIA A100-SXM4-80GB\nmem_mib=81920\n"),
        ("h100x8", "name=NVIDIA H100 80GB HBM3\nmem_mib=81559\n"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let lib = build_fake_nvml(dir.path(), &format!("init_result=9\n{nvml_conf}"));
        // Driver down: the PCI scan stands in.
        let down = collect(&fixture_host(host), GpuMode::Auto, Some(&lib));
        assert!(
            down.details.gpus.iter().all(|g| g.source == "pci"),
            "{host}"
        );
        // Driver back: NVML answers.
        set_fake_nvml(dir.path(), nvml_conf);
        let up = collect(&fixture_host(host), GpuMode::Auto, Some(&lib));
        assert!(up.details.gpus.iter().all(|g| g.source == "nvml"), "{host}");
        let (d, u) = (&down.specs.hardware, &up.specs.hardware);
        assert_eq!(
            (d.gpu_count, &d.gpu_type, d.gpu_memory),
            (u.gpu_count, &u.gpu_type, u.gpu_memory),
            "{host}: PCI and NVML disagree"
        );
    }
}

#[test]
fn fixture_mi250x_counts_each_die_with_its_own_memory() {
    let inv = collect(&fixture_host("mi250x"), GpuMode::Pci, None);
    let h = &inv.specs.hardware;
    assert_eq!(
        (h.gpu_count, h.gpu_vendor.as_str()),
        (8, "AMD"),
        "4 modules, 8 dies"
    );
    assert_eq!(h.gpu_type, "Instinct MI250X/MI250");
    assert_eq!(h.gpu_memory, 64, "per die, not 128 per module");
}

#[test]
fn fixture_gh200_without_a_driver_reports_nvmls_name() {
    let inv = collect(
        &fixture_host("gh200"),
        GpuMode::Auto,
        Some(Path::new("/nonexistent/libnvidia-ml.so.1")),
    );
    let h = &inv.specs.hardware;
    assert_eq!((h.gpu_count, h.gpu_type.as_str()), (1, "GH200 480GB"));
    assert_eq!(h.gpu_memory, 96, "97871 MiB as NVML reports it");
    assert_eq!(inv.details.gpus[0].bus_id, "0009:01:00.0");
}

#[test]
fn fixture_mi300a_unified_memory_comes_from_the_table_not_the_carve_out() {
    let inv = collect(&fixture_host("mi300a"), GpuMode::Pci, None);
    let h = &inv.specs.hardware;
    assert_eq!((h.gpu_count, h.gpu_type.as_str()), (4, "Instinct MI300A"));
    assert_eq!(h.gpu_memory, 128, "not amdgpu's 512 MiB VRAM carve-out");
}

/// Drivers before R510 have no `nvmlDeviceGetMemoryInfo_v2`; early R510 builds answer
/// FUNCTION_NOT_FOUND or NOT_SUPPORTED to it: memory then comes from the v1 call.
#[test]
fn memory_from_v1_when_v2_is_missing_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake_nvml_flags("cc", dir.path(), "count=2\n", &["-DNO_MEMORY_V2"]);
    let inv = collect(&fixture_host("vm-nogpu"), GpuMode::Nvml, Some(&lib));
    let h = &inv.specs.hardware;
    assert_eq!((h.gpu_count, h.gpu_memory), (2, 80), "v2 symbol missing");

    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake_nvml(dir.path(), "count=2\n");
    for code in [13, 3] {
        set_fake_nvml(dir.path(), &format!("count=2\nmem_v2_result={code}\n"));
        let inv = collect(&fixture_host("vm-nogpu"), GpuMode::Nvml, Some(&lib));
        let h = &inv.specs.hardware;
        assert_eq!((h.gpu_count, h.gpu_memory), (2, 80), "v2 answers {code}");
    }
    // And the other way round: a library with v2 only, which works.
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake_nvml_flags("cc", dir.path(), "count=2\n", &["-DNO_MEMORY_V1"]);
    let inv = collect(&fixture_host("vm-nogpu"), GpuMode::Nvml, Some(&lib));
    assert_eq!(
        inv.specs.hardware.gpu_memory, 80,
        "v1 symbol missing, v2 fine"
    );
}

/// Unified-memory parts (GB10 / DGX Spark class) answer NOT_SUPPORTED to both calls: memory from
/// the device table when the part is there, else 0 — and the GPU is always counted.
#[test]
fn no_memory_call_works_then_the_table_else_zero_never_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake_nvml(
        dir.path(),
        "count=1\nname=NVIDIA GH200 480GB\nmem_v1_result=3\nmem_v2_result=3\npci_device_id=0x234210de\n",
    );
    let inv = collect(&fixture_host("vm-nogpu"), GpuMode::Nvml, Some(&lib));
    let h = &inv.specs.hardware;
    assert_eq!((h.gpu_count, h.gpu_memory), (1, 96), "GH200 from the table");
    // A part the table does not know (a made-up device id standing in for GB10).
    set_fake_nvml(
        dir.path(),
        "count=1\nname=NVIDIA GB10\nmem_v1_result=3\nmem_v2_result=3\npci_device_id=0x2e1f10de\n",
    );
    let inv = collect(&fixture_host("vm-nogpu"), GpuMode::Nvml, Some(&lib));
    let h = &inv.specs.hardware;
    assert_eq!(
        (h.gpu_count, h.gpu_type.as_str(), h.gpu_memory),
        (1, "GB10", 0)
    );
    assert_eq!(inv.details.gpus[0].memory_bytes, None);
}

/// MIG: the physical GPUs are reported (count, full memory), and the mode is logged once, not
/// at every refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mig_reports_physical_gpus_and_logs_the_mode_once() {
    let (api, mut agent) = setup().await;
    let lib = build_agent_nvml(agent.dir.path(), "count=8\nmig_index=2\n");
    agent.write_config(
        &nvml_config(&api.url(), &lib, "nvml", Some("100ms"))
            .replace("level = \"debug\"", "level = \"info\""),
    );
    agent.spawn(&["--dry-run"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.stop();
    let out = agent.all_output();
    assert_eq!(
        out.matches("MIG mode is on for GPU 2 (0000:3a:00.0)")
            .count(),
        1,
        "{out}"
    );
    let last: serde_json::Value =
        serde_json::from_str(agent.stdout_of_last_run().lines().last().unwrap()).unwrap();
    assert_eq!(last["hardware"]["gpu_count"], 8);
    assert_eq!(last["hardware"]["gpu_memory"], 80);
}

/// A GPU whose bus id NVML cannot read is counted once: in `auto` the PCI scan does not add it
/// again (8 on the board, 8 reported), and no "NVML cannot use it" warning names a healthy GPU.
#[test]
fn a_gpu_without_a_bus_id_is_not_counted_twice() {
    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake_nvml(dir.path(), "count=8\npci_fail_index=4\n");
    let inv = collect(&fixture_host("h100x8"), GpuMode::Auto, Some(&lib));
    assert_eq!(inv.specs.hardware.gpu_count, 8, "{:?}", inv.details.gpus);
    assert!(inv.details.gpus.iter().all(|g| g.source == "nvml"));
    assert_eq!(
        inv.details
            .gpus
            .iter()
            .filter(|g| g.bus_id.is_empty())
            .count(),
        1
    );
    assert!(
        !inv.details
            .gpu_notes
            .iter()
            .any(|n| n.contains("cannot use it")),
        "{:?}",
        inv.details.gpu_notes
    );
}

/// The stub in the mode that makes a sandbox matter: it opens `nvidiactl` and `nvidia<i>` at
/// init as libnvidia-ml does. Nodes there (here plain files) → the GPUs; a node missing →
/// "driver not loaded" and the PCI scan stands in; a refused open → NVML's NO_PERMISSION,
/// reported with the advice that fits (the refusal here is sysfs's EACCES for a read-only
/// attribute opened read-write, which a root test process gets too).
#[test]
fn the_stub_opens_the_device_nodes_and_a_refusal_is_no_permission() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("dev");
    std::fs::create_dir(&dev).unwrap();
    let conf = format!("count=2\nopen_devices=1\ndev_dir={}\n", dev.display());
    let lib = build_fake_nvml(dir.path(), &conf);
    // Missing nodes: the driver is not loaded.
    let inv = collect(&fixture_host("vm-nogpu"), GpuMode::Nvml, Some(&lib));
    assert_eq!(inv.specs.hardware.gpu_count, 0);
    let notes = inv.details.gpu_notes.join("\n");
    assert!(notes.contains("driver is not loaded"), "{notes}");
    // Nodes there: both GPUs.
    for n in ["nvidiactl", "nvidia0", "nvidia1"] {
        std::fs::write(dev.join(n), "").unwrap();
    }
    let inv = collect(&fixture_host("vm-nogpu"), GpuMode::Nvml, Some(&lib));
    assert_eq!(
        inv.specs.hardware.gpu_count, 2,
        "{:?}",
        inv.details.gpu_notes
    );
    // The second GPU's node refused.
    let readonly = Path::new("/sys/devices/system/cpu/online");
    std::fs::remove_file(dev.join("nvidia1")).unwrap();
    std::os::unix::fs::symlink(readonly, dev.join("nvidia1")).unwrap();
    let inv = collect(&fixture_host("vm-nogpu"), GpuMode::Nvml, Some(&lib));
    assert_eq!(inv.specs.hardware.gpu_count, 0);
    let notes = inv.details.gpu_notes.join("\n");
    assert!(
        notes.contains("Insufficient Permissions") || notes.contains("permission"),
        "{notes}"
    );
    assert!(
        notes.contains("/dev/nvidiactl"),
        "the advice names the node: {notes}"
    );
}

/// A workstation: an RTX 4090 behind a root port, the Ryzen CPU's integrated Radeon (Raphael)
/// and an A100 bound to vfio-pci (passed through to a VM). Only the 4090 is schedulable here:
/// it used to report gpu_count 2 (3 with the passed-through card).
#[test]
fn fixture_ryzen_workstation_counts_neither_the_apu_graphics_nor_a_passed_through_gpu() {
    for mode in [GpuMode::Pci, GpuMode::Auto] {
        let inv = collect(
            &fixture_host("ryzen-4090"),
            mode,
            Some(Path::new("/nonexistent/libnvidia-ml.so.1")),
        );
        let h = &inv.specs.hardware;
        assert_eq!(
            (h.gpu_count, h.gpu_vendor.as_str(), h.gpu_type.as_str()),
            (1, "NVIDIA", "GeForce RTX 4090"),
            "{mode:?}: {:?}",
            inv.details.gpus
        );
        assert_eq!(inv.details.gpus[0].driver.as_deref(), Some("nvidia"));
        let notes = inv.details.gpu_notes.join("\n");
        assert!(
            notes.contains("Raphael at 0000:11:00.0 is integrated graphics"),
            "{notes}"
        );
        assert!(
            notes.contains(
                "at 0000:05:00.0 is bound to vfio-pci (passed through to a virtual machine)"
            ),
            "{notes}"
        );
    }
}

/// Intel's integrated graphics are told by the bus topology (on the root bus, no port between),
/// not by a bus number: the laptop's iGPU is skipped, its discrete RTX counted.
#[test]
fn fixture_laptop_skips_intel_graphics_integrated_in_the_root_complex() {
    let inv = collect(&fixture_host("laptop"), GpuMode::Pci, None);
    assert_eq!(inv.specs.hardware.gpu_count, 1);
    let notes = inv.details.gpu_notes.join("\n");
    assert!(
        notes.contains("at 0000:00:02.0 is integrated graphics"),
        "{notes}"
    );
}

/// A vGPU host: 4 L40S, each with 4 SR-IOV virtual functions (a `physfn` link in each VF's
/// directory). Only the physical functions are GPUs — on the PCI path, with `auto` when NVML
/// fails (falls back to PCI), and with NVML working (a VF is no GPU that "fell off the bus").
/// Before this rule: 20 on the PCI path and 16 "NVML cannot use it" notes.
#[test]
fn sriov_virtual_functions_are_not_gpus() {
    let host = fixture_host("l40s-sriov");
    let inv = collect(&host, GpuMode::Pci, None);
    assert_eq!(inv.specs.hardware.gpu_count, 4, "{:?}", inv.details.gpus);
    assert_eq!(inv.specs.hardware.gpu_type, "L40S");
    let notes = inv.details.gpu_notes.join("\n");
    assert!(notes.contains("16 SR-IOV virtual functions"), "{notes}");

    let dir = tempfile::tempdir().unwrap();
    let lib = build_fake_nvml(dir.path(), "init_result=9\n");
    let inv = collect(&host, GpuMode::Auto, Some(&lib));
    assert_eq!(
        inv.specs.hardware.gpu_count, 4,
        "NVML failed: PCI stands in"
    );

    set_fake_nvml(dir.path(), "count=4\n");
    let inv = collect(&host, GpuMode::Auto, Some(&lib));
    assert_eq!(inv.specs.hardware.gpu_count, 4);
    let notes = inv.details.gpu_notes.join("\n");
    assert!(!notes.contains("NVML cannot use it"), "{notes}");
}

/// A VM whose hypervisor puts every device on bus 0 (no root ports): discrete Intel (Flex,
/// Max), NVIDIA and AMD GPUs there are GPUs; only the Intel iGPU at 00:02.0 is integrated.
/// Before this rule: the Flex and the Max were taken for integrated graphics.
#[test]
fn discrete_gpus_on_a_root_bus_count_and_the_igpu_does_not() {
    let inv = collect(&fixture_host("vm-passthrough"), GpuMode::Pci, None);
    let buses: Vec<&str> = inv.details.gpus.iter().map(|g| g.bus_id.as_str()).collect();
    assert_eq!(
        buses,
        vec![
            "0000:00:03.0",
            "0000:00:04.0",
            "0000:00:05.0",
            "0000:00:06.0",
            "0000:00:07.0"
        ],
        "{:?}",
        inv.details.gpu_notes
    );
    let notes = inv.details.gpu_notes.join("\n");
    assert!(
        notes.contains("at 0000:00:02.0 is integrated graphics"),
        "{notes}"
    );
}
