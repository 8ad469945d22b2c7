//! The commands behind the CLI: each returns the process exit code.

use crate::cli::{Cli, Command, InventoryArgs, RunArgs, StatusArgs};
use crate::config::{Config, EX_CONFIG, Overrides, process_env};
use crate::heartbeat::{self, Control, Mode};
use crate::inventory::{Collector, HostCollector, Inventory};
use crate::state::{StateStore, rfc3339};
use serde::Serialize;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Exit code for runtime failures.
pub const EXIT_FAILURE: u8 = 1;

/// Dispatches a parsed command line.
pub fn main(cli: Cli) -> u8 {
    let overrides = Overrides {
        config: cli.config.clone(),
        api_url: cli.api_url.clone(),
        node_id: cli.node_id.clone(),
        state_dir: cli.state_dir.clone(),
        log_level: cli.log_level.clone(),
    };
    match cli.command {
        Command::Run(args) => run(&overrides, &args),
        Command::Inventory(args) => inventory(&overrides, &args),
        Command::Status(args) => status(&overrides, &args),
        Command::CheckConfig => check_config(&overrides),
        Command::Register(args) => crate::register::command(&overrides, &args),
        Command::ImportLegacy(args) => {
            crate::commands::exit_code(crate::commands::import_legacy::run(&overrides, &args))
        }
        Command::Doctor(args) => {
            crate::commands::exit_code(crate::commands::doctor::run(&overrides, &args))
        }
    }
}

/// The agent's runtime: current-thread (the multi-thread one costs ≈ 1.5× the CPU for this
/// load); blocking probes go to `spawn_blocking`.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("exalsius-node-agent: cannot start the runtime: {e}");
            EXIT_FAILURE
        })
}

pub(crate) fn load_or_report(overrides: &Overrides) -> Result<Config, u8> {
    Config::load(overrides, &process_env).map_err(|e| {
        eprintln!("exalsius-node-agent: configuration error: {e}");
        EX_CONFIG
    })
}

fn run(overrides: &Overrides, args: &RunArgs) -> u8 {
    let cfg = match load_or_report(overrides) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::logging::init(&cfg.log.level, cfg.log.format);
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    let mode = if args.once {
        Mode::Once
    } else if args.dry_run {
        Mode::DryRun
    } else {
        Mode::Daemon
    };
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match cfg.source.as_deref() {
        Some(p) => {
            tracing::info!(config = %p.display(), version = env!("CARGO_PKG_VERSION"), "starting")
        }
        None => tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            "starting without a config file ({} not found): defaults and environment only",
            crate::config::DEFAULT_CONFIG_PATH
        ),
    }
    let collector: Arc<dyn Collector> = Arc::new(HostCollector::new(
        cfg.inventory.gpu,
        cfg.inventory.nvml_library.as_deref(),
    ));
    let reload_overrides = overrides.clone();
    let result = runtime.block_on(async move {
        let (shutdown, reload) = crate::shutdown::install();
        let agent = heartbeat::prepare(cfg, mode, collector)?;
        agent
            .run(Control {
                shutdown,
                reload: Some(reload),
                reloader: Some(Box::new(move || {
                    Config::load(&reload_overrides, &process_env)
                })),
                collectors: Some(Box::new(|cfg: &Config| -> Arc<dyn Collector> {
                    Arc::new(HostCollector::new(
                        cfg.inventory.gpu,
                        cfg.inventory.nvml_library.as_deref(),
                    ))
                })),
            })
            .await
    });
    // Exit is never held by blocking work: a getaddrinfo, a version probe, a /sys read or an
    // NVML call stuck in a blocking thread is abandoned (the process exit ends it) instead of
    // being waited for, as dropping the runtime would. Probe children are killed first.
    runtime.shutdown_background();
    crate::inventory::software::kill_running_probes();
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("exalsius-node-agent: {e}");
            e.exit_code()
        }
    }
}

fn inventory(overrides: &Overrides, args: &InventoryArgs) -> u8 {
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
            eprintln!("exalsius-node-agent: ignoring the configuration: {e}");
            ("warn".to_string(), Default::default(), None, None)
        }
    };
    crate::logging::init(&level, Default::default());
    let gpu_mode = args.gpu.map_or(gpu_mode, Into::into);
    let root = args.root.as_deref().unwrap_or(std::path::Path::new("/"));
    if !root.is_dir() {
        eprintln!(
            "exalsius-node-agent: --root {}: not a directory",
            root.display()
        );
        return EXIT_FAILURE;
    }
    let inv = HostCollector::with_root(root, gpu_mode, nvml_library.as_deref()).collect();
    let mut out = std::io::stdout().lock();
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
    match text {
        Ok(t) => {
            let _ = out.write_all(t.as_bytes());
            0
        }
        Err(e) => {
            eprintln!("exalsius-node-agent: cannot render inventory: {e}");
            EXIT_FAILURE
        }
    }
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
    s.push_str("\nGPU\n");
    if d.gpus.is_empty() {
        s.push_str("  none found\n");
    } else {
        s.push_str(&format!(
            "  {:<3} {:<28} {:>10}  {:<42} {:<14} {}\n",
            "#", "name", "memory", "uuid", "bus id", "MIG"
        ));
        for g in &d.gpus {
            s.push_str(&format!(
                "  {:<3} {:<28} {:>10}  {:<42} {:<14} {}\n",
                g.index,
                g.name,
                g.memory_bytes.map_or_else(|| "unknown".to_string(), gib),
                g.uuid.as_deref().unwrap_or("-"),
                g.bus_id,
                match g.mig_enabled {
                    Some(true) => "on",
                    Some(false) => "off",
                    None => "-",
                }
            ));
        }
    }
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

/// `status --json` (never the token).
#[derive(Debug, Serialize)]
struct StatusView {
    node_id: String,
    api_url: String,
    last_attempt_at: Option<String>,
    last_result: &'static str,
    last_error: Option<String>,
    last_success_at: Option<String>,
    last_success_age_seconds: Option<u64>,
    consecutive_failures: u32,
    token_type: String,
    token_expires_at: Option<String>,
    healthy: bool,
    healthy_if_success_within_seconds: u64,
}

fn status(overrides: &Overrides, args: &StatusArgs) -> u8 {
    let cfg = match load_or_report(overrides) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let store = StateStore::new(&cfg.state.dir);
    let state = match store.load() {
        Ok((Some(s), _)) => s,
        Ok((None, _)) => {
            if args.json {
                println!("{{\"healthy\":false,\"message\":\"no heartbeat recorded yet\"}}");
            } else {
                println!(
                    "no heartbeat recorded yet ({} does not exist)",
                    store.path().display()
                );
            }
            return EXIT_FAILURE;
        }
        Err(e) => {
            eprintln!("exalsius-node-agent: {e}");
            return EXIT_FAILURE;
        }
    };
    let now = SystemTime::now();
    let limit = cfg.heartbeat.interval.saturating_mul(3);
    let age = state
        .last_success_at
        .map(|t| now.duration_since(t).unwrap_or_default());
    let healthy = age.is_some_and(|a| a < limit);
    let view = StatusView {
        node_id: state.node_id.to_string(),
        api_url: state.api_url.clone(),
        last_attempt_at: state.last_attempt_at.map(rfc3339),
        last_result: match (&state.last_attempt_at, &state.last_error) {
            (None, _) => "none",
            (Some(_), None) => "ok",
            (Some(_), Some(_)) => "failed",
        },
        last_error: state.last_error.clone(),
        last_success_at: state.last_success_at.map(rfc3339),
        last_success_age_seconds: age.map(|a| a.as_secs()),
        consecutive_failures: state.consecutive_failures,
        token_type: state
            .token_type
            .clone()
            .unwrap_or_else(|| "Bearer".to_string()),
        token_expires_at: state.token_expires_at.map(rfc3339),
        healthy,
        healthy_if_success_within_seconds: limit.as_secs(),
    };
    if args.json {
        match serde_json::to_string_pretty(&view) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("exalsius-node-agent: {e}");
                return EXIT_FAILURE;
            }
        }
    } else {
        let ago = |t: Option<SystemTime>| match t {
            None => "never".to_string(),
            Some(t) => format!(
                "{} ({} ago)",
                rfc3339(t),
                short(now.duration_since(t).unwrap_or_default())
            ),
        };
        let mut s = String::new();
        s.push_str(&format!("node:                 {}\n", view.node_id));
        s.push_str(&format!("api:                  {}\n", view.api_url));
        let result = match &view.last_error {
            Some(e) => format!("failed: {e}"),
            None if state.last_attempt_at.is_some() => "ok".to_string(),
            None => "-".to_string(),
        };
        s.push_str(&format!(
            "last attempt:         {}: {result}\n",
            ago(state.last_attempt_at)
        ));
        s.push_str(&format!(
            "last success:         {}\n",
            ago(state.last_success_at)
        ));
        s.push_str(&format!(
            "consecutive failures: {}\n",
            view.consecutive_failures
        ));
        let expiry = match state.token_expires_at {
            None => "expiry unknown".to_string(),
            Some(t) => match t.duration_since(now) {
                Ok(left) => format!("expires {} (in {})", rfc3339(t), short(left)),
                Err(_) => format!("EXPIRED at {}", rfc3339(t)),
            },
        };
        s.push_str(&format!(
            "token:                {}, {expiry}\n",
            view.token_type
        ));
        s.push_str(&format!(
            "health:               {}\n",
            if healthy {
                format!("ok (last success within 3 × interval = {})", short(limit))
            } else {
                format!(
                    "UNHEALTHY (no success within 3 × interval = {})",
                    short(limit)
                )
            }
        ));
        print!("{s}");
    }
    if healthy { 0 } else { EXIT_FAILURE }
}

fn short(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

fn check_config(overrides: &Overrides) -> u8 {
    let cfg = match load_or_report(overrides) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = crate::api::ApiClient::new(&cfg.api) {
        eprintln!("exalsius-node-agent: configuration error: {e}");
        return EX_CONFIG;
    }
    let source = cfg.source.as_deref().map_or_else(
        || {
            format!(
                "no config file ({} not found): defaults and environment",
                crate::config::DEFAULT_CONFIG_PATH
            )
        },
        |p| p.display().to_string(),
    );
    println!("# effective configuration from {source}");
    for w in &cfg.warnings {
        println!("# warning: {w}");
    }
    print!("{}", cfg.to_redacted_toml());
    if cfg.api.node_id.is_none() || cfg.api.access_token.is_none() {
        println!(
            "# note: api.node_id/api.access_token not both set: `run` needs them, or a node registered with `register`"
        );
    }
    0
}
