//! placeholder
use super::Failure;
use crate::cli::DoctorArgs;
use crate::config::Overrides;

/// Runs `doctor`.
pub fn run(_overrides: &Overrides, _args: &DoctorArgs) -> Result<(), Failure> {
    Err(Failure::runtime("not yet"))
}
