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
//!
//! A ring is a function of its `(address, weight)` list alone, so versions
//! with the same list share one ([`Rings`]): a rebuild of the routing
//! snapshot reuses the rings of versions whose endpoints did not change,
//! and routes that send to the same endpoints hold one ring between them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use pingora_ketama::{Bucket, Continuum};

use crate::upstream::Upstream;

/// The `(address, weight)` list a ring is built from, in config order.
type RingKey = Box<[(SocketAddr, u32)]>;

/// The rings that snapshots hold, by the list they were built from: a
/// version whose list a live snapshot already has gets that ring, not a new
/// one (160 points per unit of weight: ~1.3 KB for two endpoints, and
/// building 2 000 of them was half of a 1 000-route rebuild's 12 ms).
#[derive(Default)]
pub struct Rings {
    by_key: Mutex<HashMap<RingKey, Weak<Continuum>>>,
}

impl Rings {
    /// The ring of the list `key`: a live one of the same list, else a
    /// new one.
    fn get(&self, key: RingKey) -> Arc<Continuum> {
        let mut map = match self.by_key.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(ring) = map.get(&key).and_then(Weak::upgrade) {
            return ring;
        }
        let buckets: Vec<Bucket> = key.iter().map(|(a, w)| Bucket::new(*a, *w)).collect();
        let ring = Arc::new(Continuum::new(&buckets));
        map.insert(key, Arc::downgrade(&ring));
        ring
    }

    /// Forgets the rings no snapshot holds any more (once a build).
    pub fn sweep(&self) {
        let mut map = match self.by_key.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.retain(|_, ring| ring.strong_count() > 0);
    }

    /// Rings known (live or not yet swept).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_key.lock().map_or(0, |m| m.len())
    }
}

/// Endpoints of one version and their ring.
pub struct Balancer {
    ring: Arc<Continuum>,
    /// Sorted by address, for lookup from ring points.
    endpoints: Vec<Arc<Upstream>>,
    /// `(configured name, weight)`, aligned with `endpoints`.
    names: Vec<(Box<str>, u32)>,
}

/// The endpoint chosen for a request, and where on the ring its key fell,
/// so that a fallback can be found later without the key.
#[derive(Clone, Copy, Debug)]
pub struct Pick {
    ring_idx: usize,
    first: usize,
}

impl Pick {
    /// Index of the chosen endpoint in [`Balancer::endpoints`].
    pub fn first(&self) -> usize {
        self.first
    }
}

impl Balancer {
    /// A ring over `(upstream, weight, configured name)`; addresses are
    /// unique. The ring comes from `rings` (shared with every version of
    /// the same addresses and weights).
    pub fn new(mut endpoints: Vec<(Arc<Upstream>, u32, String)>, rings: &Rings) -> Balancer {
        // One endpoint an address (the first listed of two alike): the
        // ring walk counts endpoints by address, and a second of the same
        // address was never found, so a walk for another endpoint (a
        // failed connect's fallback) went round the ring for ever.
        let mut seen = std::collections::HashSet::new();
        endpoints.retain(|(u, _, _)| seen.insert(u.addr()));
        let key: RingKey = endpoints.iter().map(|(u, w, _)| (u.addr(), *w)).collect();
        endpoints.sort_by_key(|(u, _, _)| u.addr());
        let names = endpoints
            .iter()
            .map(|(_, w, n)| (n.as_str().into(), *w))
            .collect();
        Balancer {
            ring: rings.get(key),
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

    /// The key's first endpoint on the ring, ignoring health.
    pub fn first_choice(&self, key: &[u8]) -> Option<SocketAddr> {
        self.ring.node(key)
    }

    /// The endpoint for `key`: the first healthy one in ring order from the
    /// key's point. If none is healthy, the key's own first choice is tried
    /// anyway, since an endpoint in back-off may have recovered.
    pub fn pick(&self, key: &[u8]) -> Option<Pick> {
        if self.endpoints.len() == 1 {
            return Some(Pick {
                ring_idx: 0,
                first: 0,
            });
        }
        let ring_idx = self.ring.node_idx(key);
        let mut first_choice = None;
        let found = self.walk(ring_idx, |i, u| {
            first_choice.get_or_insert(i);
            u.is_healthy()
        });
        found.or(first_choice).map(|first| Pick { ring_idx, first })
    }

    /// The endpoint to retry a failed connect on: the next healthy one after
    /// the pick's, in ring order, within the same version.
    pub fn fallback(&self, pick: &Pick) -> Option<usize> {
        if self.endpoints.len() == 1 {
            return None;
        }
        self.walk(pick.ring_idx, |i, u| i != pick.first && u.is_healthy())
    }

    /// Where a retry of a request picked as `pick` goes, having been to
    /// the endpoints in `tried` (one bit each, by index): the next healthy
    /// endpoint in ring order not tried yet, within the same version; else
    /// the next healthy one other than the pick's; the same one when there
    /// is no other.
    pub fn retry_pick(&self, pick: &Pick, tried: u64) -> Pick {
        if self.endpoints.len() == 1 {
            return *pick;
        }
        let fresh = self.walk(pick.ring_idx, |i, u| {
            tried & (1u64 << (i % 64)) == 0 && u.is_healthy()
        });
        match fresh.or_else(|| self.fallback(pick)) {
            Some(first) => Pick {
                ring_idx: pick.ring_idx,
                first,
            },
            None => *pick,
        }
    }

    /// Walks the ring from `ring_idx`, visiting each distinct endpoint once,
    /// until `want` accepts one.
    fn walk(
        &self,
        mut ring_idx: usize,
        mut want: impl FnMut(usize, &Upstream) -> bool,
    ) -> Option<usize> {
        // Config validation caps a version at 64 endpoints: one bit each.
        let mut seen: u64 = 0;
        let mut distinct = 0;
        while distinct < self.endpoints.len() {
            let addr = self.ring.get_addr(&mut ring_idx)?;
            let Ok(i) = self.endpoints.binary_search_by(|u| u.addr().cmp(addr)) else {
                continue;
            };
            let bit = 1u64 << (i % 64);
            if seen & bit != 0 {
                continue;
            }
            seen |= bit;
            distinct += 1;
            if self.endpoints.get(i).is_some_and(|u| want(i, u)) {
                return Some(i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Upstreams;

    /// A version listing one address twice (two names resolving to it)
    /// is one endpoint: a failed connect's fallback finds none (it went
    /// round the ring for ever, a worker thread with it), and a key is
    /// still picked.
    #[test]
    fn an_address_listed_twice_is_one_endpoint() {
        let reg = Upstreams::new();
        let b = balancer(&reg, &[("127.0.0.1:11", 1), ("127.0.0.1:11", 1)]);
        assert_eq!(b.endpoints().len(), 1);
        let pick = b.pick(b"a-user").expect("pick");
        assert_eq!(b.fallback(&pick), None);
        let b = balancer(
            &reg,
            &[
                ("127.0.0.1:11", 1),
                ("127.0.0.1:12", 1),
                ("127.0.0.1:11", 2),
            ],
        );
        assert_eq!(b.endpoints().len(), 2);
        let pick = b.pick(b"a-user").expect("pick");
        assert_ne!(b.fallback(&pick), Some(pick.first()));
    }

    fn balancer(reg: &Upstreams, eps: &[(&str, u32)]) -> Balancer {
        balancer_in(reg, &Rings::default(), eps)
    }

    fn balancer_in(reg: &Upstreams, rings: &Rings, eps: &[(&str, u32)]) -> Balancer {
        Balancer::new(
            eps.iter()
                .map(|(a, w)| {
                    (
                        reg.get(a.parse().expect("addr"), crate::upstream::Connector::H1, 8),
                        *w,
                        a.to_string(),
                    )
                })
                .collect(),
            rings,
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
        let pick = b.pick(key).expect("pick");
        let first = b.endpoints()[pick.first()].clone();
        let second = b.endpoints()[b.fallback(&pick).expect("fallback")].clone();
        assert_ne!(first.addr(), second.addr());
        assert_eq!(b.first_choice(key), Some(first.addr()));
        first.mark_failed(crate::error::ProxyError::UpstreamConnect);
        let again = b.pick(key).expect("pick");
        assert_eq!(b.endpoints()[again.first()].addr(), second.addr());
        for u in b.endpoints() {
            u.mark_failed(crate::error::ProxyError::UpstreamReset);
        }
        let last = b.pick(key).expect("pick");
        assert_eq!(b.endpoints()[last.first()].addr(), first.addr());
        assert_eq!(b.fallback(&last), None);
    }

    #[test]
    fn retries_go_to_endpoints_not_tried_yet() {
        let reg = Upstreams::new();
        let b = balancer(
            &reg,
            &[
                ("127.0.0.1:11", 1),
                ("127.0.0.1:12", 1),
                ("127.0.0.1:13", 1),
            ],
        );
        let bit = |p: &Pick| 1u64 << p.first();
        let first = b.pick(b"a-user").expect("pick");
        let second = b.retry_pick(&first, bit(&first));
        let third = b.retry_pick(&second, bit(&first) | bit(&second));
        let all: std::collections::HashSet<usize> =
            [first.first(), second.first(), third.first()].into();
        assert_eq!(all.len(), 3, "each try to another endpoint");
        // All tried: the next other than the last try's.
        let fourth = b.retry_pick(&third, 0b111);
        assert_ne!(fourth.first(), third.first());
        // Two endpoints: the other one, then back.
        let two = balancer(&reg, &[("127.0.0.1:21", 1), ("127.0.0.1:22", 1)]);
        let p = two.pick(b"a-user").expect("pick");
        let q = two.retry_pick(&p, bit(&p));
        assert_ne!(p.first(), q.first());
        assert_eq!(two.retry_pick(&q, bit(&p) | bit(&q)).first(), p.first());
    }

    #[test]
    fn versions_of_the_same_endpoints_share_a_ring_until_none_holds_it() {
        let reg = Upstreams::new();
        let rings = Rings::default();
        let eps = [("127.0.0.1:1", 1), ("127.0.0.1:2", 3)];
        let a = balancer_in(&reg, &rings, &eps);
        let b = balancer_in(&reg, &rings, &eps);
        assert!(Arc::ptr_eq(&a.ring, &b.ring), "same list, one ring");
        let reweighted = balancer_in(&reg, &rings, &[("127.0.0.1:1", 1), ("127.0.0.1:2", 1)]);
        assert!(
            !Arc::ptr_eq(&a.ring, &reweighted.ring),
            "other weights, another ring"
        );
        // A shared ring routes as a ring of its own would.
        let own = balancer(&reg, &eps);
        for i in 0..2_000 {
            let k = format!("k{i}");
            assert_eq!(a.first_choice(k.as_bytes()), own.first_choice(k.as_bytes()));
        }
        assert_eq!(rings.len(), 2);
        drop((a, reweighted));
        rings.sweep();
        assert_eq!(rings.len(), 1, "b still holds the first ring");
        drop(b);
        rings.sweep();
        assert_eq!(rings.len(), 0, "no balancer holds a ring: forgotten");
    }
}
