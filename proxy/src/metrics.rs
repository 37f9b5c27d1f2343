//! Prometheus metrics: one registry, and per-version handles resolved when a
//! snapshot is built so that the request path only increments atomics.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use veer_control::guard::Guard;
use veer_control::rollout::{DeploymentResult, Label};

use std::sync::Arc;

use crate::error::UPSTREAM_KINDS;
use crate::route_metrics::RouteFamily;
use crate::window_metrics::WindowSummary;

/// Registers a shared collector (the registry wants ownership).
struct SharedCollector<C>(Arc<C>);

impl<C: prometheus::core::Collector> prometheus::core::Collector for SharedCollector<C> {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }
    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.0.collect()
    }
}

/// Status classes, in the order of a version's response counters.
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
    /// `veer_request_buffer_full_total`: request bodies small enough to be
    /// read whole that streamed part-way, the budget for them being spent.
    pub request_buffer_full: IntCounter,
    /// `veer_open_connections`: client connections being served.
    pub open_connections: IntGauge,
    /// `veer_admin_refused_total{why}`: admin connections refused
    /// (`per_address`: over an address's limit, closed as accepted; `all`:
    /// the port full, none accepted until one closes).
    pub admin_refused: IntCounterVec,
    /// `veer_parked_connections`: idle HTTP/1.1 client connections parked
    /// (`crate::protocol::Served::park`).
    pub parked_connections: IntGauge,
    /// `veer_judge_routes_awake`: routes the judge visits (the others
    /// sleep until a request comes).
    pub routes_awake: IntGauge,
    /// `veer_routing_rebuilds_total`: routing snapshots put in effect.
    pub routing_rebuilds: IntCounter,
    /// `veer_state_persisted`: 1 while the last write of the state dir
    /// reached the disk (see [`crate::persist::save`]).
    pub state_persisted: IntGauge,
    /// `veer_tls_certificate_expiry_timestamp_seconds{certificate}`: when
    /// each certificate veer uses (served, or an upstream's client
    /// certificate) expires; also [`crate::tls::EXPIRY`].
    pub tls_expiry: IntGaugeVec,
    /// `veer_tls_handshakes_total{kind}`: client TLS handshakes that
    /// succeeded, in full or resuming a session (see [`Handshakes`]).
    pub tls_handshakes: Handshakes,
    /// `veer_verdict{route,verdict}`: 1 for the current verdict.
    pub verdict: Arc<RouteFamily>,
    /// `veer_reverts_total{route,reason}`.
    pub reverts: Arc<RouteFamily>,
    /// `veer_deployments_total{route,result}`: ended deployments (DORA).
    pub deployments: Arc<RouteFamily>,
    /// `veer_change_failure_ratio{route}`: reverted over ended, 30 days.
    pub change_failure_ratio: GaugeVec,
    /// `veer_time_to_revert_seconds{route}`: canary's first request to revert.
    pub time_to_revert: HistogramVec,
    /// `veer_window_requests{route,version}`.
    pub window_requests: IntGaugeVec,
    /// `veer_window_error_ratio{route,version}`.
    pub window_error_ratio: GaugeVec,
    /// `veer_judge_e_value{route,test}`: evidence of the sequential tests.
    pub e_value: GaugeVec,
    /// `veer_rollout_step{route}`: index of the current rollout step.
    pub rollout_step: IntGaugeVec,
    /// `veer_health_check_failing{route,version,endpoint}`: 1 while the
    /// route's health check keeps the endpoint out, 0 while it passes.
    pub health_check_failing: IntGaugeVec,
    /// `veer_window_latency_seconds{route,version,quantile}`.
    pub window_latency: std::sync::Arc<WindowSummary>,
    /// `veer_webhook_events_total{result}`: ok, failed, dropped.
    pub webhook_events: IntCounterVec,
    /// `veer_smoke_checks_total{route,result}`: runs of a route's smoke
    /// checks, passed or failed.
    pub smoke_checks: Arc<RouteFamily>,
    /// `veer_grpc_responses_total`.
    pub grpc: IntCounterVec,
    /// `veer_requests_given_up_total`.
    pub given_up: IntCounterVec,
    /// `veer_outlier_ejections_total{route,version}`.
    pub ejections: IntCounterVec,
    /// `veer_retries_total{route,version,result}`.
    pub retries: IntCounterVec,
    /// `veer_mirror_requests_total{route,result}`.
    pub mirror: IntCounterVec,
}

/// `veer_tls_handshakes_total`'s two series, exported at 0 from the start.
#[derive(Clone)]
pub struct Handshakes {
    /// `kind="full"`.
    pub full: IntCounter,
    /// `kind="resumed"`.
    pub resumed: IntCounter,
}

/// gRPC status code names, by code.
pub const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Handles for one (route, version). Its series are made at the
/// version's first response, not when it is configured: an ingress with a
/// thousand routes that carry no traffic exports no request or latency
/// series for them (a trade-off: the first scrape after a version's first
/// request shows its counters already past 0; `rate()` over the next
/// scrapes sees every later change).
#[derive(Clone)]
pub struct VersionMetrics {
    handles: std::sync::Arc<std::sync::OnceLock<Handles>>,
    requests: IntCounterVec,
    upstream_errors: IntCounterVec,
    duration: HistogramVec,
    /// gRPC calls by status code, made on the first call that ends with
    /// each code (a route that never sees gRPC exports none).
    grpc: IntCounterVec,
    /// Requests given up, made at the version's first (a version whose
    /// clients never leave exports none).
    given_up: IntCounterVec,
    /// Endpoints ejected by outlier detection, made at the version's first.
    ejections: IntCounterVec,
    /// Retries (`[route.retry]`), made at the version's first.
    retries: IntCounterVec,
    names: std::sync::Arc<[std::sync::Arc<str>; 2]>,
}

/// A version's series, resolved once (at its first response).
struct Handles {
    responses: [IntCounter; 5],
    upstream_errors: [IntCounter; 4],
    duration: Histogram,
}

impl VersionMetrics {
    fn handles(&self) -> &Handles {
        self.handles.get_or_init(|| {
            let (route, version) = (&*self.names[0], &*self.names[1]);
            Handles {
                responses: CODE_CLASSES
                    .map(|c| self.requests.with_label_values(&[route, version, c])),
                upstream_errors: UPSTREAM_KINDS
                    .map(|k| self.upstream_errors.with_label_values(&[route, version, k])),
                duration: self.duration.with_label_values(&[route, version]),
            }
        })
    }

    /// Counts a response by its status and records its latency.
    #[inline]
    pub fn record(&self, status: u16, seconds: f64) {
        let h = self.handles();
        let class = usize::from(status / 100).saturating_sub(1).min(4);
        if let Some(c) = h.responses.get(class) {
            c.inc();
        }
        h.duration.observe(seconds);
    }

    /// Counts a gRPC call that ended with status `code` (0-16).
    pub fn grpc(&self, code: u8) {
        let name = GRPC_CODES
            .get(usize::from(code))
            .copied()
            .unwrap_or("UNKNOWN");
        self.grpc
            .with_label_values(&[&*self.names[0], &*self.names[1], name])
            .inc();
    }

    /// Counts a request given up: its client left (or its caller's own
    /// deadline passed) after sending it whole, before the answer came.
    pub fn given_up(&self) {
        self.given_up
            .with_label_values(&[&*self.names[0], &*self.names[1]])
            .inc();
    }

    /// Exports the version's count of ejections (at 0 until the first).
    pub fn export_ejections(&self) {
        let _ = self
            .ejections
            .with_label_values(&[&*self.names[0], &*self.names[1]]);
    }

    /// Counts an endpoint of the version ejected by outlier detection.
    pub fn ejected(&self) {
        self.ejections
            .with_label_values(&[&*self.names[0], &*self.names[1]])
            .inc();
    }

    /// Exports the version's retry counts (at 0 until the first).
    pub fn export_retries(&self) {
        for result in ["sent", "budget_spent"] {
            let _ = self
                .retries
                .with_label_values(&[&*self.names[0], &*self.names[1], result]);
        }
    }

    /// Counts a failed try of a request sent again (`sent`), or not for the
    /// route's retry budget being spent.
    pub fn retried(&self, sent: bool) {
        let result = if sent { "sent" } else { "budget_spent" };
        self.retries
            .with_label_values(&[&*self.names[0], &*self.names[1], result])
            .inc();
    }

    /// Counts an upstream failure of kind index `kind` (see [`UPSTREAM_KINDS`]).
    #[inline]
    pub fn upstream_error(&self, kind: usize) {
        if let Some(c) = self.handles().upstream_errors.get(kind) {
            c.inc();
        }
    }
}

/// Handles for failures that belong to no version.
#[derive(Clone)]
pub struct ProxyErrorMetrics {
    /// One counter per kind of [`crate::error::PROXY_KINDS`], created at 0.
    pub by_kind: [IntCounter; crate::error::PROXY_KINDS.len()],
}

impl ProxyErrorMetrics {
    /// Counts one request of kind `e` (upstream kinds are counted per version, not here).
    pub fn inc(&self, e: crate::error::ProxyError) {
        if let Some(i) = crate::error::PROXY_KINDS.iter().position(|k| *k == e) {
            if let Some(c) = self.by_kind.get(i) {
                c.inc();
            }
        }
    }
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
                "Requests that failed through no version's fault (no route, the client's own), by kind.",
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
        let request_buffer_full = IntCounter::new(
            "veer_request_buffer_full_total",
            "Request bodies small enough to be read whole before going upstream ([proxy] request_buffer) that streamed part-way instead: the 64 MiB held at once for such bodies was spent.",
        )?;
        let open_connections =
            IntGauge::new("veer_open_connections", "Client connections being served.")?;
        let admin_refused = IntCounterVec::new(
            Opts::new(
                "veer_admin_refused_total",
                "Admin connections refused: why=per_address, closed as accepted (an address over 16); why=all, times the port was full (128 open) and stopped accepting.",
            ),
            &["why"],
        )?;
        for why in ["per_address", "all"] {
            admin_refused.with_label_values(&[why]);
        }
        let parked_connections = IntGauge::new(
            "veer_parked_connections",
            "Idle HTTP/1.1 client connections parked: their buffers freed until the client's next request.",
        )?;
        let routes_awake = IntGauge::new(
            "veer_judge_routes_awake",
            "Judged routes the controller visits each interval; idle ones sleep until a request comes.",
        )?;
        let routing_rebuilds = IntCounter::new(
            "veer_routing_rebuilds_total",
            "Routing snapshots put in effect (a reload, a decision, a seat, an endpoint's new address).",
        )?;
        let state_persisted = IntGauge::new(
            "veer_state_persisted",
            "1 while the last write of the state dir reached the disk; 0 after one failed or had no answer in 5 s (decisions since would not survive a restart).",
        )?;
        // Nothing written yet: what is on disk is what was read at start.
        state_persisted.set(1);
        let tls_expiry = IntGaugeVec::new(
            Opts::new(
                "veer_tls_certificate_expiry_timestamp_seconds",
                "When each certificate veer uses (its TLS listeners', upstreams' client certificates) expires: its notAfter, Unix seconds, by its file.",
            ),
            &["certificate"],
        )?;
        let crl_next_update = IntGaugeVec::new(
            Opts::new(
                "veer_tls_crl_next_update_timestamp_seconds",
                "When the client certificate revocation lists in each client_crl file are due to be replaced: the earliest nextUpdate among them, Unix seconds, by its file.",
            ),
            &["crl"],
        )?;
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "veer_tls_handshakes_total",
                "Client TLS handshakes that succeeded: kind=full, or kind=resumed (a session the client had, no certificate signature or verification).",
            ),
            &["kind"],
        )?;
        let verdict = Arc::new(RouteFamily::new(
            "veer_verdict",
            "1 for the route's current judge verdict, 0 for the others.",
            "verdict",
            Label::ALL.iter().map(|l| l.as_str()).collect(),
            true,
        )?);
        let reverts = Arc::new(RouteFamily::new(
            "veer_reverts_total",
            "Canaries taken out of traffic, by the guard or test that tripped (operator: an admin action).",
            "reason",
            Guard::ALL.iter().map(|g| g.as_str()).collect(),
            false,
        )?);
        let deployments = Arc::new(RouteFamily::new(
            "veer_deployments_total",
            "Deployments (canary identities, or runs of one after a reset) that ended: promoted, reverted or replaced.",
            "result",
            DeploymentResult::ALL.iter().map(|r| r.as_str()).collect(),
            false,
        )?);
        let change_failure_ratio = GaugeVec::new(
            Opts::new(
                "veer_change_failure_ratio",
                "Reverted deployments over ended ones in the last 30 days (kept in the state dir).",
            ),
            &["route"],
        )?;
        let time_to_revert = HistogramVec::new(
            HistogramOpts::new(
                "veer_time_to_revert_seconds",
                "From a canary's first request to its revert.",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 14400.0,
            ]),
            &["route"],
        )?;
        let window_requests = IntGaugeVec::new(
            Opts::new("veer_window_requests", "Requests in the judge window."),
            &["route", "version"],
        )?;
        let window_error_ratio = GaugeVec::new(
            Opts::new(
                "veer_window_error_ratio",
                "Errors / requests in the judge window.",
            ),
            &["route", "version"],
        )?;
        let e_value = GaugeVec::new(
            Opts::new("veer_judge_e_value", "E-value of the judge's sequential test (errors, latency); a revert needs 2/false_revert_rate."),
            &["route", "test"],
        )?;
        let rollout_step = IntGaugeVec::new(
            Opts::new(
                "veer_rollout_step",
                "Index of the current rollout step (0-based).",
            ),
            &["route"],
        )?;
        let health_check_failing = IntGaugeVec::new(
            Opts::new(
                "veer_health_check_failing",
                "1 while a route's [route.health_check] keeps the endpoint out of its version's choices, 0 while it is in.",
            ),
            &["route", "version", "endpoint"],
        )?;
        let window_latency = std::sync::Arc::new(WindowSummary::new()?);
        let webhook_events = IntCounterVec::new(
            Opts::new(
                "veer_webhook_events_total",
                "Webhook events by outcome: ok, failed (after retries), dropped (queue full).",
            ),
            &["result"],
        )?;
        let smoke_checks = Arc::new(RouteFamily::new(
            "veer_smoke_checks_total",
            "Runs of a route's smoke checks against a new canary (every check on every endpoint), by result: passed, failed.",
            "result",
            vec!["passed", "failed"],
            false,
        )?);
        let mirror = IntCounterVec::new(
            Opts::new(
                "veer_mirror_requests_total",
                "Requests chosen for mirroring to the canary, by result: ok and error (the copy's answer), too_large (body over max_body), busy (max_concurrent copies in flight), unpaired (no pair: stable's exchange was the client's fault or never ended).",
            ),
            &["route", "result"],
        )?;
        let grpc = IntCounterVec::new(
            Opts::new(
                "veer_grpc_responses_total",
                "gRPC calls by the grpc-status they ended with (trailers, or a trailers-only answer).",
            ),
            &["route", "version", "grpc_code"],
        )?;
        let given_up = IntCounterVec::new(
            Opts::new(
                "veer_requests_given_up_total",
                "Requests whose client left (or whose gRPC caller's own deadline passed) after sending them whole, before the version answered; slow for the judge once past a latency test's threshold.",
            ),
            &["route", "version"],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(
                "veer_outlier_ejections_total",
                "Endpoints of a version taken out by [route.outlier_detection] (failed requests in a row); the log names each.",
            ),
            &["route", "version"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "veer_retries_total",
                "Failed tries sent again by [route.retry] to the next endpoint of their version (result sent), or not because the route's retry budget was spent (budget_spent).",
            ),
            &["route", "version", "result"],
        )?;
        for c in [
            requests.clone(),
            grpc.clone(),
            given_up.clone(),
            ejections.clone(),
            retries.clone(),
            mirror.clone(),
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
        registry.register(Box::new(request_buffer_full.clone()))?;
        registry.register(Box::new(admin_refused.clone()))?;
        registry.register(Box::new(parked_connections.clone()))?;
        registry.register(Box::new(routes_awake.clone()))?;
        registry.register(Box::new(routing_rebuilds.clone()))?;
        registry.register(Box::new(state_persisted.clone()))?;
        registry.register(Box::new(tls_expiry.clone()))?;
        // Certificates are loaded where no metrics are at hand (an
        // upstream's client certificate, on a handshake): the process's
        // first registry's gauge is theirs.
        let _ = crate::tls::EXPIRY.set(tls_expiry.clone());
        registry.register(Box::new(crl_next_update.clone()))?;
        registry.register(Box::new(tls_handshakes.clone()))?;
        let _ = crate::tls::CRL_NEXT_UPDATE.set(crl_next_update);
        registry.register(Box::new(SharedCollector(verdict.clone())))?;
        registry.register(Box::new(SharedCollector(reverts.clone())))?;
        registry.register(Box::new(SharedCollector(smoke_checks.clone())))?;
        registry.register(Box::new(window_requests.clone()))?;
        registry.register(Box::new(window_error_ratio.clone()))?;
        registry.register(Box::new(e_value.clone()))?;
        registry.register(Box::new(rollout_step.clone()))?;
        registry.register(Box::new(health_check_failing.clone()))?;
        registry.register(Box::new(SharedCollector(window_latency.clone())))?;
        registry.register(Box::new(webhook_events.clone()))?;
        registry.register(Box::new(SharedCollector(deployments.clone())))?;
        registry.register(Box::new(change_failure_ratio.clone()))?;
        registry.register(Box::new(time_to_revert.clone()))?;
        registry.register(Box::new(crate::log_drops::LogDrops::new()?))?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Every series whose labels are known is exported from the start,
        // at 0: an alert on `increase(...)` needs the 0 before the first
        // event (a series that appears at 1 shows no increase).
        for result in ["success", "failure"] {
            reloads.with_label_values(&[result]);
        }
        for result in ["ok", "failed", "dropped"] {
            webhook_events.with_label_values(&[result]);
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
            request_buffer_full,
            admin_refused,
            parked_connections,
            routes_awake,
            routing_rebuilds,
            state_persisted,
            tls_expiry,
            tls_handshakes: Handshakes {
                full: tls_handshakes.with_label_values(&["full"]),
                resumed: tls_handshakes.with_label_values(&["resumed"]),
            },
            verdict,
            reverts,
            deployments,
            change_failure_ratio,
            time_to_revert,
            window_requests,
            window_error_ratio,
            e_value,
            rollout_step,
            health_check_failing,
            window_latency,
            webhook_events,
            smoke_checks,
            grpc,
            given_up,
            ejections,
            retries,
            mirror,
        })
    }

    /// Registers a collector made elsewhere (the fleet's, when configured).
    pub fn register(
        &self,
        c: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), prometheus::Error> {
        self.registry.register(c)
    }

    /// Resolves the handles of one (route, version).
    pub fn version(&self, route: &str, version: &str) -> VersionMetrics {
        VersionMetrics {
            handles: Default::default(),
            requests: self.requests.clone(),
            upstream_errors: self.upstream_errors.clone(),
            duration: self.duration.clone(),
            grpc: self.grpc.clone(),
            given_up: self.given_up.clone(),
            ejections: self.ejections.clone(),
            retries: self.retries.clone(),
            names: std::sync::Arc::new([route.into(), version.into()]),
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
        for c in GRPC_CODES {
            let _ = self.grpc.remove_label_values(&[route, version, c]);
        }
        let _ = self.given_up.remove_label_values(&[route, version]);
        let _ = self.ejections.remove_label_values(&[route, version]);
        for result in ["sent", "budget_spent"] {
            let _ = self.retries.remove_label_values(&[route, version, result]);
        }
        let _ = self.window_requests.remove_label_values(&[route, version]);
        let _ = self
            .window_error_ratio
            .remove_label_values(&[route, version]);
    }

    /// Exports a new route's revert counters at 0, one per guard (see
    /// `Metrics::new` on why).
    pub fn add_route(&self, route: &str) {
        self.reverts.add_route(route);
        self.deployments.add_route(route);
        self.smoke_checks.add_route(route);
    }

    /// A mirrored route's counters, one per [`crate::mirror::RESULTS`]
    /// label (exported at 0 from the first snapshot that mirrors).
    pub fn mirror(&self, route: &str) -> [IntCounter; 5] {
        crate::mirror::RESULTS.map(|r| self.mirror.with_label_values(&[route, r]))
    }

    /// Forgets a route's series.
    pub fn forget_route(&self, route: &str) {
        for r in crate::mirror::RESULTS {
            let _ = self.mirror.remove_label_values(&[route, r]);
        }
        self.reverts.forget_route(route);
        self.deployments.forget_route(route);
        self.smoke_checks.forget_route(route);
        let _ = self.change_failure_ratio.remove_label_values(&[route]);
        let _ = self.time_to_revert.remove_label_values(&[route]);
        for source in ["configured", "effective"] {
            let _ = self.canary_weight.remove_label_values(&[route, source]);
        }
        self.verdict.forget_route(route);
        for t in ["errors", "latency"] {
            let _ = self.e_value.remove_label_values(&[route, t]);
        }
        let _ = self.rollout_step.remove_label_values(&[route]);
    }

    /// Sets the route's verdict gauge to `current`.
    pub fn set_verdict(&self, route: &str, current: Label) {
        self.verdict.set_only(route, current.as_str());
    }

    /// Handles for failures outside any version.
    pub fn proxy_errors(&self) -> ProxyErrorMetrics {
        ProxyErrorMetrics {
            by_kind: crate::error::PROXY_KINDS
                .map(|k| self.proxy_errors.with_label_values(&[k.kind()])),
        }
    }

    /// The text exposition of every metric, and of `more` (families read
    /// at the scrape from elsewhere).
    pub fn encode(&self, more: Vec<prometheus::proto::MetricFamily>) -> String {
        let mut buf = Vec::new();
        let mut families = self.registry.gather();
        families.extend(more);
        let _ = TextEncoder::new().encode(&families, &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
