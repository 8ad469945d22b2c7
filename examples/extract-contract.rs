//! Writes the part of the exalsius OpenAPI spec the contract tests check, with `$ref`s
//! inlined, as JSON on stdout:
//!
//!     cargo run --example extract-contract -- ../shared/exalsius-api/openapi > tests/contract/exalsius-api.json
//!
//! `tests/it/contract.rs` fails when the committed file no longer matches the spec beside the
//! repository, so a new spec version is noticed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/contract.rs"]
mod contract;

fn main() {
    let spec = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "../shared/exalsius-api/openapi".to_string());
    let extract = contract::extract(std::path::Path::new(&spec));
    println!("{}", serde_json::to_string_pretty(&extract).unwrap());
}
