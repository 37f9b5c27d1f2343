//! The version split: which of stable and canary a request goes to.
//!
//! # Method
//!
//! The route's sticky key (the first of its `sticky` sources present on the
//! request) is hashed with XXH3-64, seed 0, over the key's raw bytes, and
//! reduced to one of [`BUCKETS`] buckets by `hash % 10_000`. A bucket below
//! the canary weight in basis points (`weight × 100`) goes to the canary.
//!
//! # Guarantees
//!
//! * **Deterministic everywhere.** XXH3 with a fixed seed has no per-process
//!   randomness (unlike Rust's `RandomState`), so every replica and every
//!   restart maps a key to the same bucket.
//! * **Monotone.** A key's bucket does not depend on the weight, so raising
//!   the weight only moves keys from stable to canary, and lowering it only
//!   moves them back.
//! * **Accurate.** XXH3 output is uniform enough that over n distinct keys the
//!   canary share is within binomial error of the weight (the modulo bias of
//!   `2^64 mod 10_000` is below 10⁻¹⁵).
//!
//! A request with no key at all is split at random by weight.
//!
//! Key bytes: a header's value as sent; a cookie's value; the client IP as
//! 4 (IPv4) or 16 (IPv6) network-order bytes (an IPv4-mapped IPv6 address
//! counts as IPv4). A key veer makes for a client without a sticky cookie
//! (`[route.sticky_cookie]`) is 16 random hex digits, the cookie's value
//! from then on.

use std::net::{IpAddr, SocketAddr};

use http::header::{HeaderName, COOKIE};
use http::HeaderMap;
use veer_control::config::StickySource;
use xxhash_rust::xxh3::xxh3_64;

/// Number of hash buckets; a weight of 0.01 % is one bucket.
pub const BUCKETS: u16 = 10_000;

/// A sticky-key source, resolved for the hot path.
#[derive(Clone, Debug)]
pub enum StickyKey {
    /// A request header.
    Header(HeaderName),
    /// A cookie by name.
    Cookie(Box<str>),
    /// The client's IP address.
    ClientIp,
}

impl StickyKey {
    /// Resolves a configured source. Header names were validated as tokens.
    pub fn from_config(s: &StickySource) -> Option<StickyKey> {
        Some(match s {
            StickySource::Header(h) => {
                StickyKey::Header(HeaderName::from_bytes(h.as_bytes()).ok()?)
            }
            StickySource::Cookie(c) => StickyKey::Cookie(c.as_str().into()),
            StickySource::ClientIp => StickyKey::ClientIp,
        })
    }
}

/// `[route.sticky_cookie]`, ready for requests: makes a key for a client
/// that brought none, and the `Set-Cookie` that gives it to the client.
#[derive(Debug)]
pub struct MintCookie {
    name: Box<str>,
    /// `; Path=...; Max-Age=...; Domain=...; HttpOnly; SameSite=...`.
    attributes: Box<str>,
    /// `Secure` whatever the request's scheme.
    always_secure: bool,
}

impl MintCookie {
    /// From the config.
    pub fn of(c: &veer_control::config::StickyCookie) -> MintCookie {
        let max_age = c.max_age.map_or(String::new(), |a| {
            format!("; Max-Age={}", a.as_secs().max(1))
        });
        let domain = c
            .domain
            .as_ref()
            .map_or(String::new(), |d| format!("; Domain={d}"));
        MintCookie {
            name: c.name.as_str().into(),
            attributes: format!(
                "; Path={}{max_age}{domain}; HttpOnly; SameSite={}",
                c.path,
                c.same_site.as_str()
            )
            .into(),
            always_secure: c.secure,
        }
    }

    /// A new random key, in `buf`.
    pub fn mint<'a>(&self, buf: &'a mut [u8; 16]) -> &'a [u8] {
        crate::headers::random_hex(buf);
        &buf[..]
    }

    /// The `Set-Cookie` value that gives `key` to the client (`Secure`
    /// when the request came over HTTPS, or always if configured so).
    pub fn set_cookie(&self, key: &[u8], https: bool) -> Option<http::HeaderValue> {
        let key = std::str::from_utf8(key).ok()?;
        let secure = if https || self.always_secure {
            "; Secure"
        } else {
            ""
        };
        http::HeaderValue::from_str(&format!("{}={key}{}{secure}", self.name, self.attributes)).ok()
    }
}

/// Storage for a key that is not borrowed from the request (the client IP).
#[derive(Default)]
pub struct KeyBuf([u8; 16]);

/// Finds the sticky key: the first source present on the request.
pub fn sticky_key<'a>(
    sources: &[StickyKey],
    headers: &'a HeaderMap,
    peer: &SocketAddr,
    buf: &'a mut KeyBuf,
) -> Option<&'a [u8]> {
    let mut ip_wanted = false;
    for s in sources {
        match s {
            StickyKey::Header(name) => {
                if let Some(v) = crate::headers::get(headers, name) {
                    if !v.is_empty() {
                        return Some(v.as_bytes());
                    }
                }
            }
            StickyKey::Cookie(name) => {
                if let Some(v) = cookie(headers, name) {
                    return Some(v);
                }
            }
            StickyKey::ClientIp => {
                ip_wanted = true;
                break;
            }
        }
    }
    if !ip_wanted {
        return None;
    }
    let len = match peer.ip() {
        IpAddr::V4(v4) => {
            buf.0[..4].copy_from_slice(&v4.octets());
            4
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                buf.0[..4].copy_from_slice(&v4.octets());
                4
            }
            None => {
                buf.0 = v6.octets();
                16
            }
        },
    };
    buf.0.get(..len)
}

/// A cookie's value from the `Cookie` headers, without allocating.
/// The value of cookie `name`, if the request has it (non-empty).
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    for h in headers.get_all(COOKIE) {
        for pair in h.as_bytes().split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            if let Some(rest) = pair.strip_prefix(name.as_bytes()) {
                if let Some(value) = rest.strip_prefix(b"=") {
                    let value = value.trim_ascii();
                    let value = value
                        .strip_prefix(b"\"")
                        .and_then(|v| v.strip_suffix(b"\""))
                        .unwrap_or(value);
                    if !value.is_empty() {
                        return Some(value);
                    }
                }
            }
        }
    }
    None
}

/// The bucket of a key, `0..BUCKETS`.
#[inline]
pub fn bucket(key: &[u8]) -> u16 {
    bucket_of_hash(key_hash(key))
}

/// The key's 64-bit hash (XXH3, seed 0); its bucket is `hash % 10 000`.
#[inline]
pub fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// The bucket of a key hash.
#[inline]
pub fn bucket_of_hash(hash: u64) -> u16 {
    (hash % u64::from(BUCKETS)) as u16
}

/// Whether a bucket goes to the canary at a weight in basis points.
#[inline]
pub fn is_canary(bucket: u16, weight_bp: u16) -> bool {
    bucket < weight_bp
}

/// The bucket for a request without a key: uniformly random.
#[inline]
pub fn random_bucket() -> u16 {
    fastrand::u16(..BUCKETS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn a_made_cookie_carries_its_attributes() {
        use veer_control::config::{SameSite, StickyCookie};
        let mut c = StickyCookie {
            name: "k".into(),
            max_age: Some(std::time::Duration::from_secs(3600)),
            path: "/app".into(),
            domain: None,
            same_site: SameSite::Lax,
            secure: false,
        };
        let made = |c: &StickyCookie, https: bool| {
            MintCookie::of(c)
                .set_cookie(b"00ff", https)
                .expect("value")
                .to_str()
                .expect("text")
                .to_string()
        };
        assert_eq!(
            made(&c, false),
            "k=00ff; Path=/app; Max-Age=3600; HttpOnly; SameSite=Lax"
        );
        assert_eq!(
            made(&c, true),
            "k=00ff; Path=/app; Max-Age=3600; HttpOnly; SameSite=Lax; Secure"
        );
        c.domain = Some("example.com".into());
        c.same_site = SameSite::None;
        c.secure = true;
        c.max_age = None;
        assert_eq!(
            made(&c, false),
            "k=00ff; Path=/app; Domain=example.com; HttpOnly; SameSite=None; Secure"
        );
    }

    fn peer() -> SocketAddr {
        "192.0.2.7:5555".parse().expect("addr")
    }

    #[test]
    fn first_present_source_wins() {
        let sources = [
            StickyKey::Header(HeaderName::from_static("x-user-id")),
            StickyKey::Cookie("session".into()),
            StickyKey::ClientIp,
        ];
        let mut buf = KeyBuf::default();
        let h = headers(&[("cookie", "a=1; session=\"abc\"; b=2"), ("x-user-id", "u1")]);
        assert_eq!(
            sticky_key(&sources, &h, &peer(), &mut buf),
            Some(&b"u1"[..])
        );
        let h = headers(&[("cookie", "a=1"), ("cookie", "session=abc")]);
        assert_eq!(
            sticky_key(&sources, &h, &peer(), &mut buf),
            Some(&b"abc"[..])
        );
        let h = headers(&[("cookie", "sessionx=1")]);
        assert_eq!(
            sticky_key(&sources, &h, &peer(), &mut buf),
            Some(&[192, 0, 2, 7][..])
        );
        assert_eq!(sticky_key(&sources[..2], &h, &peer(), &mut buf), None);
    }

    #[test]
    fn mapped_ipv6_client_is_the_same_key_as_ipv4() {
        let mut a = KeyBuf::default();
        let mut b = KeyBuf::default();
        let h = HeaderMap::new();
        let v6: SocketAddr = "[::ffff:192.0.2.7]:1".parse().expect("addr");
        assert_eq!(
            sticky_key(&[StickyKey::ClientIp], &h, &peer(), &mut a),
            sticky_key(&[StickyKey::ClientIp], &h, &v6, &mut b)
        );
    }

    /// Pinned values: changing the hash would move every user between
    /// versions on upgrade, so it must be a deliberate, visible change.
    #[test]
    fn the_hash_is_fixed() {
        assert_eq!(bucket(b""), (xxh3_64(b"") % 10_000) as u16);
        assert_eq!(xxh3_64(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(bucket(b"user-1"), bucket(b"user-1"));
    }

    #[test]
    fn split_accuracy_over_100k_keys() {
        for weight_bp in [1, 100, 500, 1000, 2500, 5000, 9999] {
            let n = 100_000u32;
            let canary = (0..n)
                .filter(|i| is_canary(bucket(format!("user-{i}").as_bytes()), weight_bp))
                .count();
            let share = canary as f64 / f64::from(n) * 100.0;
            let want = f64::from(weight_bp) / 100.0;
            assert!((share - want).abs() <= 0.5, "weight {want}%: got {share}%");
        }
    }

    proptest! {
        #[test]
        fn bucket_is_in_range(key in proptest::collection::vec(any::<u8>(), 0..64)) {
            prop_assert!(bucket(&key) < BUCKETS);
        }

        #[test]
        fn split_is_monotone_in_the_weight(key in "[a-z0-9]{1,24}", lo in 0u16..=10_000, hi in 0u16..=10_000) {
            let (lo, hi) = (lo.min(hi), lo.max(hi));
            let b = bucket(key.as_bytes());
            if is_canary(b, lo) {
                prop_assert!(is_canary(b, hi));
            }
        }

        #[test]
        fn weight_zero_and_full_are_absolute(key in proptest::collection::vec(any::<u8>(), 0..32)) {
            let b = bucket(&key);
            prop_assert!(!is_canary(b, 0));
            prop_assert!(is_canary(b, 10_000));
        }
    }
}
