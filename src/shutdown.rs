//! Signals: SIGTERM/SIGINT cancel one `CancellationToken`; SIGHUP asks for a reload.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Spawns the signal task (inside a runtime). Returns the shutdown token and the reload
/// channel; several SIGHUPs in a row are coalesced into one reload.
pub fn install() -> (CancellationToken, mpsc::Receiver<()>) {
    let token = CancellationToken::new();
    let (tx, rx) = mpsc::channel(1);
    let cancel = token.clone();
    let streams = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    );
    match streams {
        (Ok(mut term), Ok(mut int), Ok(mut hup)) => {
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = term.recv() => { tracing::info!("SIGTERM received: stopping"); break; }
                        _ = int.recv() => { tracing::info!("SIGINT received: stopping"); break; }
                        _ = hup.recv() => {
                            tracing::info!("SIGHUP received: reloading configuration and refreshing inventory");
                            let _ = tx.try_send(());
                        }
                    }
                }
                cancel.cancel();
            });
        }
        (t, i, h) => {
            for e in [t.err(), i.err(), h.err()].into_iter().flatten() {
                tracing::error!("cannot install signal handler: {e}");
            }
        }
    }
    (token, rx)
}
