//! The routing snapshot: everything a request needs, immutable, swapped whole.
//!
//! A validated [`Config`] becomes one [`Snapshot`]: the router, every route's
//! sticky sources, weights, endpoint rings and metric handles. Requests load
//! it once (one `ArcSwap` load) and never see a mix of two configs.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use veer_control::config::{Config, Route, UpstreamProtocol, Version};

use crate::balance::Balancer;
use crate::metrics::{Metrics, ProxyErrorMetrics, VersionMetrics};
use crate::record::{Recorder, RouteKeys};
use crate::router::Router;
use crate::split::StickyKey;
use crate::upstream::{Connector, Upstreams};
use veer_control::config::MAX_ENDPOINTS;

/// One version of a route, ready for requests.
pub struct VersionTarget {
    /// The version name (metric label).
    pub name: Arc<str>,
    /// Its endpoints.
    pub balancer: Balancer,
    /// Its metric handles.
    pub metrics: VersionMetrics,
    /// Its inline recorder for the judge.
    pub recorder: Arc<Recorder>,
}

/// What the controller decides for a route when a snapshot is built.
pub struct RouteInputs {
    /// Canary share in effect, in basis points.
    pub weight_bp: u16,
    /// Stable's recorder (kept across snapshots while the route's identity stays).
    pub stable: Option<Arc<Recorder>>,
    /// The canary's recorder.
    pub canary: Option<Arc<Recorder>>,
    /// The canary is reverted (forced requests skip it unless allowed).
    pub canary_reverted: bool,
    /// The mirrored pairs of the canary (`[route.mirror]`).
    pub pairs: Option<Arc<crate::mirror::Pairs>>,
}

/// One route, ready for requests.
pub struct RouteTarget {
    /// Route name.
    pub name: Arc<str>,
    /// Sticky-key sources, first present wins.
    pub sticky: Box<[StickyKey]>,
    /// Until the response head arrives.
    pub timeout: Duration,
    /// One connect attempt.
    pub connect_timeout: Duration,
    /// Whether upstream 4xx count as errors.
    pub count_4xx_as_errors: bool,
    /// gRPC status codes that count as errors, one bit per code.
    pub grpc_errors: u32,
    /// Whether requests are recorded for the judge (`mode` is not `off`).
    pub record: bool,
    /// Stable version.
    pub stable: VersionTarget,
    /// Canary version, if deployed.
    pub canary: Option<VersionTarget>,
    /// Canary share in effect, in basis points.
    pub weight_bp: u16,
    /// `[route.force]`, if set.
    pub force: Option<ForceTarget>,
    /// `[route.mirror]`, while the canary may take traffic.
    pub mirror: Option<crate::mirror::MirrorTarget>,
    /// Bodiless GET and HEAD to `http://` endpoints go over raw
    /// connections ([`crate::raw`]; `[proxy] upstream_http1`).
    pub raw_http1: bool,
    /// `[route.outlier_detection]`: endpoints whose requests fail in a
    /// row are ejected (see [`crate::upstream::Upstream::outlier_answer`]).
    pub outlier: Option<veer_control::config::OutlierDetection>,
    /// `[route.retry]`, and its budget.
    pub retry: Option<Box<crate::retry::RetryTarget>>,
    /// `veer_request_buffer_full_total` (process-wide; a handle here so
    /// that the request path needs no other).
    pub buffer_full: prometheus::IntCounter,
    /// The longest request body taken, in bytes (`max_request_body`, the
    /// route's or `[proxy]`'s); `u64::MAX`: no limit.
    pub max_body: u64,
    /// `[route.rate_limit]`'s buckets.
    pub limiter: Option<Arc<crate::limit::RateLimiter>>,
    /// `allow_from` and `deny_from`, if either is set.
    pub sources: Option<Box<crate::limit::Sources>>,
    /// `[route.sticky_cookie]`, if set.
    pub mint: Option<Box<crate::split::MintCookie>>,
    /// `[route.cors]`, if set.
    pub cors: Option<Box<crate::cors::CorsTarget>>,
    /// `https_redirect`: requests over plain HTTP get 308 to HTTPS.
    pub https_redirect: bool,
    /// `require_client_cert`: requests without a verified client
    /// certificate get 403.
    pub require_client_cert: bool,
    /// `rewrite_prefix`, if set.
    pub rewrite: Option<Box<crate::edit::Rewrite>>,
    /// `[route.request_headers]`, if it edits anything.
    pub request_edits: Option<Box<crate::edit::Edits>>,
    /// `[route.response_headers]`, if it edits anything.
    pub response_edits: Option<Box<crate::edit::Edits>>,
    /// The route as configured (for status), shared with the config.
    pub config: Arc<Route>,
}

/// `[route.force]`, ready for requests.
pub struct ForceTarget {
    header: Option<HeaderName>,
    cookie: Option<Box<str>>,
    /// `canary_values`, `stable_values`.
    canary_values: Box<[Box<str>]>,
    stable_values: Box<[Box<str>]>,
    /// Forced requests may reach the canary (not reverted, or allowed).
    canary_open: bool,
}

/// Which version a forced request goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forced {
    /// Stable.
    Stable,
    /// The canary.
    Canary,
}

impl RouteTarget {
    /// The version a request went to: the canary when it did and there
    /// is one, else stable.
    pub fn version(&self, canary: bool) -> &VersionTarget {
        match (&self.canary, canary) {
            (Some(c), true) => c,
            _ => &self.stable,
        }
    }

    /// The version the request names through `[route.force]`: the header if
    /// it names one, else the cookie if it does; None (the weighted split)
    /// otherwise, or when it names a canary that may not take forced
    /// requests (reverted).
    pub fn forced(&self, headers: &http::HeaderMap) -> Option<Forced> {
        let f = self.force.as_ref()?;
        let listed = |list: &[Box<str>], v: &[u8]| list.iter().any(|l| l.as_bytes() == v);
        let names = |v: &[u8]| -> Option<Forced> {
            if v == b"stable" || v == self.stable.name.as_bytes() || listed(&f.stable_values, v) {
                return Some(Forced::Stable);
            }
            let c = self.canary.as_ref()?;
            (v == b"canary" || v == c.name.as_bytes() || listed(&f.canary_values, v))
                .then_some(Forced::Canary)
        };
        let from_header = f
            .header
            .as_ref()
            .and_then(|h| headers.get(h))
            .and_then(|v| names(v.as_bytes()));
        let from_cookie = || {
            f.cookie
                .as_deref()
                .and_then(|c| crate::split::cookie(headers, c))
                .and_then(names)
        };
        match from_header.or_else(from_cookie)? {
            Forced::Canary if !f.canary_open => None,
            v => Some(v),
        }
    }
}

/// The whole routing state of one config generation.
pub struct Snapshot {
    /// Increments with every applied config.
    pub generation: u64,
    /// Host and path matching.
    pub router: Router,
    /// Routes by index.
    pub routes: Vec<Arc<RouteTarget>>,
    /// Idle time allowed between body frames.
    pub body_timeout: Duration,
    /// `[proxy] request_buffer`.
    pub request_buffer: usize,
    /// `[proxy] trusted_hops`.
    pub trusted_hops: usize,
    /// `[proxy] idle_timeout` (for tunnels).
    pub idle_timeout: Duration,
    /// Counters for requests that reach no version.
    pub proxy_errors: ProxyErrorMetrics,
    /// `[proxy] access_log`.
    pub access_log: veer_control::config::AccessLog,
    /// `[proxy] request_id`.
    pub request_id: bool,
    /// `[proxy] merge_slashes`.
    pub merge_slashes: bool,
}

/// The host of an endpoint's `host:port` (an IPv6 address without brackets).
fn endpoint_host(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Why a config could not become a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Endpoint host names that did not resolve.
    #[error("{}", .0.join("; "))]
    Resolve(Vec<String>),
}

/// Every address each endpoint of a config stands for, by its `host:port`
/// as configured: sorted, without repeats (so that a DNS server's
/// round-robin order is no change); one for an address.
pub type Addresses = HashMap<String, Vec<SocketAddr>>;

/// The name a version's member goes by (`/status`, metrics, logs): the
/// endpoint as configured, and for a host name that stands for several
/// addresses, each address after it: `checkout.svc:8000 (10.0.0.7:8000)`.
fn member_name(configured: &str, addr: SocketAddr, several: bool) -> String {
    if several {
        format!("{configured} ({addr})")
    } else {
        configured.to_string()
    }
}

/// Whether a version's member (its name: the endpoint as configured, then
/// its address for a name of several) is of the endpoint
/// configured as `configured`.
pub fn member_of(member: &str, configured: &str) -> bool {
    member
        .strip_prefix(configured)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(" ("))
}

/// Resolves every endpoint address of a config: a host name stands for
/// every address it resolves to (as nginx's `server` and Envoy's strict
/// DNS take them: a Kubernetes headless Service's pods, each an endpoint).
/// Blocking (DNS): call it off the reactor.
pub fn resolve(config: &Config) -> Result<Addresses, BuildError> {
    let mut out = HashMap::new();
    let mut errors = Vec::new();
    let versions = config
        .routes
        .iter()
        .flat_map(|r| std::iter::once(&r.stable).chain(r.canary.as_ref()));
    for v in versions {
        for e in &v.endpoints {
            if out.contains_key(&e.addr) {
                continue;
            }
            if let Ok(a) = e.addr.parse::<SocketAddr>() {
                out.insert(e.addr.clone(), vec![a]);
                continue;
            }
            match e.addr.to_socket_addrs().map(|it| it.collect::<Vec<_>>()) {
                Ok(mut all) if !all.is_empty() => {
                    all.sort_unstable();
                    all.dedup();
                    out.insert(e.addr.clone(), all);
                }
                Ok(_) => errors.push(format!("endpoint {}: no address found", e.addr)),
                Err(err) => errors.push(format!("endpoint {}: {err}", e.addr)),
            }
        }
    }
    errors.extend(crate::upstream_tls::check(config));
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(BuildError::Resolve(errors))
    }
}

impl Snapshot {
    /// Builds the snapshot of `config`. `addrs` comes from [`resolve`];
    /// `inputs` gives each route's effective weight and recorders.
    pub fn build(
        config: &Config,
        generation: u64,
        addrs: &Addresses,
        upstreams: &Upstreams,
        metrics: &Metrics,
        mut inputs: impl FnMut(&Route) -> RouteInputs,
    ) -> Snapshot {
        upstreams.sweep();
        upstreams.rings.sweep();
        let mut router = Router::default();
        let mut routes = Vec::with_capacity(config.routes.len());
        // An endpoint named by several routes gets the largest of their caps.
        let mut caps: std::collections::HashMap<std::net::SocketAddr, usize> =
            std::collections::HashMap::new();
        for r in &config.routes {
            for v in std::iter::once(&r.stable).chain(r.canary.as_ref()) {
                for a in v
                    .endpoints
                    .iter()
                    .flat_map(|e| addrs.get(&e.addr))
                    .flatten()
                {
                    let c = caps.entry(*a).or_insert(0);
                    *c = (*c).max(r.max_upstream_connections);
                }
            }
        }
        let cap_of = |a: &std::net::SocketAddr| caps.get(a).copied().unwrap_or(1024);
        for (i, r) in config.routes.iter().enumerate() {
            router.add(&r.hosts, &r.path_prefix, i);
            let input = inputs(r);
            let version = |v: &Version, recorder: Option<Arc<Recorder>>| VersionTarget {
                name: v.name.as_str().into(),
                balancer: Balancer::new(
                    {
                        let tls = (v.protocol == UpstreamProtocol::Https)
                            .then(|| upstreams.tls.get(&v.tls.clone().unwrap_or_default()));
                        let server_name = v.tls.as_ref().and_then(|t| t.server_name.as_deref());
                        let mut seen = HashSet::new();
                        let mut members = Vec::with_capacity(v.endpoints.len());
                        for e in &v.endpoints {
                            let all = addrs.get(&e.addr).map_or(&[][..], Vec::as_slice);
                            let connector = Connector::new(
                                v.protocol,
                                tls.clone().unwrap_or_else(|| Err(String::new())),
                                server_name,
                                endpoint_host(&e.addr),
                            );
                            // An address is one member, whichever names
                            // it first (two names may resolve to it): here
                            // so that the cap below counts addresses (the
                            // balancer keeps it so too, its walk's need).
                            for a in all.iter().filter(|a| seen.insert(**a)) {
                                members.push((
                                    upstreams.get(*a, connector.clone(), cap_of(a)),
                                    e.weight,
                                    member_name(&e.addr, *a, all.len() > 1),
                                ));
                            }
                        }
                        if members.len() > MAX_ENDPOINTS {
                            tracing::warn!(
                                route = %r.name,
                                version = %v.name,
                                addresses = members.len(),
                                "a version's endpoints resolve to more than {MAX_ENDPOINTS} addresses: the first {MAX_ENDPOINTS} by address are used; put a larger fleet behind a Service's one address"
                            );
                            members.sort_by_key(|(u, _, _)| u.addr());
                            members.truncate(MAX_ENDPOINTS);
                        }
                        members
                    },
                    &upstreams.rings,
                ),
                metrics: metrics.version(&r.name, &v.name),
                recorder: recorder
                    .unwrap_or_else(|| Arc::new(Recorder::new(Arc::new(RouteKeys::new(0))))),
            };
            let canary = r.canary.as_ref().map(|c| version(c, input.canary.clone()));
            let weight_bp = if canary.is_some() { input.weight_bp } else { 0 };
            routes.push(Arc::new(RouteTarget {
                name: r.name.as_str().into(),
                sticky: r.sticky.iter().filter_map(StickyKey::from_config).collect(),
                timeout: r.timeout,
                connect_timeout: r.connect_timeout,
                count_4xx_as_errors: r.count_4xx_as_errors,
                grpc_errors: r
                    .grpc_error_codes
                    .iter()
                    .fold(0, |m, c| m | (1u32 << (c & 31))),
                record: r.judge.mode != veer_control::config::JudgeMode::Off,
                stable: version(&r.stable, input.stable.clone()),
                canary,
                weight_bp,
                force: r.force.as_ref().map(|f| ForceTarget {
                    header: f
                        .header
                        .as_deref()
                        .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
                    cookie: f.cookie.as_deref().map(Into::into),
                    canary_values: f.canary_values.iter().map(|v| v.as_str().into()).collect(),
                    stable_values: f.stable_values.iter().map(|v| v.as_str().into()).collect(),
                    canary_open: !input.canary_reverted || f.allow_when_reverted,
                }),
                mirror: match (&r.mirror, &input.pairs) {
                    (Some(m), Some(pairs)) if !input.canary_reverted && r.canary.is_some() => {
                        pairs.set_limit(m.max_concurrent);
                        Some(crate::mirror::MirrorTarget::new(
                            m,
                            pairs.clone(),
                            metrics.mirror(&r.name),
                        ))
                    }
                    _ => None,
                },
                raw_http1: config.proxy.upstream_http1 == veer_control::config::UpstreamHttp1::Veer,
                outlier: r.outlier_detection.clone(),
                retry: r.retry.as_ref().map(|t| {
                    let percent = t.budget_percent;
                    Box::new(crate::retry::RetryTarget {
                        settings: t.clone(),
                        budget: upstreams.retry_budgets.get_or_make(
                            &r.name,
                            |b| b.percent() == percent,
                            || crate::retry::RetryBudget::new(percent),
                        ),
                        keep_up_to: config.proxy.request_buffer,
                    })
                }),
                buffer_full: metrics.request_buffer_full.clone(),
                max_body: match r.max_request_body.unwrap_or(config.proxy.max_request_body) {
                    0 => u64::MAX,
                    n => n,
                },
                limiter: r
                    .rate_limit
                    .clone()
                    .map(|l| upstreams.limiters.get(&r.name, l)),
                sources: crate::limit::Sources::of(r),
                https_redirect: r.https_redirect,
                require_client_cert: r.require_client_cert,
                cors: r.cors.as_ref().and_then(crate::cors::CorsTarget::of),
                mint: r
                    .sticky_cookie
                    .as_ref()
                    .map(|c| Box::new(crate::split::MintCookie::of(c))),
                rewrite: crate::edit::Rewrite::of(r),
                request_edits: crate::edit::Edits::of(&r.request_headers),
                response_edits: crate::edit::Edits::of(&r.response_headers),
                config: r.clone(),
            }));
            // Exported at 0 where ejections may come (stable's endpoints
            // only), so that `increase` sees the first one (as the revert
            // counters are).
            if let Some(t) = routes.last().filter(|t| t.outlier.is_some()) {
                t.stable.metrics.export_ejections();
            }
            // So are retries, on routes that retry.
            if let Some(t) = routes.last().filter(|t| t.retry.is_some()) {
                for v in std::iter::once(&t.stable).chain(&t.canary) {
                    v.metrics.export_retries();
                }
            }
        }
        Snapshot {
            generation,
            router,
            routes,
            body_timeout: config.proxy.body_timeout,
            request_buffer: config.proxy.request_buffer,
            trusted_hops: config.proxy.trusted_hops,
            idle_timeout: config.proxy.idle_timeout,
            proxy_errors: metrics.proxy_errors(),
            access_log: config.proxy.access_log,
            request_id: config.proxy.request_id,
            merge_slashes: config.proxy.merge_slashes,
        }
    }

    /// Publishes the snapshot's gauges and forgets series of versions that
    /// `previous` had and this one does not.
    pub fn publish(&self, previous: Option<&Snapshot>, metrics: &Metrics) {
        let labels = |s: &Snapshot| {
            let mut v = Vec::new();
            for r in &s.routes {
                v.push((r.name.clone(), "stable", r.stable.name.clone()));
                if let Some(c) = &r.canary {
                    v.push((r.name.clone(), "canary", c.name.clone()));
                }
            }
            v
        };
        let now = labels(self);
        // Sets, not scans: a rebuild of a 1000-route snapshot compares
        // each label once.
        let now_versions: HashSet<(&str, &str)> =
            now.iter().map(|(r, _, v)| (&**r, &**v)).collect();
        let now_roles: HashSet<(&str, &str, &str)> =
            now.iter().map(|(r, ro, v)| (&**r, *ro, &**v)).collect();
        let now_routes: HashSet<&str> = self.routes.iter().map(|r| &*r.name).collect();
        let mut prev_routes = HashSet::new();
        if let Some(prev) = previous {
            for (route, role, version) in labels(prev) {
                if !now_versions.contains(&(&*route, &*version)) {
                    metrics.forget_version(&route, role, &version);
                } else if !now_roles.contains(&(&*route, role, &*version)) {
                    let _ = metrics
                        .version_info
                        .remove_label_values(&[&route, role, &version]);
                }
            }
            for r in &prev.routes {
                prev_routes.insert(&*r.name);
                if !now_routes.contains(&*r.name) {
                    metrics.forget_route(&r.name);
                }
            }
        }
        for r in &self.routes {
            if !prev_routes.contains(&*r.name) {
                metrics.add_route(&r.name);
            }
        }
        for (route, role, version) in &now {
            metrics
                .version_info
                .with_label_values(&[&**route, role, &**version])
                .set(1);
        }
        for r in &self.routes {
            metrics
                .canary_weight
                .with_label_values(&[&*r.name, "configured"])
                .set(r.config.canary_weight_percent());
            metrics
                .canary_weight
                .with_label_values(&[&*r.name, "effective"])
                .set(f64::from(r.weight_bp) / 100.0);
        }
        metrics.generation.set(self.generation as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version of a host name standing for 70 addresses, one address,
    /// and a second name for that same address.
    fn built(addrs: &Addresses) -> Snapshot {
        let text = r#"
[[route]]
name = "web"
[route.stable]
version = "v1"
endpoints = ["many.test:80", "127.0.0.5:80", "dup.test:80"]
"#;
        let config = Config::parse(text, std::path::Path::new("/etc/veer")).expect("valid");
        let metrics = Metrics::new().expect("metrics");
        Snapshot::build(&config, 1, addrs, &Upstreams::new(), &metrics, |_| {
            RouteInputs {
                weight_bp: 0,
                stable: None,
                canary: None,
                canary_reverted: false,
                pairs: None,
            }
        })
    }

    #[test]
    fn a_name_is_each_of_its_addresses_once_and_a_version_at_most_64() {
        let five: SocketAddr = "127.0.0.5:80".parse().unwrap();
        let mut addrs = Addresses::new();
        addrs.insert("127.0.0.5:80".into(), vec![five]);
        addrs.insert("dup.test:80".into(), vec![five]);
        addrs.insert(
            "many.test:80".into(),
            vec![
                "127.1.0.1:80".parse().unwrap(),
                "127.1.0.2:80".parse().unwrap(),
            ],
        );
        let snap = built(&addrs);
        let names: Vec<String> = snap.routes[0]
            .stable
            .balancer
            .members()
            .map(|(n, _, u)| format!("{n} = {}", u.addr()))
            .collect();
        assert_eq!(
            names,
            [
                "127.0.0.5:80 = 127.0.0.5:80",
                "many.test:80 (127.1.0.1:80) = 127.1.0.1:80",
                "many.test:80 (127.1.0.2:80) = 127.1.0.2:80",
            ]
        );
        assert!(member_of("many.test:80 (127.1.0.1:80)", "many.test:80"));
        assert!(member_of("127.0.0.5:80", "127.0.0.5:80"));
        assert!(!member_of(
            "many.test:8000 (127.1.0.1:8000)",
            "many.test:80"
        ));

        // Past 64 addresses, the first 64 by address (the balancer's walk
        // over a version's endpoints counts them in 64 bits).
        addrs.insert(
            "many.test:80".into(),
            (1..=70)
                .map(|i| SocketAddr::from(([127, 2, 0, i], 80)))
                .collect(),
        );
        let snap = built(&addrs);
        let b = &snap.routes[0].stable.balancer;
        assert_eq!(b.endpoints().len(), MAX_ENDPOINTS);
        assert_eq!(b.endpoints()[0].addr(), five);
        assert_eq!(
            b.endpoints()[63].addr(),
            SocketAddr::from(([127, 2, 0, 63], 80))
        );
        // Every key still finds an endpoint.
        for i in 0..200u32 {
            assert!(b.pick(&i.to_le_bytes()).is_some());
        }
    }
}
