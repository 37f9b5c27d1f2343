//! Writing the decisions to the state dir, off the reactor.

use std::path::PathBuf;

use veer_control::state::State;

use crate::shared::Shared;

/// Writes `state` to `dir` on a blocking thread; false if that failed.
/// The failure is kept for `/status` and logged once per distinct error
/// (evidence is saved every few seconds, and a read-only state dir should
/// not flood the log); a success clears it.
pub async fn save(shared: &Shared, state: State, dir: PathBuf) -> bool {
    let error = match tokio::task::spawn_blocking(move || state.save(&dir)).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(e) => Some(e.to_string()),
    };
    let mut current = shared.state_error.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = error.as_ref().filter(|e| current.as_ref() != Some(*e)) {
        tracing::error!(error = %e, "could not persist decisions; they hold until restart only");
    }
    *current = error.clone();
    error.is_none()
}
