//! The wall clock, read in one place.
//!
//! Durations and deadlines use `tokio::time::Instant`, which tests can
//! pause and advance; `clippy.toml` bans `std::time::Instant::now` and
//! `SystemTime::now` elsewhere. Wall-clock time is only ever recorded
//! (revert times, webhook events), never used to wait; it measures one
//! thing, a mirrored pair's answer times, because the kernel's receive
//! timestamps are on it (`raw::Arrival`, which falls back to the monotonic
//! clock when the two disagree).

use std::time::UNIX_EPOCH;

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    wall_now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The wall clock now, to be recorded (never to measure or wait with).
#[allow(clippy::disallowed_methods)] // the one reading of the wall clock
pub fn wall_now() -> std::time::SystemTime {
    std::time::SystemTime::now()
}

/// Milliseconds since the Unix epoch (0 if the clock is before it): a
/// fleet's records and shared step clocks, and the propagation time of a
/// decision between replicas.
pub fn unix_ms() -> u64 {
    wall_now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
