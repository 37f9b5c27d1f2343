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

/// The file in `[state] dir` whose lock says a veer writes that dir.
pub const LOCK_FILE: &str = "lock";

/// `[state] dir` held by this process alone while it runs: an exclusive
/// `flock` on `dir/lock`, which holds this process's id. The kernel lets
/// it go when the process ends, however it ends.
#[derive(Debug)]
pub struct DirLock {
    _held: nix::fcntl::Flock<std::fs::File>,
}

/// Another process holds the state dir's lock.
#[derive(Debug, thiserror::Error)]
#[error(
    "the state dir {} is in use by another veer{}: two writing one state would each overwrite the other's decisions (a revert among them) at every write; stop it, or give this one a [state] dir of its own",
    .dir.display(),
    .holder.map(|pid| format!(" (process {pid})")).unwrap_or_default()
)]
pub struct DirInUse {
    /// The dir.
    pub dir: PathBuf,
    /// The holder's process id, as it wrote it (in its own PID namespace).
    pub holder: Option<u32>,
}

/// Takes `dir`'s lock (creating `dir`), or says who holds it. Blocking.
/// Where no lock can be taken (a read-only or full volume, a file system
/// without `flock`) veer runs all the same, as before the lock: the log
/// says so, and its writes there fail and say so as any would
/// (`veer_state_persisted`).
pub fn lock_dir(dir: &std::path::Path) -> Result<Option<DirLock>, DirInUse> {
    use std::io::Write as _;
    let path = dir.join(LOCK_FILE);
    let opened = std::fs::create_dir_all(dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
    });
    let file = match opened {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "the state dir's lock could not be taken: another veer given this dir would not be stopped");
            return Ok(None);
        }
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(held) => {
            let mut f: &std::fs::File = &held;
            let _ = f
                .set_len(0)
                .and_then(|()| writeln!(f, "{}", std::process::id()));
            Ok(Some(DirLock { _held: held }))
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(DirInUse {
            dir: dir.to_path_buf(),
            holder: std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok()),
        }),
        Err((_, e)) => {
            tracing::warn!(path = %path.display(), error = %e, "the state dir's lock could not be taken: another veer given this dir would not be stopped");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_of_a_state_dir_at_a_time() {
        let dir = tempfile::tempdir().expect("dir");
        let state = dir.path().join("state");
        let held = lock_dir(&state).expect("free").expect("a lock");
        let e = lock_dir(&state).expect_err("held");
        assert_eq!(e.holder, Some(std::process::id()));
        assert!(
            e.to_string().starts_with(&format!(
                "the state dir {} is in use by another veer (process {}): ",
                state.display(),
                std::process::id()
            )),
            "{e}"
        );
        drop(held);
        assert!(lock_dir(&state).expect("free again").is_some());
    }
}
