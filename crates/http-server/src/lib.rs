//! The HTTP/1 server of the mock queue and of the worker's own endpoints: axum's router on
//! hyper connections that have a timer, so a connection that stalls in its request head is
//! closed after `header_read_timeout` (`axum::serve` has no timer, and such a connection would
//! stay open for good: the worker's port faces the network on the platform).
//!
//! Connections are capped by the process's file descriptors ([`connection_cap`]): past the cap,
//! a new connection is still served, but one request and closed, with a short header timer, so
//! a flood of idle keep-alive connections cannot take the descriptors that the worker's parser
//! children, URL fetches and model files need, and `/health` keeps answering under it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Pause after a failed accept (out of file descriptors, say), so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// How long a connection over the cap may take to send its request head.
const OVER_CAP_HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// The share of the process's descriptors one server's connections may hold (the rest stay in
/// reserve: the queue client, parser children, URL fetches, model files, a second server).
const CAP_SHARE: u64 = 4;

/// Connections a server keeps open at once: a quarter of the descriptors the process may open
/// (its soft `RLIMIT_NOFILE`, raised to the hard limit first), at least 16, at most 16,384.
pub fn connection_cap() -> usize {
    let limit = raise_open_files_limit();
    (limit / CAP_SHARE).clamp(16, 16_384) as usize
}

/// Raises the soft limit on open files to the hard limit (as servers do: the default soft
/// limit of 1,024 is a historical accident); the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = raised;
        }
    }
    limit.current.unwrap_or(u64::MAX)
}

/// Serves `app` on `listener` until `stop`, then lets the requests in flight finish.
pub async fn serve_http1(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    stop: CancellationToken,
) -> std::io::Result<()> {
    serve_http1_capped(listener, app, header_read_timeout, stop, connection_cap()).await
}

/// [`serve_http1`] with `cap` connections kept open at once: past it, each new connection is
/// served one request (with a short header timer) and closed.
pub async fn serve_http1_capped(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    stop: CancellationToken,
    cap: usize,
) -> std::io::Result<()> {
    let connections = TaskTracker::new();
    let open = Arc::new(AtomicUsize::new(0));
    let mut warned = false;
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
        let held = OpenConnection::new(&open);
        let over_cap = held.count > cap;
        if over_cap && !warned {
            warned = true;
            tracing::warn!(
                "HTTP server: {cap} connections open; until fewer are, each new one is served \
                 one request and closed"
            );
        } else if !over_cap {
            warned = false;
        }
        connections.spawn(async move {
            let _held = held;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new());
            if over_cap {
                builder
                    .keep_alive(false)
                    .header_read_timeout(header_read_timeout.min(OVER_CAP_HEADER_TIMEOUT));
            } else {
                builder.header_read_timeout(header_read_timeout);
            }
            let connection = builder.serve_connection(TokioIo::new(stream), service);
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
    // Responses in flight are written; a client that stopped reading (or an event stream
    // that never ends) must not keep the process from exiting.
    if tokio::time::timeout(SHUTDOWN_WRITE_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "HTTP server: connections still open {} s after the stop: closing them",
            SHUTDOWN_WRITE_GRACE.as_secs()
        );
    }
    Ok(())
}

/// How long a stopped server waits for the responses in flight to be written.
const SHUTDOWN_WRITE_GRACE: Duration = Duration::from_secs(10);

/// One open connection, counted until dropped.
struct OpenConnection {
    open: Arc<AtomicUsize>,
    /// Connections open with this one.
    count: usize,
}

impl OpenConnection {
    fn new(open: &Arc<AtomicUsize>) -> Self {
        let count = open.fetch_add(1, Ordering::Relaxed) + 1;
        Self {
            open: open.clone(),
            count,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}
