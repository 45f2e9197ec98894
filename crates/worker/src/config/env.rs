//! The environment variables that override keys of the file: an image bakes its config, and an
//! endpoint's environment (the Hub's listing sets these) adjusts it. Applied after the file and
//! before validation, so a value out of range is refused like one written in the file, with
//! the variable named. An empty variable is ignored (a form field left blank).

use std::path::PathBuf;

use super::error::ConfigError;
use super::{model_source, Config, Size};

/// Overrides `[server] host`.
pub const HOST_ENV: &str = "RUNPOD_WORKER_HOST";
/// Overrides `[server] port`.
pub const PORT_ENV: &str = "RUNPOD_WORKER_PORT";
/// Overrides `[handler] model`: the Hugging Face repository the models come from.
pub const MODEL_NAME_ENV: &str = "MODEL_NAME";

/// One variable, the key it overrides, and how its text becomes that key's value (`Err`: what
/// the text must be).
pub struct EnvOverride {
    /// The variable.
    pub var: &'static str,
    /// The dotted key it overrides.
    pub key: &'static str,
    apply: fn(&mut Config, &str) -> Result<(), &'static str>,
}

/// Every override, in the order they are applied.
pub const ENV_OVERRIDES: &[EnvOverride] = &[
    EnvOverride {
        var: HOST_ENV,
        key: "server.host",
        apply: |c, v| {
            c.server.host = v.to_owned();
            Ok(())
        },
    },
    EnvOverride {
        var: PORT_ENV,
        key: "server.port",
        apply: |c, v| {
            c.server.port = v.parse().map_err(|_| "a port number from 0 to 65535")?;
            Ok(())
        },
    },
    EnvOverride {
        var: "RUNPOD_MODEL_DIR",
        key: "handler.model_dir",
        apply: |c, v| {
            c.handler.model_dir = PathBuf::from(v);
            Ok(())
        },
    },
    EnvOverride {
        var: MODEL_NAME_ENV,
        key: "handler.model",
        apply: |c, v| {
            model_source::ModelRef::parse(v).map_err(|_| model_source::MODEL_FORM)?;
            c.handler.model = Some(v.to_owned());
            Ok(())
        },
    },
    EnvOverride {
        var: "RUNPOD_MAX_CONCURRENCY",
        key: "handler.max_concurrency",
        apply: |c, v| {
            c.handler.max_concurrency = whole(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "RUNPOD_GPU_MEMORY_PER_REQUEST",
        key: "handler.gpu_memory_per_request",
        apply: |c, v| {
            c.handler.gpu_memory_per_request =
                super::reservation::parse(v).map_err(|_| SIZE_OR_ALL)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "RUNPOD_LOCAL_QUEUE_MAX_WAIT_S",
        key: "handler.local_queue_max_wait_s",
        apply: |c, v| {
            c.handler.local_queue_max_wait_s = whole(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "RUNPOD_EXECUTION_TIMEOUT",
        key: "handler.execution_timeout",
        apply: |c, v| {
            c.handler.execution_timeout = whole(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "RUNPOD_MAX_BATCH_ROWS",
        key: "batching.max_batch_rows",
        apply: |c, v| {
            c.batching.max_batch_rows = whole(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "RUNPOD_MAX_BATCH_TOKENS",
        key: "batching.max_batch_tokens",
        apply: |c, v| {
            c.batching.max_batch_tokens = Some(whole(v)?);
            Ok(())
        },
    },
    EnvOverride {
        var: "RUNPOD_MAX_BATCH_DELAY_US",
        key: "batching.max_batch_delay_us",
        apply: |c, v| {
            c.batching.max_batch_delay_us = whole(v)?;
            Ok(())
        },
    },
    EnvOverride {
        var: "RUNPOD_GPU_HEADROOM",
        key: "gpu.headroom",
        apply: |c, v| {
            c.gpu.headroom = v.parse::<Size>().map_err(|_| SIZE)?;
            Ok(())
        },
    },
];

const SIZE: &str = "a size with a unit, e.g. \"1GiB\" or \"512MB\"";
const SIZE_OR_ALL: &str = "a size with a unit, e.g. \"6GB\", or \"all\"";

fn whole<T: std::str::FromStr>(text: &str) -> Result<T, &'static str> {
    text.parse().map_err(|_| "a whole number")
}

impl Config {
    /// The file's values overridden by [`ENV_OVERRIDES`] where `var` has them, then validated;
    /// a refused value names the variable it came from.
    pub fn with_env_overrides(
        mut self,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut applied: Vec<&EnvOverride> = Vec::new();
        for knob in ENV_OVERRIDES {
            let Some(text) = var(knob.var).filter(|t| !t.trim().is_empty()) else {
                continue;
            };
            (knob.apply)(&mut self, text.trim()).map_err(|must_be| ConfigError::OutOfRange {
                key: knob.var.into(),
                value: format!("{text:?}"),
                limit: format!("must be {must_be} (it sets {})", knob.key),
            })?;
            applied.push(knob);
        }
        self.validate().map_err(|error| {
            let from_env = match &error {
                ConfigError::OutOfRange { key, .. } => {
                    applied.iter().find(|knob| key.as_str() == knob.key)
                }
                _ => None,
            };
            match from_env {
                Some(knob) => ConfigError::FromEnv {
                    var: knob.var.to_owned(),
                    source: Box::new(error),
                },
                None => error,
            }
        })?;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    fn overridden(var: &str, value: &str) -> Result<Config, String> {
        Config::default()
            .with_env_overrides(env(&[(var, value)]))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn each_variable_overrides_its_key() {
        type Read = fn(&Config) -> String;
        let cases: &[(&str, &str, Read, &str)] = &[
            (
                "RUNPOD_MODEL_DIR",
                "/runpod-volume/models",
                |c| c.handler.model_dir.display().to_string(),
                "/runpod-volume/models",
            ),
            (
                "MODEL_NAME",
                "org/name:v2",
                |c| format!("{:?}", c.handler.model),
                "Some(\"org/name:v2\")",
            ),
            (
                "RUNPOD_MAX_CONCURRENCY",
                "7",
                |c| c.handler.max_concurrency.to_string(),
                "7",
            ),
            (
                "RUNPOD_GPU_MEMORY_PER_REQUEST",
                "10GB",
                |c| c.handler.gpu_memory_per_request.to_string(),
                "10GB",
            ),
            (
                "RUNPOD_GPU_MEMORY_PER_REQUEST",
                "all",
                |c| {
                    c.handler
                        .gpu_memory_per_request
                        .is_whole_budget()
                        .to_string()
                },
                "true",
            ),
            (
                "RUNPOD_LOCAL_QUEUE_MAX_WAIT_S",
                "5",
                |c| c.handler.local_queue_max_wait_s.to_string(),
                "5",
            ),
            (
                "RUNPOD_EXECUTION_TIMEOUT",
                "600",
                |c| c.handler.execution_timeout.to_string(),
                "600",
            ),
            (
                "RUNPOD_MAX_BATCH_ROWS",
                "16",
                |c| c.batching.max_batch_rows.to_string(),
                "16",
            ),
            (
                "RUNPOD_MAX_BATCH_TOKENS",
                "8192",
                |c| format!("{:?}", c.batching.max_batch_tokens),
                "Some(8192)",
            ),
            (
                "RUNPOD_MAX_BATCH_DELAY_US",
                "500",
                |c| c.batching.max_batch_delay_us.to_string(),
                "500",
            ),
            (
                "RUNPOD_GPU_HEADROOM",
                "2GiB",
                |c| c.gpu.headroom.bytes().to_string(),
                "2147483648",
            ),
            (
                "RUNPOD_WORKER_HOST",
                "0.0.0.0",
                |c| c.server.host.clone(),
                "0.0.0.0",
            ),
            (
                "RUNPOD_WORKER_PORT",
                "9090",
                |c| c.server.port.to_string(),
                "9090",
            ),
        ];
        for (var, value, read, expected) in cases {
            let config = overridden(var, value).unwrap();
            assert_eq!(read(&config), *expected, "{var}={value}");
            assert!(
                ENV_OVERRIDES.iter().any(|k| k.var == *var),
                "{var} is in the table"
            );
        }
        assert_eq!(
            ENV_OVERRIDES.len(),
            cases
                .iter()
                .map(|c| c.0)
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            "every variable has a case"
        );
    }

    #[test]
    fn a_bad_value_is_refused_with_the_variable_named() {
        let cases = [
            ("RUNPOD_MAX_CONCURRENCY", "many", "a whole number"),
            ("RUNPOD_MAX_CONCURRENCY", "0", "between 1 and 1024"),
            ("RUNPOD_EXECUTION_TIMEOUT", "-1", "a whole number"),
            ("RUNPOD_EXECUTION_TIMEOUT", "0", "handler.execution_timeout"),
            (
                "RUNPOD_LOCAL_QUEUE_MAX_WAIT_S",
                "86401",
                "between 0 and 86400",
            ),
            ("RUNPOD_GPU_MEMORY_PER_REQUEST", "6", "a size with a unit"),
            ("RUNPOD_GPU_HEADROOM", "lots", "a size with a unit"),
            ("RUNPOD_MAX_BATCH_ROWS", "0", "batching.max_batch_rows"),
            ("RUNPOD_MAX_BATCH_TOKENS", "8", "between 16 and"),
            (
                "RUNPOD_MAX_BATCH_DELAY_US",
                "2000000",
                "between 0 and 1000000",
            ),
            ("MODEL_NAME", "a/b/c", "org/name"),
            ("MODEL_NAME", "../etc", "org/name"),
            ("RUNPOD_WORKER_PORT", "80000", "a port number"),
            ("RUNPOD_WORKER_HOST", "not a host!", "server.host"),
        ];
        for (var, value, says) in cases {
            let error = overridden(var, value).unwrap_err();
            assert!(
                error.contains(var) && error.contains(says),
                "{var}={value}: {error}"
            );
        }
    }

    #[test]
    fn the_reference_lists_every_override_with_its_key() {
        let reference = include_str!("../../../../docs/configuration.md");
        for knob in ENV_OVERRIDES {
            let row = format!("| `{}` | `{}`", knob.var, knob.key);
            assert!(
                reference.contains(&row),
                "docs/configuration.md lacks {row}"
            );
        }
    }

    #[test]
    fn an_empty_variable_changes_nothing() {
        let config = Config::default()
            .with_env_overrides(env(&[("RUNPOD_MAX_CONCURRENCY", " "), ("MODEL_NAME", "")]))
            .unwrap();
        assert_eq!(config, Config::default());
    }
}
