//! Load-balancing mode: the platform's load balancer sends requests straight to the worker's
//! own HTTP server, with no queue in between and no retry. The routes ([`routes`]) run each
//! request as a job through the same admission as a taken job (handler limits,
//! `max_concurrency`, the memory ledger) and answer `429` with `Retry-After` where the queue
//! mode would answer the retry signal; `/ping` on `PORT_HEALTH` tells the balancer when the
//! worker can take requests (204 while it loads, 200 ready, 503 draining or unhealthy).

mod request;
mod routes;

use std::sync::Arc;

pub use routes::{health_router, router, Gate};

/// Where a load-balancing worker listens: the platform's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports {
    /// Bind address: `RUNPOD_WORKER_HOST`, else every interface (the balancer is elsewhere).
    pub host: String,
    /// `PORT`: the requests (and `/health`, `/metrics`, and the ping when it is also
    /// `PORT_HEALTH`).
    pub port: u16,
    /// `PORT_HEALTH`: the balancer's ping.
    pub health_port: u16,
    /// `HEALTH_CHECK_PATH`: the ping's path (`/ping` is always served too).
    pub health_path: String,
}

/// Routes the worker serves itself, which the ping's path must not take.
const OWN_ROUTES: [&str; 5] = ["/health", "/ready", "/metrics", "/runsync", "/stream"];

/// The platform's default for both ports.
const DEFAULT_PORT: u16 = 80;

impl Ports {
    /// Reads `PORT`, `PORT_HEALTH`, `HEALTH_CHECK_PATH` and `RUNPOD_WORKER_HOST` through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let port_of = |name: &str| match var(name).filter(|v| !v.trim().is_empty()) {
            None => Ok(DEFAULT_PORT),
            Some(text) => text
                .trim()
                .parse::<u16>()
                .map_err(|_| format!("{name}={text:?} is not a port number (0 to 65535)")),
        };
        let health_path = var("HEALTH_CHECK_PATH")
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/ping".to_owned());
        if !health_path.starts_with('/') || health_path.contains(['{', '}', '*', '?', '#', ':']) {
            return Err(format!(
                "HEALTH_CHECK_PATH={health_path:?} must be a plain path starting with '/', \
                 such as /ping"
            ));
        }
        let taken = OWN_ROUTES
            .iter()
            .any(|own| health_path == *own || health_path.starts_with("/v1/"));
        if taken {
            return Err(format!(
                "HEALTH_CHECK_PATH={health_path:?} is one of the worker's own routes ({}, \
                 /v1/...): choose another path, such as /ping",
                OWN_ROUTES.join(", ")
            ));
        }
        Ok(Self {
            host: var("RUNPOD_WORKER_HOST")
                .filter(|h| !h.trim().is_empty())
                .unwrap_or_else(|| "0.0.0.0".to_owned()),
            port: port_of("PORT")?,
            health_port: port_of("PORT_HEALTH")?,
            health_path,
        })
    }

    /// Whether one listener serves the requests and the ping.
    pub fn shared(&self) -> bool {
        self.port == self.health_port
    }
}

/// Whether the environment asks for load-balancing mode: `PORT` is set and no job queue is
/// named (`RUNPOD_WEBHOOK_GET_JOB`), as on a load-balancing endpoint.
pub fn chosen_by(var: impl Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    set("PORT") && !set("RUNPOD_WEBHOOK_GET_JOB")
}

/// What the routes hand requests to once the worker has started: empty while it loads (the
/// routes answer 503 "starting" then, and the ping 204).
pub type SubmitterSlot = Arc<std::sync::OnceLock<crate::runner::Submitter>>;

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(vars: &[(&str, &str)]) -> Result<Ports, String> {
        Ports::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn the_mode_follows_port_without_a_queue() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        assert!(chosen_by(env(&[("PORT", "80")])));
        assert!(!chosen_by(env(&[])));
        assert!(!chosen_by(env(&[
            ("PORT", "80"),
            ("RUNPOD_WEBHOOK_GET_JOB", "http://q/$ID")
        ])));
    }

    #[test]
    fn both_ports_default_to_80_on_every_interface() {
        let p = ports(&[]).unwrap();
        assert_eq!(
            (p.port, p.health_port, p.host.as_str()),
            (80, 80, "0.0.0.0")
        );
        assert_eq!(p.health_path, "/ping");
        assert!(p.shared());
    }

    #[test]
    fn the_platform_variables_are_read_and_checked() {
        let p = ports(&[
            ("PORT", "5000"),
            ("PORT_HEALTH", "5001"),
            ("HEALTH_CHECK_PATH", "/up"),
        ])
        .unwrap();
        assert_eq!(
            (p.port, p.health_port, p.health_path.as_str()),
            (5000, 5001, "/up")
        );
        assert!(!p.shared());
        let bad = ports(&[("PORT", "http")]).unwrap_err();
        assert!(bad.contains("PORT=\"http\""), "{bad}");
        for path in [
            "ping",
            "/:x",
            "/health",
            "/metrics",
            "/runsync",
            "/v1/models",
        ] {
            let bad = ports(&[("HEALTH_CHECK_PATH", path)]).unwrap_err();
            assert!(bad.contains("HEALTH_CHECK_PATH"), "{bad}");
        }
        let ping = ports(&[("HEALTH_CHECK_PATH", "/ping")]).unwrap();
        assert_eq!(ping.health_path, "/ping");
    }
}
