//! `docs/configuration.md` names every key of the configuration, and only those: checked here
//! against the configuration types, so the reference cannot drift from the code.

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::PathBuf;

    use crate::config::{Config, DeviceChoice, HandlerConfig, Size};

    const REFERENCE: &str = include_str!("../../../../docs/configuration.md");

    /// A config with every optional key set. The handler table is written out field by
    /// field (no `..Default::default()`), so a new key does not compile until it is here.
    fn every_key() -> Config {
        let mut config = Config::default();
        config.handler.parser = Some(PathBuf::from("runpod-parse"));
        config.handler.openai_handler = Some("extract".to_owned());
        config.handler.model = Some("org/name".to_owned());
        config.gpu.simulate = Some(Size::gb(24));
        config.gpu.external_load_file = Some(PathBuf::from("load"));
        config.gpu.host_ledger_dir = Some(PathBuf::from("/dev/shm"));
        config.batching.max_batch_tokens = Some(8192);
        let size = Some(Size::gb(1));
        let table = HandlerConfig {
            kind: Some("classify".into()),
            max_concurrency: 1,
            device: DeviceChoice::Cuda,
            gpu_memory: size,
            model_memory: size,
            model: Some("m.pt".into()),
            labels: Some(vec!["a".into()]),
            temperature: Some(0.05),
            chunk_tokens: Some(200),
            overlap: Some(32),
            allow_private_urls: Some(false),
            max_document_size: size,
            url_timeout_s: Some(20),
            max_parse_memory: size,
            max_parse_cpu_s: Some(30),
            max_text_chars: Some(1000),
            max_pages: Some(10),
            inputs: Some(vec!["x".into()]),
            batch: Some(true),
            warm_up: Some(
                [(
                    "x".to_owned(),
                    crate::config::WarmUpInput {
                        shape: vec![1, 4],
                        dtype: Some("float32".into()),
                    },
                )]
                .into(),
            ),
        };
        config.handlers.clear();
        config.handlers.insert("some".into(), table);
        config
    }

    /// Dotted keys of a TOML table, handler names written `<name>` (a torchscript handler's
    /// `warm_up` is one key: its table is keyed by the model's input names).
    fn keys(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
        for (key, value) in table {
            let dotted = match prefix {
                "" => key.clone(),
                "handlers" => "handlers.<name>".to_owned(),
                prefix => format!("{prefix}.{key}"),
            };
            match value {
                toml::Value::Table(inner) if key != "warm_up" => keys(&dotted, inner, out),
                _ => {
                    out.insert(dotted);
                }
            }
        }
    }

    #[test]
    fn the_reference_names_every_key_and_no_other() {
        let table: toml::Table = toml::from_str(&toml::to_string(&every_key()).unwrap()).unwrap();
        let mut known = BTreeSet::new();
        keys("", &table, &mut known);
        assert!(
            known.contains("handlers.<name>.max_parse_memory"),
            "{known:?}"
        );
        let missing: Vec<&String> = known
            .iter()
            .filter(|key| !REFERENCE.contains(&format!("| `{key}` |")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/configuration.md lacks {missing:?}"
        );
        let documented: Vec<&str> = REFERENCE
            .lines()
            .filter_map(|line| line.strip_prefix("| `")?.split_once("` |"))
            .map(|(key, _)| key)
            .filter(|key| key.contains('.'))
            .collect();
        let unknown: Vec<&&str> = documented
            .iter()
            .filter(|key| !known.contains(**key))
            .collect();
        assert!(
            unknown.is_empty(),
            "docs/configuration.md names keys that do not exist: {unknown:?}"
        );
    }
}
