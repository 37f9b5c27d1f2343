//! Endpoint choice inside one version: weighted consistent hashing.
//!
//! # Method
//!
//! Each version has a ketama continuum (`pingora-ketama`, the nginx-compatible
//! ring: 160 points per unit of weight, CRC32 of the key). A key goes to the
//! endpoint owning the first point at or after the key's hash; so a key sticks
//! to one endpoint, endpoint weights are honoured, and adding or removing one
//! endpoint of N moves only about 1/N of the keys.
//!
//! Walking the ring further from the key's point gives the key's next
//! choices, which is where its requests go while its first choice is in
//! back-off. Failover never leaves the version.

use std::net::SocketAddr;
use std::sync::Arc;

use pingora_ketama::{Bucket, Continuum};

use crate::upstream::Upstream;

/// Endpoints of one version and their ring.
pub struct Balancer {
    ring: Continuum,
    /// Sorted by address, for lookup from ring points.
    endpoints: Vec<Arc<Upstream>>,
    /// `(configured name, weight)`, aligned with `endpoints`.
    names: Vec<(Box<str>, u32)>,
}

/// At most two endpoints to try for one request: the first choice and the
/// one a failed connect is retried on.
#[derive(Clone, Debug, Default)]
pub struct Candidates {
    first: Option<Arc<Upstream>>,
    second: Option<Arc<Upstream>>,
}

impl Candidates {
    /// The first choice.
    pub fn first(&self) -> Option<&Arc<Upstream>> {
        self.first.as_ref()
    }

    /// The fallback for a failed connect.
    pub fn second(&self) -> Option<&Arc<Upstream>> {
        self.second.as_ref()
    }
}

impl Balancer {
    /// A ring over `(upstream, weight, configured name)`; addresses are unique.
    pub fn new(mut endpoints: Vec<(Arc<Upstream>, u32, String)>) -> Balancer {
        let buckets: Vec<Bucket> = endpoints
            .iter()
            .map(|(u, w, _)| Bucket::new(u.addr(), *w))
            .collect();
        endpoints.sort_by_key(|(u, _, _)| u.addr());
        let names = endpoints
            .iter()
            .map(|(_, w, n)| (n.as_str().into(), *w))
            .collect();
        Balancer {
            ring: Continuum::new(&buckets),
            endpoints: endpoints.into_iter().map(|(u, _, _)| u).collect(),
            names,
        }
    }

    /// The endpoints, sorted by address.
    pub fn endpoints(&self) -> &[Arc<Upstream>] {
        &self.endpoints
    }

    /// `(configured name, weight, endpoint)` of every endpoint.
    pub fn members(&self) -> impl Iterator<Item = (&str, u32, &Arc<Upstream>)> {
        self.names
            .iter()
            .zip(&self.endpoints)
            .map(|((n, w), u)| (&**n, *w, u))
    }

    fn lookup(&self, addr: &SocketAddr) -> Option<&Arc<Upstream>> {
        self.endpoints
            .binary_search_by(|u| u.addr().cmp(addr))
            .ok()
            .and_then(|i| self.endpoints.get(i))
    }

    /// The key's first endpoint on the ring, ignoring health.
    pub fn first_choice(&self, key: &[u8]) -> Option<SocketAddr> {
        self.ring.node(key)
    }

    /// The endpoints to try for `key`: the first two distinct healthy ones in
    /// ring order. If none is healthy the key's first choice is tried anyway,
    /// since an endpoint in back-off may have recovered.
    pub fn candidates(&self, key: &[u8]) -> Candidates {
        let mut c = Candidates::default();
        if self.endpoints.len() == 1 {
            c.first = self.endpoints.first().cloned();
            return c;
        }
        let mut seen: u64 = 0; // one bit per endpoint index
        let mut distinct = 0;
        let mut fallback = None;
        for addr in self.ring.node_iter(key) {
            let Ok(i) = self.endpoints.binary_search_by(|u| u.addr().cmp(addr)) else {
                continue;
            };
            // Config validation caps a version at 64 endpoints, so the bit is exact.
            let bit = 1u64 << (i % 64);
            if seen & bit != 0 {
                continue;
            }
            seen |= bit;
            distinct += 1;
            let Some(u) = self.lookup(addr) else { continue };
            if fallback.is_none() {
                fallback = Some(u.clone());
            }
            if u.is_healthy() {
                if c.first.is_none() {
                    c.first = Some(u.clone());
                } else {
                    c.second = Some(u.clone());
                    break;
                }
            }
            if distinct >= self.endpoints.len() {
                break;
            }
        }
        if c.first.is_none() {
            c.first = fallback;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Upstreams;

    fn balancer(reg: &Upstreams, eps: &[(&str, u32)]) -> Balancer {
        Balancer::new(
            eps.iter()
                .map(|(a, w)| (reg.get(a.parse().expect("addr")), *w, a.to_string()))
                .collect(),
        )
    }

    #[test]
    fn weights_are_honoured() {
        let reg = Upstreams::new();
        let b = balancer(&reg, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 3)]);
        let n = 20_000;
        let heavy = (0..n)
            .filter(|i| {
                b.first_choice(format!("k{i}").as_bytes())
                    == Some("127.0.0.1:2".parse().expect("addr"))
            })
            .count();
        let share = heavy as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.05, "share {share}");
    }

    #[test]
    fn removing_one_of_three_moves_only_its_keys() {
        let reg = Upstreams::new();
        let three = balancer(
            &reg,
            &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1), ("127.0.0.1:3", 1)],
        );
        let two = balancer(&reg, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)]);
        let removed: SocketAddr = "127.0.0.1:3".parse().expect("addr");
        let n = 20_000;
        let mut moved = 0;
        for i in 0..n {
            let k = format!("k{i}");
            let before = three.first_choice(k.as_bytes());
            let after = two.first_choice(k.as_bytes());
            if before != Some(removed) && before != after {
                moved += 1;
            }
        }
        assert_eq!(moved, 0, "keys of surviving endpoints moved");
    }

    #[test]
    fn unhealthy_first_choice_fails_over_within_the_version() {
        let reg = Upstreams::new();
        let b = balancer(
            &reg,
            &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1), ("127.0.0.1:3", 1)],
        );
        let key = b"some-user";
        let c = b.candidates(key);
        let first = c.first().expect("first").clone();
        let second = c.second().expect("second").clone();
        assert_ne!(first.addr(), second.addr());
        first.mark_failed();
        let c2 = b.candidates(key);
        assert_eq!(c2.first().expect("first").addr(), second.addr());
        for u in b.endpoints() {
            u.mark_failed();
        }
        assert_eq!(
            b.candidates(key).first().expect("fallback").addr(),
            first.addr()
        );
    }
}
