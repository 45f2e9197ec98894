//! The API key, in a type that never prints itself.

use std::fmt;

/// An API key. `Debug` and `Display` print `[redacted]`, so a key that reaches a log line or an
/// error message by accident is not leaked; [`ApiKey::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key, without the spaces around it (a header value cannot carry them, so a key
    /// set as `' key '` would otherwise match no request).
    pub fn new(key: impl Into<String>) -> Self {
        let key = key.into();
        Self(key.trim().to_owned())
    }

    /// The key itself, for the `Authorization` header and the start-up banner of `local`.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether no key was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an `Authorization` header value carries this key, raw (the SDK worker) or as
    /// `Bearer KEY` (the SDK client).
    pub fn matches_header(&self, header: &str) -> bool {
        let header = header.trim();
        // The scheme's name is case-insensitive (RFC 9110 §11.1): `bearer KEY` is `Bearer KEY`.
        let presented = match header.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            _ => header,
        };
        !self.0.is_empty() && presented == self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_never_formats_itself() {
        let key = ApiKey::new("sk-secret-123");
        assert!(!format!("{key:?} {key}").contains("sk-secret-123"));
    }

    #[test]
    fn header_matches_raw_and_bearer_but_not_other_keys() {
        let key = ApiKey::new("k1");
        assert!(key.matches_header("k1"));
        assert!(key.matches_header("Bearer k1"));
        assert!(!key.matches_header("Bearer k2"));
        assert!(!key.matches_header(""));
        assert!(!ApiKey::default().matches_header(""));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let key = ApiKey::new("k1");
        for header in ["bearer k1", "BEARER k1", "Bearer  k1 "] {
            assert!(key.matches_header(header), "{header}");
        }
        assert!(!key.matches_header("Basic k1"));
    }

    #[test]
    fn spaces_around_a_key_are_not_part_of_it() {
        let key = ApiKey::new(" spaced key ");
        assert_eq!(key.expose(), "spaced key");
        assert!(key.matches_header("Bearer spaced key"));
        assert!(key.matches_header("spaced key"));
    }
}
