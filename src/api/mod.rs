//! The exalsius API as the agent uses it: typed bodies, problem+json errors, and the client.

pub mod client;
pub mod problem;
pub mod types;

pub use client::{ApiClient, ClientError, Failure, FailureKind, Outcome, Success};
pub use problem::Problem;
pub use types::{
    NodeHardware, NodePatchRequest, NodeSoftware, NodeSpecs, NodeSystem, TokenResponse,
};
