//! `application/problem+json` error bodies.
//!
//! The exalsius spec nests the RFC 9457 fields under `detail`
//! (`{"detail": {"type", "title", "status", "detail", "instance"}}`); proxies and frameworks
//! send the flat RFC 9457 form. Both are accepted; anything else yields `None`.

use serde::Deserialize;
use serde_json::Value;

/// The human-relevant parts of a problem body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Problem {
    /// Short summary.
    pub title: Option<String>,
    /// This occurrence's explanation.
    pub detail: Option<String>,
}

#[derive(Deserialize)]
struct Fields {
    #[serde(default)]
    title: Option<Value>,
    #[serde(default)]
    detail: Option<Value>,
}

/// A title or detail, as one bounded line ([`crate::text::one_line`]): the server's words are
/// printed by `register`, logged, and sent to systemd.
fn text(v: Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(crate::text::one_line(&s, 500)),
        _ => None,
    }
}

impl Problem {
    /// Parses either shape; `None` when the body is not a problem document.
    pub fn parse(body: &[u8]) -> Option<Self> {
        let fields: Fields = serde_json::from_slice(body).ok()?;
        let problem = match fields.detail {
            Some(Value::Object(inner)) => {
                let inner: Fields = serde_json::from_value(Value::Object(inner)).ok()?;
                Problem {
                    title: text(inner.title).or_else(|| text(fields.title)),
                    detail: text(inner.detail),
                }
            }
            detail => Problem {
                title: text(fields.title),
                detail: text(detail),
            },
        };
        (problem.title.is_some() || problem.detail.is_some()).then_some(problem)
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.title, &self.detail) {
            (Some(t), Some(d)) => write!(f, "{t}: {d}"),
            (Some(t), None) => f.write_str(t),
            (None, Some(d)) => f.write_str(d),
            (None, None) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_spec_shape() {
        let body = br#"{"detail":{"type":"https://api.exalsius.ai/errors/not-found","title":"Not Found","status":404,"detail":"The node with ID 123 was not found.","instance":"/nodes/123"}}"#;
        let p = Problem::parse(body).unwrap();
        assert_eq!(p.title.as_deref(), Some("Not Found"));
        assert_eq!(
            p.to_string(),
            "Not Found: The node with ID 123 was not found."
        );
    }

    #[test]
    fn flat_rfc9457_shape() {
        let body = br#"{"type":"about:blank","title":"Too Many Requests","status":429,"detail":"slow down"}"#;
        let p = Problem::parse(body).unwrap();
        assert_eq!(p.to_string(), "Too Many Requests: slow down");
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(Problem::parse(b"<html>bad gateway</html>"), None);
        assert_eq!(Problem::parse(b"{}"), None);
        assert_eq!(Problem::parse(b"[1,2]"), None);
        assert_eq!(Problem::parse(br#"{"detail": 5}"#), None);
        assert_eq!(Problem::parse(b""), None);
    }
}
