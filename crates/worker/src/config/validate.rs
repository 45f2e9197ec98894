//! Validation of a parsed [`Config`]: every limit is stated in the message that enforces it.

use super::error::{check, ConfigError};
use super::{Config, Size};

/// Kinds of handler this build knows how to construct.
pub(crate) const HANDLER_KINDS: &[&str] = &["echo", "extract", "classify", "torchscript"];

const MAX_CONCURRENCY: u64 = 1024;
/// Bounds of `max_job_size` and `max_result_size`: room for an error result, and no more than
/// a worker should hold in memory per message.
const MIN_MESSAGE_SIZE: u64 = 16_000;
const MAX_MESSAGE_SIZE: u64 = 1_000_000_000;
const ONE_DAY_S: u64 = 86_400;
const SEVEN_DAYS_S: u64 = 7 * ONE_DAY_S;

pub(super) fn validate(config: &Config) -> Result<(), ConfigError> {
    let h = &config.handler;
    check(
        "handler.max_concurrency",
        h.max_concurrency.into(),
        1,
        MAX_CONCURRENCY,
    )?;
    check("handler.timeout", h.timeout, 1, ONE_DAY_S)?;
    check(
        "handler.execution_timeout",
        h.execution_timeout,
        1,
        SEVEN_DAYS_S,
    )?;
    check(
        "handler.local_queue_max_wait_s",
        h.local_queue_max_wait_s,
        0,
        ONE_DAY_S,
    )?;
    check("handler.drain_grace_s", h.drain_grace_s, 0, ONE_DAY_S)?;
    check(
        "handler.max_consecutive_ooms",
        h.max_consecutive_ooms.into(),
        1,
        1000,
    )?;
    check(
        "handler.progress_interval_ms",
        h.progress_interval_ms,
        0,
        3_600_000,
    )?;
    let factor = h.recycle_memory_factor;
    if !(factor == 0.0 || (1.5..=100.0).contains(&factor)) {
        return Err(ConfigError::OutOfRange {
            key: "handler.recycle_memory_factor".into(),
            value: factor.to_string(),
            limit: "0 (off) or from 1.5 to 100".into(),
        });
    }
    if h.gpu_memory_per_request.bytes() == 0 {
        return Err(ConfigError::OutOfRange {
            key: "handler.gpu_memory_per_request".into(),
            value: format!("{:?}", h.gpu_memory_per_request.to_string()),
            limit: "must be more than 0".into(),
        });
    }

    if let Some(model) = &h.model {
        super::ModelRef::parse(model).map_err(|_| ConfigError::OutOfRange {
            key: "handler.model".into(),
            value: format!("{model:?}"),
            limit: format!("must be {}", super::model_source::MODEL_FORM),
        })?;
    }

    let b = &config.batching;
    check("batching.max_batch_rows", b.max_batch_rows as u64, 1, 4096)?;
    if let Some(tokens) = b.max_batch_tokens {
        check("batching.max_batch_tokens", tokens as u64, 16, 4_194_304)?;
    }
    check(
        "batching.max_batch_delay_us",
        b.max_batch_delay_us,
        0,
        1_000_000,
    )?;

    let q = &config.queue;
    check(
        "queue.empty_poll_floor_ms",
        q.empty_poll_floor_ms,
        0,
        60_000,
    )?;
    check("queue.backoff_initial_ms", q.backoff_initial_ms, 1, 60_000)?;
    check(
        "queue.backoff_max_ms",
        q.backoff_max_ms,
        q.backoff_initial_ms,
        600_000,
    )?;
    check("queue.rate_limited_wait_s", q.rate_limited_wait_s, 0, 600)?;
    check("queue.long_poll_timeout_s", q.long_poll_timeout_s, 1, 600)?;
    check(
        "queue.take_answer_grace_ms",
        q.take_answer_grace_ms,
        0,
        10_000,
    )?;
    check("queue.delivery_retry_s", q.delivery_retry_s, 0, ONE_DAY_S)?;
    check(
        "queue.max_results_in_delivery",
        q.max_results_in_delivery as u64,
        1,
        100_000,
    )?;
    check(
        "queue.max_result_bytes_in_delivery",
        q.max_result_bytes_in_delivery.bytes(),
        1024 * 1024,
        1 << 40,
    )?;

    let g = &config.gpu;
    check("gpu.simulate_devices", g.simulate_devices as u64, 1, 16)?;
    check("gpu.sample_interval_ms", g.sample_interval_ms, 10, 60_000)?;
    check("gpu.retry_after_min_s", g.retry_after_min_s, 1, 3600)?;
    check(
        "gpu.retry_after_max_s",
        g.retry_after_max_s,
        g.retry_after_min_s,
        3600,
    )?;
    check(
        "gpu.footprint_min_samples",
        g.footprint_min_samples as u64,
        1,
        64,
    )?;
    check(
        "gpu.grow_after_successes",
        g.grow_after_successes.into(),
        1,
        10_000,
    )?;
    if !(50.0..=100.0).contains(&g.footprint_percentile)
        || !(0.0..=2.0).contains(&g.footprint_margin)
    {
        return Err(ConfigError::OutOfRange {
            key: "gpu.footprint_percentile / gpu.footprint_margin".into(),
            value: format!("{} / {}", g.footprint_percentile, g.footprint_margin),
            limit: "the percentile must be between 50 and 100, the margin between 0 and 2".into(),
        });
    }

    check(
        "server.max_waiting",
        config.server.max_waiting as u64,
        0,
        100_000,
    )?;
    let host = config.server.host.trim();
    if host != "localhost" && host.parse::<std::net::IpAddr>().is_err() {
        return Err(ConfigError::OutOfRange {
            key: "server.host".into(),
            value: format!("{:?}", config.server.host),
            limit: "must be an IP address such as 127.0.0.1 or 0.0.0.0, or localhost".into(),
        });
    }
    for (key, size) in [
        ("queue.max_job_size", q.max_job_size),
        ("queue.max_result_size", q.max_result_size),
    ] {
        if !(MIN_MESSAGE_SIZE..=MAX_MESSAGE_SIZE).contains(&size.bytes()) {
            return Err(ConfigError::OutOfRange {
                key: key.into(),
                value: format!("{:?}", size.to_string()),
                limit: format!(
                    "must be between {} (an error result must fit) and {}",
                    Size::from_bytes(MIN_MESSAGE_SIZE),
                    Size::from_bytes(MAX_MESSAGE_SIZE)
                ),
            });
        }
    }

    if let Some(total) = config.gpu.simulate {
        if total <= config.gpu.headroom {
            return Err(ConfigError::OutOfRange {
                key: "gpu.simulate".into(),
                value: format!("{:?}", total.to_string()),
                limit: format!("must be larger than gpu.headroom ({})", config.gpu.headroom),
            });
        }
        validate_budget(config, total, config.declared_model_memory())?;
    }

    if config.handlers.is_empty() {
        return Err(ConfigError::OutOfRange {
            key: "handlers".into(),
            value: "{}".into(),
            limit: "at least one [handlers.<name>] table is needed".into(),
        });
    }
    if let Some(name) = &config.handler.openai_handler {
        let kind = config.handlers.get(name).map(|h| h.kind(name));
        if kind != Some("extract") {
            return Err(ConfigError::OutOfRange {
                key: "handler.openai_handler".into(),
                value: format!("{name:?}"),
                limit: "the name of an extract handler".into(),
            });
        }
    }
    for (name, handler) in &config.handlers {
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid_name {
            return Err(ConfigError::OutOfRange {
                key: format!("handlers.{name}"),
                value: format!("{name:?}"),
                limit: "handler names use only letters, digits, '_' and '-'".into(),
            });
        }
        let kind = handler.kind(name);
        if !HANDLER_KINDS.contains(&kind) {
            return Err(ConfigError::OutOfRange {
                key: format!("handlers.{name}.kind"),
                value: format!("{kind:?}"),
                limit: format!("must be one of {}", HANDLER_KINDS.join(", ")),
            });
        }
        check(
            &format!("handlers.{name}.max_concurrency"),
            handler.max_concurrency.into(),
            1,
            MAX_CONCURRENCY,
        )?;
        super::kind_keys::validate_kind_keys(name, kind, handler)?;
        if let Some(model_memory) = handler.model_memory {
            if handler.device != super::DeviceChoice::Cuda {
                return Err(ConfigError::OutOfRange {
                    key: format!("handlers.{name}.model_memory"),
                    value: format!("{:?}", model_memory.to_string()),
                    limit: "only handlers on device = \"cuda\" hold GPU memory".into(),
                });
            }
            if model_memory.bytes() == 0 {
                return Err(ConfigError::OutOfRange {
                    key: format!("handlers.{name}.model_memory"),
                    value: "\"0B\"".into(),
                    limit: "must be more than 0 (leave it out for a model of no size)".into(),
                });
            }
        }
        if handler.gpu_memory == Some(Size::default()) {
            return Err(ConfigError::OutOfRange {
                key: format!("handlers.{name}.gpu_memory"),
                value: "\"0B\"".into(),
                limit:
                    "must be more than 0 (use device = \"cpu\" for a handler without GPU memory)"
                        .into(),
            });
        }
    }
    Ok(())
}

/// A reservation larger than a device's budget (total minus headroom) less the models'
/// `resident` memory can never be admitted: refuse to start rather than fail every such job
/// later. `resident` is what the models hold for good (declared, estimated or measured).
pub fn validate_budget(config: &Config, total: Size, resident: u64) -> Result<(), ConfigError> {
    let budget = total.bytes().saturating_sub(config.gpu.headroom.bytes());
    if resident > budget {
        return Err(ConfigError::OutOfRange {
            key: "handlers.*.model_memory".into(),
            value: format!("{:?}", Size::from_bytes(resident).to_string()),
            limit: format!(
                "the models alone do not fit the GPU budget of {} ({} total minus {} headroom)",
                Size::from_bytes(budget).approx(),
                total,
                config.gpu.headroom
            ),
        });
    }
    let room = budget - resident;
    for (name, handler) in &config.handlers {
        let reservation = handler.reservation(&config.handler, true);
        // `"all"` fits whatever room there is, as long as there is some.
        let too_large = match reservation.is_whole_budget() {
            true => room == 0,
            false => reservation.bytes() > room,
        };
        if too_large {
            let key = match handler.gpu_memory {
                Some(_) => format!("handlers.{name}.gpu_memory"),
                None => "handler.gpu_memory_per_request".to_owned(),
            };
            let models = if resident > 0 {
                format!(
                    ", less {} for the models",
                    Size::from_bytes(resident).approx()
                )
            } else {
                String::new()
            };
            return Err(ConfigError::OutOfRange {
                key,
                value: format!("{:?}", reservation.to_string()),
                limit: format!(
                    "one {name} job would not fit the GPU budget of {} ({} total minus {} \
                     headroom{models})",
                    Size::from_bytes(room).approx(),
                    total,
                    config.gpu.headroom
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::from_toml(text).unwrap_err().to_string()
    }

    #[test]
    fn a_reservation_of_all_is_the_whole_budget_and_only_reservations_take_it() {
        let config = Config::from_toml(
            "[handler]\ngpu_memory_per_request = \"all\"\n\
             [handlers.classify]\nmax_concurrency = 1\ndevice = \"cuda\"\ngpu_memory = \"all\"\n",
        )
        .unwrap();
        assert!(config.handler.gpu_memory_per_request.is_whole_budget());
        let classify = &config.handlers["classify"];
        assert!(classify
            .reservation(&config.handler, true)
            .is_whole_budget());
        assert_eq!(classify.reservation(&config.handler, true).within(7), 7);
        // It fits any GPU with room for a job, and says "all" when written back.
        validate_budget(&config, Size::gb(24), Size::gb(2).bytes()).unwrap();
        let written = toml::to_string(&config).unwrap();
        assert!(written.contains("gpu_memory = \"all\""), "{written}");
        assert_eq!(Config::from_toml(&written).unwrap(), config);
        // Not a size anywhere else.
        let msg = err("[gpu]\nheadroom = \"all\"\n");
        assert!(msg.contains("headroom"), "{msg}");
        // A size larger than the budget is still refused (the seed's "24GB" on a 24 GB card).
        let seed = Config::from_toml("[handler]\ngpu_memory_per_request = \"24GB\"\n").unwrap();
        assert!(validate_budget(&seed, Size::gb(24), 0).is_err());
    }

    #[test]
    fn the_environment_overrides_where_the_worker_listens() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let config = Config::default()
            .with_env_overrides(env(&[
                (super::super::HOST_ENV, "0.0.0.0"),
                (super::super::PORT_ENV, "9090"),
            ]))
            .unwrap();
        assert_eq!(
            (config.server.host.as_str(), config.server.port),
            ("0.0.0.0", 9090)
        );
        let untouched = Config::default().with_env_overrides(env(&[])).unwrap();
        assert_eq!(untouched.server, Config::default().server);
        let bad_port = Config::default()
            .with_env_overrides(env(&[(super::super::PORT_ENV, "80000")]))
            .unwrap_err()
            .to_string();
        assert!(bad_port.contains("RUNPOD_WORKER_PORT"), "{bad_port}");
        let bad_host = Config::default()
            .with_env_overrides(env(&[(super::super::HOST_ENV, "not a host!")]))
            .unwrap_err()
            .to_string();
        assert!(bad_host.contains("server.host"), "{bad_host}");
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn unknown_key_is_refused_with_its_name() {
        let msg = err("[handler]\nmax_concurency = 4\n");
        assert!(msg.contains("max_concurency"), "{msg}");
        let msg = err("[handlers.echo]\nmax_concurrency = 1\ndevice = \"cpu\"\ncolour = 1\n");
        assert!(msg.contains("colour"), "{msg}");
    }

    #[test]
    fn bad_size_is_refused_with_the_key_and_the_expected_form() {
        let msg = err("[handler]\ngpu_memory_per_request = \"6\"\n");
        assert!(msg.contains("gpu_memory_per_request"), "{msg}");
        assert!(msg.contains("no unit"), "{msg}");
        let msg = err("[gpu]\nsimulate = \"24 parsecs\"\n");
        assert!(
            msg.contains("simulate") && msg.contains("not a size"),
            "{msg}"
        );
    }

    #[test]
    fn out_of_range_values_name_the_key_and_the_limit() {
        let msg = err("[handler]\nmax_concurrency = 0\n");
        assert!(msg.contains("`handler.max_concurrency` = 0"), "{msg}");
        assert!(msg.contains("between 1 and 1024"), "{msg}");
        let msg = err("[handlers.x]\nkind = \"echo\"\nmax_concurrency = 5000\ndevice = \"cpu\"\n");
        assert!(msg.contains("handlers.x.max_concurrency"), "{msg}");
    }

    #[test]
    fn hosts_that_cannot_be_bound_and_message_sizes_without_room_are_refused() {
        let msg = err("[server]\nhost = \"not a host\"\n");
        assert!(msg.contains("server.host"), "{msg}");
        assert!(Config::from_toml("[server]\nhost = \"0.0.0.0\"\n").is_ok());
        assert!(Config::from_toml("[server]\nhost = \"::1\"\n").is_ok());
        let msg = err("[queue]\nmax_result_size = \"10B\"\n");
        assert!(
            msg.contains("queue.max_result_size") && msg.contains("error result must fit"),
            "{msg}"
        );
        let msg = err("[queue]\nmax_job_size = \"99999999999999999999TB\"\n");
        assert!(
            msg.contains("max_job_size") && msg.contains("over"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_handler_kind_lists_the_known_ones() {
        let msg = err("[handlers.llm]\nmax_concurrency = 1\ndevice = \"cuda\"\n");
        assert!(
            msg.contains("handlers.llm.kind") && msg.contains("echo, extract"),
            "{msg}"
        );
    }

    #[test]
    fn reservation_larger_than_the_simulated_budget_is_refused() {
        let msg = err("[gpu]\nsimulate = \"8GB\"\nheadroom = \"1GB\"\n[handlers.classify]\nmax_concurrency = 1\ndevice = \"cuda\"\ngpu_memory = \"24GB\"\n");
        assert!(msg.contains("handlers.classify.gpu_memory"), "{msg}");
        assert!(msg.contains("7.0GB"), "{msg}");
    }

    #[test]
    fn declared_model_memory_leaves_less_of_the_simulated_budget() {
        let gpu = "[gpu]\nsimulate = \"24GB\"\nheadroom = \"1GB\"\n";
        let classify =
            "[handlers.classify]\nmax_concurrency = 1\ndevice = \"cuda\"\ngpu_memory = \"6GB\"\n";
        assert!(Config::from_toml(&format!("{gpu}{classify}model_memory = \"14GB\"\n")).is_ok());
        let msg = err(&format!("{gpu}{classify}model_memory = \"20GB\"\n"));
        assert!(
            msg.contains("handlers.classify.gpu_memory")
                && msg.contains("less 20.0GB for the models"),
            "{msg}"
        );
        let msg = err(&format!("{gpu}{classify}model_memory = \"30GB\"\n"));
        assert!(msg.contains("models alone do not fit"), "{msg}");
        let msg = err(
            "[handlers.extract]\nmax_concurrency = 1\ndevice = \"cpu\"\nmodel_memory = \"1GB\"\n",
        );
        assert!(msg.contains("handlers.extract.model_memory"), "{msg}");
    }

    #[test]
    fn cpu_handlers_reserve_nothing_and_gpu_handlers_inherit_the_default() {
        let config = Config::default();
        let extract = &config.handlers["extract"];
        let classify = &config.handlers["classify"];
        assert_eq!(extract.reservation(&config.handler, true).bytes(), 0);
        assert_eq!(classify.reservation(&config.handler, true), Size::gb(6));
        assert_eq!(classify.reservation(&config.handler, false).bytes(), 0);
    }

    #[test]
    fn the_annotated_example_at_the_repo_root_equals_the_defaults() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../runpod.toml");
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(Config::from_toml(&text).unwrap(), Config::default());
    }
}
