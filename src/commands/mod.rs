//! The commands: one file per subcommand, each returning `Result<(), Exit>`. [`main`]
//! dispatches, prints a failure once (one line on stderr) and turns it into the exit code; no
//! command prints its own error line.

pub mod check_config;
pub mod doctor;
pub mod import_legacy;
pub mod inventory;
pub mod register;
pub mod run;
pub mod status;

use crate::cli::{Cli, Command};
use crate::config::{Config, EX_CONFIG, Overrides, process_env};

/// Exit code for runtime failures.
pub const EXIT_FAILURE: u8 = 1;

/// How a command ended badly: the exit code and the one line the operator sees (a failed HTTP
/// attempt is the other meaning of "failure", `api::Failure`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// 1 (runtime) or 78 (configuration, invalid input).
    pub code: u8,
    /// One line, naming the problem and what to do.
    pub message: String,
}

impl Exit {
    /// A runtime failure (exit 1).
    pub fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_FAILURE,
            message: message.into(),
        }
    }

    /// Exit 1 with nothing more to say: the command's output already said it (`status`).
    pub fn quiet() -> Self {
        Self::runtime(String::new())
    }

    /// A configuration or input problem (exit 78).
    pub fn config(message: impl Into<String>) -> Self {
        Self {
            code: EX_CONFIG,
            message: message.into(),
        }
    }
}

/// Dispatches a parsed command line; returns the process exit code.
pub fn main(cli: Cli) -> u8 {
    let overrides = Overrides {
        config: cli.config.clone(),
        api_url: cli.api_url.clone(),
        node_id: cli.node_id.clone(),
        state_dir: cli.state_dir.clone(),
        log_level: cli.log_level.clone(),
    };
    exit_code(match cli.command {
        Command::Run(args) => run::run(&overrides, &args),
        Command::Inventory(args) => inventory::run(&overrides, &args),
        Command::Status(args) => status::run(&overrides, &args),
        Command::CheckConfig => check_config::run(&overrides),
        Command::Register(args) => register::run(&overrides, &args),
        Command::ImportLegacy(args) => import_legacy::run(&overrides, &args),
        Command::Doctor(args) => doctor::run(&overrides, &args),
        Command::NvmlProbe(args) => {
            return crate::inventory::gpu::probe::child_main(args.library.as_deref());
        }
    })
}

/// Prints a failure once (stderr) and turns the outcome into the exit code.
pub fn exit_code(outcome: Result<(), Exit>) -> u8 {
    match outcome {
        Ok(()) => 0,
        Err(f) => {
            if !f.message.is_empty() {
                crate::output::warn_line(&f.message);
            }
            f.code
        }
    }
}

/// The configuration, or the failure that names the key and file (exit 78; exit 1 when the
/// file cannot be read now, a fault systemd retries).
pub fn load_config(overrides: &Overrides) -> Result<Config, Exit> {
    Config::load(overrides, &process_env).map_err(|e| {
        if e.is_machine_fault() {
            Exit::runtime(format!("{e}"))
        } else {
            Exit::config(format!("configuration error: {e}"))
        }
    })
}

/// The agent's runtime: current-thread (the multi-thread one costs ≈ 1.5× the CPU for this
/// load); blocking probes go to `spawn_blocking`.
pub fn runtime() -> Result<tokio::runtime::Runtime, Exit> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Exit::runtime(format!("cannot start the runtime: {e}")))
}
