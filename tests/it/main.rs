//! The integration tests: one crate (one link), a module per area. `support` (the stand-in
//! API, the binary runner, the stub NVML built from C) is compiled once for all of them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../support/mod.rs"]
mod support;

mod arm64;
mod cli;
mod contract;
mod credentials;
mod daemon;
mod doctor;
mod fuzz;
mod gpu;
mod hung_fs;
mod import_legacy;
mod metrics;
mod notify;
mod nvml_real;
mod outside_text;
mod package_test;
mod policies;
mod register;
mod reliability;
mod reload;
mod schedule;
mod stall;
mod token_model;
