//! Stage two of the config parse: meaning, defaults, and every error at once.
//!
//! Each check pushes a [`Diagnostic`] pointing at the offending value and
//! carries on, so an operator sees all the problems of a file in one pass.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawCanary, RawConfig, RawEndpoint, RawJudge, RawRoute, RawVersion};
use super::{
    AdminSettings, Config, Endpoint, JudgeMode, JudgeSettings, ProxySettings, Quantile, Rollout,
    Route, StateSettings, StickySource, Strategy, TlsSettings, Version, Webhook,
};

/// One problem in a config file, at a 1-based line and column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// What is wrong, and what would be right.
    pub message: String,
}

impl Diagnostic {
    /// A diagnostic at a byte offset of `text`.
    pub fn at(text: &str, offset: usize, message: impl Into<String>) -> Diagnostic {
        let offset = offset.min(text.len());
        let before = text.get(..offset).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
        Diagnostic {
            line,
            col,
            message: message.into(),
        }
    }
}

/// All problems of one config file, in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Renders one `PATH:LINE:COL: message` line per problem.
    pub fn render(&self, path: &Path) -> String {
        let mut out = String::new();
        for d in &self.0 {
            out.push_str(&format!(
                "{}:{}:{}: {}\n",
                path.display(),
                d.line,
                d.col,
                d.message
            ));
        }
        out
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}:{}: {}", d.line, d.col, d.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

/// Defaults, named so that the docs and the code agree.
pub mod defaults {
    use std::time::Duration;

    /// `[proxy] listen`.
    pub const LISTEN: &str = "0.0.0.0:8080";
    /// `[proxy] max_connections`.
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// `[proxy] max_header_bytes`.
    pub const MAX_HEADER_BYTES: usize = 16 * 1024;
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
    };
    let proxy = v.proxy(&raw);
    let admin = v.admin(&raw);
    let state = StateSettings {
        dir: raw
            .state
            .dir
            .as_ref()
            .map(|d| v.path(d))
            .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR)),
    };
    let mut routes = Vec::with_capacity(raw.route.len());
    for r in &raw.route {
        if let Some(route) = v.route(r) {
            routes.push(route);
        }
    }
    v.cross_route(&raw.route);
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
            routes,
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

    fn webhook(&mut self, j: &RawJudge) -> Option<Webhook> {
        let ca_file = j.webhook_ca_file.as_ref().map(|f| (f.span(), self.path(f)));
        let Some(w) = &j.webhook else {
            if let Some((span, _)) = ca_file {
                self.err(span, "webhook_ca_file is set but there is no webhook");
            }
            return None;
        };
        let Some(mut hook) = Webhook::parse(w.get_ref()) else {
            self.err(
                w.span(),
                format!(
                    "webhook {:?} is not an http[s]://host[:port][/path] URL without credentials",
                    super::redact_url(w.get_ref())
                ),
            );
            return None;
        };
        if let Some((span, path)) = ca_file {
            if !hook.tls {
                self.err(span, "webhook_ca_file applies only to an https:// webhook");
                return None;
            }
            match std::fs::read_to_string(&path) {
                Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => hook.ca_file = Some(path),
                Ok(_) => {
                    self.err(
                        span,
                        format!(
                            "webhook_ca_file {}: no PEM certificate in it",
                            path.display()
                        ),
                    );
                    return None;
                }
                Err(e) => {
                    self.err(span, format!("webhook_ca_file {}: {e}", path.display()));
                    return None;
                }
            }
        }
        Some(hook)
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

    /// `[route.judge] warmup`: a duration that may be zero, at most 10 minutes.
    fn warmup(&mut self, s: Option<&Spanned<String>>) -> Duration {
        let Some(s) = s else {
            return defaults::WARMUP;
        };
        match humantime::parse_duration(s.get_ref()) {
            Ok(d) if d > Duration::from_secs(600) => {
                self.err(s.span(), "warmup must be at most 10m: a longer one leaves a slow canary untested for too long");
                defaults::WARMUP
            }
            Ok(d) => d,
            Err(e) => {
                self.err(
                    s.span(),
                    format!(
                        "invalid duration {:?}: {e} (write a number with a unit, like \"0s\" or \"30s\")",
                        s.get_ref()
                    ),
                );
                defaults::WARMUP
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
            TlsSettings {
                listen,
                cert: self.path(&t_ref.cert),
                key: self.path(&t_ref.key),
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
            shutdown_grace: self.duration(p.shutdown_grace.as_ref(), defaults::SHUTDOWN_GRACE),
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
        AdminSettings {
            listen,
            token_file,
            read_token: a.read_token.as_ref().is_some_and(|b| *b.get_ref()),
        }
    }

    fn route(&mut self, r: &Spanned<RawRoute>) -> Option<Route> {
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
            Rollout {
                steps_bp,
                hold: self.duration(Some(&rr.hold), Duration::from_secs(300)),
            }
        });
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
            stable,
            canary: canary.map(|c| c.0),
            canary_weight_bp,
            judge,
            rollout,
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
        let token = |n: &str| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
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

    fn endpoints(&mut self, list: &Spanned<Vec<Spanned<RawEndpoint>>>) -> Vec<Endpoint> {
        let mut out: Vec<Endpoint> = Vec::new();
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
            if !valid_host_port(&addr) {
                self.err(e.span(), format!("endpoint {addr:?} is not HOST:PORT (like \"10.0.0.1:8000\" or \"stable.svc:8000\")"));
                continue;
            }
            if out.iter().any(|o| o.addr == addr) {
                self.err(e.span(), format!("endpoint {addr} is listed twice"));
                continue;
            }
            out.push(Endpoint {
                addr,
                weight: weight as u32,
            });
        }
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
        Version {
            name: self.version_name(&v.version),
            endpoints: self.endpoints(&v.endpoints),
        }
    }

    fn canary(&mut self, c: &Spanned<RawCanary>) -> (Version, u16) {
        let c = c.get_ref();
        let version = Version {
            name: self.version_name(&c.version),
            endpoints: self.endpoints(&c.endpoints),
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

    fn fraction(
        &mut self,
        s: Option<&Spanned<f64>>,
        lo_exclusive: f64,
        hi: f64,
        what: &str,
    ) -> Option<f64> {
        let s = s?;
        let v = *s.get_ref();
        if v > lo_exclusive && v <= hi {
            Some(v)
        } else {
            self.err(
                s.span(),
                format!("{what} must be greater than {lo_exclusive} and at most {hi}, got {v}"),
            );
            None
        }
    }

    fn quantile_map(
        &mut self,
        m: Option<&Spanned<std::collections::BTreeMap<String, Spanned<f64>>>>,
        lo_exclusive: f64,
        what: &str,
    ) -> Vec<(Quantile, f64)> {
        let mut out = Vec::new();
        let Some(m) = m else { return out };
        for (k, v) in m.get_ref() {
            let Some(q) = Quantile::from_key(k) else {
                self.err(
                    m.span(),
                    format!("{what}: unknown quantile {k:?} (use p50, p90, p95, p99 or p999)"),
                );
                continue;
            };
            if v.get_ref().partial_cmp(&lo_exclusive) != Some(std::cmp::Ordering::Greater)
                || !v.get_ref().is_finite()
            {
                self.err(
                    v.span(),
                    format!("{what}.{k} must be greater than {lo_exclusive}"),
                );
                continue;
            }
            out.push((q, *v.get_ref()));
        }
        out.sort_by_key(|(q, _)| *q);
        out
    }

    fn judge(&mut self, j: Option<&RawJudge>) -> JudgeSettings {
        let default = RawJudge::default();
        let j = j.unwrap_or(&default);
        let mode = match j.mode.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
            None | Some(("enforce", _)) => JudgeMode::Enforce,
            Some(("observe", _)) => JudgeMode::Observe,
            Some(("off", _)) => JudgeMode::Off,
            Some((other, span)) => {
                self.err(
                    span,
                    format!("judge mode {other:?} is not one of \"enforce\", \"observe\", \"off\""),
                );
                JudgeMode::Enforce
            }
        };
        let interval = self.duration(j.interval.as_ref(), defaults::JUDGE_INTERVAL);
        let window = self.duration(j.window.as_ref(), defaults::JUDGE_WINDOW);
        if interval > window {
            let span = j.interval.as_ref().map_or(0..0, |s| s.span());
            self.err(span, "judge interval must not exceed the window");
        }
        if window > Duration::from_secs(3600) {
            let span = j.window.as_ref().map_or(0..0, |s| s.span());
            self.err(span, "judge window must be at most 1h");
        }
        let min_requests = self.int_in(
            j.min_requests.as_ref(),
            1..=1_000_000_000,
            defaults::MIN_REQUESTS as i64,
            "min_requests",
        ) as u64;
        JudgeSettings {
            mode,
            interval,
            window,
            min_requests,
            max_error_rate: self.fraction(j.max_error_rate.as_ref(), 0.0, 1.0, "max_error_rate"),
            max_error_rate_ratio: self.fraction(
                j.max_error_rate_ratio.as_ref(),
                1.0,
                1e6,
                "max_error_rate_ratio",
            ),
            max_latency_ms: self.quantile_map(j.max_latency_ms.as_ref(), 0.0, "max_latency_ms"),
            max_latency_ratio: self.quantile_map(
                j.max_latency_ratio.as_ref(),
                1.0,
                "max_latency_ratio",
            ),
            false_revert_rate: self
                .fraction(j.false_revert_rate.as_ref(), 0.0, 0.5, "false_revert_rate")
                .unwrap_or(defaults::FALSE_REVERT_RATE),
            margin: match &j.margin {
                Some(m) if !(1.0..=10.0).contains(m.get_ref()) => {
                    self.err(
                        m.span(),
                        format!("margin must be between 1 and 10, got {}", m.get_ref()),
                    );
                    1.0
                }
                Some(m) => *m.get_ref(),
                None => 1.0,
            },
            watch: self.duration(j.watch.as_ref(), defaults::WATCH),
            warmup: self.warmup(j.warmup.as_ref()),
            blue_green: false,
            webhook: self.webhook(j),
            slo: match &j.slo {
                Some(v) if !(0.5..1.0).contains(v.get_ref()) => {
                    self.err(v.span(), format!("slo must be an availability objective between 0.5 and 1 (exclusive), like 0.999; got {}", v.get_ref()));
                    None
                }
                Some(v) => Some(*v.get_ref()),
                None => None,
            },
        }
    }

    /// Checks that span routes: unique names, and no two routes claiming the
    /// same (host, path prefix).
    fn cross_route(&mut self, routes: &[Spanned<RawRoute>]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Diagnostics> {
        Config::parse(text, Path::new("/etc/veer"))
    }

    const MINIMAL: &str = r#"
[[route]]
name = "web"
[route.stable]
version = "v1"
endpoints = ["127.0.0.1:9000"]
"#;

    #[test]
    fn webhooks_take_http_and_https_urls() {
        let h = Webhook::parse("https://hooks.example.com/services/T0").expect("https");
        assert_eq!(
            (
                h.authority.as_str(),
                h.host.as_str(),
                h.path.as_str(),
                h.tls
            ),
            (
                "hooks.example.com:443",
                "hooks.example.com",
                "/services/T0",
                true
            )
        );
        let h = Webhook::parse("http://127.0.0.1:8080").expect("http");
        assert_eq!(
            (h.authority.as_str(), h.path.as_str(), h.tls),
            ("127.0.0.1:8080", "/", false)
        );
        let h = Webhook::parse("https://[::1]:8443/x").expect("ipv6");
        assert_eq!(
            (h.authority.as_str(), h.host.as_str()),
            ("[::1]:8443", "::1")
        );
        let h = Webhook::parse("https://[::1]/x").expect("ipv6 without port");
        assert_eq!(
            (h.authority.as_str(), h.host.as_str()),
            ("[::1]:443", "::1")
        );
        for bad in ["ftp://x", "https://", "http://user@host/", "https:///path"] {
            assert!(Webhook::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn webhook_ca_file_must_hold_certificates_and_go_with_https() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let judge = |hook: &str, ca_file: &str| {
            format!(
                "{MINIMAL}[route.judge]\nwebhook = \"{hook}\"\nwebhook_ca_file = \"{ca_file}\"\n"
            )
        };
        let c =
            Config::parse(&judge("https://127.0.0.1:9/e", "ca.pem"), dir.path()).expect("valid");
        let hook = c.routes[0].judge.webhook.clone().expect("hook");
        assert_eq!(hook.ca_file.as_deref(), Some(ca.as_path()));

        let e = Config::parse(&judge("http://127.0.0.1:9/e", "ca.pem"), dir.path()).unwrap_err();
        assert!(e.0[0].message.contains("only to an https"), "{e}");
        let e =
            Config::parse(&judge("https://127.0.0.1:9/e", "missing.pem"), dir.path()).unwrap_err();
        assert!(e.0[0].message.contains("missing.pem"), "{e}");
        std::fs::write(&ca, "not a certificate").expect("write");
        let e = Config::parse(&judge("https://127.0.0.1:9/e", "ca.pem"), dir.path()).unwrap_err();
        assert!(e.0[0].message.contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(
            c.proxy.listen,
            vec![defaults::LISTEN.parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(c.admin.listen.to_string(), "127.0.0.1:9901");
        let r = &c.routes[0];
        assert_eq!(r.path_prefix, "/");
        assert_eq!(r.sticky, vec![StickySource::ClientIp]);
        assert_eq!(r.timeout, defaults::TIMEOUT);
        assert_eq!(r.canary, None);
        assert_eq!(r.canary_weight_bp, 0);
        assert_eq!(r.judge.false_revert_rate, defaults::FALSE_REVERT_RATE);
    }

    #[test]
    fn unknown_key_is_an_error_with_its_location() {
        let text = "[proxy]\nlisten = [\"127.0.0.1:1\"]\nlisen = 3\n";
        let e = parse(text).expect_err("unknown key");
        let d =
            e.0.iter()
                .find(|d| d.message.contains("lisen"))
                .expect("reported");
        assert_eq!((d.line, d.col), (3, 1));
    }

    #[test]
    fn every_unknown_key_is_reported_with_the_semantic_errors() {
        let text = "[proxy]\nlisen = 1\nworkers = 2\nmax_conections = 5\n[[route]]\nname = \"Bad\"\ntimout = \"1s\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:1\"]\n";
        let e = parse(text).expect_err("invalid");
        let at: Vec<(usize, usize)> = e.0.iter().map(|d| (d.line, d.col)).collect();
        assert_eq!(at, vec![(2, 1), (4, 1), (6, 8), (7, 1)], "{e}");
        assert!(
            e.0[0].message.contains("lisen") && e.0[1].message.contains("max_conections"),
            "{e}"
        );
        assert!(e.0[3].message.contains("timout"), "{e}");
        // A syntax error still stops the parse: nothing after it is reliable.
        let e = parse("[proxy]\nlisen = 1\nworkers = = 2\n").expect_err("invalid");
        assert_eq!(e.0.len(), 1, "{e}");
        assert!(e.0[0].message.contains("extra"), "{e}");
    }

    #[test]
    fn every_semantic_error_is_reported_not_just_the_first() {
        let text = r#"
[[route]]
name = "Bad Name"
timeout = "15"
sticky = ["header:", "client-ip"]
[route.stable]
version = "v1"
endpoints = ["nope", "127.0.0.1:1"]
[route.canary]
version = "v1"
endpoints = ["127.0.0.1:1"]
weight = 5.001
"#;
        let e = parse(text).expect_err("invalid");
        let lines: Vec<usize> = e.0.iter().map(|d| d.line).collect();
        // name, timeout, sticky, endpoint, version clash, weight (the
        // endpoint in both versions, line 11, is a warning only)
        for want in [3, 4, 5, 8, 10, 12] {
            assert!(lines.contains(&want), "no error on line {want}: {e}");
        }
        assert!(!lines.contains(&11), "{e}");
    }

    #[test]
    fn weight_has_a_step_of_one_hundredth() {
        let ok = MINIMAL.to_string() + "[route.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9001\"]\nweight = 12.34\n";
        assert_eq!(parse(&ok).expect("valid").routes[0].canary_weight_bp, 1234);
        let whole = ok.replace("12.34", "5");
        assert_eq!(
            parse(&whole).expect("valid").routes[0].canary_weight_bp,
            500
        );
        for bad in ["100.5", "-1", "0.001"] {
            assert!(parse(&ok.replace("12.34", bad)).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn non_loopback_admin_needs_a_token() {
        let text = MINIMAL.to_string() + "[admin]\nlisten = \"0.0.0.0:9901\"\n";
        let e = parse(&text).expect_err("needs token");
        assert!(e.0[0].message.contains("token_file"));
        let ok = text.replace("[admin]\n", "[admin]\ntoken_file = \"t\"\n");
        let c = parse(&ok).expect("valid with token");
        assert_eq!(
            c.admin.token_file.as_deref(),
            Some(Path::new("/etc/veer/t"))
        );
    }

    #[test]
    fn two_routes_claiming_the_same_requests_are_rejected() {
        let text = MINIMAL.to_string() + &MINIMAL.replace("\"web\"", "\"web2\"");
        let e = parse(&text).expect_err("duplicate default route");
        assert!(e.to_string().contains("already claimed"), "{e}");
    }

    #[test]
    fn blue_green_weight_is_all_or_nothing() {
        let base = MINIMAL.replace(
            "name = \"web\"",
            "name = \"web\"\nstrategy = \"blue-green\"",
        )
            + "[route.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9001\"]\nweight = 50\n";
        assert!(parse(&base).is_err());
        assert!(parse(&base.replace("weight = 50", "weight = 100")).is_ok());
    }

    #[test]
    fn line_and_column_count_characters() {
        let d = Diagnostic::at("ab\ncdé f", 8, "x");
        assert_eq!((d.line, d.col), (2, 5));
    }

    #[test]
    fn a_short_timeout_alone_shrinks_the_default_connect_timeout() {
        let c = parse(&MINIMAL.replace("name = \"web\"", "name = \"web\"\ntimeout = \"300ms\""))
            .expect("a 300ms timeout alone is valid");
        let r = &c.routes[0];
        assert_eq!(r.connect_timeout, Duration::from_millis(300));
        let explicit = MINIMAL.replace(
            "name = \"web\"",
            "name = \"web\"\ntimeout = \"300ms\"\nconnect_timeout = \"1s\"",
        );
        assert!(
            parse(&explicit).is_err(),
            "an explicit one above timeout is a mistake"
        );
    }

    #[test]
    fn the_same_endpoint_in_both_versions_is_a_warning_not_an_error() {
        let text = "[[route]]\nname = \"web\"\n[route.stable]\nversion = \"v1\"\nendpoints = [\"127.0.0.1:9\"]\n[route.canary]\nversion = \"v2\"\nendpoints = [\"127.0.0.1:9\"]\nweight = 50\n";
        let c = parse(text).expect("an A/A rehearsal is valid");
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert_eq!(c.warnings[0].line, 8);
        assert!(c.warnings[0].message.contains("127.0.0.1:9 is in both"));
        assert!(parse(MINIMAL).expect("valid").warnings.is_empty());
    }
}
