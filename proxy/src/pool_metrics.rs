//! `veer_upstream_connections`, `veer_upstream_connection_limit` and
//! `veer_upstream_waiting`: what each endpoint's connections are doing,
//! read from its pool at each scrape (HAProxy's per-server current
//! sessions, limit and queue). Nothing here is on the request path.
//!
//! Only endpoints with a connection open or a request waiting are
//! exported: an ingress's idle routes add no series to every scrape. An
//! endpoint that two routes name with the same protocol has one pool,
//! shown under each.

use prometheus::proto::{Gauge, Metric, MetricFamily, MetricType};

use crate::snapshot::Snapshot;
use crate::upstream::Load;
use crate::window_metrics::label;

const CONNECTIONS: &str = "veer_upstream_connections";
const CONNECTIONS_HELP: &str = "Connections open to an endpoint: busy (a request on it, an HTTP/2 connection with a stream, or being opened) or idle (kept for the next request).";
const LIMIT: &str = "veer_upstream_connection_limit";
const LIMIT_HELP: &str =
    "The endpoint's connection cap (the largest max_upstream_connections of the routes naming it).";
const WAITING: &str = "veer_upstream_waiting";
const WAITING_HELP: &str = "Requests waiting for a connection to the endpoint (every connection busy at the cap; for requests whose bodies stream, every upload slot, half the cap, busy); they get 503 overloaded after connect_timeout.";

/// The families, from the endpoints of `snap`'s routes.
pub fn families(snap: &Snapshot) -> Vec<MetricFamily> {
    let (mut connections, mut limits, mut waiting) = (Vec::new(), Vec::new(), Vec::new());
    for route in snap.routes.iter() {
        for version in std::iter::once(&route.stable).chain(route.canary.as_ref()) {
            for (endpoint, _, upstream) in version.balancer.members() {
                let load: Load = upstream.load();
                if load.busy + load.idle + load.waiting == 0 {
                    continue;
                }
                let labels = |state: Option<&str>| {
                    let mut l = vec![label("endpoint", endpoint), label("route", &route.name)];
                    if let Some(s) = state {
                        l.push(label("state", s));
                    }
                    l.push(label("version", &version.name));
                    l
                };
                connections.push(gauge(labels(Some("busy")), load.busy));
                connections.push(gauge(labels(Some("idle")), load.idle));
                limits.push(gauge(labels(None), load.limit));
                waiting.push(gauge(labels(None), load.waiting));
            }
        }
    }
    if limits.is_empty() {
        return Vec::new();
    }
    vec![
        family(CONNECTIONS, CONNECTIONS_HELP, connections),
        family(LIMIT, LIMIT_HELP, limits),
        family(WAITING, WAITING_HELP, waiting),
    ]
}

fn gauge(labels: Vec<prometheus::proto::LabelPair>, value: usize) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value as f64);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_gauge(g);
    m
}

fn family(name: &str, help: &str, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.into());
    f.set_help(help.into());
    f.set_field_type(MetricType::GAUGE);
    f.set_metric(metrics);
    f
}
