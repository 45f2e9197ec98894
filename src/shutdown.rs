//! SIGTERM and SIGINT, turned into a cancellation token that starts the drain.

use tokio_util::sync::CancellationToken;

/// A token cancelled at the first SIGTERM or SIGINT. A second signal is left to the default
/// action only once the drain is over; until then further signals are ignored, so a job that
/// is being answered is not cut off by an impatient second Ctrl-C.
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
