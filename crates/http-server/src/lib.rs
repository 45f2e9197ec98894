//! The HTTP/1 server of the mock queue and of the worker's own endpoints: axum's router on
//! hyper connections that have a timer, so a connection that stalls in its request head is
//! closed after `header_read_timeout` (`axum::serve` has no timer, and such a connection would
//! stay open for good: the worker's port faces the network on the platform).

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pause after a failed accept (out of file descriptors, say), so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Serves `app` on `listener` until `stop`, then lets the requests in flight finish.
pub async fn serve_http1(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("HTTP server: accept failed: {e}");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Answers are small and each is a whole response: send them at once rather than let
        // Nagle's algorithm hold a response's tail for the client's delayed ACK.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!("HTTP server: TCP_NODELAY not set: {e}");
        }
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                // A client that went away, or one that stalled in its headers.
                tracing::debug!("HTTP server: connection ended: {e}");
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}
