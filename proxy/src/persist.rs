//! Writing the decisions to the state dir, off the reactor.

use std::path::PathBuf;
use std::time::Duration;

use veer_control::state::State;

use crate::shared::Shared;

/// Longest wait for a write of the state dir: an operator's action waits
/// for it (the judge's and other decisions are written behind the
/// controller's loop, see [`start`]). A write takes milliseconds, an
/// fsync on a busy disk up to a second or so; one that takes this long is
/// a file system that does not answer.
const SAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes `state` to `dir` on a blocking thread; false if that failed or
/// gave no answer within 5 s (the write goes on, and no other starts until
/// it returns: the next one after it writes the whole state again). The
/// failure is kept for `/status` (and `veer_state_persisted` is 0 until a
/// write succeeds) and logged once per distinct error (the
/// controller tries again every 10 s, and a read-only state dir should not
/// flood the log); a success clears it.
pub async fn save(shared: &Shared, state: State, dir: PathBuf) -> bool {
    let error = match shared.state_writes.enter(1) {
        None => Some(
            "an earlier write of the state dir has not returned (a file system that does not answer?)"
                .to_string(),
        ),
        Some(writing) => {
            let write = tokio::task::spawn_blocking(move || {
                let written = state.save(&dir);
                drop(writing);
                written
            });
            match tokio::time::timeout(SAVE_TIMEOUT, write).await {
                Ok(Ok(Ok(()))) => None,
                Ok(Ok(Err(e))) => Some(e.to_string()),
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!(
                    "writing the state dir: no answer within {SAVE_TIMEOUT:?} (a file system that does not answer?)"
                )),
            }
        }
    };
    let mut current = shared.state_error.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(e) = error.as_ref().filter(|e| current.as_ref() != Some(*e)) {
        tracing::error!(error = %e, "could not persist decisions; they hold until restart only");
    }
    // (The gauge first: `/status` never shows an error it does not.)
    shared
        .metrics
        .state_persisted
        .set(i64::from(error.is_none()));
    *current = error.clone();
    error.is_none()
}

/// A write of the state dir under way behind the controller's loop (see
/// [`start`]).
#[derive(Debug)]
pub struct Saving(tokio::task::JoinHandle<bool>);

/// Starts [`save`] as a task of its own, so that the loop (the judge, a
/// reload, the fleet's news) goes on while the disk answers; its result
/// is taken with [`saved`]. The wait is bounded as [`save`]'s is.
pub fn start(shared: std::sync::Arc<Shared>, state: State, dir: PathBuf) -> Saving {
    Saving(tokio::spawn(async move { save(&shared, state, dir).await }))
}

/// The result of the write under way, if any (pending while none is):
/// whether it reached the disk.
pub async fn saved(saving: &mut Option<Saving>) -> bool {
    match saving {
        // A task that did not finish (it cannot panic short of a bug)
        // counts as a failed write.
        Some(s) => (&mut s.0).await.unwrap_or(false),
        None => std::future::pending().await,
    }
}
