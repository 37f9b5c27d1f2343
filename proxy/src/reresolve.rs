//! Re-resolving endpoint host names off the controller's loop: DNS can
//! take seconds, and the judge must keep ticking meanwhile.

use std::net::SocketAddr;
use std::time::Duration;

use veer_control::config::Config;

/// What a re-resolution gives: endpoint name to address, or why not.
pub type Resolved = Result<crate::snapshot::Addresses, String>;

/// Longest wait for a re-resolution's DNS answers.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A re-resolution under way, for the config generation it was made for.
pub struct Resolving {
    /// The generation.
    pub generation: u64,
    task: tokio::task::JoinHandle<Resolved>,
}

/// Starts re-resolving `config`'s host-name endpoints, bounded by a 5 s
/// timeout; None when every endpoint is an address.
pub fn start(config: &Config, generation: u64) -> Option<Resolving> {
    let named = config
        .routes
        .iter()
        .flat_map(|r| std::iter::once(&r.stable).chain(r.canary.as_ref()));
    if named
        .flat_map(|v| &v.endpoints)
        .all(|e| e.addr.parse::<SocketAddr>().is_ok())
    {
        return None;
    }
    let config = config.clone();
    let task = tokio::spawn(async move {
        let lookup = tokio::task::spawn_blocking(move || crate::snapshot::resolve(&config));
        match tokio::time::timeout(TIMEOUT, lookup).await {
            Ok(Ok(r)) => r.map_err(|e| e.to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {TIMEOUT:?}")),
        }
    });
    Some(Resolving { generation, task })
}

/// The result of the re-resolution under way, if any (never ready when
/// there is none), with its generation.
pub async fn finished(resolving: &mut Option<Resolving>) -> (u64, Resolved) {
    match resolving {
        Some(r) => (
            r.generation,
            (&mut r.task).await.unwrap_or_else(|e| Err(e.to_string())),
        ),
        None => std::future::pending().await,
    }
}
