//! Inline recording of every request's outcome and latency, per version.
//!
//! The request path only increments atomics: a request counter, an error
//! counter, one bucket of a log-linear latency histogram, and — for bad
//! events — a distinct-key filter ([`KeyFilter`]) and an event counter. No
//! locks, no allocation. The judge drains the counters once per tick into an
//! HDR histogram slice of its window.
//!
//! The latency histogram has 64 linear sub-buckets per power of two above
//! 128 µs (exact below), so a value is kept within 1.6 %: finer than the
//! judge's guards need, and 1 728 buckets cover 1 µs to 1 hour.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use veer_control::config::Quantile;
use veer_control::judge::VersionTick;
use veer_control::keyfilter::{KeyFilter, SHORT_BITS};
use veer_control::window::{Slice, MAX_LATENCY_US};

const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS; // exact values below this
const HALF: u64 = SUB / 2;
const BUCKETS: usize = (SUB + (32 - SUB_BITS as u64) * HALF) as usize;
/// Slow thresholds the proxy can apply at once (one per quantile).
pub const MAX_THRESHOLDS: usize = 5;
const OFF: u64 = u64::MAX;

#[inline]
fn bucket_of(us: u64) -> usize {
    let v = us.min(MAX_LATENCY_US);
    if v < SUB {
        return v as usize;
    }
    let e = 63 - u64::from(v.leading_zeros()); // >= SUB_BITS
    let mantissa = v >> (e - u64::from(SUB_BITS) + 1); // in [HALF, SUB)
    (SUB + (e - u64::from(SUB_BITS)) * HALF + (mantissa - HALF)) as usize
}

/// The middle of a bucket, in µs.
fn value_of(index: usize) -> u64 {
    let i = index as u64;
    if i < SUB {
        return i;
    }
    let e = (i - SUB) / HALF + u64::from(SUB_BITS);
    let mantissa = (i - SUB) % HALF + HALF;
    let shift = e - u64::from(SUB_BITS) + 1;
    (mantissa << shift) + (1 << shift) / 2
}

/// Bad-event key filters shared by both versions of one route's canary
/// identity, so a filter collision biases neither version.
#[derive(Debug, Default)]
pub struct RouteKeys {
    errors: KeyFilter,
    slow: Vec<KeyFilter>,
    burst: KeyFilter,
    burst_users: KeyFilter,
}

impl RouteKeys {
    /// Filters for errors and for `thresholds` slow thresholds.
    pub fn new(thresholds: usize) -> RouteKeys {
        RouteKeys {
            errors: KeyFilter::new(),
            slow: (0..thresholds.min(MAX_THRESHOLDS))
                .map(|_| KeyFilter::new())
                .collect(),
            burst: KeyFilter::with_bits(SHORT_BITS),
            burst_users: KeyFilter::with_bits(SHORT_BITS),
        }
    }

    /// Starts a new burst span: failing keys count afresh.
    pub fn clear_burst(&self) {
        self.burst.clear();
        self.burst_users.clear();
    }
}

/// The recorder of one version of one route.
pub struct Recorder {
    requests: AtomicU64,
    errors: AtomicU64,
    connect_errors: AtomicU64,
    error_events: AtomicU64,
    burst_keys: AtomicU64,
    burst_users: AtomicU64,
    slow_events: [AtomicU64; MAX_THRESHOLDS],
    thresholds_us: [AtomicU64; MAX_THRESHOLDS],
    latency: Box<[AtomicU64]>,
    total_count: AtomicU64,
    total_sum_us: AtomicU64,
    keys: Arc<RouteKeys>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("requests", &self.requests.load(Ordering::Relaxed))
            .finish()
    }
}

/// How a request ended, as far as judging goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not an error.
    Ok,
    /// An upstream 5xx (or 4xx when the route counts them), or a reset or protocol failure.
    Error,
    /// The connect failed on every endpoint tried.
    ConnectError,
    /// No answer within the route's timeout: an error, and slow.
    Timeout,
}

impl Recorder {
    /// A recorder sharing `keys` with the other version of the route.
    pub fn new(keys: Arc<RouteKeys>) -> Recorder {
        Recorder {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            error_events: AtomicU64::new(0),
            burst_keys: AtomicU64::new(0),
            burst_users: AtomicU64::new(0),
            slow_events: std::array::from_fn(|_| AtomicU64::new(0)),
            thresholds_us: std::array::from_fn(|_| AtomicU64::new(OFF)),
            latency: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            total_count: AtomicU64::new(0),
            total_sum_us: AtomicU64::new(0),
            keys,
        }
    }

    /// Records one request. `key_hash` is the sticky key's hash (None: the
    /// request had no key, so it counts as its own key).
    #[inline]
    pub fn record(&self, latency_us: u64, outcome: Outcome, key_hash: Option<u64>) {
        let first = |f: &KeyFilter| key_hash.is_none_or(|h| f.first_time(h));
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = self.latency.get(bucket_of(latency_us)) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.total_sum_us.fetch_add(latency_us, Ordering::Relaxed);
        if first(&self.keys.burst_users) {
            self.burst_users.fetch_add(1, Ordering::Relaxed);
        }
        if outcome != Outcome::Ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
            if outcome == Outcome::ConnectError {
                self.connect_errors.fetch_add(1, Ordering::Relaxed);
            }
            if first(&self.keys.errors) {
                self.error_events.fetch_add(1, Ordering::Relaxed);
            }
            if first(&self.keys.burst) {
                self.burst_keys.fetch_add(1, Ordering::Relaxed);
            }
        }
        for (i, filter) in self.keys.slow.iter().enumerate() {
            let t = self.thresholds_us[i].load(Ordering::Relaxed);
            if t != OFF && (latency_us > t || outcome == Outcome::Timeout) && first(filter) {
                self.slow_events[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Sets the slow thresholds (µs) for the requests to come.
    pub fn set_thresholds(&self, thresholds: &[Option<u64>]) {
        for (i, slot) in self.thresholds_us.iter().enumerate() {
            slot.store(
                thresholds.get(i).copied().flatten().unwrap_or(OFF),
                Ordering::Relaxed,
            );
        }
    }

    /// Takes everything recorded since the last drain.
    pub fn drain(&self, thresholds: usize) -> (VersionTick, u64) {
        let requests = self.requests.swap(0, Ordering::Relaxed);
        self.total_count.fetch_add(requests, Ordering::Relaxed);
        let mut slice = Slice {
            requests,
            errors: self.errors.swap(0, Ordering::Relaxed),
            ..Slice::default()
        };
        for (i, b) in self.latency.iter().enumerate() {
            let n = b.swap(0, Ordering::Relaxed);
            if n > 0 {
                let _ = slice.latency.record_n(value_of(i).max(1), n);
            }
        }
        let tick = VersionTick {
            slice,
            error_events: self.error_events.swap(0, Ordering::Relaxed),
            slow_events: self.slow_events[..thresholds.min(MAX_THRESHOLDS)]
                .iter()
                .map(|c| c.swap(0, Ordering::Relaxed))
                .collect(),
            burst_keys: self.burst_keys.swap(0, Ordering::Relaxed),
            burst_users: self.burst_users.swap(0, Ordering::Relaxed),
            unreachable: false,
        };
        (tick, self.connect_errors.swap(0, Ordering::Relaxed))
    }

    /// The route's key filters.
    pub fn keys(&self) -> &RouteKeys {
        &self.keys
    }

    /// Requests (as of the last drain) and latency sum (seconds) since
    /// start, for the summary metric.
    pub fn totals(&self) -> (u64, f64) {
        (
            self.total_count.load(Ordering::Relaxed),
            self.total_sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        )
    }
}

/// The quantiles a judge applies thresholds for, capped to what the
/// recorder holds.
pub fn threshold_count(quantiles: &[Quantile]) -> usize {
    quantiles.len().min(MAX_THRESHOLDS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_values_within_two_percent() {
        for v in [
            1u64,
            7,
            127,
            128,
            129,
            1_000,
            4_321,
            65_537,
            1_000_000,
            3_000_000_000,
        ] {
            let back = value_of(bucket_of(v));
            let err = (back as f64 - v as f64).abs() / v as f64;
            assert!(err <= 0.016, "{v} -> {back}");
        }
        assert!(bucket_of(u64::MAX) < BUCKETS);
    }

    #[test]
    fn record_then_drain() {
        let keys = Arc::new(RouteKeys::new(1));
        let r = Recorder::new(keys.clone());
        let other = Recorder::new(keys);
        r.set_thresholds(&[Some(10_000)]);
        other.set_thresholds(&[Some(10_000)]);
        r.record(2_000, Outcome::Ok, Some(1 << 40));
        r.record(20_000, Outcome::Error, Some(2 << 40));
        r.record(20_000, Outcome::Error, Some(2 << 40)); // same key: one event
        other.record(20_000, Outcome::Error, Some(2 << 40)); // shared filter
        r.record(5_000, Outcome::Timeout, None);
        let (t, connect) = r.drain(1);
        assert_eq!((t.slice.requests, t.slice.errors, connect), (4, 3, 0));
        assert_eq!(t.error_events, 2);
        assert_eq!(t.slow_events, vec![2]);
        assert_eq!(t.slice.latency.len(), 4);
        assert_eq!(r.drain(1).0.slice.requests, 0);
        assert_eq!(r.totals().0, 4);
    }
}
