//! `inventory`: collect and print this node's specs (a table, the exact heartbeat body, or
//! everything as JSON).

use super::Exit;
use crate::cli::InventoryArgs;
use crate::config::{Config, Overrides, process_env};
use crate::inventory::{Collector, HostCollector, Inventory};

/// Runs `inventory`: works without a config and without network.
pub fn run(overrides: &Overrides, args: &InventoryArgs) -> Result<(), Exit> {
    // Works without a config; a broken one is reported but does not stop a diagnostic tool.
    let cfg = Config::load(overrides, &process_env);
    let (level, gpu_mode, description, nvml_library) = match &cfg {
        Ok(c) => (
            if overrides.log_level.is_some() || process_env(crate::config::ENV_LOG).is_some() {
                c.log.level.clone()
            } else {
                "warn".to_string()
            },
            c.inventory.gpu,
            c.inventory.description.clone(),
            c.inventory.nvml_library.clone(),
        ),
        Err(e) => {
            // A diagnostic tool goes on without the config; it says so (not an error).
            crate::output::warn_line(&format!("ignoring the configuration: {e}"));
            ("warn".to_string(), Default::default(), None, None)
        }
    };
    crate::logging::init(&level, Default::default());
    let gpu_mode = args.gpu.map_or(gpu_mode, Into::into);
    let root = args.root.as_deref().unwrap_or(std::path::Path::new("/"));
    if !root.is_dir() {
        return Err(Exit::runtime(format!(
            "--root {}: not a directory",
            root.display()
        )));
    }
    let count_unhealthy = cfg.as_ref().is_ok_and(|c| c.inventory.count_unhealthy_gpus);
    let inv = HostCollector::with_root(root, gpu_mode, nvml_library.as_deref())
        .count_unhealthy_gpus(count_unhealthy)
        .collect();
    let text = if args.json {
        serde_json::to_string_pretty(&crate::api::NodePatchRequest::new(
            &inv.specs,
            description.as_deref(),
        ))
        .map(|s| s + "\n")
    } else if args.verbose_json {
        serde_json::to_string_pretty(&inv).map(|s| s + "\n")
    } else {
        Ok(render_inventory(&inv))
    };
    let text = text.map_err(|e| Exit::runtime(format!("cannot render inventory: {e}")))?;
    // A closed pipe (`| head`) is not an error worth a message: a quiet exit 141.
    crate::output::write(&text)
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// The human view: a compact table per section.
pub fn render_inventory(inv: &Inventory) -> String {
    let d = &inv.details;
    let h = &inv.specs.hardware;
    let mut s = String::new();
    let opt = |v: Option<u32>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    s.push_str("SYSTEM\n");
    s.push_str(&format!("  os       {}\n", inv.specs.system.os));
    s.push_str(&format!("  kernel   {}\n", inv.specs.system.kernel));
    s.push_str("\nCPU\n");
    s.push_str(&format!(
        "  model    {}\n  logical  {}   sockets {}   physical cores {}\n",
        d.cpu.model.as_deref().unwrap_or("-"),
        d.cpu.logical,
        opt(d.cpu.sockets),
        opt(d.cpu.physical_cores)
    ));
    s.push_str(&format!("\nMEMORY\n  total    {}\n", gib(d.memory_bytes)));
    s.push_str(&format!("\nSTORAGE ({})\n", d.storage_source));
    if d.disks.is_empty() {
        s.push_str(&format!(
            "  /        {:.0} GB\n",
            d.storage_bytes as f64 / 1e9
        ));
    }
    for disk in &d.disks {
        s.push_str(&format!(
            "  {:<12} {:>8.0} GB  {}\n",
            disk.name,
            disk.bytes as f64 / 1e9,
            disk.model.as_deref().unwrap_or("")
        ));
    }
    s.push_str(&render_gpus(d));
    for note in &d.gpu_notes {
        s.push_str(&format!("  note: {note}\n"));
    }
    let sw = &inv.specs.software;
    s.push_str("\nSOFTWARE\n");
    for (name, v) in [
        ("docker", &sw.docker),
        ("nvidia", &sw.nvidia),
        ("amd", &sw.amd),
    ] {
        let first = v.lines().next().unwrap_or("");
        s.push_str(&format!(
            "  {name:<8} {}\n",
            if first.is_empty() { "-" } else { first }
        ));
    }
    s.push_str(&format!(
        "\nSENT TO THE API\n  cpu_cores {}  memory_gb {}  storage_gb {}  gpu_count {}  gpu_vendor {}  gpu_type {}  gpu_memory {}\n",
        h.cpu_cores, h.memory_gb, h.storage_gb, h.gpu_count, h.gpu_vendor, h.gpu_type, h.gpu_memory
    ));
    s
}

/// The health column: `ok`, `-` (no NVML checks: the PCI scan), or each state with
/// "(not counted)" where it keeps the GPU out of `gpu_count` ("(counted anyway)" with
/// `inventory.count_unhealthy_gpus`).
fn health_cell(g: &crate::inventory::gpu::Gpu, count_unhealthy: bool) -> String {
    if g.health.is_none() {
        return "-".to_string();
    }
    let states = g.states();
    if states.is_empty() {
        return "ok".to_string();
    }
    states
        .iter()
        .map(|s| {
            if s.counted() {
                s.name().to_string()
            } else if count_unhealthy {
                format!("{} (counted anyway)", s.name())
            } else {
                format!("{} (not counted)", s.name())
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The GPU table: one row per GPU.
fn render_gpus(d: &crate::inventory::Details) -> String {
    let mut s = String::new();
    s.push_str("\nGPU\n");
    if d.gpus.is_empty() {
        s.push_str("  none found\n");
    } else {
        s.push_str(&format!(
            "  {:<3} {:<28} {:>10}  {:<42} {:<14} {:<4} {}\n",
            "#", "name", "memory", "uuid", "bus id", "MIG", "health"
        ));
        for g in &d.gpus {
            s.push_str(&format!(
                "  {:<3} {:<28} {:>10}  {:<42} {:<14} {:<4} {}\n",
                g.index,
                g.name,
                g.memory_bytes.map_or_else(|| "unknown".to_string(), gib),
                g.uuid.as_deref().unwrap_or("-"),
                g.bus_id,
                match g.mig_enabled {
                    Some(true) => "on",
                    Some(false) => "off",
                    None => "-",
                },
                health_cell(g, d.count_unhealthy_gpus)
            ));
        }
    }
    s
}
