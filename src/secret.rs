//! A string that must never be printed: access tokens and register tokens.
//!
//! `Debug` and `Display` print `<redacted>`; the raw value is only reachable through
//! [`Secret::expose`], which the HTTP layer and the state file use and nothing else.

use sha2::{Digest, Sha256};
use std::fmt;

/// What every redacted value prints as.
pub const REDACTED: &str = "<redacted>";

/// A credential. Cloning is allowed (the loop and the state file both hold it); printing is not.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a raw value.
    pub fn new(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    /// The raw value, for the `Authorization` header and the state file only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Hex SHA-256 of the value: lets the state file remember *which* configured token it came
    /// from without storing that token.
    pub fn sha256_hex(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }

    /// True for an empty or whitespace-only value.
    pub fn is_blank(&self) -> bool {
        self.0.trim().is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_value() {
        let s = Secret::new("hunter2-token");
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(format!("{s:?}"), REDACTED);
        assert_eq!(format!("{:?}", Some(s.clone())), "Some(<redacted>)");
        assert_eq!(s.expose(), "hunter2-token");
    }

    #[test]
    fn sha256_is_stable_and_not_the_value() {
        let s = Secret::new("abc");
        assert_eq!(
            s.sha256_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
