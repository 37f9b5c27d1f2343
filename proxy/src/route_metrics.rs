//! Per-route metric families with a fixed set of label values
//! (`veer_reverts_total{route,reason}`, `veer_deployments_total`,
//! `veer_smoke_checks_total`, `veer_verdict`), kept compactly.
//!
//! A `prometheus` vector keeps, per series, its own copy of the metric's
//! description (name, help text, label names) and label pairs: about 350
//! bytes each. These families export every value of every route at 0 from
//! the route's first snapshot (so that `increase()` sees a route's first
//! revert), which made them most of an idle route's series: 26 per route,
//! 26 000 for an ingress of 1000 routes. Here a route costs one small array
//! of counts, and the series are rendered only when scraped. The output is
//! the same text as the vectors' (same names, labels, values).

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

/// One family: a `route` label and one other label with fixed values.
pub struct RouteFamily {
    desc: Desc,
    label: &'static str,
    values: Vec<&'static str>,
    gauge: bool,
    routes: Mutex<BTreeMap<Box<str>, Box<[i64]>>>,
}

impl RouteFamily {
    /// A counter (`gauge` false) or gauge family `name` whose second label
    /// `label` takes `values`.
    pub fn new(
        name: &str,
        help: &str,
        label: &'static str,
        values: Vec<&'static str>,
        gauge: bool,
    ) -> Result<RouteFamily, prometheus::Error> {
        Ok(RouteFamily {
            desc: Desc::new(
                name.into(),
                help.into(),
                vec!["route".into(), label.into()],
                Default::default(),
            )?,
            label,
            values,
            gauge,
            routes: Mutex::new(BTreeMap::new()),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<Box<str>, Box<[i64]>>) -> T) -> T {
        f(&mut self.routes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn counts<'a>(
        &self,
        map: &'a mut BTreeMap<Box<str>, Box<[i64]>>,
        route: &str,
    ) -> &'a mut [i64] {
        if !map.contains_key(route) {
            map.insert(route.into(), vec![0; self.values.len()].into());
        }
        map.get_mut(route).map_or(&mut [], |c| &mut c[..])
    }

    /// Exports the route's series at 0 (if not exported yet).
    pub fn add_route(&self, route: &str) {
        self.with(|m| {
            self.counts(m, route);
        });
    }

    /// Forgets the route's series.
    pub fn forget_route(&self, route: &str) {
        self.with(|m| m.remove(route));
    }

    /// Adds 1 to the series of `route` and `value` (a value not in the
    /// family's is ignored).
    pub fn inc(&self, route: &str, value: &str) {
        let Some(i) = self.values.iter().position(|v| *v == value) else {
            return;
        };
        self.with(|m| {
            if let Some(c) = self.counts(m, route).get_mut(i) {
                *c += 1;
            }
        });
    }

    /// Sets the series of `route` to 1 for `value` and 0 for the others.
    pub fn set_only(&self, route: &str, value: &str) {
        self.with(|m| {
            for (c, v) in self.counts(m, route).iter_mut().zip(&self.values) {
                *c = i64::from(*v == value);
            }
        });
    }

    /// The value of one series (None if the route is not exported).
    pub fn get(&self, route: &str, value: &str) -> Option<i64> {
        let i = self.values.iter().position(|v| *v == value)?;
        self.with(|m| m.get(route).and_then(|c| c.get(i).copied()))
    }
}

fn pair(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.into());
    l.set_value(value.into());
    l
}

impl Collector for RouteFamily {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut family = MetricFamily::default();
        family.set_name(self.desc.fq_name.clone());
        family.set_help(self.desc.help.clone());
        family.set_field_type(if self.gauge {
            MetricType::GAUGE
        } else {
            MetricType::COUNTER
        });
        let metrics = self.with(|m| {
            let mut out = Vec::with_capacity(m.len() * self.values.len());
            for (route, counts) in m.iter() {
                for (value, n) in self.values.iter().zip(counts.iter()) {
                    let mut metric = Metric::default();
                    // Label pairs sorted by name, as the text format has them.
                    let (a, b) = (pair("route", route), pair(self.label, value));
                    metric.set_label(if self.label < "route" {
                        vec![b, a]
                    } else {
                        vec![a, b]
                    });
                    if self.gauge {
                        let mut g = Gauge::default();
                        g.set_value(*n as f64);
                        metric.set_gauge(g);
                    } else {
                        let mut c = Counter::default();
                        c.set_value(*n as f64);
                        metric.set_counter(c);
                    }
                    out.push(metric);
                }
            }
            out
        });
        if metrics.is_empty() {
            return Vec::new();
        }
        family.set_metric(metrics);
        vec![family]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(f: RouteFamily) -> String {
        let r = prometheus::Registry::new();
        r.register(Box::new(f)).expect("register");
        let mut out = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &r.gather(), &mut out)
            .expect("encode");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn renders_the_text_a_vector_would() {
        let f = RouteFamily::new("veer_x_total", "Help.", "reason", vec!["a", "b"], false)
            .expect("family");
        f.add_route("web");
        f.inc("web", "b");
        f.inc("web", "b");
        f.inc("web", "nope");
        f.inc("api", "a");
        assert_eq!(f.get("web", "b"), Some(2));
        f.forget_route("api");
        let want = "# HELP veer_x_total Help.\n# TYPE veer_x_total counter\nveer_x_total{reason=\"a\",route=\"web\"} 0\nveer_x_total{reason=\"b\",route=\"web\"} 2\n";
        assert_eq!(text(f), want);
        let g = RouteFamily::new("veer_v", "V.", "verdict", vec!["x", "y"], true).expect("family");
        g.set_only("web", "y");
        assert!(text(g).contains(
            "veer_v{route=\"web\",verdict=\"x\"} 0\nveer_v{route=\"web\",verdict=\"y\"} 1\n"
        ));
    }
}
