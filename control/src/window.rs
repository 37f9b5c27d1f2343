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
use std::sync::OnceLock;

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

/// An empty slice's histogram is the smallest one (16 KiB, growing as
/// values come): a tick without traffic, on each version of each idle
/// route every second, should not allocate and zero 88 KiB.
impl Default for Slice {
    fn default() -> Slice {
        Slice {
            requests: 0,
            errors: 0,
            latency: small_histogram(),
        }
    }
}

impl Slice {
    /// A slice with nothing in it whose histogram holds no buckets to speak
    /// of (zero significant digits): what a recorder's drain starts from,
    /// so an idle route's tick allocates almost nothing. Never record into
    /// it: a drain that finds requests replaces it with [`histogram`].
    #[allow(clippy::expect_used)] // constant bounds, inside hdrhistogram's accepted range
    pub fn empty() -> Slice {
        Slice {
            requests: 0,
            errors: 0,
            latency: Histogram::new_with_bounds(1, 2, 0).expect("constant histogram bounds"),
        }
    }
}

/// The smallest auto-resizing latency histogram.
#[allow(clippy::expect_used)] // constant bounds, inside hdrhistogram's accepted range
pub fn small_histogram() -> Histogram<u64> {
    let mut h = Histogram::new(SIGNIFICANT_DIGITS).expect("constant histogram bounds");
    h.auto(true);
    h
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
///
/// The totals' histogram (and the scratch one used to subtract a slice
/// that falls out) exist only while the window holds a request: an idle
/// route's windows cost no histogram at all, and a route whose traffic
/// stopped gives its memory back once its last request falls out.
#[derive(Clone, Debug)]
pub struct Window {
    slices: VecDeque<Kept>,
    capacity: usize,
    total: Option<Stats>,
    /// Rebuilds a slice that falls out, to subtract it.
    scratch: Option<Histogram<u64>>,
}

/// The totals of a window without requests.
fn empty_stats() -> &'static Stats {
    static EMPTY: OnceLock<Stats> = OnceLock::new();
    EMPTY.get_or_init(|| Stats {
        requests: 0,
        errors: 0,
        latency: small_histogram(),
    })
}

impl Window {
    /// How many slices it keeps.
    pub fn slices(&self) -> usize {
        self.capacity
    }

    /// A window of `capacity` slices (at least 1).
    pub fn new(capacity: usize) -> Window {
        Window {
            // Grown by the first slices, not reserved: an idle route's
            // windows hold none.
            slices: VecDeque::new(),
            capacity: capacity.max(1),
            total: None,
            scratch: None,
        }
    }

    /// Adds the newest slice, dropping the oldest when full.
    pub fn push(&mut self, slice: Slice) {
        if self.slices.len() == self.capacity {
            if let (Some(old), Some(total)) = (self.slices.pop_front(), self.total.as_mut()) {
                total.requests -= old.requests;
                total.errors -= old.errors;
                if !old.latency.is_empty() {
                    let scratch = self.scratch.get_or_insert_with(small_histogram);
                    scratch.reset();
                    for (v, n) in &old.latency {
                        // Cannot fail: `v` came out of a histogram of the same bounds.
                        let _ = scratch.record_n(*v, *n);
                    }
                    // Cannot fail: the total contains every count of `old`.
                    let _ = total.latency.subtract(&*scratch);
                }
            }
        }
        let empty = slice.requests == 0 && slice.latency.is_empty();
        let latency = if empty {
            Vec::new()
        } else {
            let total = self.total.get_or_insert_with(|| Stats {
                requests: 0,
                errors: 0,
                latency: small_histogram(),
            });
            total.requests += slice.requests;
            total.errors += slice.errors;
            if slice.latency.is_empty() {
                Vec::new()
            } else {
                let _ = total.latency.add(&slice.latency);
                slice
                    .latency
                    .iter_recorded()
                    .map(|v| (v.value_iterated_to(), v.count_at_value()))
                    .collect()
            }
        };
        self.slices.push_back(Kept {
            requests: slice.requests,
            errors: slice.errors,
            latency,
        });
        if self
            .total
            .as_ref()
            .is_some_and(|t| t.requests == 0 && t.latency.is_empty())
        {
            self.total = None;
            self.scratch = None;
        }
    }

    /// Totals over the whole window.
    pub fn stats(&self) -> &Stats {
        self.total.as_ref().unwrap_or_else(|| empty_stats())
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
    fn an_idle_window_holds_no_histogram_and_gives_it_back_when_traffic_stops() {
        let mut w = Window::new(2);
        w.push(Slice::default());
        assert!(w.total.is_none());
        assert_eq!(w.stats().requests, 0);
        w.push(slice(5, 1, 2_000));
        assert_eq!((w.stats().requests, w.stats().latency.len()), (5, 5));
        w.push(Slice::default());
        assert!(w.total.is_some(), "the request is still in the window");
        w.push(Slice::default());
        assert!(w.total.is_none() && w.scratch.is_none());
        assert!(w.stats().latency.is_empty());
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
