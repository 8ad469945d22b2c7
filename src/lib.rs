//! exalsius-node-agent: keeps a self-managed GPU node alive and truthfully described in the
//! exalsius node pool.
//!
//! What is collected ([`inventory`]): logical CPUs, RAM (GiB), local disk capacity (GB), OS
//! and kernel, GPUs, and docker/NVIDIA/AMD tool versions. What is sent ([`api`]):
//! `PATCH {api.url}/node/{node_id}` with a `NodePatchRequest` body on a jittered schedule
//! ([`heartbeat`]); every success returns a new access token, which is persisted atomically
//! ([`state`]) before it is used.
//!
//! Data flows one way: [`config`] → [`inventory`] → request → response → [`state`].

pub mod api;
pub mod bounded;
pub mod cli;
pub mod commands;
pub mod config;
pub mod exit;
pub mod footprint;
pub mod heartbeat;
pub mod inventory;
pub mod logging;
pub mod metrics;
pub mod output;
pub mod perms;
pub mod secret;
pub mod shutdown;
pub mod state;
pub mod systemd;
pub mod text;
