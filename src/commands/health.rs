//! `health`: a probe for a container's `HEALTHCHECK`, so the image needs no curl. It asks the
//! worker's `/ready` where the config says the worker listens (on `PORT` in load-balancing mode).

use std::path::Path;
use std::time::Duration;

use worker::config::{Config, ServerConfig};
use worker::load_balancing;

/// How long the probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The `/ready` URL of a worker listening as `server` says (a wildcard address is reached on
/// loopback).
pub fn ready_url(server: &ServerConfig) -> String {
    let host = match server.host.as_str() {
        "0.0.0.0" | "" => "127.0.0.1".to_owned(),
        "::" | "[::]" => "[::1]".to_owned(),
        host if host.contains(':') && !host.starts_with('[') => format!("[{host}]"),
        host => host.to_owned(),
    };
    format!("http://{host}:{}/ready", server.port)
}

/// Exit 0 when `/ready` answers 200, 1 otherwise (saying why on stderr).
pub async fn health(config_path: Option<&Path>, url: Option<&str>) -> i32 {
    let env = |name: &str| std::env::var(name).ok();
    let url = match url {
        Some(url) => url.to_owned(),
        // A load-balancing worker serves `/ready` on `PORT`.
        None if load_balancing::chosen_by(env) => match load_balancing::Ports::from_vars(env) {
            Ok(ports) => ready_url(&ServerConfig {
                host: ports.host,
                port: ports.port,
                ..ServerConfig::default()
            }),
            Err(e) => {
                eprintln!("{e}");
                return 1;
            }
        },
        None => match Config::load(config_path) {
            Ok((config, _)) => ready_url(&config.server),
            Err(e) => {
                eprintln!("{e}");
                return 1;
            }
        },
    };
    let client = match reqwest::Client::builder()
        .timeout(PROBE_TIMEOUT)
        .no_proxy()
        .build()
    {
        Ok(client) => client,
        Err(e) => {
            eprintln!("cannot build an HTTP client: {e}");
            return 1;
        }
    };
    match client.get(&url).send().await {
        Ok(response) if response.status().is_success() => {
            println!("ready ({url})");
            0
        }
        Ok(response) => {
            let status = response.status().as_u16();
            let phase = response.text().await.unwrap_or_default();
            eprintln!("not ready ({url}): {status} {}", phase.trim());
            1
        }
        Err(e) => {
            eprintln!("no answer from {url}: {}", e.without_url());
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_addresses_are_probed_on_loopback() {
        let at = |host: &str| {
            ready_url(&ServerConfig {
                host: host.into(),
                port: 8080,
                ..ServerConfig::default()
            })
        };
        assert_eq!(at("0.0.0.0"), "http://127.0.0.1:8080/ready");
        assert_eq!(at("::"), "http://[::1]:8080/ready");
        assert_eq!(at("10.0.0.5"), "http://10.0.0.5:8080/ready");
        assert_eq!(at("fd00::1"), "http://[fd00::1]:8080/ready");
    }
}
