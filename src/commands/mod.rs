//! Commands in the shape every command is moving to (issue 10): each returns
//! `Result<(), Failure>`; `app::main` prints the failure once and exits with its code. The
//! older commands in `app.rs` and `register.rs` still print their own errors.

pub mod doctor;
pub mod import_legacy;

use crate::config::EX_CONFIG;

/// Exit code for runtime failures.
pub const EXIT_FAILURE: u8 = 1;

/// Why a command failed: the one line the operator sees, and the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// 1 (runtime) or 78 (configuration, invalid input).
    pub code: u8,
    /// One line, naming the problem and what to do.
    pub message: String,
}

impl Failure {
    /// A runtime failure (exit 1).
    pub fn runtime(message: impl Into<String>) -> Self {
        Self {
            code: EXIT_FAILURE,
            message: message.into(),
        }
    }

    /// A configuration or input problem (exit 78).
    pub fn config(message: impl Into<String>) -> Self {
        Self {
            code: EX_CONFIG,
            message: message.into(),
        }
    }
}

/// Prints a failure once (stderr) and turns the outcome into the exit code.
pub fn exit_code(outcome: Result<(), Failure>) -> u8 {
    match outcome {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("exalsius-node-agent: {}", f.message);
            f.code
        }
    }
}
