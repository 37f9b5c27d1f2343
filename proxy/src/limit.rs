//! Which clients a route serves, and how often: `allow_from` and
//! `deny_from` ([`Sources`]), and `[route.rate_limit]` ([`RateLimiter`]).
//!
//! Both see a client as its address as `client-ip` stickiness does
//! (behind `trusted_hops`), IPv4-mapped IPv6 as IPv4. A refused request
//! is the client's (403 `forbidden`, 429 `rate_limited`), answered before
//! any upstream hears of it, never a version's.
//!
//! A token bucket per client (nginx's `limit_req`, Envoy's local rate
//! limit): it holds at most `burst` tokens, refills at `requests_per_second`,
//! and each request takes one; a request that finds none is answered 429
//! with `Retry-After`, counted as `rate_limited`, never sent upstream and
//! never the version's. A client is its address as `client-ip` stickiness
//! sees it (`trusted_hops`), an IPv6 one by its /64 (what one host is
//! usually given): the key the judge counts one vote per
//! ([`crate::record::client_hash`]).
//!
//! The buckets of a route are kept in 16 shards of at most 4 096 clients
//! each (65 536 in all, ~3 MiB at most: 16 tables of 8 192 slots of 25
//! bytes, allocated as clients come). A client whose bucket is full
//! again is forgotten when its shard needs room (looked for at most every
//! 100 ms, so that a flood of new addresses does not make each of its
//! requests go over 4 096 buckets): it would start full anyway. A new
//! client that finds its shard full of clients still spending is refused
//! (nginx's zone does the same): memory stays bounded whatever the number
//! of addresses.
//!
//! The buckets live as long as the route's settings: a reload or a
//! decision that rebuilds the routing snapshot keeps them
//! ([`Limiters`]).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, Weak};

use tokio::time::Instant;
use veer_control::config::{RateLimit, Route};

/// A route's `allow_from` and `deny_from` ranges.
#[derive(Debug)]
pub struct Sources {
    allow: Box<[ipnet::IpNet]>,
    deny: Box<[ipnet::IpNet]>,
}

impl Sources {
    /// The ranges of `route`; `None` when it sets neither.
    pub fn of(route: &Route) -> Option<Box<Sources>> {
        (!route.allow_from.is_empty() || !route.deny_from.is_empty()).then(|| {
            Box::new(Sources {
                allow: route.allow_from.as_slice().into(),
                deny: route.deny_from.as_slice().into(),
            })
        })
    }

    /// Whether the route serves a client at `ip`: in no `deny_from`
    /// range, and in an `allow_from` one if any is set.
    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        let ip = ip.to_canonical();
        !self.deny.iter().any(|n| n.contains(&ip))
            && (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip)))
    }
}

/// Shards of a route's buckets (a power of two).
const SHARDS: usize = 16;

/// Clients a shard keeps.
const PER_SHARD: usize = 4096;

/// How often a full shard looks for clients to forget, at most: a look
/// goes over all 4 096 (some 40 000 instructions, under the shard's
/// lock), and a flood of new addresses must not make every one of its
/// requests pay for one.
const SWEEP_EVERY_US: u64 = 100_000;

/// One client's bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was counted, in µs after the limiter's base.
    at_us: u64,
}

/// The keys are hashes already ([`crate::record::client_hash`]): used as
/// they are.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Buckets = HashMap<u64, Bucket, BuildHasherDefault<Identity>>;

/// A sixteenth of a route's clients.
#[derive(Default)]
struct Shard {
    buckets: Buckets,
    /// When the shard last looked for clients to forget (µs after the
    /// limiter's base), if it has.
    swept_us: Option<u64>,
}

/// A route's buckets.
pub struct RateLimiter {
    settings: RateLimit,
    /// Tokens a µs.
    per_us: f64,
    burst: f64,
    base: Instant,
    shards: Box<[Mutex<Shard>]>,
    /// `key = "header:NAME"`.
    key_header: Option<http::HeaderName>,
    /// `key = "client-cert"`.
    key_client_cert: bool,
}

impl RateLimiter {
    /// Empty buckets-to-be for `settings`.
    pub fn new(settings: RateLimit) -> RateLimiter {
        RateLimiter {
            per_us: settings.per_second() / 1e6,
            burst: f64::from(settings.burst),
            base: Instant::now(),
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            key_header: settings
                .key_header
                .as_deref()
                .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
            key_client_cert: settings.key_client_cert,
            settings,
        }
    }

    /// Whose bucket a request spends from: its key header's value (hashed)
    /// when the limit is keyed by one and the request has it, or its
    /// connection's verified client certificate's subject (`cert`) when
    /// keyed by that, else `client` (the client address's hash).
    pub fn key(&self, headers: &http::HeaderMap, client: u64, cert: Option<&str>) -> u64 {
        if self.key_client_cert {
            // (Another seed than the addresses': a subject is never
            // taken for an address's bucket.)
            return cert.map_or(client, |s| {
                xxhash_rust::xxh3::xxh3_64_with_seed(s.as_bytes(), 1)
            });
        }
        self.key_header
            .as_ref()
            .and_then(|h| headers.get(h))
            .filter(|v| !v.is_empty())
            .map_or(client, |v| xxhash_rust::xxh3::xxh3_64(v.as_bytes()))
    }

    /// Takes a token from client `client`'s bucket at `now`: `Ok`, or the
    /// whole seconds until one will be there (`Retry-After`).
    pub fn admit(&self, client: u64, now: Instant) -> Result<(), u64> {
        let at_us = now.saturating_duration_since(self.base).as_micros() as u64;
        let Some(shard) = self.shards.get((client >> 60) as usize % SHARDS) else {
            return Ok(());
        };
        // A poisoned shard (a panic while it was held) still counts.
        let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
        if shard.buckets.len() >= PER_SHARD && !shard.buckets.contains_key(&client) {
            let due = shard
                .swept_us
                .is_none_or(|t| at_us.saturating_sub(t) >= SWEEP_EVERY_US);
            if due {
                shard.swept_us = Some(at_us);
                self.forget_full(&mut shard.buckets, at_us);
            }
            if shard.buckets.len() >= PER_SHARD {
                return Err(self.wait_secs(0.0));
            }
        }
        let b = shard.buckets.entry(client).or_insert(Bucket {
            tokens: self.burst,
            at_us,
        });
        b.tokens = self.refilled(b, at_us);
        b.at_us = at_us;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(self.wait_secs(b.tokens))
        }
    }

    /// `b`'s tokens at `at_us`.
    fn refilled(&self, b: &Bucket, at_us: u64) -> f64 {
        let refill = at_us.saturating_sub(b.at_us) as f64 * self.per_us;
        (b.tokens + refill).min(self.burst)
    }

    /// Whole seconds until a bucket holding `tokens` has one, at least 1.
    fn wait_secs(&self, tokens: f64) -> u64 {
        let us = (1.0 - tokens).max(0.0) / self.per_us;
        ((us / 1e6).ceil() as u64).max(1)
    }

    /// Forgets the clients whose buckets are full again.
    fn forget_full(&self, buckets: &mut Buckets, at_us: u64) {
        buckets.retain(|_, b| self.refilled(b, at_us) < self.burst);
    }
}

/// Every route's limiter, by route name, kept across snapshots while its
/// settings stay: a snapshot built for a reload or a decision finds the
/// buckets its predecessor filled.
pub type Limiters = Kept<RateLimiter>;

/// Every route's state of one kind (a rate limiter's buckets, a retry
/// budget), by route name, kept across snapshots while the route's
/// settings for it stay.
pub struct Kept<T> {
    by_route: Mutex<HashMap<String, Weak<T>>>,
}

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Kept {
            by_route: Mutex::default(),
        }
    }
}

impl Kept<RateLimiter> {
    /// The limiter of route `name` with `settings`: the live one if its
    /// settings are the same, else a new one.
    pub fn get(&self, name: &str, settings: RateLimit) -> Arc<RateLimiter> {
        self.get_or_make(
            name,
            |live| live.settings == settings,
            || RateLimiter::new(settings.clone()),
        )
    }
}

impl<T> Kept<T> {
    /// Route `name`'s live one if `same` says it was made with the same
    /// settings, else a new one `make`s.
    pub fn get_or_make(
        &self,
        name: &str,
        same: impl FnOnce(&T) -> bool,
        make: impl FnOnce() -> T,
    ) -> Arc<T> {
        let mut by_route = self.by_route.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(live) = by_route.get(name).and_then(Weak::upgrade) {
            if same(&live) {
                return live;
            }
        }
        let fresh = Arc::new(make());
        by_route.insert(name.to_string(), Arc::downgrade(&fresh));
        // Routes no snapshot holds any more are forgotten.
        by_route.retain(|_, l| l.strong_count() > 0);
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limiter(per_second: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimit {
            per_second_milli: (per_second * 1000.0) as u64,
            burst,
            key_header: None,
            key_client_cert: false,
        })
    }

    #[test]
    fn a_route_serves_the_allowed_less_the_denied_mapped_addresses_as_ipv4() {
        let s = Sources {
            allow: ["10.0.0.0/8", "2001:db8::/32"]
                .map(|n| n.parse().expect("net"))
                .into(),
            deny: ["10.13.0.0/16"].map(|n| n.parse().expect("net")).into(),
        };
        let ip = |a: &str| a.parse::<std::net::IpAddr>().expect("addr");
        assert!(s.admits(ip("10.1.2.3")));
        assert!(s.admits(ip("::ffff:10.1.2.3")), "IPv4-mapped");
        assert!(s.admits(ip("2001:db8::7")));
        assert!(!s.admits(ip("10.13.0.1")), "denied though allowed");
        assert!(!s.admits(ip("192.0.2.1")), "not allowed");
        let deny_only = Sources {
            allow: Box::new([]),
            deny: s.deny.clone(),
        };
        assert!(deny_only.admits(ip("192.0.2.1")));
        assert!(!deny_only.admits(ip("10.13.9.9")));
    }

    #[test]
    fn a_client_gets_its_burst_then_the_rate_and_others_their_own() {
        let l = limiter(2.0, 3);
        let t0 = l.base;
        for _ in 0..3 {
            assert_eq!(l.admit(7, t0), Ok(()));
        }
        assert_eq!(l.admit(7, t0), Err(1), "burst spent");
        assert_eq!(l.admit(8, t0), Ok(()), "another client has its own");
        // Two a second: one more after 500 ms, not before.
        assert!(l.admit(7, t0 + Duration::from_millis(499)).is_err());
        assert_eq!(l.admit(7, t0 + Duration::from_millis(500)), Ok(()));
        assert!(l.admit(7, t0 + Duration::from_millis(500)).is_err());
        // A quiet spell fills the bucket to its burst, no more.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(l.admit(7, later), Ok(()));
        }
        assert!(l.admit(7, later).is_err());
    }

    #[test]
    fn retry_after_says_when_a_token_comes() {
        let l = limiter(0.1, 1);
        assert_eq!(l.admit(1, l.base), Ok(()));
        assert_eq!(l.admit(1, l.base), Err(10));
        assert_eq!(l.admit(1, l.base + Duration::from_secs(4)), Err(6));
    }

    /// Fills shard 0 (clients whose top four bits are zero) with clients
    /// that each spent their one token at the limiter's start, returned.
    fn fill_shard_zero(l: &RateLimiter) -> Instant {
        for c in 0..PER_SHARD as u64 {
            assert_eq!(l.admit(c, l.base), Ok(()));
        }
        l.base
    }

    #[test]
    fn a_full_shard_forgets_idle_clients_and_refuses_new_ones_while_all_spend() {
        let l = limiter(1.0, 1);
        let t0 = fill_shard_zero(&l);
        let newcomer = PER_SHARD as u64;
        assert!(l.admit(newcomer, t0).is_err(), "the shard is full");
        assert_eq!(l.admit(1 << 60, t0), Ok(()), "other shards are not");
        // A second on, every bucket is full again: forgotten for room.
        assert_eq!(l.admit(newcomer, t0 + Duration::from_secs(1)), Ok(()));
        let kept = l.shards[0].lock().expect("shard").buckets.len();
        assert_eq!(kept, 1);
    }

    #[test]
    fn a_full_shard_looks_for_clients_to_forget_at_most_every_100_ms() {
        // Buckets full again a millisecond after they are spent.
        let l = limiter(1000.0, 1);
        let t0 = fill_shard_zero(&l);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(
            l.admit(PER_SHARD as u64, at(0)).is_err(),
            "swept: all spending"
        );
        assert!(
            l.admit(PER_SHARD as u64 + 1, at(50)).is_err(),
            "no look before 100 ms, though all are full again"
        );
        assert_eq!(l.admit(PER_SHARD as u64 + 2, at(100)), Ok(()));
    }

    #[test]
    fn a_route_keeps_its_buckets_while_its_settings_stay() {
        let all = Limiters::default();
        let settings = RateLimit {
            per_second_milli: 1000,
            burst: 1,
            key_header: None,
            key_client_cert: false,
        };
        let a = all.get("web", settings.clone());
        assert!(Arc::ptr_eq(&a, &all.get("web", settings.clone())));
        let other = RateLimit {
            burst: 2,
            ..settings.clone()
        };
        assert!(!Arc::ptr_eq(&a, &all.get("web", other)));
        let keyed = RateLimit {
            key_header: Some("x-api-key".into()),
            ..settings.clone()
        };
        assert!(!Arc::ptr_eq(&a, &all.get("web", keyed)));
        let b = all.get("api", settings);
        assert!(!Arc::ptr_eq(&a, &b));
    }

    #[test]
    fn a_keyed_limit_spends_from_the_keys_bucket_and_the_address_without_one() {
        let l = RateLimiter::new(RateLimit {
            per_second_milli: 1,
            burst: 1,
            key_header: Some("x-api-key".into()),
            key_client_cert: false,
        });
        let mut h = http::HeaderMap::new();
        assert_eq!(l.key(&h, 7, None), 7, "no key: the address");
        h.insert("x-api-key", http::HeaderValue::from_static(""));
        assert_eq!(l.key(&h, 7, None), 7, "an empty one neither");
        h.insert("x-api-key", http::HeaderValue::from_static("team-a"));
        let a = l.key(&h, 7, None);
        assert_ne!(a, 7);
        assert_eq!(a, l.key(&h, 8, Some("CN=x")), "whatever the address");
        let now = Instant::now();
        assert!(l.admit(a, now).is_ok());
        assert!(l.admit(a, now).is_err());
        assert!(l.admit(7, now).is_ok(), "the address's own bucket");
        let plain = limiter(1.0, 1);
        assert_eq!(plain.key(&h, 7, Some("CN=x")), 7, "not keyed: the address");
        // Keyed by the client certificate: its subject, whatever the
        // address or header; the address without one.
        let by_cert = RateLimiter::new(RateLimit {
            per_second_milli: 1,
            burst: 1,
            key_header: None,
            key_client_cert: true,
        });
        let partner = by_cert.key(&h, 7, Some("CN=partner-a,O=Bank"));
        assert_eq!(partner, by_cert.key(&h, 8, Some("CN=partner-a,O=Bank")));
        assert_ne!(partner, by_cert.key(&h, 7, Some("CN=partner-b,O=Bank")));
        assert_eq!(by_cert.key(&h, 7, None), 7);
    }
}
