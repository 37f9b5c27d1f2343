//! `[[route]]`: matching, stickiness, versions, endpoints and weights, and
//! the checks across routes.

use super::super::http_token;
use super::*;
use crate::config::raw::{RawOutlierDetection, RawRetry, RawSmoke};
use crate::config::{HealthCheck, OutlierDetection, Retry, GRPC_HEALTH_CHECK_PATH};

impl Validator<'_> {
    pub(super) fn route(&mut self, r: &Spanned<RawRoute>) -> Option<Route> {
        let span = r.span();
        let r = r.get_ref();
        let name = r.name.get_ref().clone();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            self.err(
                r.name.span(),
                format!("route name {name:?} must be non-empty and use only a-z, 0-9, '-' and '_'"),
            );
        }
        let mut hosts = Vec::new();
        for h in r.hosts.iter().flatten() {
            if let Some(host) = self.host(h) {
                if hosts.contains(&host) {
                    self.err(h.span(), format!("host {host:?} is listed twice"));
                } else {
                    hosts.push(host);
                }
            }
        }
        let path_prefix = match &r.path_prefix {
            Some(p) if !p.get_ref().starts_with('/') => {
                self.err(
                    p.span(),
                    format!("path_prefix {:?} must start with '/'", p.get_ref()),
                );
                "/".to_string()
            }
            Some(p) if p.get_ref().contains(['?', '#', ' ']) => {
                self.err(
                    p.span(),
                    "path_prefix must be a plain path, without '?', '#' or spaces",
                );
                "/".to_string()
            }
            Some(p) => p.get_ref().clone(),
            None => "/".to_string(),
        };
        let sticky = match &r.sticky {
            Some(list) => list.iter().filter_map(|s| self.sticky(s)).collect(),
            None => vec![StickySource::ClientIp],
        };
        let strategy = match r
            .strategy
            .as_ref()
            .map(|s| (s.get_ref().as_str(), s.span()))
        {
            None | Some(("canary", _)) => Strategy::Canary,
            Some(("blue-green", _)) => Strategy::BlueGreen,
            Some((other, span)) => {
                self.err(
                    span,
                    format!("strategy {other:?} is not one of \"canary\", \"blue-green\""),
                );
                Strategy::Canary
            }
        };
        let timeout = self.duration(r.timeout.as_ref(), defaults::TIMEOUT);
        // The default connect_timeout (1 s) shrinks to a shorter `timeout`;
        // only one set explicitly above `timeout` is a mistake.
        let connect_timeout = self
            .duration(r.connect_timeout.as_ref(), defaults::CONNECT_TIMEOUT)
            .min(if r.connect_timeout.is_none() {
                timeout
            } else {
                Duration::MAX
            });
        if connect_timeout > timeout {
            let span = r
                .connect_timeout
                .as_ref()
                .map_or(span.clone(), |s| s.span());
            self.err(span, "connect_timeout must not exceed timeout");
        }
        let stable = self.version(&r.stable);
        let canary = r.canary.as_ref().map(|c| self.canary(c));
        let mut canary_weight_bp = 0;
        if let (Some(c), Some(canary)) = (&r.canary, &canary) {
            canary_weight_bp = canary.1;
            if c.get_ref().version.get_ref() == stable.name.as_str() {
                self.err(
                    c.get_ref().version.span(),
                    format!(
                        "canary version {:?} is the same as the stable version",
                        stable.name
                    ),
                );
            }
            for e in &canary.0.endpoints {
                if stable.endpoints.iter().any(|s| s.addr == e.addr) {
                    // An A/A rehearsal: veer records each request under the
                    // version it routed it to, so the judge still works.
                    self.warn(
                        c.get_ref().endpoints.span(),
                        format!("endpoint {} is in both stable and canary: both versions are the same server (an A/A rehearsal?); they share its health and connections", e.addr),
                    );
                }
            }
            if strategy == Strategy::BlueGreen
                && canary_weight_bp != 0
                && canary_weight_bp != 10_000
            {
                let wspan = c.get_ref().weight.as_ref().map_or(c.span(), |w| w.span());
                self.err(wspan, "blue-green sends all traffic to one colour: canary weight must be 0 (stable live) or 100 (canary live)");
            }
        }
        let mut judge = self.judge(r.judge.as_ref());
        judge.blue_green = strategy == Strategy::BlueGreen;
        let mirror = r.mirror.as_ref().and_then(|m| self.mirror(m, r));
        judge.mirrored = mirror.is_some();
        if let (Some(m), JudgeMode::Off) = (&r.mirror, judge.mode) {
            self.warn(
                m.span(),
                "[route.mirror] does nothing while the judge is off (copies are made to be judged): use mode = \"observe\" to mirror without reverting",
            );
        }
        let rollout = r.rollout.as_ref().map(|ro| {
            let rr = ro.get_ref();
            let mut steps_bp: Vec<u16> = Vec::new();
            for s in rr.steps.get_ref() {
                if let Some(bp) = self.weight_bp(s) {
                    if bp == 0 {
                        self.err(s.span(), "a rollout step must be greater than 0");
                    } else if steps_bp.last().is_some_and(|&last| bp <= last) {
                        self.err(s.span(), "rollout steps must be strictly increasing");
                    }
                    steps_bp.push(bp);
                }
            }
            if steps_bp.is_empty() {
                self.err(rr.steps.span(), "rollout needs at least one step");
            }
            if strategy == Strategy::BlueGreen {
                self.err(
                    ro.span(),
                    "[route.rollout] is for strategy \"canary\"; blue-green switches all at once",
                );
            }
            if r.canary.is_none() {
                self.err(ro.span(), "[route.rollout] needs a [route.canary]");
            }
            let confirm = rr.confirm.as_ref().and_then(|url| {
                let ca = rr
                    .confirm_ca_file
                    .as_ref()
                    .map(|f| (f.span(), self.path(f)));
                self.http_target(url, ca, "confirm")
            });
            if confirm.is_none() {
                if let Some(ca) = &rr.confirm_ca_file {
                    if rr.confirm.is_none() {
                        self.err(
                            ca.span(),
                            "confirm_ca_file is set but there is no confirm URL",
                        );
                    }
                }
            }
            Rollout {
                steps_bp,
                hold: self.duration(Some(&rr.hold), Duration::from_secs(300)),
                confirm,
            }
        });
        let cors = r.cors.as_ref().and_then(|c| self.cors(c));
        let sticky_cookie = r
            .sticky_cookie
            .as_ref()
            .and_then(|c| self.sticky_cookie(c, &sticky));
        let protocols: Vec<(&str, UpstreamProtocol)> = std::iter::once(&stable)
            .chain(canary.as_ref().map(|c| &c.0))
            .map(|v| (v.name.as_str(), v.protocol))
            .collect();
        let health_check = self.health_check(r, &protocols);
        Some(Route {
            name,
            hosts,
            path_prefix,
            sticky,
            strategy,
            timeout,
            connect_timeout,
            count_4xx_as_errors: r.count_4xx_as_errors.unwrap_or(false),
            max_upstream_connections: self.int_in(
                r.max_upstream_connections.as_ref(),
                1..=65_536,
                defaults::MAX_UPSTREAM_CONNECTIONS as i64,
                "max_upstream_connections",
            ) as usize,
            max_request_body: r
                .max_request_body
                .as_ref()
                .map(|b| self.int_in(Some(b), 0..=i64::MAX, 0, "max_request_body") as u64),
            allow_from: self.ranges(r.allow_from.as_deref(), "allow_from"),
            deny_from: self.ranges(r.deny_from.as_deref(), "deny_from"),
            https_redirect: r.https_redirect.as_ref().is_some_and(|b| *b.get_ref()),
            require_client_cert: r.require_client_cert.as_ref().is_some_and(|b| *b.get_ref()),
            rewrite_prefix: r
                .rewrite_prefix
                .as_ref()
                .and_then(|p| self.rewrite_prefix(p)),
            request_headers: self.header_edits(r.request_headers.as_ref(), Edited::Requests),
            response_headers: self.header_edits(r.response_headers.as_ref(), Edited::Answers),
            stable,
            canary: canary.map(|c| c.0),
            canary_weight_bp,
            judge,
            rollout,
            force: r.force.as_ref().and_then(|f| self.force(f)),
            mirror,
            rate_limit: r.rate_limit.as_ref().and_then(|l| self.rate_limit(l)),
            sticky_cookie,
            cors,
            smoke: self.smoke(r),
            health_check,
            outlier_detection: r
                .outlier_detection
                .as_ref()
                .map(|o| self.outlier_detection(o)),
            retry: r.retry.as_ref().map(|t| self.retry(t, timeout)),
            grpc_error_codes: self.grpc_error_codes(r),
        })
    }

    fn host(&mut self, h: &Spanned<String>) -> Option<String> {
        let host = h.get_ref().trim_end_matches('.').to_ascii_lowercase();
        let body = host.strip_prefix("*.").unwrap_or(&host);
        let ok = !body.is_empty()
            && body.split('.').all(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if ok {
            Some(host)
        } else {
            self.err(
                h.span(),
                format!("host {:?} is not a host name (letters, digits, '-' and '.', optionally starting with \"*.\"; no port)", h.get_ref()),
            );
            None
        }
    }

    fn sticky(&mut self, s: &Spanned<String>) -> Option<StickySource> {
        let text = s.get_ref().as_str();
        let token = http_token;
        if text == "client-ip" {
            return Some(StickySource::ClientIp);
        }
        if let Some(name) = text.strip_prefix("header:") {
            if token(name) {
                return Some(StickySource::Header(name.to_ascii_lowercase()));
            }
        } else if let Some(name) = text.strip_prefix("cookie:") {
            if token(name) {
                return Some(StickySource::Cookie(name.to_string()));
            }
        }
        self.err(
            s.span(),
            format!(
                "sticky source {text:?} is not \"header:NAME\", \"cookie:NAME\" or \"client-ip\""
            ),
        );
        None
    }

    fn endpoints(
        &mut self,
        list: &Spanned<Vec<Spanned<RawEndpoint>>>,
    ) -> (Vec<Endpoint>, UpstreamProtocol) {
        let mut out: Vec<Endpoint> = Vec::new();
        let mut protocol: Option<(UpstreamProtocol, String)> = None;
        if list.get_ref().is_empty() {
            self.err(list.span(), "a version needs at least one endpoint");
        }
        if list.get_ref().len() > MAX_ENDPOINTS {
            self.err(list.span(), format!("a version has at most {MAX_ENDPOINTS} endpoints; put a larger fleet behind a Service or load balancer"));
        }
        for e in list.get_ref() {
            let (addr, weight) = match e.get_ref() {
                RawEndpoint::Addr(a) => (a.clone(), 1),
                RawEndpoint::Weighted(w) => (w.addr.clone(), w.weight),
            };
            if !(1..=1000).contains(&weight) {
                self.err(
                    e.span(),
                    format!("endpoint weight must be between 1 and 1000, got {weight}"),
                );
                continue;
            }
            let Some((proto, addr)) = self.endpoint_scheme(e.span(), &addr) else {
                continue;
            };
            match &protocol {
                None => protocol = Some((proto, addr.clone())),
                Some((p, first)) if *p != proto => {
                    self.err(
                        e.span(),
                        format!(
                            "endpoint {addr} is {}:// but {first} is {}://: one version's endpoints share one scheme (make a second route, or put them behind one Service)",
                            proto.scheme(),
                            p.scheme()
                        ),
                    );
                    continue;
                }
                Some(_) => {}
            }
            if out.iter().any(|o| o.addr == addr) {
                self.err(e.span(), format!("endpoint {addr} is listed twice"));
                continue;
            }
            self.own_listener(e.span(), &addr);
            out.push(Endpoint {
                addr,
                weight: weight as u32,
            });
        }
        (out, protocol.map_or(UpstreamProtocol::Http1, |p| p.0))
    }

    /// Warns of an endpoint that is one of veer's own listeners (a port
    /// typo: a sidecar on 0.0.0.0:8080 in front of an app on 127.0.0.1:8081
    /// given `127.0.0.1:8080`): its requests would come back to veer, each
    /// taking another connection, until `max_connections_per_ip` refuses one
    /// (256 hops for a request, each a failure of the version), or would get
    /// the admin endpoint's answers. A warning, not an error: a route may
    /// send to another of veer's routes on purpose (with its own `host`).
    /// Only an address veer can tell is its own (an IP, or `localhost`).
    fn own_listener(&mut self, span: std::ops::Range<usize>, addr: &str) {
        let Some((host, port)) = addr.rsplit_once(':') else {
            return;
        };
        let Ok(port) = port.parse::<u16>() else {
            return;
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ip: Option<std::net::IpAddr> = host.parse().ok();
        let localhost = host.eq_ignore_ascii_case("localhost");
        if port == 0 || (ip.is_none() && !localhost) {
            return;
        }
        let hit = self.own.iter().find(|(l, _)| {
            let any = l.ip().is_unspecified();
            l.port() == port
                && match ip {
                    Some(ip) => ip == l.ip() || (any && (ip.is_loopback() || ip.is_unspecified())),
                    None => any || l.ip().is_loopback(),
                }
        });
        if let Some((l, what)) = hit.copied() {
            self.warn(
                span,
                format!("endpoint {addr} is veer's own {what} ({l}): its requests would come back to veer (round and round until refused, or to the admin endpoint); a port typo?"),
            );
        }
    }

    /// Splits an endpoint into its protocol and `host:port` (an `https://`
    /// endpoint without a port gets 443).
    fn endpoint_scheme(
        &mut self,
        span: std::ops::Range<usize>,
        text: &str,
    ) -> Option<(UpstreamProtocol, String)> {
        let (proto, rest) = if let Some(r) = text.strip_prefix("http://") {
            (UpstreamProtocol::Http1, r)
        } else if let Some(r) = text.strip_prefix("h2c://") {
            (UpstreamProtocol::H2c, r)
        } else if let Some(r) = text.strip_prefix("https://") {
            (UpstreamProtocol::Https, r)
        } else if let Some((scheme, _)) = text.split_once("://") {
            self.err(
                span,
                format!("endpoint {text:?} has scheme {scheme:?}; veer speaks http:// (HTTP/1.1, the default), h2c:// (HTTP/2 without TLS) and https:// (TLS)"),
            );
            return None;
        } else {
            (UpstreamProtocol::Http1, text)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let addr = if proto == UpstreamProtocol::Https && !valid_host_port(rest) {
            format!("{rest}:443")
        } else {
            rest.to_string()
        };
        if !valid_host_port(&addr) {
            self.err(span, format!("endpoint {text:?} is not [SCHEME://]HOST:PORT (like \"10.0.0.1:8000\", \"h2c://grpc.svc:50051\" or \"https://api.internal:8443\"; no path)"));
            return None;
        }
        Some((proto, addr))
    }

    /// `[route.<version>.tls]`: only for `https://` endpoints.
    fn upstream_tls(
        &mut self,
        tls: Option<&Spanned<RawUpstreamTls>>,
        protocol: UpstreamProtocol,
    ) -> Option<UpstreamTls> {
        let t = tls?;
        if protocol != UpstreamProtocol::Https {
            self.err(
                t.span(),
                format!(
                    "tls is set but the version's endpoints are {}://; use https:// endpoints",
                    protocol.scheme()
                ),
            );
            return None;
        }
        let r = t.get_ref();
        let ca_file = r.ca_file.as_ref().map(|c| {
            let path = self.path(c);
            match std::fs::read_to_string(&path) {
                Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => {}
                Ok(_) => self.err(
                    c.span(),
                    format!("ca_file {} holds no PEM CERTIFICATE", path.display()),
                ),
                Err(e) => self.err(c.span(), format!("ca_file {}: {e}", path.display())),
            }
            path
        });
        let server_name = r.server_name.as_ref().and_then(|n| {
            let name = n.get_ref().trim_end_matches('.').to_ascii_lowercase();
            let ok = name.parse::<std::net::IpAddr>().is_ok()
                || (!name.is_empty()
                    && name.split('.').all(|l| {
                        !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    }));
            if !ok {
                self.err(
                    n.span(),
                    format!(
                        "server_name {:?} is not a DNS name or an IP address",
                        n.get_ref()
                    ),
                );
            }
            ok.then_some(name)
        });
        let client_cert = self.client_cert(r.cert_file.as_ref(), r.key_file.as_ref());
        Some(UpstreamTls {
            ca_file,
            server_name,
            client_cert,
        })
    }

    /// `grpc_error_codes`: gRPC status codes 1-16, each once.
    fn grpc_error_codes(&mut self, r: &RawRoute) -> Vec<u8> {
        let Some(list) = &r.grpc_error_codes else {
            return DEFAULT_GRPC_ERROR_CODES.to_vec();
        };
        let mut out = Vec::new();
        for c in list.get_ref() {
            let v = *c.get_ref();
            if !(1..=16).contains(&v) {
                self.err(
                    c.span(),
                    format!("grpc_error_codes: {v} is not a gRPC status code from 1 (CANCELLED) to 16 (UNAUTHENTICATED); 0 is OK"),
                );
            } else if out.contains(&(v as u8)) {
                self.err(c.span(), format!("grpc_error_codes: {v} is listed twice"));
            } else {
                out.push(v as u8);
            }
        }
        out.sort_unstable();
        out
    }

    fn version_name(&mut self, s: &Spanned<String>) -> String {
        let v = s.get_ref();
        if v.is_empty()
            || v.len() > 64
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
        {
            self.err(s.span(), format!("version {v:?} must be 1-64 characters of letters, digits, '.', '_', '-' or '+'"));
        }
        v.clone()
    }

    fn version(&mut self, v: &Spanned<RawVersion>) -> Version {
        let v = v.get_ref();
        let (endpoints, protocol) = self.endpoints(&v.endpoints);
        Version {
            name: self.version_name(&v.version),
            endpoints,
            protocol,
            tls: self.upstream_tls(v.tls.as_ref(), protocol),
        }
    }

    fn canary(&mut self, c: &Spanned<RawCanary>) -> (Version, u16) {
        let c = c.get_ref();
        let (endpoints, protocol) = self.endpoints(&c.endpoints);
        let version = Version {
            name: self.version_name(&c.version),
            endpoints,
            protocol,
            tls: self.upstream_tls(c.tls.as_ref(), protocol),
        };
        let weight = c
            .weight
            .as_ref()
            .and_then(|w| self.weight_bp(w))
            .unwrap_or(0);
        (version, weight)
    }

    /// A percentage `0..=100` with at most two decimals, in basis points.
    fn weight_bp(&mut self, w: &Spanned<f64>) -> Option<u16> {
        let pct = *w.get_ref();
        let bp = pct * 100.0;
        if !(0.0..=100.0).contains(&pct) || pct.is_nan() {
            self.err(
                w.span(),
                format!("weight must be a percentage between 0 and 100, got {pct}"),
            );
            None
        } else if (bp - bp.round()).abs() > 1e-6 {
            self.err(
                w.span(),
                format!("weight {pct} has more than two decimals (the step is 0.01)"),
            );
            None
        } else {
            Some(bp.round() as u16)
        }
    }

    /// An endpoint named by several routes is checked by the first of them
    /// with a `[route.health_check]`: another route's different check of
    /// the same endpoint is not used, and says so.
    pub(super) fn shared_health_checks(&mut self, raw: &[Spanned<RawRoute>], routes: &[Route]) {
        let mut first: std::collections::HashMap<(&str, UpstreamProtocol), (&str, &HealthCheck)> =
            std::collections::HashMap::new();
        for r in routes {
            let Some(check) = &r.health_check else {
                continue;
            };
            for v in std::iter::once(&r.stable).chain(&r.canary) {
                for e in &v.endpoints {
                    let (by, theirs) = *first
                        .entry((e.addr.as_str(), v.protocol))
                        .or_insert((r.name.as_str(), check));
                    if theirs == check {
                        continue;
                    }
                    let span = raw
                        .iter()
                        .find(|x| *x.get_ref().name.get_ref() == r.name)
                        .and_then(|x| x.get_ref().health_check.as_ref().map(|h| h.span()));
                    if let Some(span) = span {
                        self.warn(span, format!("endpoint {} is checked by route {by:?}'s health check, which differs: this one is not used for it (one check per endpoint, the first route's)", e.addr));
                    }
                }
            }
        }
    }

    /// Checks that span routes: unique names, and no two routes claiming the
    /// same (host, path prefix).
    pub(super) fn cross_route(&mut self, routes: &[Spanned<RawRoute>]) {
        let mut names = HashSet::new();
        let mut keys: HashSet<(String, String)> = HashSet::new();
        for r in routes {
            let rr = r.get_ref();
            if !names.insert(rr.name.get_ref().clone()) {
                self.err(
                    rr.name.span(),
                    format!("route name {:?} is used twice", rr.name.get_ref()),
                );
            }
            let prefix = rr
                .path_prefix
                .as_ref()
                .map_or("/".to_string(), |p| p.get_ref().clone());
            let hosts: Vec<String> = match &rr.hosts {
                Some(h) if !h.is_empty() => h
                    .iter()
                    .map(|h| h.get_ref().trim_end_matches('.').to_ascii_lowercase())
                    .collect(),
                _ => vec![String::new()],
            };
            for h in hosts {
                if !keys.insert((h.clone(), prefix.clone())) {
                    let what = if h.is_empty() {
                        "the default route (no hosts)".to_string()
                    } else {
                        format!("host {h:?}")
                    };
                    self.err(r.span(), format!("route {:?}: {what} with path_prefix {prefix:?} is already claimed by an earlier route", rr.name.get_ref()));
                }
            }
        }
    }

    /// `[route.mirror]`: a share of stable's requests for a canary to see.
    /// `allow_from` / `deny_from`: addresses and CIDR ranges, at most
    /// 1 024. A range with host bits set is taken as its network, with a
    /// warning (as nginx does).
    pub(super) fn ranges(
        &mut self,
        list: Option<&[Spanned<String>]>,
        what: &str,
    ) -> Vec<ipnet::IpNet> {
        let Some(list) = list else {
            return Vec::new();
        };
        if list.len() > 1024 {
            if let Some(first) = list.first() {
                self.err(
                    first.span(),
                    format!("{what} takes at most 1024 ranges, got {}", list.len()),
                );
            }
        }
        let mut out = Vec::with_capacity(list.len());
        for s in list {
            let text = s.get_ref().trim();
            let Some(net) = super::super::ip_range(text) else {
                self.err(
                    s.span(),
                    format!("{what}: {text:?} is not an address or a CIDR range (like \"10.0.0.0/8\" or \"2001:db8::/32\")"),
                );
                continue;
            };
            if net.trunc() != net {
                self.warn(
                    s.span(),
                    format!(
                        "{what}: {text:?} has host bits set; taken as {}",
                        net.trunc()
                    ),
                );
            }
            out.push(net.trunc());
        }
        out
    }

    fn outlier_detection(&mut self, o: &Spanned<RawOutlierDetection>) -> OutlierDetection {
        let raw = o.get_ref();
        let ejection_time = self.duration(raw.ejection_time.as_ref(), Duration::from_secs(30));
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&ejection_time) {
            let s = raw.ejection_time.as_ref().map_or(o.span(), |t| t.span());
            self.err(
                s,
                "outlier_detection ejection_time must be between 1s and 1h",
            );
        }
        OutlierDetection {
            consecutive_errors: self.int_in(
                raw.consecutive_errors.as_ref(),
                1..=1000,
                5,
                "consecutive_errors",
            ) as u32,
            ejection_time,
            max_ejected_percent: self.int_in(
                raw.max_ejected_percent.as_ref(),
                1..=100,
                50,
                "max_ejected_percent",
            ) as u8,
        }
    }

    fn retry(&mut self, t: &Spanned<RawRetry>, timeout: Duration) -> Retry {
        let raw = t.get_ref();
        let mut retry = Retry {
            on_reset: false,
            on_timeout: false,
            on_status: Vec::new(),
            on_unavailable: false,
            retries: self.int_in(raw.retries.as_ref(), 1..=2, 1, "retry retries") as u8,
            try_timeout: raw
                .try_timeout
                .as_ref()
                .map(|s| self.duration(Some(s), timeout)),
            budget_percent: self.int_in(
                raw.budget_percent.as_ref(),
                1..=100,
                20,
                "retry budget_percent",
            ) as u8,
        };
        let on: Vec<(&str, std::ops::Range<usize>)> = match &raw.on {
            Some(on) => {
                if on.get_ref().is_empty() {
                    self.err(on.span(), "retry on must name at least one failure");
                }
                on.get_ref()
                    .iter()
                    .map(|s| (s.get_ref().as_str(), s.span()))
                    .collect()
            }
            None => vec![("reset", t.span())],
        };
        for (what, span) in on {
            match what {
                "reset" => retry.on_reset = true,
                "timeout" => retry.on_timeout = true,
                "unavailable" => retry.on_unavailable = true,
                "502" | "503" | "504" => {
                    let code = what.parse().unwrap_or(503);
                    if !retry.on_status.contains(&code) {
                        retry.on_status.push(code);
                    }
                }
                other => self.err(
                    span,
                    format!(
                        "retry on {other:?} is not one of \"reset\", \"timeout\", \"502\", \"503\", \"504\", \"unavailable\""
                    ),
                ),
            }
        }
        let try_span = || raw.try_timeout.as_ref().map_or(t.span(), |s| s.span());
        match retry.try_timeout {
            Some(_) if !retry.on_timeout => self.err(
                try_span(),
                "retry try_timeout needs \"timeout\" in on (a try cut short would not be sent again)",
            ),
            None if retry.on_timeout => self.err(
                try_span(),
                "retry on \"timeout\" needs try_timeout (shorter than the route's timeout)",
            ),
            Some(d) if d >= timeout => self.err(
                try_span(),
                format!(
                    "retry try_timeout ({d:?}) must be shorter than the route's timeout ({timeout:?})"
                ),
            ),
            _ => {}
        }
        retry
    }

    fn rate_limit(&mut self, l: &Spanned<RawRateLimit>) -> Option<RateLimit> {
        let raw = l.get_ref();
        let rps = *raw.requests_per_second.get_ref();
        if !(0.001..=1_000_000.0).contains(&rps) {
            self.err(
                raw.requests_per_second.span(),
                format!(
                    "rate_limit requests_per_second must be between 0.001 and 1000000, got {rps}"
                ),
            );
            return None;
        }
        let default_burst = rps.ceil().max(1.0) as i64;
        let burst = self.int_in(
            raw.burst.as_ref(),
            1..=1_000_000,
            default_burst,
            "rate_limit burst",
        );
        let key_client_cert = raw
            .key
            .as_ref()
            .is_some_and(|k| k.get_ref() == "client-cert");
        let key_header = raw.key.as_ref().and_then(|k| match k.get_ref().as_str() {
            "client-ip" | "client-cert" => None,
            text => match text.strip_prefix("header:").map(str::to_ascii_lowercase) {
                Some(name) if http_token(&name) => Some(name),
                _ => {
                    self.err(
                        k.span(),
                        format!("rate_limit key {text:?} is not \"client-ip\", \"client-cert\" or \"header:NAME\""),
                    );
                    None
                }
            },
        });
        Some(RateLimit {
            per_second_milli: (rps * 1000.0).round() as u64,
            burst: burst as u32,
            key_header,
            key_client_cert,
        })
    }

    fn mirror(&mut self, m: &Spanned<RawMirror>, r: &RawRoute) -> Option<Mirror> {
        let raw = m.get_ref();
        if r.canary.is_none() {
            self.err(
                m.span(),
                "[route.mirror] copies requests to the canary: the route needs a [route.canary]",
            );
            return None;
        }
        let percent_bp = match self.weight_bp(&raw.percent) {
            Some(0) => {
                self.err(
                    raw.percent.span(),
                    "mirror percent must be greater than 0 (remove [route.mirror] to stop mirroring)",
                );
                None
            }
            bp => bp,
        };
        let max_body = self.int_in(
            raw.max_body.as_ref(),
            0..=defaults::MAX_MIRROR_BODY as i64,
            defaults::MIRROR_BODY as i64,
            "mirror max_body (bytes)",
        ) as usize;
        let max_concurrent = self.int_in(
            raw.max_concurrent.as_ref(),
            1..=10_000,
            defaults::MIRROR_CONCURRENCY as i64,
            "mirror max_concurrent",
        ) as usize;
        let mut methods = Vec::new();
        for method in raw.methods.iter().flatten() {
            let up = method.get_ref().to_ascii_uppercase();
            if !http_token(&up) {
                self.err(
                    method.span(),
                    format!("mirror method {:?} is not an HTTP method", method.get_ref()),
                );
            } else if up == "CONNECT" {
                self.err(method.span(), "CONNECT requests cannot be mirrored");
            } else if !methods.contains(&up) {
                methods.push(up);
            }
        }
        Some(Mirror {
            percent_bp: percent_bp?,
            max_body,
            max_concurrent,
            methods,
        })
    }

    /// `[route.force]`: a valid header name or cookie name, at least one.
    fn force(&mut self, f: &Spanned<RawForce>) -> Option<Force> {
        let raw = f.get_ref();
        let header = raw.header.as_ref().and_then(|h| {
            let name = h.get_ref().to_ascii_lowercase();
            if http_token(&name) {
                Some(name)
            } else {
                self.err(
                    h.span(),
                    format!("force header {:?} is not a header name", h.get_ref()),
                );
                None
            }
        });
        let cookie = raw.cookie.as_ref().and_then(|c| {
            if http_token(c.get_ref()) {
                Some(c.get_ref().clone())
            } else {
                self.err(
                    c.span(),
                    format!("force cookie {:?} is not a cookie name", c.get_ref()),
                );
                None
            }
        });
        if raw.header.is_none() && raw.cookie.is_none() {
            self.err(
                f.span(),
                "[route.force] needs a header or a cookie (or both)",
            );
            return None;
        }
        let canary_values = self.force_values(raw.canary_values.as_deref(), "canary_values");
        let stable_values = self.force_values(raw.stable_values.as_deref(), "stable_values");
        for v in raw.stable_values.iter().flatten() {
            if canary_values.contains(v.get_ref()) {
                self.err(
                    v.span(),
                    format!(
                        "force value {:?} is in both canary_values and stable_values",
                        v.get_ref()
                    ),
                );
            }
        }
        Some(Force {
            header,
            cookie,
            allow_when_reverted: raw.allow_when_reverted.unwrap_or(false),
            canary_values,
            stable_values,
        })
    }

    /// `canary_values` / `stable_values`: at most 16 plain values (visible
    /// ASCII, as a header or cookie value carries them).
    fn force_values(&mut self, list: Option<&[Spanned<String>]>, what: &str) -> Vec<String> {
        let Some(list) = list else {
            return Vec::new();
        };
        if list.len() > 16 {
            if let Some(first) = list.first() {
                self.err(
                    first.span(),
                    format!("force {what} takes at most 16 values"),
                );
            }
        }
        let mut out = Vec::new();
        for v in list {
            let text = v.get_ref();
            if text.is_empty() || !text.bytes().all(|b| b.is_ascii_graphic()) {
                self.err(
                    v.span(),
                    format!("force {what}: {text:?} must be visible ASCII, without spaces"),
                );
            } else if !out.contains(text) {
                out.push(text.clone());
            }
        }
        out
    }
}

/// Which of a route's messages a header table edits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Edited {
    /// `[route.request_headers]`.
    Requests,
    /// `[route.response_headers]`.
    Answers,
}

impl Edited {
    fn table(self) -> &'static str {
        match self {
            Edited::Requests => "[route.request_headers]",
            Edited::Answers => "[route.response_headers]",
        }
    }

    /// Why veer keeps `name` to itself, if it does: fields that frame the
    /// message or belong to one hop, and (on requests) the forwarding
    /// fields and gRPC deadline veer writes.
    fn reserved(self, name: &str) -> Option<&'static str> {
        const FRAMING: [&str; 8] = [
            "connection",
            "keep-alive",
            "proxy-connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "content-length",
        ];
        const FORWARDING: [&str; 5] = [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-real-ip",
            "forwarded",
        ];
        if FRAMING.contains(&name) {
            return Some("it frames the message or belongs to one hop");
        }
        if self == Edited::Answers && name.starts_with("grpc-") {
            return Some("the judge reads a gRPC call's outcome from it");
        }
        if self == Edited::Requests {
            if FORWARDING.contains(&name) {
                return Some("veer writes this hop's forwarding fields itself (see trusted_hops)");
            }
            if name == "grpc-timeout" || name == "expect" {
                return Some("veer keeps the call's deadline and the client's Expect");
            }
        }
        None
    }
}

/// Fields a header table may set or remove, each.
const MAX_HEADER_EDITS: usize = 64;

/// Whether `v` may be a field value as written: visible ASCII, spaces and
/// tabs, nothing before or after them.
fn field_value(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b)) && v.trim() == v
}

impl Validator<'_> {
    /// With `[proxy] request_id` on, veer owns `X-Request-Id` on requests:
    /// a route's `[route.request_headers]` may not set or remove it.
    pub(super) fn request_id_kept(&mut self, routes: &[Spanned<RawRoute>]) {
        for r in routes {
            let Some(t) = &r.get_ref().request_headers else {
                continue;
            };
            let t = t.get_ref();
            let set = t
                .set
                .iter()
                .flat_map(|s| s.get_ref().iter().map(|(n, v)| (n, v.span())));
            let removed = t.remove.iter().flatten().map(|n| (n.get_ref(), n.span()));
            for (name, span) in set.chain(removed) {
                if name.eq_ignore_ascii_case("x-request-id") {
                    self.err(span, "[route.request_headers] cannot set or remove \"x-request-id\" while [proxy] request_id is on: veer keeps the client's or makes one");
                }
            }
        }
    }

    /// `[route.cors]`, with ingress-nginx's defaults.
    fn cors(&mut self, c: &Spanned<RawCors>) -> Option<Cors> {
        let raw = c.get_ref();
        let mut origins = Vec::new();
        for o in &raw.allow_origins {
            let text = o.get_ref().trim().to_ascii_lowercase();
            // A `*` only as a whole subdomain: `https://*.example.com`.
            let wildcard_ok = match text.split_once("://*.") {
                Some((_, rest)) => !rest.is_empty() && !rest.contains('*'),
                None => !text.contains('*'),
            };
            let origin = text == "*"
                || ((text.starts_with("https://") || text.starts_with("http://"))
                    && !text.ends_with('/')
                    && wildcard_ok
                    && text.bytes().all(|b| b.is_ascii_graphic() && b != b','));
            if origin {
                origins.push(text);
            } else {
                self.err(o.span(), format!("cors allow_origins: {:?} is not \"*\" or an origin like \"https://app.example.com\" or \"https://*.example.com\" (scheme, host, port; no path)", o.get_ref()));
            }
        }
        if raw.allow_origins.is_empty() {
            self.err(c.span(), "[route.cors] needs allow_origins (\"*\" for any)");
        }
        let mut list =
            |l: Option<&[Spanned<String>]>, default: &[&str], what: &str, token: bool| {
                let Some(l) = l else {
                    return default.iter().map(|s| s.to_string()).collect::<Vec<_>>();
                };
                let mut out = Vec::new();
                for v in l {
                    let text = v.get_ref().trim();
                    if (token && !http_token(text)) || text.is_empty() {
                        self.err(v.span(), format!("cors {what}: {text:?} is not a name"));
                    } else {
                        out.push(text.to_string());
                    }
                }
                out
            };
        let allow_methods = list(
            raw.allow_methods.as_deref(),
            &["GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS"],
            "allow_methods",
            true,
        );
        let allow_headers = list(
            raw.allow_headers.as_deref(),
            &[
                "DNT",
                "Keep-Alive",
                "User-Agent",
                "X-Requested-With",
                "If-Modified-Since",
                "Cache-Control",
                "Content-Type",
                "Range",
                "Authorization",
            ],
            "allow_headers",
            true,
        );
        let expose_headers = list(raw.expose_headers.as_deref(), &[], "expose_headers", true);
        Some(Cors {
            allow_origins: origins,
            allow_methods,
            allow_headers,
            expose_headers,
            allow_credentials: raw.allow_credentials.unwrap_or(true),
            max_age: self.duration(raw.max_age.as_ref(), Duration::from_secs(1_728_000)),
        })
    }

    /// `[route.sticky_cookie]`: names the route's last sticky source (a
    /// made key is always there, so nothing after it would be read).
    fn sticky_cookie(
        &mut self,
        c: &Spanned<RawStickyCookie>,
        sticky: &[StickySource],
    ) -> Option<StickyCookie> {
        let raw = c.get_ref();
        let name = raw.name.get_ref();
        match sticky
            .iter()
            .position(|s| matches!(s, StickySource::Cookie(n) if n == name))
        {
            Some(i) if i + 1 == sticky.len() => {}
            Some(_) => {
                self.err(
                    raw.name.span(),
                    format!("sticky_cookie {name:?} must be the route's last sticky source: a made cookie is always there, so the sources after it would never be read"),
                );
                return None;
            }
            None => {
                self.err(
                    raw.name.span(),
                    format!("sticky_cookie {name:?} is not one of the route's sticky sources: add \"cookie:{name}\" as the last"),
                );
                return None;
            }
        }
        let path = match &raw.path {
            Some(p)
                if !p.get_ref().starts_with('/')
                    || !p
                        .get_ref()
                        .bytes()
                        .all(|b| b.is_ascii_graphic() && b != b';') =>
            {
                self.err(
                    p.span(),
                    "sticky_cookie path must be a path starting with '/' (visible ASCII, no ';')",
                );
                return None;
            }
            Some(p) => p.get_ref().clone(),
            None => "/".into(),
        };
        let domain = match &raw.domain {
            Some(d) => {
                let Some(domain) = super::super::cookie_domain(d.get_ref()) else {
                    self.err(
                        d.span(),
                        "sticky_cookie domain must be a DNS name (\"example.com\": the cookie then goes to its subdomains too)",
                    );
                    return None;
                };
                Some(domain)
            }
            None => None,
        };
        let same_site = match raw
            .same_site
            .as_ref()
            .map(|s| (s, s.get_ref().to_ascii_lowercase()))
        {
            None => SameSite::Lax,
            Some((_, s)) if s == "lax" => SameSite::Lax,
            Some((_, s)) if s == "strict" => SameSite::Strict,
            Some((_, s)) if s == "none" => SameSite::None,
            Some((s, _)) => {
                self.err(
                    s.span(),
                    "sticky_cookie same_site must be \"lax\", \"strict\" or \"none\"",
                );
                return None;
            }
        };
        Some(StickyCookie {
            name: name.clone(),
            max_age: raw
                .max_age
                .as_ref()
                .map(|a| self.duration(Some(a), Duration::from_secs(1))),
            path,
            domain,
            same_site,
            secure: raw.secure.unwrap_or(false) || same_site == SameSite::None,
        })
    }

    /// `rewrite_prefix`: a plain path that takes `path_prefix`'s place.
    fn rewrite_prefix(&mut self, p: &Spanned<String>) -> Option<String> {
        let text = p.get_ref();
        let plain = text.starts_with('/')
            && text
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'?' | b'#'))
            && !text.split('/').any(|seg| seg == "." || seg == "..");
        if !plain {
            self.err(
                p.span(),
                format!("rewrite_prefix {text:?} must be a plain path starting with '/' (no '?', '#', spaces or '.' and '..' segments)"),
            );
            return None;
        }
        Some(text.clone())
    }

    /// `[route.request_headers]` / `[route.response_headers]`.
    fn header_edits(&mut self, t: Option<&Spanned<RawHeaderEdits>>, what: Edited) -> HeaderEdits {
        let Some(t) = t else {
            return HeaderEdits::default();
        };
        let table = what.table();
        let raw = t.get_ref();
        let mut out = HeaderEdits::default();
        let check = |v: &mut Self, name: &str, span: std::ops::Range<usize>, verb: &str| {
            let lower = name.to_ascii_lowercase();
            if !http_token(&lower) {
                v.err(span, format!("{table}: {name:?} is not a header name"));
                return None;
            }
            if let Some(why) = what.reserved(&lower) {
                v.err(span, format!("{table} cannot {verb} {lower:?}: {why}"));
                return None;
            }
            if lower == "host" && (verb == "remove" || what == Edited::Answers) {
                v.err(span, format!("{table} cannot {verb} \"host\""));
                return None;
            }
            Some(lower)
        };
        if let Some(set) = &raw.set {
            if set.get_ref().len() > MAX_HEADER_EDITS {
                self.err(
                    set.span(),
                    format!("{table} sets at most {MAX_HEADER_EDITS} fields"),
                );
            }
            for (name, value) in set.get_ref() {
                let Some(lower) = check(self, name, value.span(), "set") else {
                    continue;
                };
                if !field_value(value.get_ref()) {
                    self.err(
                        value.span(),
                        format!("{table}: the value of {lower:?} must be visible ASCII, spaces and tabs, without spaces around it"),
                    );
                    continue;
                }
                if out.set.iter().any(|(n, _)| *n == lower) {
                    self.err(value.span(), format!("{table} sets {lower:?} twice"));
                    continue;
                }
                out.set.push((lower, value.get_ref().clone()));
            }
        }
        if let Some(remove) = &raw.remove {
            if remove.len() > MAX_HEADER_EDITS {
                self.err(
                    t.span(),
                    format!("{table} removes at most {MAX_HEADER_EDITS} fields"),
                );
            }
            for name in remove {
                let Some(lower) = check(self, name.get_ref(), name.span(), "remove") else {
                    continue;
                };
                if out.set.iter().any(|(n, _)| *n == lower) {
                    self.err(
                        name.span(),
                        format!("{table} both sets and removes {lower:?}"),
                    );
                    continue;
                }
                if !out.remove.contains(&lower) {
                    out.remove.push(lower);
                }
            }
        }
        if out.is_empty() {
            self.warn(
                t.span(),
                format!("{table} neither sets nor removes a field"),
            );
        }
        out
    }
}

impl Validator<'_> {
    fn smoke(&mut self, r: &RawRoute) -> Vec<SmokeCheck> {
        let Some(checks) = &r.smoke else {
            return Vec::new();
        };
        if r.canary.is_none() {
            if let Some(first) = checks.first() {
                self.err(first.span(), "[[route.smoke]] checks a new canary before it gets traffic: the route needs a [route.canary]");
            }
        }
        if checks.len() > MAX_SMOKE_CHECKS {
            if let Some(c) = checks.get(MAX_SMOKE_CHECKS) {
                self.err(
                    c.span(),
                    format!("at most {MAX_SMOKE_CHECKS} smoke checks per route"),
                );
            }
        }
        checks
            .iter()
            .map(|c| {
                let raw = c.get_ref();
                for (key, set) in [
                    ("interval", raw.interval.as_ref().map(|v| v.span())),
                    ("grpc_service", raw.grpc_service.as_ref().map(|v| v.span())),
                    ("unhealthy", raw.unhealthy.as_ref().map(|v| v.span())),
                    ("healthy", raw.healthy.as_ref().map(|v| v.span())),
                    ("start_out", raw.start_out.as_ref().map(|v| v.span())),
                ] {
                    if let Some(span) = set {
                        self.err(span, format!("`{key}` is a [route.health_check] key; a smoke check runs once per canary"));
                    }
                }
                self.check_request(raw, c.span(), "smoke", Duration::from_secs(5), None)
            })
            .collect()
    }

    /// `[route.health_check]` (`protocols`: the route's versions', by
    /// name).
    fn health_check(
        &mut self,
        r: &RawRoute,
        protocols: &[(&str, UpstreamProtocol)],
    ) -> Option<HealthCheck> {
        let h = r.health_check.as_ref()?;
        let span = h.span();
        let raw = h.get_ref();
        let grpc_service = raw.grpc_service.as_ref().map(|s| s.get_ref().clone());
        if let Some(s) = &raw.grpc_service {
            let asked = [
                ("path", raw.path.as_ref().map(|v| v.span())),
                ("method", raw.method.as_ref().map(|v| v.span())),
                (
                    "expect_status",
                    raw.expect_status.as_ref().map(|v| v.span()),
                ),
                (
                    "expect_body",
                    raw.expect_body.as_ref().map(|_| span.clone()),
                ),
            ];
            for (key, set) in asked {
                if let Some(at) = set {
                    self.err(at, format!("a gRPC health check (grpc_service) sends the standard health service's Check call and wants SERVING: `{key}` does not go with it"));
                }
            }
            for (version, p) in protocols {
                if *p == UpstreamProtocol::Http1 {
                    self.err(s.span(), format!("a gRPC health check needs HTTP/2: version {version}'s endpoints are HTTP/1.1 (give them h2c:// or https://)"));
                }
            }
        }
        let grpc_path = grpc_service.as_ref().map(|_| GRPC_HEALTH_CHECK_PATH);
        let mut check = self.check_request(
            raw,
            span.clone(),
            "health check",
            Duration::from_secs(1),
            grpc_path,
        );
        if grpc_service.is_some() {
            check.method = "POST".into();
        }
        let interval = self.duration(raw.interval.as_ref(), Duration::from_secs(5));
        if !(Duration::from_millis(500)..=Duration::from_secs(300)).contains(&interval) {
            let s = raw.interval.as_ref().map_or(span.clone(), |t| t.span());
            self.err(
                s,
                "a health check's interval must be between 500ms and 300s",
            );
        }
        if check.timeout > interval {
            let s = raw.timeout.as_ref().map_or(span.clone(), |t| t.span());
            self.err(
                s,
                format!(
                    "a health check's timeout ({:?}) must be at most its interval ({interval:?})",
                    check.timeout
                ),
            );
        }
        let unhealthy = self.int_in(raw.unhealthy.as_ref(), 1..=100, 3, "unhealthy") as u32;
        let healthy = self.int_in(raw.healthy.as_ref(), 1..=100, 2, "healthy") as u32;
        Some(HealthCheck {
            check,
            interval,
            unhealthy,
            healthy,
            grpc_service,
            start_out: raw.start_out.as_ref().is_some_and(|b| *b.get_ref()),
        })
    }

    /// A smoke or health check's request (`what` names it in errors;
    /// `span`: the check's table).
    fn check_request(
        &mut self,
        raw: &RawSmoke,
        span: std::ops::Range<usize>,
        what: &str,
        default_timeout: Duration,
        default_path: Option<&str>,
    ) -> SmokeCheck {
        let path = match (&raw.path, default_path) {
            (Some(p), _) => {
                let path = p.get_ref().clone();
                if !path.starts_with('/') || path.contains(['#', ' ']) {
                    self.err(p.span(), format!("{what} path {path:?} must start with '/' (a query is allowed, no '#' or spaces)"));
                }
                path
            }
            (None, Some(d)) => d.to_string(),
            (None, None) => {
                self.err(span.clone(), format!("a {what} needs a path"));
                String::new()
            }
        };
        let method = raw
            .method
            .as_ref()
            .map_or_else(|| "GET".to_string(), |m| m.get_ref().to_ascii_uppercase());
        if !["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"].contains(&method.as_str())
        {
            let s = raw.method.as_ref().map_or(span.clone(), |m| m.span());
            self.err(s, format!("{what} method {method:?} is not GET, HEAD, POST, PUT, DELETE, OPTIONS or PATCH"));
        }
        let mut headers = Vec::new();
        if let Some(h) = &raw.headers {
            for (k, v) in h.get_ref() {
                let name = k.to_ascii_lowercase();
                if !http_token(&name) || v.bytes().any(|b| b == b'\r' || b == b'\n') {
                    self.err(
                        h.span(),
                        format!("{what} header {k:?} is not a valid header"),
                    );
                }
                headers.push((name, v.clone()));
            }
        }
        let expect_status =
            self.int_in(raw.expect_status.as_ref(), 100..=599, 200, "expect_status") as u16;
        let timeout = self.duration(raw.timeout.as_ref(), default_timeout);
        if timeout > Duration::from_secs(60) {
            let s = raw.timeout.as_ref().map_or(span, |t| t.span());
            self.err(s, format!("a {what}'s timeout must be at most 60s"));
        }
        SmokeCheck {
            path,
            method,
            headers,
            expect_status,
            expect_body: raw.expect_body.clone(),
            timeout,
        }
    }
}

/// Smoke checks per route.
const MAX_SMOKE_CHECKS: usize = 16;
