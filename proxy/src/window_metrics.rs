//! `veer_window_latency_seconds`: a Prometheus summary whose quantiles are
//! the judge's window quantiles, with cumulative `_sum` and `_count`.
//!
//! The judge publishes one sample per (route, version) each tick; scrapes
//! read the latest. Nothing here is on the request path.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{LabelPair, Metric, MetricFamily, MetricType, Quantile, Summary};

const NAME: &str = "veer_window_latency_seconds";
const HELP: &str =
    "Latency quantiles over the judge window; _sum and _count are cumulative since start.";

/// Window quantiles reported, in order.
pub const QUANTILES: [f64; 4] = [0.5, 0.95, 0.99, 0.999];

/// One (route, version)'s latest window latency.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowLatency {
    /// Seconds at each of [`QUANTILES`].
    pub quantiles: [f64; 4],
    /// Requests since start.
    pub count: u64,
    /// Seconds of latency since start.
    pub sum: f64,
}

/// The collector.
pub struct WindowSummary {
    desc: Desc,
    samples: Mutex<BTreeMap<(String, String), WindowLatency>>,
}

impl WindowSummary {
    /// An empty summary.
    pub fn new() -> Result<WindowSummary, prometheus::Error> {
        Ok(WindowSummary {
            desc: Desc::new(
                NAME.into(),
                HELP.into(),
                vec!["route".into(), "version".into()],
                Default::default(),
            )?,
            samples: Mutex::new(BTreeMap::new()),
        })
    }

    /// Replaces the samples of `route` with `versions`.
    pub fn publish(&self, route: &str, versions: Vec<(String, WindowLatency)>) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        // The route's entries are adjacent in the map: remove just those
        // (a retain over every route's would make publishing all routes
        // quadratic in their number).
        let stale: Vec<(String, String)> = s
            .range((route.to_string(), String::new())..)
            .take_while(|((r, _), _)| r == route)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            s.remove(&k);
        }
        for (v, w) in versions {
            s.insert((route.to_string(), v), w);
        }
    }

    /// Forgets routes not in `keep`.
    pub fn retain_routes(&self, keep: &[&str]) {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        s.retain(|(r, _), _| keep.contains(&r.as_str()));
    }
}

/// A label pair.
pub(crate) fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.into());
    l.set_value(value.into());
    l
}

impl Collector for WindowSummary {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let mut family = MetricFamily::default();
        family.set_name(NAME.into());
        family.set_help(HELP.into());
        family.set_field_type(MetricType::SUMMARY);
        let mut metrics = Vec::with_capacity(samples.len());
        for ((route, version), w) in samples.iter() {
            let mut summary = Summary::default();
            summary.set_sample_count(w.count);
            summary.set_sample_sum(w.sum);
            summary.set_quantile(
                QUANTILES
                    .iter()
                    .zip(w.quantiles)
                    .map(|(q, v)| {
                        let mut quantile = Quantile::default();
                        quantile.set_quantile(*q);
                        quantile.set_value(v);
                        quantile
                    })
                    .collect(),
            );
            let mut m = Metric::default();
            m.set_label(vec![label("route", route), label("version", version)]);
            m.set_summary(summary);
            metrics.push(m);
        }
        family.set_metric(metrics);
        vec![family]
    }
}
