//! Log lines a lasting failure would repeat, said sparsely: one a request
//! may cause ([`Sparse`]: at most once a period per source, each with the
//! count of those not said since; an endpoint whose TLS handshake fails
//! for every request would otherwise write a line per request, thousands
//! a second, into the log pipeline an operator needs to read it), and one
//! each periodic check of a broken file causes ([`Repeats`]: again only
//! when its words change, or after a period).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// How often one source's line is said.
pub const EVERY: Duration = Duration::from_secs(10);

/// One source of one kind of line.
#[derive(Debug, Default)]
pub struct Sparse {
    /// When the last line was said: milliseconds since [`epoch_ms`]'s
    /// epoch, plus one (0: never).
    last: AtomicU64,
    /// Lines not said since.
    skipped: AtomicU64,
}

impl Sparse {
    /// Whether this line is said: `Some(n)`, with the `n` lines not said
    /// since the last, once every `every`; otherwise `None` (and it is
    /// counted).
    pub fn due(&self, every: Duration) -> Option<u64> {
        let now = epoch_ms() + 1;
        let last = self.last.load(Relaxed);
        let period = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
        let early = last != 0 && now.saturating_sub(last) < period;
        if early
            || self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_err()
        {
            self.skipped.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.skipped.swap(0, Relaxed))
    }
}

/// How often a check's unchanged failure is said again.
pub const REPEAT: Duration = Duration::from_secs(60);

/// The failures of periodic checks said lately, by kind (`config`, `tls`,
/// `token`, `operators`) and words.
#[derive(Debug, Default)]
pub struct Repeats(Mutex<HashMap<(&'static str, String), tokio::time::Instant>>);

impl Repeats {
    /// Whether `text`, a failure of `kind`, is said now: not when the same
    /// words of that kind were said within `every`.
    pub fn fresh(&self, kind: &'static str, text: &str, every: Duration) -> bool {
        let now = tokio::time::Instant::now();
        let mut said = self.0.lock().unwrap_or_else(|p| p.into_inner());
        said.retain(|_, at| now.duration_since(*at) < every);
        let key = (kind, text.to_string());
        if said.contains_key(&key) {
            return false;
        }
        said.insert(key, now);
        true
    }

    /// `kind` works again: its next failure is said at once.
    pub fn clear(&self, kind: &'static str) {
        let mut said = self.0.lock().unwrap_or_else(|p| p.into_inner());
        said.retain(|(k, _), _| *k != kind);
    }
}

/// Milliseconds on tokio's clock (paused in tests) since its first read.
fn epoch_ms() -> u64 {
    static EPOCH: OnceLock<tokio::time::Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(tokio::time::Instant::now);
    let since = tokio::time::Instant::now().saturating_duration_since(epoch);
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first line is said, those within the period counted, and the
    /// next one after it says how many were not.
    #[tokio::test(start_paused = true)]
    async fn a_line_is_said_once_a_period_with_the_count_not_said() {
        let s = Sparse::default();
        assert_eq!(s.due(EVERY), Some(0));
        for _ in 0..5 {
            assert_eq!(s.due(EVERY), None);
        }
        tokio::time::advance(EVERY - Duration::from_millis(1)).await;
        assert_eq!(s.due(EVERY), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(s.due(EVERY), Some(6));
        assert_eq!(s.due(EVERY), None);
        let other = Sparse::default();
        assert_eq!(other.due(EVERY), Some(0), "each source its own");
    }

    /// A failure is said once a period while its words stay; other words,
    /// another kind, or the same after the kind worked again, at once.
    #[tokio::test(start_paused = true)]
    async fn a_lasting_failure_is_said_again_after_a_period_a_new_one_at_once() {
        let r = Repeats::default();
        assert!(r.fresh("config", "veer.toml:3:1: bad", REPEAT));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!r.fresh("config", "veer.toml:3:1: bad", REPEAT));
        assert!(r.fresh("config", "veer.toml:4:1: worse", REPEAT));
        assert!(r.fresh("tls", "veer.toml:3:1: bad", REPEAT));
        tokio::time::advance(REPEAT - Duration::from_secs(6)).await;
        assert!(!r.fresh("config", "veer.toml:3:1: bad", REPEAT));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(r.fresh("config", "veer.toml:3:1: bad", REPEAT));
        r.clear("config");
        assert!(r.fresh("config", "veer.toml:3:1: bad", REPEAT));
        assert!(!r.fresh("tls", "veer.toml:3:1: bad", REPEAT));
    }
}
