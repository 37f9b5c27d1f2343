//! Counting bad events by distinct sticky key, so that one user cannot
//! outweigh the rest.
//!
//! With sticky routing a user's requests all land on one version, so one
//! heavy user who always fails would look like a stream of independent
//! canary failures if the canary happened to get that user. Counting each
//! key's *first* bad event only restores the coin: keys are assigned to the
//! canary by their hash alone, so under no regression each new failing key
//! is on the canary with probability `w`, however often it fails.
//!
//! The set of keys seen is a one-hash Bloom filter of 2²⁰ bits shared by both
//! versions of a route, so a false positive (a new key taken for a seen one)
//! is equally likely for either version and biases neither; it only costs a
//! little power as the filter fills. Lock-free: a load, and one `fetch_or`
//! the first time a key is seen.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

/// Bits of a filter that lives as long as a canary (2²⁰ = 128 KiB).
const BITS: u64 = 1 << 20;
/// Bits of a short-lived filter, cleared every few seconds (2¹⁸ = 32 KiB,
/// small enough to stay in cache on the request path).
pub const SHORT_BITS: u64 = 1 << 18;

/// The set of keys that already had a bad event.
///
/// Its bits are allocated at the first key marked: most routes of a large
/// config see no bad event for long stretches, or no traffic at all, and
/// should not pay 128 KiB per filter for it.
pub struct KeyFilter {
    words: OnceLock<Box<[AtomicU64]>>,
    bits: u64,
    shift: u32,
    /// A key was marked since the last `clear`.
    dirty: AtomicBool,
}

impl Default for KeyFilter {
    fn default() -> KeyFilter {
        KeyFilter::new()
    }
}

impl std::fmt::Debug for KeyFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFilter")
            .field("fill", &self.fill())
            .finish()
    }
}

impl KeyFilter {
    /// An empty filter of 2²⁰ bits.
    pub fn new() -> KeyFilter {
        KeyFilter::with_bits(BITS)
    }

    /// An empty filter of `bits` bits (a power of two, at least 64).
    pub fn with_bits(bits: u64) -> KeyFilter {
        let bits = bits.max(64).next_power_of_two();
        KeyFilter {
            words: OnceLock::new(),
            bits,
            shift: 64 - bits.trailing_zeros(),
            dirty: AtomicBool::new(false),
        }
    }

    fn words(&self) -> &[AtomicU64] {
        self.words
            .get_or_init(|| (0..self.bits / 64).map(|_| AtomicU64::new(0)).collect())
    }

    /// Marks a key (by its 64-bit hash); true if it was not marked before.
    #[inline]
    pub fn first_time(&self, key_hash: u64) -> bool {
        // The low bits pick the version bucket; use the high bits here.
        let bit = (key_hash >> 32).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift;
        let word = (bit / 64) as usize;
        let mask = 1u64 << (bit % 64);
        match self.words().get(word) {
            // A key seen before only reads, so its cache line stays shared.
            Some(w) if w.load(Ordering::Relaxed) & mask != 0 => false,
            Some(w) => {
                let first = w.fetch_or(mask, Ordering::Relaxed) & mask == 0;
                if first && !self.dirty.load(Ordering::Relaxed) {
                    self.dirty.store(true, Ordering::Relaxed);
                }
                first
            }
            None => true,
        }
    }

    /// Forgets every key (nothing to do when none was marked since the
    /// last time).
    pub fn clear(&self) {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        if let Some(words) = self.words.get() {
            for w in words.iter() {
                w.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Share of bits set.
    pub fn fill(&self) -> f64 {
        let Some(words) = self.words.get() else {
            return 0.0;
        };
        let set: u64 = words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        set as f64 / (words.len() as f64 * 64.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_counts_once() {
        let f = KeyFilter::new();
        assert!(f.first_time(0xDEAD_BEEF_0000_0001));
        assert!(!f.first_time(0xDEAD_BEEF_0000_0001));
        assert!(f.first_time(0x1234_5678_0000_0001));
    }

    #[test]
    fn a_filter_allocates_at_its_first_key_and_clears_only_when_marked() {
        let f = KeyFilter::with_bits(1 << 10);
        assert!(f.words.get().is_none());
        f.clear();
        assert_eq!(f.fill(), 0.0);
        assert!(f.first_time(0xABCD_0000_0000_0001));
        assert!(f.words.get().is_some());
        assert!(f.fill() > 0.0);
        f.clear();
        assert_eq!(f.fill(), 0.0);
        assert!(f.first_time(0xABCD_0000_0000_0001), "cleared: counts again");
    }

    #[test]
    fn distinct_keys_rarely_collide() {
        let f = KeyFilter::new();
        let mut s = 1u64;
        let mut new = 0;
        for _ in 0..10_000 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            new += u32::from(f.first_time(s));
        }
        assert!(new > 9_900, "{new}");
    }
}
