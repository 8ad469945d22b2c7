//! Where heartbeats go: the seam between the loop and the network. The daemon and `--once`
//! send through the API client; `--dry-run` prints each body on stdout; tests script the
//! answers and run the loop in paused time.

use crate::api::{Answer, ApiClient, Outcome, Success};
use crate::secret::Secret;
use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::OnceLock;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// One heartbeat in flight.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// A destination for heartbeats.
pub trait Sender: Send + Sync {
    /// `PATCH url` with `token` and `body` (empty: a pure heartbeat).
    fn send<'a>(&'a self, url: &'a str, token: &'a Secret, body: Vec<u8>) -> SendFuture<'a>;
}

impl Sender for ApiClient {
    fn send<'a>(&'a self, url: &'a str, token: &'a Secret, body: Vec<u8>) -> SendFuture<'a> {
        Box::pin(self.patch_node(url, token, body))
    }
}

/// The first failed write of a dry run to stdout (a reader gone: `| head`).
static STDOUT_ERROR: OnceLock<std::io::Error> = OnceLock::new();

/// Cancelled when a dry run cannot write to stdout any more; `run` stops the loop on it.
pub fn stdout_gone() -> &'static CancellationToken {
    static GONE: OnceLock<CancellationToken> = OnceLock::new();
    GONE.get_or_init(CancellationToken::new)
}

/// Why a dry run stopped writing, if it did.
pub fn stdout_error() -> Option<&'static std::io::Error> {
    STDOUT_ERROR.get()
}

/// `--dry-run`: each body on one stdout line, answered as the API would answer for the node
/// in the URL (status 0, no new token), so the loop runs exactly as it does against the API.
#[derive(Debug, Default)]
pub struct Stdout;

impl Sender for Stdout {
    fn send<'a>(&'a self, url: &'a str, _token: &'a Secret, body: Vec<u8>) -> SendFuture<'a> {
        let mut out = std::io::stdout().lock();
        let written = out
            .write_all(&body)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush());
        if let Err(e) = written {
            // The output is the product of a dry run: with no reader, the run is over.
            let _ = STDOUT_ERROR.set(e);
            stdout_gone().cancel();
        }
        let node_id = url.rsplit('/').next().unwrap_or_default().to_string();
        Box::pin(std::future::ready(Ok(Success {
            status: 0,
            latency: Duration::ZERO,
            body: Answer {
                node_id,
                issued: None,
                notes: Vec::new(),
            },
        })))
    }
}
