//! SIGTERM and SIGINT, turned into a cancellation token that starts the drain, and a second
//! signal that ends it at once.

use std::sync::OnceLock;

use tokio_util::sync::CancellationToken;

/// Cancelled at the second SIGTERM or SIGINT: the drain stops waiting, the jobs in hand are
/// answered `Interrupted` and the worker exits. Signals belong to the process, so this does too.
pub fn second_signal() -> CancellationToken {
    static SECOND: OnceLock<CancellationToken> = OnceLock::new();
    SECOND.get_or_init(CancellationToken::new).clone()
}

/// A token cancelled at the first SIGTERM or SIGINT; the second cancels [`second_signal`]
/// (answering what can be answered `Interrupted`, then exiting) instead of killing the process
/// mid-answer.
pub fn signal_token() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers; SIGTERM will not drain");
            return;
        };
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!("{name} received: no new jobs; finishing and answering the jobs in hand");
        trigger.cancel();
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!("second signal ({name}): answering the jobs in hand `Interrupted` now");
        second_signal().cancel();
        // Keep the handlers installed (and the signals absorbed) until the process exits.
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
    });
    token
}
