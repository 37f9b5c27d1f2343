//! Prometheus metrics: one registry, and per-version handles resolved when a
//! snapshot is built so that the request path only increments atomics.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::error::UPSTREAM_KINDS;

/// Status classes, in [`VersionMetrics::responses`] order.
pub const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Latency buckets of `veer_request_duration_seconds`, 0.5 ms to 30 s.
const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
    30.0,
];

/// Every metric veer exports.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    upstream_errors: IntCounterVec,
    duration: HistogramVec,
    proxy_errors: IntCounterVec,
    /// `veer_config_reloads_total{result}`.
    pub reloads: IntCounterVec,
    /// `veer_config_generation`.
    pub generation: IntGauge,
    /// `veer_canary_weight_percent{route,source}`.
    pub canary_weight: GaugeVec,
    /// `veer_version_info{route,role,version}`: joins a version label to its role.
    pub version_info: IntGaugeVec,
    /// `veer_open_connections`: client connections being served.
    pub open_connections: IntGauge,
}

/// Handles for one (route, version), resolved once per snapshot.
#[derive(Clone)]
pub struct VersionMetrics {
    responses: [IntCounter; 5],
    upstream_errors: [IntCounter; 4],
    duration: Histogram,
}

impl VersionMetrics {
    /// Counts a response by its status and records its latency.
    #[inline]
    pub fn record(&self, status: u16, seconds: f64) {
        let class = usize::from(status / 100).saturating_sub(1).min(4);
        if let Some(c) = self.responses.get(class) {
            c.inc();
        }
        self.duration.observe(seconds);
    }

    /// Counts an upstream failure of kind index `kind` (see [`UPSTREAM_KINDS`]).
    #[inline]
    pub fn upstream_error(&self, kind: usize) {
        if let Some(c) = self.upstream_errors.get(kind) {
            c.inc();
        }
    }
}

/// Handles for failures that belong to no version.
#[derive(Clone)]
pub struct ProxyErrorMetrics {
    /// Requests no route matched.
    pub no_route: IntCounter,
    /// Requests veer could not forward as they were.
    pub bad_request: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "veer_requests_total",
                "Requests answered, by route, version and status class.",
            ),
            &["route", "version", "code"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "veer_upstream_errors_total",
                "Failures to get an answer from a version's endpoint, by kind.",
            ),
            &["route", "version", "kind"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "veer_request_duration_seconds",
                "Time from receiving a request to sending the response head.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route", "version"],
        )?;
        let proxy_errors = IntCounterVec::new(
            Opts::new(
                "veer_proxy_errors_total",
                "Requests veer answered itself without asking a version, by kind.",
            ),
            &["kind"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "veer_config_reloads_total",
                "Config load attempts, by result.",
            ),
            &["result"],
        )?;
        let generation = IntGauge::new(
            "veer_config_generation",
            "Generation of the running config; 1 for the config loaded at start.",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "veer_build_info",
                "Always 1; the version label says which veer runs.",
            ),
            &["version"],
        )?;
        let canary_weight = GaugeVec::new(
            Opts::new(
                "veer_canary_weight_percent",
                "Share of keys sent to the canary: as configured, and in effect.",
            ),
            &["route", "source"],
        )?;
        let version_info = IntGaugeVec::new(
            Opts::new(
                "veer_version_info",
                "Always 1 per deployed version; role is stable or canary.",
            ),
            &["route", "role", "version"],
        )?;
        let open_connections =
            IntGauge::new("veer_open_connections", "Client connections being served.")?;
        for c in [
            requests.clone(),
            upstream_errors.clone(),
            proxy_errors.clone(),
            reloads.clone(),
        ] {
            registry.register(Box::new(c))?;
        }
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(generation.clone()))?;
        registry.register(Box::new(build_info.clone()))?;
        registry.register(Box::new(canary_weight.clone()))?;
        registry.register(Box::new(version_info.clone()))?;
        registry.register(Box::new(open_connections.clone()))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        Ok(Metrics {
            registry,
            requests,
            upstream_errors,
            duration,
            proxy_errors,
            reloads,
            generation,
            canary_weight,
            version_info,
            open_connections,
        })
    }

    /// Resolves the handles of one (route, version).
    pub fn version(&self, route: &str, version: &str) -> VersionMetrics {
        VersionMetrics {
            responses: CODE_CLASSES.map(|c| self.requests.with_label_values(&[route, version, c])),
            upstream_errors: UPSTREAM_KINDS
                .map(|k| self.upstream_errors.with_label_values(&[route, version, k])),
            duration: self.duration.with_label_values(&[route, version]),
        }
    }

    /// Forgets the series of a (route, role, version) no longer configured.
    pub fn forget_version(&self, route: &str, role: &str, version: &str) {
        let _ = self
            .version_info
            .remove_label_values(&[route, role, version]);
        for c in CODE_CLASSES {
            let _ = self.requests.remove_label_values(&[route, version, c]);
        }
        for k in UPSTREAM_KINDS {
            let _ = self
                .upstream_errors
                .remove_label_values(&[route, version, k]);
        }
        let _ = self.duration.remove_label_values(&[route, version]);
    }

    /// Forgets a route's weight series.
    pub fn forget_route(&self, route: &str) {
        for source in ["configured", "effective"] {
            let _ = self.canary_weight.remove_label_values(&[route, source]);
        }
    }

    /// Handles for failures outside any version.
    pub fn proxy_errors(&self) -> ProxyErrorMetrics {
        ProxyErrorMetrics {
            no_route: self.proxy_errors.with_label_values(&["no_route"]),
            bad_request: self.proxy_errors.with_label_values(&["bad_request"]),
        }
    }

    /// The registry, for components that add their own metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
