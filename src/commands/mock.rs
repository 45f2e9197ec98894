//! `mock-queue`: the mock job API alone, for several `serve` workers to share.

use std::time::Duration;

use tokio::net::TcpListener;

use crate::mock_queue::{router, MockState};
use crate::secret::ApiKey;

/// Serves the mock until SIGTERM/SIGINT.
pub async fn mock_queue(host: &str, port: u16, api_key: Option<String>, long_poll_s: u64) -> i32 {
    let listener = match TcpListener::bind((host, port)).await {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("cannot listen on {host}:{port}: {e}");
            return 1;
        }
    };
    let key = api_key.filter(|k| !k.is_empty()).map(ApiKey::new);
    if key.is_none() {
        tracing::warn!(
            "no --api-key and no RUNPOD_AI_API_KEY: the mock accepts requests without a key"
        );
    }
    let state = std::sync::Arc::new(MockState::new(key, Duration::from_secs(long_poll_s)));
    if let Ok(addr) = listener.local_addr() {
        println!("listening on http://{addr}");
    }
    let stop = crate::shutdown::signal_token();
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    match served {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!("mock queue stopped: {e}");
            1
        }
    }
}
