//! Typed bodies of the exalsius API calls the agent makes (see the shared OpenAPI spec:
//! `NodePatchRequest`, `NodePatchResponse`, `NodeSelfRegisterRequest/Response`).

use serde::{Deserialize, Serialize};

/// `NodeHardware`. Integers are `int32` in the spec; collectors saturate at `i32::MAX`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHardware {
    /// Number of GPUs found.
    pub gpu_count: i32,
    /// `NVIDIA`, `AMD`, `INTEL` or `UNKNOWN` (the API's `GpuTypeInfo` vendor enum).
    pub gpu_vendor: String,
    /// Model name of the (most common) GPU, or `UNKNOWN`.
    pub gpu_type: String,
    /// Memory per GPU in GiB, rounded to nearest.
    pub gpu_memory: i32,
    /// Logical CPUs of the host.
    pub cpu_cores: i32,
    /// Total RAM in GiB, rounded to nearest.
    pub memory_gb: i32,
    /// Total capacity of the local physical disks in GB (10^9).
    pub storage_gb: i32,
}

/// `NodeSoftware`: version strings, empty when the tool is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSoftware {
    /// `docker --version`
    pub docker: String,
    /// NVIDIA driver (and CUDA) version.
    pub nvidia: String,
    /// `amd-smi version`
    pub amd: String,
}

/// `NodeSystem`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSystem {
    /// `PRETTY_NAME` from os-release.
    pub os: String,
    /// Kernel release (`uname -r`).
    pub kernel: String,
}

/// The node's specs as the API sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpecs {
    /// `hardware`
    pub hardware: NodeHardware,
    /// `software`
    pub software: NodeSoftware,
    /// `system`
    pub system: NodeSystem,
}

/// `NodePatchRequest`: the heartbeat body.
#[derive(Debug, Clone, Serialize)]
pub struct NodePatchRequest<'a> {
    /// Hardware specs.
    pub hardware: &'a NodeHardware,
    /// Software versions.
    pub software: &'a NodeSoftware,
    /// OS and kernel.
    pub system: &'a NodeSystem,
    /// Operator's free-text description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<&'a str>,
}

impl<'a> NodePatchRequest<'a> {
    /// The body for these specs.
    pub fn new(specs: &'a NodeSpecs, description: Option<&'a str>) -> Self {
        Self {
            hardware: &specs.hardware,
            software: &specs.software,
            system: &specs.system,
            description,
        }
    }
}

/// `NodePatchResponse` (also the shape of `NodeSelfRegisterResponse`).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenResponse {
    /// The node the API answered for.
    pub node_id: String,
    /// The token to use from now on.
    #[serde(default)]
    pub next_access_token: Option<String>,
    /// Its lifetime in seconds.
    #[serde(default)]
    pub next_access_token_expires_in: Option<i64>,
    /// Its type (`Bearer`).
    #[serde(default)]
    pub next_access_token_type: Option<String>,
}
