//! Typed bodies of the exalsius API calls the agent makes (see the shared OpenAPI spec:
//! `NodePatchRequest`, `NodePatchResponse`, `NodeSelfRegisterRequest/Response`).

use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::time::Duration;

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

/// `NodePatchResponse` (also the shape of `NodeSelfRegisterResponse`), read as leniently as
/// the spec allows: `node_id` is required; the optional fields may be absent, `null`, or any
/// JSON number the schema's `integer` admits (`3600`, `3600.0`, `3.6e3`); unknown fields are
/// ignored, because the API will grow.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenResponse {
    /// The node the API answered for.
    pub node_id: String,
    /// The token to use from now on.
    #[serde(default)]
    pub next_access_token: Option<serde_json::Value>,
    /// Its lifetime in seconds.
    #[serde(default)]
    pub next_access_token_expires_in: Option<serde_json::Value>,
    /// Its type (`Bearer`).
    #[serde(default)]
    pub next_access_token_type: Option<serde_json::Value>,
}

/// A lifetime above this is treated as unknown: no real token lives for years, and a garbled
/// value must not be taken as "never renew".
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(366 * 86_400);
/// Tokens longer than this are not plausible and would bloat every request.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A token the API issued in a 2xx, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Issued {
    /// The new access token.
    pub token: Secret,
    /// Its lifetime, when the API gave a usable one.
    pub expires_in: Option<Duration>,
    /// `Bearer` when the API named the scheme (in any case), else `None`.
    pub token_type: Option<String>,
}

/// What a 2xx said, after the lenient reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The node the API answered for (not yet checked against ours).
    pub node_id: String,
    /// The new token, if one was issued.
    pub issued: Option<Issued>,
    /// Optional fields that were present but unusable, and were ignored (for the log).
    pub notes: Vec<String>,
}

impl TokenResponse {
    /// Interprets the body. `Err` only when the new token itself is unusable (then nothing
    /// about the stored token may change); an unusable optional field becomes a note.
    // Long: every field of the lenient reading, each with its own rule and note.
    pub fn interpret(self) -> Result<Answer, String> {
        let mut notes = Vec::new();
        let token = match self.next_access_token {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(t)) => {
                // RFC 6750's b64token holds no white space: at the edges (a trailing newline)
                // it is framing, trimmed; refusing the token would present the answered one.
                let t = t.trim();
                if let Some(why) = implausible_token(t) {
                    return Err(format!("an unusable next_access_token: {why}"));
                }
                Some(Secret::new(t))
            }
            Some(other) => {
                return Err(format!(
                    "an unusable next_access_token: a JSON {} instead of a string",
                    json_kind(&other)
                ));
            }
        };
        let expires_in = match self.next_access_token_expires_in {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Number(n)) => match n.as_f64() {
                Some(s) if s > 0.0 && s <= MAX_TOKEN_LIFETIME.as_secs_f64() => {
                    Some(Duration::from_secs_f64(s))
                }
                _ => {
                    notes.push(format!(
                        "next_access_token_expires_in = {n} is not a usable lifetime; ignored (expiry unknown)"
                    ));
                    None
                }
            },
            Some(other) => {
                notes.push(format!(
                    "next_access_token_expires_in is a JSON {} instead of a number; ignored (expiry unknown)",
                    json_kind(&other)
                ));
                None
            }
        };
        let token_type = match self.next_access_token_type {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(t)) if t.trim().eq_ignore_ascii_case("bearer") => {
                Some("Bearer".to_string())
            }
            Some(serde_json::Value::String(t)) if t.trim().is_empty() => None,
            Some(other) => {
                notes.push(format!(
                    "next_access_token_type {} is not a scheme the agent knows; sending Bearer",
                    truncate_json(&other)
                ));
                None
            }
        };
        if token.is_none() && (expires_in.is_some() || token_type.is_some()) {
            notes.push("token lifetime or type given without a new token; ignored".to_string());
        }
        Ok(Answer {
            node_id: self.node_id,
            issued: token.map(|token| Issued {
                token,
                expires_in,
                token_type,
            }),
            notes,
        })
    }
}

/// Why a token from the server cannot be used, if it cannot.
pub(crate) fn implausible_token(t: &str) -> Option<&'static str> {
    if t.is_empty() {
        Some("empty")
    } else if t.len() > MAX_TOKEN_LEN {
        Some("too long")
    } else if !t.bytes().all(|b| b.is_ascii_graphic()) {
        Some("contains characters that cannot be sent in a header")
    } else {
        None
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

fn truncate_json(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

/// `NodeSelfRegisterRequest`: the body of `POST /node/self-register`.
#[derive(Debug, Serialize)]
pub struct NodeSelfRegisterRequest<'a> {
    /// The registration token (the only place it is ever written to).
    pub register_token: &'a str,
    /// Node name.
    pub hostname: &'a str,
    /// SSH endpoint `host:port`.
    pub endpoint: &'a str,
    /// SSH user.
    pub username: &'a str,
    /// SSH key id.
    pub ssh_key_id: &'a str,
    /// USD per hour.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_per_hour: Option<f64>,
    /// Hardware specs.
    pub hardware: &'a NodeHardware,
    /// Software versions.
    pub software: &'a NodeSoftware,
    /// OS and kernel.
    pub system: &'a NodeSystem,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(json: &str) -> Result<Answer, String> {
        serde_json::from_str::<TokenResponse>(json)
            .map_err(|e| e.to_string())?
            .interpret()
    }

    #[test]
    fn every_number_shape_the_schema_allows_and_unknown_fields() {
        for body in [
            r#"{"node_id":"n","next_access_token":"t","next_access_token_expires_in":3600}"#,
            r#"{"node_id":"n","next_access_token":"t","next_access_token_expires_in":3600.0}"#,
            r#"{"node_id":"n","next_access_token":"t","next_access_token_expires_in":3.6e3,"refresh_hint":{"a":[1]},"x":null}"#,
        ] {
            let a = read(body).unwrap();
            let i = a.issued.unwrap();
            assert_eq!(i.token.expose(), "t");
            assert_eq!(i.expires_in, Some(Duration::from_secs(3600)), "{body}");
            assert!(a.notes.is_empty(), "{:?}", a.notes);
        }
    }

    #[test]
    fn absent_and_null_optional_fields() {
        let a = read(r#"{"node_id":"n"}"#).unwrap();
        assert!(a.issued.is_none());
        let a = read(r#"{"node_id":"n","next_access_token":null,"next_access_token_expires_in":null,"next_access_token_type":null}"#).unwrap();
        assert!(a.issued.is_none() && a.notes.is_empty());
        let a =
            read(r#"{"node_id":"n","next_access_token":"t","next_access_token_expires_in":null}"#)
                .unwrap();
        assert_eq!(a.issued.unwrap().expires_in, None);
    }

    #[test]
    fn unusable_optional_fields_are_noted_and_the_token_kept() {
        for (field, value) in [
            ("next_access_token_expires_in", "0"),
            ("next_access_token_expires_in", "-5"),
            ("next_access_token_expires_in", "1e300"),
            ("next_access_token_expires_in", "\"3600\""),
            ("next_access_token_type", "\"MAC\""),
            ("next_access_token_type", "7"),
        ] {
            let body = format!(r#"{{"node_id":"n","next_access_token":"t","{field}":{value}}}"#);
            let a = read(&body).unwrap();
            let i = a.issued.unwrap();
            assert_eq!(i.token.expose(), "t", "{body}");
            assert_eq!(i.expires_in, None);
            assert_eq!(i.token_type, None);
            assert_eq!(a.notes.len(), 1, "{body}: {:?}", a.notes);
        }
    }

    #[test]
    fn bearer_in_any_case_is_canonical() {
        for t in ["bearer", "BEARER", "Bearer", " bEaReR "] {
            let body = format!(
                r#"{{"node_id":"n","next_access_token":"t","next_access_token_type":"{t}"}}"#
            );
            assert_eq!(
                read(&body).unwrap().issued.unwrap().token_type.as_deref(),
                Some("Bearer")
            );
        }
    }

    #[test]
    fn unusable_tokens_are_errors() {
        for v in ["\"\"", "42", "{}", "\"a b\"", "\"caf\u{e9}\""] {
            let body = format!(r#"{{"node_id":"n","next_access_token":{v}}}"#);
            assert!(read(&body).is_err(), "{body}");
        }
        let long = format!(
            r#"{{"node_id":"n","next_access_token":"{}"}}"#,
            "x".repeat(MAX_TOKEN_LEN + 1)
        );
        assert!(read(&long).is_err());
        // node_id is required.
        assert!(read(r#"{"next_access_token":"t"}"#).is_err());
    }

    #[test]
    fn white_space_at_the_edges_of_a_token_is_trimmed() {
        for v in [r#""t-1\n""#, r#"" t-1""#, r#""\tt-1\r\n""#] {
            let body = format!(r#"{{"node_id":"n","next_access_token":{v}}}"#);
            let issued = read(&body).unwrap().issued.unwrap();
            assert_eq!(issued.token.expose(), "t-1", "{body}");
        }
        assert!(read(r#"{"node_id":"n","next_access_token":" \n "}"#).is_err());
    }
}
