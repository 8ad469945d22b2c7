//! The exalsius API as the agent uses it: typed bodies, problem+json errors, and the client.

pub mod client;
pub mod problem;
pub mod resolve;
mod transport;
pub mod types;

pub use client::{ApiClient, ClientError, Failure, FailureKind, Outcome, Probe, Success};
pub use problem::Problem;
pub use types::{
    Answer, Issued, NodeHardware, NodePatchRequest, NodeSelfRegisterRequest, NodeSoftware,
    NodeSpecs, NodeSystem, TokenResponse,
};
