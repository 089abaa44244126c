//! Turns SIGINT/SIGTERM into a graceful shutdown. The first signal starts the
//! drain; a second one, while draining, exits at once.

use tokio::signal::unix::{SignalKind, signal};

/// Resolves at the first SIGINT or SIGTERM. Must be polled inside a tokio
/// runtime. If the handlers cannot be installed the node would be unkillable
/// by its supervisor's first signal, so that is logged loudly and the future
/// never resolves (the default action of the signal then applies).
pub async fn signals() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install SIGINT/SIGTERM handlers; graceful shutdown is unavailable");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(
        signal = name,
        "shutdown requested; send it again to exit at once"
    );
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!(signal = name, "second signal while draining: exiting now");
        std::process::exit(130);
    });
}
