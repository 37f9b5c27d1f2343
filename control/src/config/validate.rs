//! Stage two of the config parse: meaning, defaults, and every error at once.
//!
//! Each check pushes a [`Diagnostic`] pointing at the offending value and
//! carries on, so an operator sees all the problems of a file in one pass.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

pub use super::diagnostics::{Diagnostic, Diagnostics};
use super::raw::{
    RawCanary, RawConfig, RawCors, RawEndpoint, RawForce, RawHeaderEdits, RawJudge, RawMirror,
    RawRateLimit, RawRoute, RawStickyCookie, RawUpstreamTls, RawVersion,
};
use super::{
    AccessLog, AdminSettings, Config, Cors, Endpoint, Force, HeaderEdits, JudgeMode, JudgeSettings,
    Mirror, ProxySettings, Quantile, RateLimit, Rollout, Route, SameSite, SmokeCheck,
    StateSettings, StickyCookie, StickySource, Strategy, TlsSettings, UpstreamHttp1,
    UpstreamProtocol, UpstreamTls, Version, Webhook, WebhookFormat, DEFAULT_GRPC_ERROR_CODES,
};

/// Defaults, named so that the docs and the code agree.
pub mod defaults {
    use std::time::Duration;

    /// `[proxy] listen`.
    pub const LISTEN: &str = "0.0.0.0:8080";
    /// `[proxy] max_connections`.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// `[proxy] max_header_bytes`.
    pub const MAX_HEADER_BYTES: usize = 16 * 1024;
    /// `[proxy] max_header_fields` (hyper's, Envoy's and HAProxy's).
    pub const MAX_HEADER_FIELDS: usize = 100;
    /// `[route.mirror] max_body`.
    pub const MIRROR_BODY: usize = 64 * 1024;
    /// The largest `[route.mirror] max_body`.
    pub const MAX_MIRROR_BODY: usize = 16 * 1024 * 1024;
    /// `[route.mirror] max_concurrent`.
    pub const MIRROR_CONCURRENCY: usize = 100;
    /// `[[route]] max_upstream_connections`.
    pub const MAX_UPSTREAM_CONNECTIONS: usize = 1024;
    /// `[proxy] header_timeout`.
    pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
    /// `[proxy] max_connections_per_ip`.
    pub const MAX_CONNECTIONS_PER_IP: usize = 256;
    /// `[proxy] idle_timeout`.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// `[proxy] body_timeout`.
    pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
    /// `[proxy] request_buffer` (nginx's `client_body_buffer_size` on
    /// 64-bit systems).
    pub const REQUEST_BUFFER: usize = 16 * 1024;
    /// The largest `[proxy] request_buffer`.
    pub const MAX_REQUEST_BUFFER: usize = 1 << 20;
    /// `[proxy] shutdown_grace`.
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    /// `[admin] listen`.
    pub const ADMIN_LISTEN: std::net::SocketAddr = std::net::SocketAddr::V4(
        std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9901),
    );
    /// `[state] dir`.
    pub const STATE_DIR: &str = "/var/lib/veer";
    /// `[[route]] timeout`.
    pub const TIMEOUT: Duration = Duration::from_secs(15);
    /// `[[route]] connect_timeout`.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
    /// `[route.judge] interval`.
    pub const JUDGE_INTERVAL: Duration = Duration::from_secs(1);
    /// `[route.judge] window`.
    pub const JUDGE_WINDOW: Duration = Duration::from_secs(60);
    /// `[route.judge] min_requests`.
    pub const MIN_REQUESTS: u64 = 50;
    /// `[route.judge] watch`.
    pub const WATCH: Duration = Duration::from_secs(30 * 60);
    /// `[route.judge] warmup`: none unless configured.
    pub const WARMUP: Duration = Duration::ZERO;
    /// `[route.judge] false_revert_rate`.
    pub const FALSE_REVERT_RATE: f64 = 0.01;
}

/// Endpoints per version; the balancer's failover walk relies on it.
pub const MAX_ENDPOINTS: usize = 64;

/// Validates a raw config. `text` is the file's text (for line numbers) and
/// `base` the directory relative paths are resolved against.
pub fn validate(raw: RawConfig, text: &str, base: &Path) -> Result<Config, Diagnostics> {
    let mut v = Validator {
        text,
        base,
        errors: Vec::new(),
        warnings: Vec::new(),
        own: Vec::new(),
    };
    let proxy = v.proxy(&raw);
    let admin = v.admin(&raw);
    // veer's own ports, which no endpoint should name (see `own_listener`).
    v.own = (proxy.listen.iter().map(|a| (*a, "[proxy] listen")))
        .chain(
            proxy
                .tls
                .iter()
                .flat_map(|t| &t.listen)
                .map(|a| (*a, "[proxy.tls] listen")),
        )
        .chain([(admin.listen, "[admin] listen")])
        .collect();
    let state = StateSettings {
        dir: raw
            .state
            .dir
            .as_ref()
            .map(|d| v.path(d))
            .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR)),
    };
    let fleet = raw.fleet.as_ref().and_then(|f| v.fleet(f));
    let mut routes = Vec::with_capacity(raw.route.len());
    for r in &raw.route {
        if let Some(route) = v.route(r) {
            routes.push(route);
        }
    }
    v.cross_route(&raw.route);
    v.shared_health_checks(&raw.route, &routes);
    if proxy.request_id {
        v.request_id_kept(&raw.route);
    }
    if proxy.request_buffer == 0 {
        // No body is kept: a gRPC call's messages neither.
        for r in &raw.route {
            let on = r
                .get_ref()
                .retry
                .as_ref()
                .and_then(|t| t.get_ref().on.as_ref());
            if let Some(u) = on
                .into_iter()
                .flat_map(|on| on.get_ref())
                .find(|s| s.get_ref() == "unavailable")
            {
                v.warn(u.span(), "retry on \"unavailable\" with [proxy] request_buffer = 0: no gRPC call's messages are kept, so none is sent again");
            }
        }
    }
    if proxy.tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
        // No client certificate is ever verified: nobody would be served.
        for r in &raw.route {
            if let Some(b) = r
                .get_ref()
                .require_client_cert
                .as_ref()
                .filter(|b| *b.get_ref())
            {
                v.err(b.span(), "require_client_cert needs [proxy.tls] client_ca (the CAs clients' certificates are verified against; client_auth = \"optional\" lets the routes that do not require one serve clients without)");
            }
            let key = r
                .get_ref()
                .rate_limit
                .as_ref()
                .and_then(|l| l.get_ref().key.as_ref());
            if let Some(k) = key.filter(|k| k.get_ref() == "client-cert") {
                v.err(k.span(), "rate_limit key \"client-cert\" needs [proxy.tls] client_ca (no client certificate is verified without it)");
            }
        }
    }
    if let (Some(hops), None, false) = (
        raw.proxy.trusted_hops.as_ref().filter(|h| *h.get_ref() > 0),
        raw.proxy.max_connections_per_ip.as_ref(),
        proxy.proxy_protocol,
    ) {
        // Connections come from the proxies in front (an L7 balancer, or
        // kube-proxy's SNAT): the cap is a proxy's, all its clients'.
        v.warn(hops.span(), format!("trusted_hops: clients connect through the proxies in front, so max_connections_per_ip ({}) caps each proxy's connections to veer, all its clients' together (a websocket or a stream holds one each): set max_connections_per_ip to what one proxy may hold", defaults::MAX_CONNECTIONS_PER_IP));
    }
    if proxy.tls.is_none() && proxy.trusted_hops == 0 && !proxy.proxy_protocol {
        // Every request comes over plain HTTP: all would be sent away.
        for r in &raw.route {
            if let Some(b) = r.get_ref().https_redirect.as_ref().filter(|b| *b.get_ref()) {
                v.warn(b.span(), "https_redirect: veer serves no HTTPS ([proxy.tls]) and trusts no proxy in front of it to say a request came over HTTPS (trusted_hops, proxy_protocol), so every request of this route is redirected");
            }
        }
    }
    // A fleet that pools its evidence splits each route's α between the
    // pooled tests and the local tests of its seats.
    if let Some(f) = &fleet {
        for r in &mut routes {
            r.judge.fleet_seats = f.seats;
        }
    }
    // Chat messages link to `/status` where people can reach it.
    if let Some(base) = &admin.public_url {
        for hook in routes.iter_mut().filter_map(|r| r.judge.webhook.as_mut()) {
            hook.status_url = Some(format!("{base}/status"));
        }
    }
    if raw.route.is_empty() {
        v.err(0..0, "no [[route]]: at least one route is required");
    }
    if v.errors.is_empty() {
        v.warnings.sort_by_key(|d| (d.line, d.col));
        v.warnings.dedup();
        Ok(Config {
            proxy,
            admin,
            state,
            fleet,
            routes: routes.into_iter().map(std::sync::Arc::new).collect(),
            warnings: v.warnings,
        })
    } else {
        v.errors.sort_by_key(|d| (d.line, d.col));
        v.errors.dedup();
        Err(Diagnostics(v.errors))
    }
}

struct Validator<'a> {
    text: &'a str,
    base: &'a Path,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
    /// veer's own listeners, and the setting that names each.
    own: Vec<(SocketAddr, &'static str)>,
}

impl Validator<'_> {
    fn err(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.errors
            .push(Diagnostic::at(self.text, span.start, message));
    }

    /// Something valid that is often a mistake: the config is applied, and
    /// the warning logged, printed by `veer check` and shown in `/status`.
    fn warn(&mut self, span: Range<usize>, message: impl Into<String>) {
        self.warnings
            .push(Diagnostic::at(self.text, span.start, message));
    }

    fn path(&mut self, s: &Spanned<String>) -> PathBuf {
        let p = Path::new(s.get_ref());
        if s.get_ref().is_empty() {
            self.err(s.span(), "path must not be empty");
        }
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// A client certificate: `cert_file` and `key_file` go together.
    fn client_cert(
        &mut self,
        cert: Option<&Spanned<String>>,
        key: Option<&Spanned<String>>,
    ) -> Option<(PathBuf, PathBuf)> {
        match (cert, key) {
            (Some(c), Some(k)) => Some((self.path(c), self.path(k))),
            (Some(c), None) => {
                self.err(
                    c.span(),
                    "cert_file needs key_file (the client certificate's key)",
                );
                None
            }
            (None, Some(k)) => {
                self.err(
                    k.span(),
                    "key_file needs cert_file (the client certificate)",
                );
                None
            }
            (None, None) => None,
        }
    }

    fn duration(&mut self, s: Option<&Spanned<String>>, default: Duration) -> Duration {
        let Some(s) = s else { return default };
        match humantime::parse_duration(s.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.err(s.span(), "duration must be greater than zero");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(
                    s.span(),
                    format!(
                        "invalid duration {:?}: {e} (write a number with a unit, like \"250ms\", \"1s\" or \"5m\")",
                        s.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn addr(&mut self, s: &Spanned<String>) -> Option<SocketAddr> {
        match s.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    s.span(),
                    format!(
                        "invalid listen address {:?}: expected IP:PORT, like \"0.0.0.0:8080\" or \"[::1]:8080\"",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn addrs(&mut self, list: &Spanned<Vec<Spanned<String>>>) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for a in list.get_ref() {
            if let Some(addr) = self.addr(a) {
                // Port 0 asks the kernel for a free port, so it may repeat.
                if addr.port() != 0 && out.contains(&addr) {
                    self.err(a.span(), format!("{addr} is listed twice"));
                } else {
                    out.push(addr);
                }
            }
        }
        out
    }

    fn int_in(
        &mut self,
        s: Option<&Spanned<i64>>,
        range: std::ops::RangeInclusive<i64>,
        default: i64,
        what: &str,
    ) -> i64 {
        let Some(s) = s else { return default };
        let v = *s.get_ref();
        if range.contains(&v) {
            v
        } else {
            self.err(
                s.span(),
                format!(
                    "{what} must be between {} and {}, got {v}",
                    range.start(),
                    range.end()
                ),
            );
            default
        }
    }

    fn proxy(&mut self, raw: &RawConfig) -> ProxySettings {
        let p = &raw.proxy;
        let listen = match &p.listen {
            Some(l) => self.addrs(l),
            None => defaults::LISTEN.parse().into_iter().collect(),
        };
        let tls = p.tls.as_ref().map(|t| {
            let t_ref = t.get_ref();
            let listen = self.addrs(&t_ref.listen);
            if listen.is_empty() {
                self.err(
                    t_ref.listen.span(),
                    "[proxy.tls] listen must name at least one address",
                );
            }
            let more = t_ref.certificates.as_ref();
            if let Some(m) = more.filter(|m| m.get_ref().len() > crate::config::MAX_CERTIFICATES) {
                self.err(
                    m.span(),
                    format!(
                        "[[proxy.tls.certificates]]: at most {} pairs",
                        crate::config::MAX_CERTIFICATES
                    ),
                );
            }
            let certificates = more
                .map(|m| {
                    m.get_ref()
                        .iter()
                        .map(|c| (self.path(&c.cert), self.path(&c.key)))
                        .collect()
                })
                .unwrap_or_default();
            let client_ca = t_ref.client_ca.as_ref().map(|p| self.path(p));
            let client_auth_optional = match t_ref.client_auth.as_ref() {
                None => false,
                Some(a) => {
                    let optional = match a.get_ref().as_str() {
                        "required" => false,
                        "optional" => true,
                        _ => {
                            self.err(a.span(), "client_auth must be \"required\" or \"optional\"");
                            false
                        }
                    };
                    if client_ca.is_none() {
                        self.err(
                            a.span(),
                            "client_auth needs client_ca (the CAs clients' certificates are verified against)",
                        );
                    }
                    optional
                }
            };
            let client_crl = t_ref.client_crl.as_ref().map(|c| {
                if client_ca.is_none() {
                    self.err(
                        c.span(),
                        "client_crl needs client_ca (the CAs whose revocation lists it holds)",
                    );
                }
                self.path(c)
            });
            let public_port = t_ref.public_port.as_ref().map(|p| {
                self.int_in(Some(p), 1..=65_535, 443, "[proxy.tls] public_port") as u16
            });
            let forward_client_cert = t_ref.forward_client_cert.as_ref().is_some_and(|f| {
                if client_ca.is_none() && *f.get_ref() {
                    self.err(
                        f.span(),
                        "forward_client_cert needs client_ca (only a verified client certificate is forwarded)",
                    );
                }
                *f.get_ref()
            });
            let ticket_keys = match t_ref.ticket_keys.as_ref() {
                None => Vec::new(),
                Some(k) => {
                    let n = k.get_ref().len();
                    if n == 0 || n > crate::config::MAX_TICKET_KEYS {
                        self.err(
                            k.span(),
                            format!(
                                "ticket_keys: 1 to {} files (the first seals tickets, all open them; leave it out for a key of veer's own)",
                                crate::config::MAX_TICKET_KEYS
                            ),
                        );
                    }
                    k.get_ref().iter().map(|p| self.path(p)).collect()
                }
            };
            let tls13_only = t_ref.min_version.as_ref().is_some_and(|v| match v.get_ref().as_str() {
                "1.2" => false,
                "1.3" => true,
                _ => {
                    self.err(
                        v.span(),
                        "min_version must be \"1.2\" or \"1.3\" (veer speaks no older TLS)",
                    );
                    false
                }
            });
            let session_tickets = t_ref.session_tickets.as_ref().is_none_or(|t| {
                if !*t.get_ref() && !ticket_keys.is_empty() {
                    self.err(
                        t.span(),
                        "session_tickets = false leaves no use for ticket_keys (remove them, or give tickets)",
                    );
                }
                *t.get_ref()
            });
            let session_cache = self.int_in(
                t_ref.session_cache.as_ref(),
                0..=crate::config::MAX_SESSION_CACHE as i64,
                crate::config::DEFAULT_SESSION_CACHE as i64,
                "[proxy.tls] session_cache (sessions held; 0: none)",
            ) as usize;
            TlsSettings {
                listen,
                public_port,
                forward_client_cert,
                ticket_keys,
                tls13_only,
                session_tickets,
                session_cache,
                cert: self.path(&t_ref.cert),
                key: self.path(&t_ref.key),
                certificates,
                client_ca,
                client_auth_optional,
                client_crl,
            }
        });
        if let Some(tls) = &tls {
            for a in &tls.listen {
                if a.port() != 0 && listen.contains(a) {
                    let span = p.tls.as_ref().map_or(0..0, |t| t.span());
                    self.err(span, format!("{a} is both a plain and a TLS listener"));
                }
            }
        }
        let listed = p.listen.as_ref().map_or(1, |l| l.get_ref().len());
        if listed == 0 && tls.is_none() {
            let span = p.listen.as_ref().map_or(0..0, |l| l.span());
            self.err(
                span,
                "no listener: [proxy] listen or [proxy.tls] listen must name an address",
            );
        }
        ProxySettings {
            listen,
            workers: self.int_in(p.workers.as_ref(), 0..=1024, 0, "workers") as usize,
            tls,
            max_connections: self.int_in(
                p.max_connections.as_ref(),
                1..=1_000_000,
                defaults::MAX_CONNECTIONS as i64,
                "max_connections",
            ) as usize,
            max_header_bytes: self.int_in(
                p.max_header_bytes.as_ref(),
                8192..=1 << 20,
                defaults::MAX_HEADER_BYTES as i64,
                "max_header_bytes",
            ) as usize,
            max_header_fields: self.int_in(
                p.max_header_fields.as_ref(),
                16..=1000,
                defaults::MAX_HEADER_FIELDS as i64,
                "max_header_fields",
            ) as usize,
            header_timeout: self.duration(p.header_timeout.as_ref(), defaults::HEADER_TIMEOUT),
            idle_timeout: self.duration(p.idle_timeout.as_ref(), defaults::IDLE_TIMEOUT),
            max_connections_per_ip: self.int_in(
                p.max_connections_per_ip.as_ref(),
                1..=1_000_000,
                defaults::MAX_CONNECTIONS_PER_IP as i64,
                "max_connections_per_ip",
            ) as usize,
            trusted_hops: self.int_in(p.trusted_hops.as_ref(), 0..=16, 0, "trusted_hops") as usize,
            body_timeout: self.duration(p.body_timeout.as_ref(), defaults::BODY_TIMEOUT),
            request_buffer: self.int_in(
                p.request_buffer.as_ref(),
                0..=defaults::MAX_REQUEST_BUFFER as i64,
                defaults::REQUEST_BUFFER as i64,
                "request_buffer",
            ) as usize,
            max_request_body: self.int_in(
                p.max_request_body.as_ref(),
                0..=i64::MAX,
                0,
                "[proxy] max_request_body",
            ) as u64,
            request_id: p.request_id.unwrap_or(false),
            merge_slashes: p.merge_slashes.unwrap_or(true),
            proxy_protocol: p.proxy_protocol.unwrap_or(false),
            proxy_protocol_from: {
                let from = self.ranges(p.proxy_protocol_from.as_deref(), "proxy_protocol_from");
                if !from.is_empty() && p.proxy_protocol != Some(true) {
                    if let Some(first) = p.proxy_protocol_from.as_ref().and_then(|l| l.first()) {
                        self.err(
                            first.span(),
                            "proxy_protocol_from names the balancers whose PROXY protocol headers are believed: set proxy_protocol = true too",
                        );
                    }
                }
                from
            },
            shutdown_grace: self.duration(p.shutdown_grace.as_ref(), defaults::SHUTDOWN_GRACE),
            access_log: match p.access_log.as_ref() {
                None => AccessLog::Off,
                Some(s) => match s.get_ref().as_str() {
                    "off" => AccessLog::Off,
                    "errors" => AccessLog::Errors,
                    "all" => AccessLog::All,
                    other => {
                        self.err(
                            s.span(),
                            format!("[proxy] access_log {other:?} is not one of \"off\", \"errors\", \"all\""),
                        );
                        AccessLog::Off
                    }
                },
            },
            upstream_http1: match p.upstream_http1.as_ref() {
                None => UpstreamHttp1::Veer,
                Some(s) => match s.get_ref().as_str() {
                    "veer" => UpstreamHttp1::Veer,
                    "hyper" => UpstreamHttp1::Hyper,
                    other => {
                        self.err(
                            s.span(),
                            format!("[proxy] upstream_http1 {other:?} is not one of \"veer\", \"hyper\""),
                        );
                        UpstreamHttp1::Veer
                    }
                },
            },
        }
    }

    fn admin(&mut self, raw: &RawConfig) -> AdminSettings {
        let a = &raw.admin;
        let listen = a
            .listen
            .as_ref()
            .and_then(|l| self.addr(l))
            .unwrap_or(defaults::ADMIN_LISTEN);
        let token_file = a.token_file.as_ref().map(|t| self.path(t));
        if !listen.ip().is_loopback() && token_file.is_none() {
            let span = a.listen.as_ref().map_or(0..0, |l| l.span());
            self.err(
                span,
                format!("admin listen {listen} is not loopback: set [admin] token_file so that only holders of the token can act"),
            );
        }
        let public_url = a.public_url.as_ref().and_then(|u| {
            let url = u.get_ref().trim_end_matches('/');
            let ok = (url.starts_with("http://") || url.starts_with("https://"))
                && Webhook::parse(url).is_some();
            if !ok {
                self.err(
                    u.span(),
                    format!("public_url {:?} is not an http[s]://host[:port][/path] URL without credentials", crate::config::redact_url(u.get_ref())),
                );
            }
            ok.then(|| url.to_string())
        });
        AdminSettings {
            listen,
            token_file,
            read_token: a.read_token.as_ref().is_some_and(|b| *b.get_ref()),
            operators_file: a.operators_file.as_ref().map(|p| self.path(p)),
            public_url,
        }
    }
}

/// A fleet or replica name: it is part of the store's keys.
fn valid_fleet_name(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// `host:port` with a non-empty host (name, IPv4 or bracketed IPv6) and a port.
fn valid_host_port(s: &str) -> bool {
    if s.parse::<SocketAddr>().is_ok() {
        return true;
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    port.parse::<u16>().is_ok_and(|p| p != 0)
        && !host.is_empty()
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

mod fleet;
mod judge;
mod route;

#[cfg(test)]
mod tests;
