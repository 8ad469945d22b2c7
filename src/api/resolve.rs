//! Name resolution that can neither pile up threads nor hold the agent: `getaddrinfo` runs on
//! a blocking thread (it has no asynchronous form), at most [`MAX_LOOKUPS`] at a time, each
//! awaited for at most the configured timeout. A resolver that never answers (a dead NSS
//! module, a DNS server that swallows queries) costs at most [`MAX_LOOKUPS`] stuck threads,
//! however long it hangs, and each attempt fails with a message that names the phase.

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// Lookups in flight at once. One is enough for the API host; the second covers a proxy host
/// while the first is stuck.
pub const MAX_LOOKUPS: usize = 2;

/// The agent's resolver (see the module docs).
#[derive(Debug, Clone)]
pub struct BoundedResolver {
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl BoundedResolver {
    /// A resolver whose lookups fail after `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(MAX_LOOKUPS)),
            timeout,
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

impl Resolve for BoundedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        let permits = Arc::clone(&self.permits);
        let timeout = self.timeout;
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let permit = tokio::time::timeout_at(deadline, permits.acquire_owned())
                .await
                .map_err(|_| {
                    format!(
                        "resolving {host} timed out after {}: earlier lookups have not returned (the resolver hangs)",
                        secs(timeout)
                    )
                })?
                .map_err(|e| format!("resolving {host}: {e}"))?;
            let lookup_host = host.clone();
            let lookup = tokio::task::spawn_blocking(move || {
                // The permit is released when getaddrinfo returns, not when we stop waiting.
                let _permit = permit;
                (lookup_host.as_str(), 0)
                    .to_socket_addrs()
                    .map(|a| a.collect::<Vec<_>>())
            });
            match tokio::time::timeout_at(deadline, lookup).await {
                Err(_) => Err(format!("resolving {host} timed out after {}", secs(timeout)).into()),
                Ok(Err(e)) => Err(format!("resolving {host}: {e}").into()),
                Ok(Ok(Err(e))) => Err(format!("resolving {host} failed: {e}").into()),
                Ok(Ok(Ok(addrs))) if addrs.is_empty() => {
                    Err(format!("resolving {host}: no addresses").into())
                }
                Ok(Ok(Ok(addrs))) => Ok(Box::new(addrs.into_iter()) as Addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[tokio::test]
    async fn resolves_loopback_names() {
        let r = BoundedResolver::new(Duration::from_secs(5));
        let addrs: Vec<_> = r
            .resolve(Name::from_str("localhost").unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        assert!(!addrs.is_empty());
    }
}
