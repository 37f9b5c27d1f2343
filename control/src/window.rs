//! Sliding windows of per-version statistics, made of fixed slices.
//!
//! The judge closes one slice per tick (its `interval`), so "the last 60 s"
//! is exactly the last `window / interval` slices and old data falls out
//! whole. Latency is kept in HDR histograms (microseconds, 3 significant
//! digits). The window keeps running totals, adding the newest slice and
//! subtracting the one that falls out, so reading it costs nothing. A dense
//! histogram at 3 digits is 184 KiB, so a slice is kept only as its
//! recorded buckets (a few hundred pairs at most) once it is in the total.

use std::collections::VecDeque;

use hdrhistogram::Histogram;

/// Highest latency tracked: 1 hour in microseconds.
pub const MAX_LATENCY_US: u64 = 3_600_000_000;

/// Significant decimal digits of every latency histogram.
pub const SIGNIFICANT_DIGITS: u8 = 3;

/// A new, empty latency histogram. It starts small (up to 2 s) and grows
/// to the slowest value recorded, up to [`MAX_LATENCY_US`]: a 3-digit
/// histogram covering an hour is 184 KiB, one covering 2 s is 88 KiB, and
/// most services never need more.
#[allow(clippy::expect_used)] // constant bounds, inside hdrhistogram's accepted range
pub fn histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, INITIAL_HIGH_US, SIGNIFICANT_DIGITS)
        .expect("constant histogram bounds");
    h.auto(true);
    h
}

/// The range a histogram starts with.
const INITIAL_HIGH_US: u64 = 2_000_000;

/// A slice once it is in a window's totals: counts and the latency
/// histogram's non-empty buckets as `(value, count)`.
#[derive(Clone, Debug)]
struct Kept {
    requests: u64,
    errors: u64,
    latency: Vec<(u64, u64)>,
}

/// One slice: what a version did during one judge tick.
#[derive(Clone, Debug)]
pub struct Slice {
    /// Requests answered.
    pub requests: u64,
    /// Requests that count as errors.
    pub errors: u64,
    /// Latency of every request, in microseconds.
    pub latency: Histogram<u64>,
}

impl Default for Slice {
    fn default() -> Slice {
        Slice {
            requests: 0,
            errors: 0,
            latency: histogram(),
        }
    }
}

/// Totals over some slices.
#[derive(Clone, Debug)]
pub struct Stats {
    /// Requests.
    pub requests: u64,
    /// Errors.
    pub errors: u64,
    /// Merged latency.
    pub latency: Histogram<u64>,
}

impl Stats {
    /// Errors / requests (0 without requests).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// A latency quantile in milliseconds (0 without data).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latency.is_empty() {
            0.0
        } else {
            self.latency.value_at_quantile(q) as f64 / 1000.0
        }
    }
}

/// The last `capacity` slices of one version, with running totals.
#[derive(Clone, Debug)]
pub struct Window {
    slices: VecDeque<Kept>,
    capacity: usize,
    total: Stats,
    /// Rebuilds a slice that falls out, to subtract it.
    scratch: Histogram<u64>,
}

impl Window {
    /// A window of `capacity` slices (at least 1).
    pub fn new(capacity: usize) -> Window {
        Window {
            slices: VecDeque::with_capacity(capacity.max(1)),
            capacity: capacity.max(1),
            total: Stats {
                requests: 0,
                errors: 0,
                latency: histogram(),
            },
            scratch: histogram(),
        }
    }

    /// Adds the newest slice, dropping the oldest when full.
    pub fn push(&mut self, slice: Slice) {
        if self.slices.len() == self.capacity {
            if let Some(old) = self.slices.pop_front() {
                self.total.requests -= old.requests;
                self.total.errors -= old.errors;
                if !old.latency.is_empty() {
                    self.scratch.reset();
                    for (v, n) in &old.latency {
                        // Cannot fail: `v` came out of a histogram of the same bounds.
                        let _ = self.scratch.record_n(*v, *n);
                    }
                    // Cannot fail: the total contains every count of `old`.
                    let _ = self.total.latency.subtract(&self.scratch);
                }
            }
        }
        self.total.requests += slice.requests;
        self.total.errors += slice.errors;
        let latency = if slice.latency.is_empty() {
            Vec::new()
        } else {
            let _ = self.total.latency.add(&slice.latency);
            slice
                .latency
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect()
        };
        self.slices.push_back(Kept {
            requests: slice.requests,
            errors: slice.errors,
            latency,
        });
    }

    /// Totals over the whole window.
    pub fn stats(&self) -> &Stats {
        &self.total
    }

    /// `(requests, errors)` over the newest `n` slices.
    pub fn recent(&self, n: usize) -> (u64, u64) {
        self.slices
            .iter()
            .rev()
            .take(n)
            .fold((0, 0), |(r, e), s| (r + s.requests, e + s.errors))
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        *self = Window::new(self.capacity);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(requests: u64, errors: u64, latency_us: u64) -> Slice {
        let mut s = Slice {
            requests,
            errors,
            ..Slice::default()
        };
        for _ in 0..requests {
            let _ = s.latency.record(latency_us);
        }
        s
    }

    #[test]
    fn old_slices_fall_out_whole() {
        let mut w = Window::new(3);
        w.push(slice(10, 10, 5_000));
        for _ in 0..3 {
            w.push(slice(10, 0, 1_000));
        }
        let s = w.stats();
        assert_eq!((s.requests, s.errors), (30, 0));
        assert!((s.quantile_ms(0.99) - 1.0).abs() < 0.01);
    }

    #[test]
    fn recent_counts_only_the_newest() {
        let mut w = Window::new(10);
        w.push(slice(5, 5, 100));
        w.push(slice(7, 1, 100));
        assert_eq!(w.recent(1), (7, 1));
        assert!((w.stats().error_rate() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn running_totals_match_a_fresh_merge() {
        let mut w = Window::new(4);
        for i in 0..10u64 {
            w.push(slice(10 + i, i % 3, 1_000 * (i + 1)));
        }
        let mut merged = histogram();
        for i in 6..10u64 {
            let _ = merged.record_n(1_000 * (i + 1), 10 + i);
        }
        assert_eq!(w.stats().requests, (16..20).sum::<u64>());
        assert_eq!(w.stats().latency.len(), merged.len());
        assert_eq!(
            w.stats().latency.value_at_quantile(0.5),
            merged.value_at_quantile(0.5)
        );
        let buckets = |h: &Histogram<u64>| -> Vec<(u64, u64)> {
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect()
        };
        assert_eq!(buckets(&w.stats().latency), buckets(&merged));
    }

    #[test]
    fn histograms_grow_for_slow_requests_and_the_window_still_subtracts_them() {
        let mut w = Window::new(3);
        w.push(slice(2, 0, MAX_LATENCY_US));
        let top = w.stats().latency.value_at_quantile(1.0);
        assert!(
            top.abs_diff(MAX_LATENCY_US) <= MAX_LATENCY_US / 1000,
            "{top}"
        );
        for _ in 0..3 {
            w.push(slice(10, 0, 1_000));
        }
        assert_eq!(w.stats().latency.len(), 30);
        assert!(w.stats().latency.value_at_quantile(1.0) <= 1_001);
    }

    #[test]
    fn latency_keeps_three_significant_digits() {
        let mut w = Window::new(2);
        w.push(slice(1, 0, 123_456));
        let v = w.stats().latency.value_at_quantile(1.0);
        assert!(v.abs_diff(123_456) <= 123, "{v}");
    }
}
