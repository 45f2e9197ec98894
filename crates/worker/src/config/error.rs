//! Why a configuration is refused: the error type, and the range check every number goes
//! through (shared by [`super::validate`] and [`super::kind_keys`]).

use std::path::{Path, PathBuf};

/// A configuration the worker refuses to start with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {reason}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The TOML is malformed, has an unknown key, or a value of the wrong type or format.
    #[error("invalid config: {0}")]
    Parse(String),
    /// A value is outside its limit.
    #[error("invalid config: `{key}` = {value}: {limit}")]
    OutOfRange {
        /// Dotted key, e.g. `handlers.classify.max_concurrency`.
        key: String,
        /// The value as written.
        value: String,
        /// The rule it breaks.
        limit: String,
    },
    /// A value from an environment variable is refused: the variable, and why.
    #[error("{var}: {source}")]
    FromEnv {
        /// The variable.
        var: String,
        /// The error.
        source: Box<ConfigError>,
    },
    /// The same error, with the file it came from.
    #[error("{path}: {source}")]
    InFile {
        /// The file.
        path: PathBuf,
        /// The error.
        source: Box<ConfigError>,
    },
}

impl ConfigError {
    pub(super) fn in_file(self, path: &Path) -> Self {
        Self::InFile {
            path: path.to_path_buf(),
            source: Box::new(self),
        }
    }

    /// A value outside `[min, max]`.
    pub fn range(key: impl Into<String>, value: impl ToString, min: u64, max: u64) -> Self {
        Self::OutOfRange {
            key: key.into(),
            value: value.to_string(),
            limit: format!("must be between {min} and {max}"),
        }
    }
}

pub(super) fn check(key: &str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::range(key, value, min, max))
    }
}
