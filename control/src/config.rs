//! The validated configuration model, and the two-stage parse that builds it.
//!
//! Stage one ([`raw`]) mirrors the TOML file and rejects unknown keys. Stage
//! two ([`validate`]) checks meaning and collects *every* problem with its
//! line and column, so `veer check` can print them all at once.

pub mod diagnostics;
pub mod raw;
pub mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use validate::{Diagnostic, Diagnostics, MAX_ENDPOINTS};

/// The whole validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Data-plane listeners and limits.
    pub proxy: ProxySettings,
    /// The admin listener.
    pub admin: AdminSettings,
    /// Where decisions that must outlive a restart are kept.
    pub state: StateSettings,
    /// The fleet this replica shares decisions with, if any.
    pub fleet: Option<FleetSettings>,
    /// Routes, in file order; names are unique. Shared: a copy of the
    /// config (the controller's, the routing snapshot's) holds the same
    /// routes, not copies of them.
    pub routes: Vec<std::sync::Arc<Route>>,
    /// Valid settings that are often mistakes, in file order.
    pub warnings: Vec<Diagnostic>,
}

/// Data-plane listeners and connection limits.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxySettings {
    /// Plain listeners (HTTP/1.1 and h2c).
    pub listen: Vec<SocketAddr>,
    /// Worker threads; 0 means one per core.
    pub workers: usize,
    /// HTTPS listeners, if any.
    pub tls: Option<TlsSettings>,
    /// Connections accepted at once, over all listeners; more wait in the backlog.
    pub max_connections: usize,
    /// Largest request head (request line and headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Most fields an HTTP/1.1 head may have, a client's request's (more
    /// gets 431) and an upstream's answer's (more is a 502, the upstream's
    /// protocol error) alike.
    pub max_header_fields: usize,
    /// A client connection that has not sent a complete request head within
    /// this long of being accepted (TLS handshake and HTTP/2 preface
    /// included), or of starting a later head, is closed.
    pub header_timeout: Duration,
    /// A client connection with no request in flight (HTTP/1.1 keep-alive,
    /// or HTTP/2 with no open stream) for this long is closed.
    pub idle_timeout: Duration,
    /// Client connections at once from one IP address; more are closed
    /// on accept.
    pub max_connections_per_ip: usize,
    /// Proxies in front of veer whose `X-Forwarded-For` entries are
    /// trusted: the client address (for `client-ip` stickiness) is the
    /// `trusted_hops`-th address from the right of the merged
    /// `X-Forwarded-For` list with the peer appended (0: the peer).
    pub trusted_hops: usize,
    /// A request or response body that makes no progress for this long is aborted.
    pub body_timeout: Duration,
    /// A request body whose announced length is at most this many bytes
    /// is read whole before its request takes an upstream connection (0:
    /// every body streams as it comes). A client uploading slowly then
    /// holds only its own connection, never an upstream's.
    pub request_buffer: usize,
    /// The longest request body a route takes unless it says otherwise
    /// (nginx's `client_max_body_size`), in bytes; 0: no limit. A longer
    /// one is answered 413 and never the version's failure.
    pub max_request_body: u64,
    /// Every request carries an `X-Request-Id` upstream (the client's when
    /// it sent one plain one, else a new one), which its answer and veer's
    /// access log line carry too.
    pub request_id: bool,
    /// Runs of slashes in a request's path are one slash, for routing and
    /// upstream (nginx's `merge_slashes`, on by default): `//admin` is
    /// `/admin`, so a route's `allow_from` cannot be stepped round by
    /// doubling a slash (servers behind that merge them, Tomcat and Apache
    /// among them, would serve it as `/admin`). Off for services whose
    /// paths carry meaningful empty segments (a URL inside a path).
    pub merge_slashes: bool,
    /// Every connection starts with a PROXY protocol header (v1 or v2, as
    /// a load balancer in front sends it), whose source address is the
    /// client's; a connection without one is closed. Read at start.
    pub proxy_protocol: bool,
    /// With `proxy_protocol`: the balancers whose headers name the client
    /// (addresses and CIDR ranges); a header from elsewhere is read and
    /// its address ignored (nginx's `set_real_ip_from`). Empty: every
    /// connection's header is believed. Read at start.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// On SIGTERM, in-flight requests get this long to finish.
    pub shutdown_grace: Duration,
    /// Which requests get an access log line.
    pub access_log: AccessLog,
    /// Who speaks HTTP/1.1 to `http://` upstreams for a bodiless GET or
    /// HEAD and a request with a `Content-Length` body.
    pub upstream_http1: UpstreamHttp1,
}

/// `[proxy] upstream_http1`: who writes a bodiless `GET` or `HEAD`, or a
/// request with a `Content-Length` body, to an `http://` upstream and
/// reads its answer (every other request goes through hyper's client
/// either way).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UpstreamHttp1 {
    /// The request's own task, over a raw pooled connection (about 16 %
    /// fewer instructions a request).
    #[default]
    Veer,
    /// hyper's client, as before session 18: the way back if an upstream
    /// misbehaves with the first.
    Hyper,
}

impl UpstreamHttp1 {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamHttp1::Veer => "veer",
            UpstreamHttp1::Hyper => "hyper",
        }
    }
}

/// `[proxy] access_log`: which requests get a log line (target
/// `veer::access`, at info, in the process's log format).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccessLog {
    /// None.
    #[default]
    Off,
    /// Those that failed: a 5xx from an upstream or from veer, a route
    /// that counts 4xx as errors answering 4xx, and every request veer
    /// refused or could not forward (no route, a client's fault).
    Errors,
    /// All.
    All,
}

impl AccessLog {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLog::Off => "off",
            AccessLog::Errors => "errors",
            AccessLog::All => "all",
        }
    }
}

/// HTTPS listeners: a default certificate chain and key, and more pairs
/// picked by the name a client asks for (SNI); re-read when the files
/// change.
#[derive(Clone, Debug, PartialEq)]
pub struct TlsSettings {
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// PEM certificate chain: for a client asking for a name no pair in
    /// `certificates` covers, or for none.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// `[[proxy.tls.certificates]]`: (chain, key) pairs, each served to a
    /// client asking for a name its certificate's DNS names cover (an
    /// exact name first, then a wildcard; the first listed of equals).
    pub certificates: Vec<(PathBuf, PathBuf)>,
    /// `client_ca`: PEM CA certificates that clients' certificates are
    /// verified against (mutual TLS); None: no client certificate asked for.
    pub client_ca: Option<PathBuf>,
    /// `client_auth = "optional"`: a client may present no certificate
    /// (one it presents must still verify); else one is required.
    pub client_auth_optional: bool,
    /// `client_crl`: PEM certificate revocation lists; a client certificate
    /// one of them revokes is refused (each CA in a client's chain needs
    /// one, as in nginx and Envoy).
    pub client_crl: Option<PathBuf>,
    /// `public_port`: the HTTPS port clients reach (a load balancer or NAT
    /// in front mapping it to `listen`'s), where `https_redirect` sends
    /// them; None: the first listener's port.
    pub public_port: Option<u16>,
    /// `forward_client_cert = true`: `X-Forwarded-Client-Cert` carries the
    /// client's certificate too (`Cert=`, its PEM URL-encoded, as Envoy's).
    pub forward_client_cert: bool,
    /// `ticket_keys`: files of 80 random bytes (nginx's
    /// `ssl_session_ticket_key` files) sealing session tickets, the first
    /// sealing and every one opening, so replicas given the same files
    /// resume each other's clients; empty: a key of veer's own.
    pub ticket_keys: Vec<PathBuf>,
    /// `min_version = "1.3"`: TLS 1.2 clients are refused; else ("1.2",
    /// the default) TLS 1.2 and 1.3 are served.
    pub tls13_only: bool,
    /// `session_tickets` (default true): returning clients resume by
    /// stateless tickets; false (nginx's `ssl_session_tickets off`): by
    /// `session_cache` only.
    pub session_tickets: bool,
    /// `session_cache`: how many sessions the listeners hold for clients
    /// that resume by session ID (TLS 1.2 clients without tickets, or
    /// every client when tickets are off; a TLS 1.3 handshake stores two);
    /// 0: none. Default [`DEFAULT_SESSION_CACHE`].
    pub session_cache: usize,
}

/// `[proxy.tls] session_cache`'s default, HAProxy's `tune.ssl.cachesize`.
pub const DEFAULT_SESSION_CACHE: usize = 20_000;

/// `[proxy.tls] session_cache`'s largest value.
pub const MAX_SESSION_CACHE: usize = 1_000_000;

/// At most this many `[proxy.tls] ticket_keys`.
pub const MAX_TICKET_KEYS: usize = 4;

/// At most this many `[[proxy.tls.certificates]]`.
pub const MAX_CERTIFICATES: usize = 10_000;

/// The admin listener.
#[derive(Clone, Debug, PartialEq)]
pub struct AdminSettings {
    /// Address of `/metrics`, `/status`, `/healthz`, `/readyz` and actions.
    pub listen: SocketAddr,
    /// File holding the bearer token for actions (without one, veer makes
    /// `[state] dir`/admin.token).
    pub token_file: Option<PathBuf>,
    /// `/status` and `/metrics` need the token too.
    pub read_token: bool,
    /// `operators_file`: named tokens (`NAME TOKEN` a line), each as good
    /// as the admin token, whose name an action's audit line and revert
    /// reason carry; re-read when the file changes.
    pub operators_file: Option<PathBuf>,
    /// Where people reach this admin endpoint (behind a port-forward or an
    /// internal proxy), for links in chat notifications.
    pub public_url: Option<String>,
}

/// `[fleet]`: replicas that share decisions through a store.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetSettings {
    /// The store's client URLs (etcd v3), all `http://` or all `https://`.
    pub endpoints: Vec<String>,
    /// The fleet's name: replicas with the same name share decisions.
    pub name: String,
    /// This replica's name, unique in the fleet; `None`: `$POD_NAME`, then
    /// the host name (resolved at start).
    pub replica: Option<String>,
    /// CA certificates the store's server certificate is verified against
    /// (`https://` only; without it, the built-in Mozilla roots).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key for mTLS to the store.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Seats for local tests per canary identity and epoch when the
    /// evidence is pooled (see [`crate::pool`]); 0: not pooled.
    pub seats: u32,
    /// How long a finished pool's keys (its log of batches, checkpoint
    /// and seat counter) stay in the store after the fleet's decision
    /// ended its judging (see [`crate::fleet::pool_finished`]).
    pub keep_evidence: Duration,
}

impl FleetSettings {
    /// Whether the store is reached over TLS.
    pub fn tls(&self) -> bool {
        self.endpoints.iter().any(|e| e.starts_with("https://"))
    }
}

/// Persisted state.
#[derive(Clone, Debug, PartialEq)]
pub struct StateSettings {
    /// Directory for decisions that must outlive a restart.
    pub dir: PathBuf,
}

/// One route: which requests it takes and how it splits them between versions.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    /// Unique name, `[a-z0-9_-]+`.
    pub name: String,
    /// Lower-cased host names (no port); empty means the default route.
    pub hosts: Vec<String>,
    /// Path prefix, starting with `/`.
    pub path_prefix: String,
    /// Sticky key sources, first present wins.
    pub sticky: Vec<StickySource>,
    /// How the two versions share traffic.
    pub strategy: Strategy,
    /// Whole request to the upstream, until the response head arrives.
    pub timeout: Duration,
    /// One connect attempt.
    pub connect_timeout: Duration,
    /// Whether upstream 4xx responses count as errors against a version.
    pub count_4xx_as_errors: bool,
    /// Connections veer opens at once to one endpoint of this route; more
    /// requests wait (a bounded queue, at most `connect_timeout`), then get
    /// 503.
    pub max_upstream_connections: usize,
    /// The longest request body this route takes, in bytes (0: no
    /// limit); `None`: `[proxy] max_request_body`.
    pub max_request_body: Option<u64>,
    /// Client addresses (as `client-ip` stickiness sees them) the route
    /// serves; empty: every one. Others get 403.
    pub allow_from: Vec<ipnet::IpNet>,
    /// Client addresses the route refuses (403), even when allowed.
    pub deny_from: Vec<ipnet::IpNet>,
    /// Requests that came over plain HTTP get `308` to the same URL over
    /// HTTPS (`https_redirect`).
    pub https_redirect: bool,
    /// Requests over a connection without a verified client certificate
    /// (`[proxy.tls] client_ca`) get 403 (`require_client_cert`).
    pub require_client_cert: bool,
    /// What replaces `path_prefix` at the start of the path a request goes
    /// upstream with (`rewrite_prefix`); `None`: the path as it came.
    pub rewrite_prefix: Option<String>,
    /// `[route.request_headers]`: fields set on, or removed from, every
    /// request before it goes upstream.
    pub request_headers: HeaderEdits,
    /// `[route.response_headers]`: fields set on, or removed from, every
    /// answer on the route (the upstream's and veer's own).
    pub response_headers: HeaderEdits,
    /// The stable version.
    pub stable: Version,
    /// The canary version, if one is deployed.
    pub canary: Option<Version>,
    /// Configured canary share in basis points (0..=10 000; 1 = 0.01 %).
    pub canary_weight_bp: u16,
    /// Judge settings.
    pub judge: JudgeSettings,
    /// Progressive promotion, if configured.
    pub rollout: Option<Rollout>,
    /// `[route.force]`: requests that name a version go there.
    pub force: Option<Force>,
    /// `[route.mirror]`: copies of some of stable's requests go to the
    /// canary too, and the pairs are judged.
    pub mirror: Option<Mirror>,
    /// `[route.rate_limit]`: requests a client address may make.
    pub rate_limit: Option<RateLimit>,
    /// `[route.cors]`: browsers on other origins may call the route.
    pub cors: Option<Cors>,
    /// `[route.sticky_cookie]`: the cookie of the last sticky source,
    /// made for a client without one.
    pub sticky_cookie: Option<StickyCookie>,
    /// Requests every endpoint of a new canary (or the target colour of a
    /// blue-green flip) must answer as expected before it gets traffic.
    pub smoke: Vec<SmokeCheck>,
    /// Active checks of every endpoint of the route's versions.
    pub health_check: Option<HealthCheck>,
    /// Passive checks of the same: an endpoint whose answers fail
    /// `consecutive_errors` in a row is taken out for a while.
    pub outlier_detection: Option<OutlierDetection>,
    /// `[route.retry]`: a failed try of a request that can be sent again
    /// is sent again to the next endpoint of its version.
    pub retry: Option<Retry>,
    /// gRPC status codes (0-16) that count as errors for the judge.
    pub grpc_error_codes: Vec<u8>,
}

/// The default `grpc_error_codes`: UNKNOWN, DEADLINE_EXCEEDED, INTERNAL,
/// UNAVAILABLE, DATA_LOSS.
pub const DEFAULT_GRPC_ERROR_CODES: [u8; 5] = [2, 4, 13, 14, 15];

/// One `[[route.smoke]]` check.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SmokeCheck {
    /// Request path (with query, if any), starting with `/`.
    pub path: String,
    /// Request method.
    pub method: String,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// The status the endpoint must answer.
    pub expect_status: u16,
    /// Text the response body must contain.
    pub expect_body: Option<String>,
    /// Deadline for the whole exchange.
    pub timeout: Duration,
}

/// `[route.health_check]`: a request sent to every endpoint of the route's
/// versions every `interval`; an endpoint that fails `unhealthy` in a row
/// is skipped (its keys go to the next endpoint of its version, as for one
/// that refuses connections) until it passes `healthy` in a row.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    /// The request and what its answer must be (`timeout`: the exchange's
    /// deadline).
    pub check: SmokeCheck,
    /// Time between two checks of an endpoint.
    pub interval: Duration,
    /// Failures in a row that take an endpoint out.
    pub unhealthy: u32,
    /// Passes in a row that bring it back.
    pub healthy: u32,
    /// The service a gRPC health check asks the standard health service
    /// about (`""`: the server as a whole); `check` is then its `Check`
    /// call.
    pub grpc_service: Option<String>,
    /// An endpoint the check starts on (one added by a reload, every one
    /// at veer's start) is out until its first pass (Envoy's way, nginx
    /// Plus's `mandatory`); `false`: in until it fails `unhealthy` times.
    pub start_out: bool,
}

/// `[route.outlier_detection]`: an endpoint of the stable version (a
/// canary's failures are the judge's evidence, never hidden) whose requests fail
/// `consecutive_errors` times in a row (5xx answers, and the route's
/// `timeout` passing with no answer) is taken out of its version's choices
/// for `ejection_time` (the n-th time in a row, n times as long, at most
/// [`MAX_EJECTION`] or `ejection_time` if longer), never more than
/// `max_ejected_percent` of a version's endpoints at once (at least one of
/// a version of two or more; a version of one endpoint is never ejected).
/// Envoy's `outlier_detection`, nginx's `max_fails`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OutlierDetection {
    /// Failed requests in a row that take an endpoint out (1 ..= 1000).
    pub consecutive_errors: u32,
    /// How long the first ejection lasts (1 s ..= 1 h).
    pub ejection_time: Duration,
    /// The largest share of a version's endpoints out at once, percent
    /// (1 ..= 100).
    pub max_ejected_percent: u8,
}

/// `[route.retry]`: a request of an idempotent method (GET, HEAD,
/// OPTIONS, PUT, DELETE, TRACE), without a body or with one read whole
/// before it went upstream (`[proxy] request_buffer`, no trailers), or a
/// gRPC call refused with UNAVAILABLE (`on_unavailable`), not an
/// upgrade nor half of a mirrored pair, whose try failed in one of the ways `on` names is sent
/// again, up to `retries` times, each time to the next endpoint of the
/// same version (never the other version), within the route's `timeout`,
/// while the route's retries stay within `budget_percent` of its requests
/// (plus [`RETRY_FLOOR_PER_S`] a second) over [`RETRY_BUDGET_WINDOW`]
/// (linkerd's retry budget; nginx's `proxy_next_upstream`, Envoy's
/// `retry_policy`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Retry {
    /// The connection closed or was reset before the answer's head, or the
    /// head was malformed.
    pub on_reset: bool,
    /// No head within `try_timeout`.
    pub on_timeout: bool,
    /// These answers (502, 503, 504).
    pub on_status: Vec<u16>,
    /// A gRPC call answered UNAVAILABLE (grpc-status 14) before any
    /// message (a trailers-only answer): the server says it did not take
    /// the call. The only failure a gRPC call (a POST) is sent again on.
    pub on_unavailable: bool,
    /// Tries after the first (1 ..= 2).
    pub retries: u8,
    /// How long one try waits for its answer's head (none: the route's
    /// `timeout` for all of them).
    pub try_timeout: Option<Duration>,
    /// Retries at most this share of the route's requests, percent (1 ..= 100).
    pub budget_percent: u8,
}

/// The window a retry budget counts over.
pub const RETRY_BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Retries a second a route may make whatever its share (a route with
/// little traffic can still retry).
pub const RETRY_FLOOR_PER_S: u64 = 10;

/// The longest a repeated ejection lasts (unless `ejection_time` is
/// longer): Envoy's `max_ejection_time`.
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// The path of the standard gRPC health service's `Check` call.
pub const GRPC_HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// Mirroring (shadow traffic): a share of stable's requests, chosen by
/// sticky key, is copied to the canary (with `x-veer-shadow: 1`); the copy's
/// answer is read and dropped, never waited for by the client, and judged
/// against stable's answer to the same request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// Share of stable's requests copied, in basis points (1..=10 000).
    pub percent_bp: u16,
    /// Requests with a larger body are not copied (bytes).
    pub max_body: usize,
    /// Copies in flight at once; a request finding them all busy is not
    /// copied.
    pub max_concurrent: usize,
    /// Methods copied (upper case); empty: every method.
    pub methods: Vec<String>,
}

/// Requests one client address (as `client-ip` stickiness sees it) may
/// make to a route: a token bucket (nginx's `limit_req`), refilled at
/// `per_second`, holding at most `burst`. Past it, 429.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests a second, in thousandths (1 ..= 10^9: 0.001 to 10^6 a
    /// second).
    pub per_second_milli: u64,
    /// Requests allowed at once after a quiet spell (1 ..= 10^6).
    pub burst: u32,
    /// Whose bucket: a request header's value (lower-case name), when
    /// the request has it; else (and with `None`) the client address.
    pub key_header: Option<String>,
    /// `key = "client-cert"`: the verified client certificate's subject,
    /// when the connection has one; else the client address.
    pub key_client_cert: bool,
}

/// Cross-origin requests a route allows (`[route.cors]`): veer answers a
/// browser's preflight itself and marks the answers to allowed origins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cors {
    /// Origins allowed (`scheme://host[:port]`, lower-case), or `*`.
    pub allow_origins: Vec<String>,
    /// `Access-Control-Allow-Methods`.
    pub allow_methods: Vec<String>,
    /// `Access-Control-Allow-Headers`.
    pub allow_headers: Vec<String>,
    /// `Access-Control-Expose-Headers` (none: not sent).
    pub expose_headers: Vec<String>,
    /// `Access-Control-Allow-Credentials: true`.
    pub allow_credentials: bool,
    /// `Access-Control-Max-Age`.
    pub max_age: Duration,
}

/// A sticky cookie veer makes (`[route.sticky_cookie]`): a client whose
/// request has no earlier sticky source and not this cookie gets a new
/// random key, used for the request and set in its answer, as
/// ingress-nginx's `affinity: cookie` does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StickyCookie {
    /// The cookie's name (the route's last sticky source is `cookie:NAME`).
    pub name: String,
    /// `Max-Age`; `None`: a browser session's cookie.
    pub max_age: Option<Duration>,
    /// `Path`.
    pub path: String,
    /// `Domain`; `None`: the request's host only.
    pub domain: Option<String>,
    /// `SameSite`.
    pub same_site: SameSite,
    /// `Secure` on every answer, not only over HTTPS (always with
    /// `SameSite=None`, which browsers refuse without it).
    pub secure: bool,
}

/// A cookie's `SameSite` attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameSite {
    /// Sent on top-level navigations from other sites (browsers' default).
    Lax,
    /// Sent only from the cookie's own site.
    Strict,
    /// Sent from any site (an app in another site's frame); needs `Secure`.
    None,
}

impl SameSite {
    /// The attribute's value.
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

/// A cookie's `Domain` as `[route.sticky_cookie] domain` takes it: a DNS
/// name (a leading `.` dropped, as browsers drop it), lower-cased; `None`
/// if it is not one.
pub fn cookie_domain(text: &str) -> Option<String> {
    let name = text.strip_prefix('.').unwrap_or(text);
    let dns = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    dns.then(|| name.to_ascii_lowercase())
}

/// An RFC 9110 token (header and cookie names): visible ASCII, no
/// separators.
pub fn http_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Header fields a route sets or removes (`[route.request_headers]`,
/// `[route.response_headers]`): names lower-case, values as written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    /// Fields that replace any of the same name (or are added).
    pub set: Vec<(String, String)>,
    /// Fields removed.
    pub remove: Vec<String>,
}

impl HeaderEdits {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// An address range as `allow_from` / `deny_from` take it: CIDR
/// (`10.0.0.0/8`, `2001:db8::/32`) or one address (`/32`, `/128`), as
/// written (host bits kept: see [`ipnet::IpNet::trunc`]).
pub fn ip_range(text: &str) -> Option<ipnet::IpNet> {
    let text = text.trim();
    text.parse::<ipnet::IpNet>().ok().or_else(|| {
        text.parse::<std::net::IpAddr>()
            .ok()
            .map(ipnet::IpNet::from)
    })
}

impl RateLimit {
    /// Requests a second.
    pub fn per_second(&self) -> f64 {
        self.per_second_milli as f64 / 1000.0
    }
}

/// Forcing a version, feature-flag style: a request whose `header` (or,
/// without it, `cookie`) names a version (or `stable` / `canary`) goes to
/// that version whatever the weight. Forced requests are kept out of the
/// judge's window and tests (their share is not the weight).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Force {
    /// Request header naming the version (lower case).
    pub header: Option<String>,
    /// Cookie naming the version.
    pub cookie: Option<String>,
    /// A reverted canary still gets forced requests.
    pub allow_when_reverted: bool,
    /// Values besides `canary` and the canary's version name that send a
    /// request to the canary (ingress-nginx's `always`).
    pub canary_values: Vec<String>,
    /// Values besides `stable` and stable's version name that send a
    /// request to stable (ingress-nginx's `never`).
    pub stable_values: Vec<String>,
}

/// A sticky-key source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StickySource {
    /// A request header, by lower-cased name.
    Header(String),
    /// A cookie, by name.
    Cookie(String),
    /// The client's IP address.
    ClientIp,
}

/// How the two versions share traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// A weighted share of keys goes to the canary.
    Canary,
    /// All traffic on one colour: weight 0 (stable) or 100 (canary).
    BlueGreen,
}

impl Strategy {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Canary => "canary",
            Strategy::BlueGreen => "blue-green",
        }
    }
}

/// One version of the service.
#[derive(Clone, Debug, PartialEq)]
pub struct Version {
    /// Version name, e.g. `v42`; used as the `version` metric label.
    pub name: String,
    /// Endpoints, each at least weight 1.
    pub endpoints: Vec<Endpoint>,
    /// How veer speaks to the endpoints (one scheme per version).
    pub protocol: UpstreamProtocol,
    /// `[route.<version>.tls]`: verification and client certificate for
    /// `https://` endpoints (None: the Mozilla roots, SNI from the host).
    pub tls: Option<UpstreamTls>,
}

/// The protocol of a version's endpoints, from their scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamProtocol {
    /// `host:port` or `http://`: HTTP/1.1 over TCP.
    Http1,
    /// `h2c://`: HTTP/2 over TCP, prior knowledge.
    H2c,
    /// `https://`: TLS, ALPN `h2` then `http/1.1`.
    Https,
}

impl UpstreamProtocol {
    /// The scheme as written in the config.
    pub fn scheme(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http",
            UpstreamProtocol::H2c => "h2c",
            UpstreamProtocol::Https => "https",
        }
    }
}

/// TLS to a version's `https://` endpoints. Verification cannot be turned off.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// PEM CA certificates the endpoints' certificates are verified
    /// against, instead of the built-in Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// Name sent as SNI and verified in the certificate (default: the
    /// endpoint's host; an IP address is verified as an IP).
    pub server_name: Option<String>,
    /// Client certificate chain and key (mTLS), re-read when they change.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// One upstream endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// `host:port`; a host name is resolved when the config is applied.
    pub addr: String,
    /// Relative weight inside its version.
    pub weight: u32,
}

/// What the judge does with a breach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JudgeMode {
    /// Revert the canary.
    Enforce,
    /// Only report.
    Observe,
    /// Neither record nor judge this route (the canary still gets its weight).
    Off,
}

impl JudgeMode {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            JudgeMode::Enforce => "enforce",
            JudgeMode::Observe => "observe",
            JudgeMode::Off => "off",
        }
    }
}

/// A latency quantile the judge can guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Quantile {
    /// Median.
    P50,
    /// 90th percentile.
    P90,
    /// 95th percentile.
    P95,
    /// 99th percentile.
    P99,
    /// 99.9th percentile.
    P999,
}

impl Quantile {
    /// The quantile as a fraction.
    pub fn fraction(self) -> f64 {
        match self {
            Quantile::P50 => 0.5,
            Quantile::P90 => 0.9,
            Quantile::P95 => 0.95,
            Quantile::P99 => 0.99,
            Quantile::P999 => 0.999,
        }
    }

    /// The key used in the config file.
    pub fn key(self) -> &'static str {
        match self {
            Quantile::P50 => "p50",
            Quantile::P90 => "p90",
            Quantile::P95 => "p95",
            Quantile::P99 => "p99",
            Quantile::P999 => "p999",
        }
    }

    /// Parses a config key.
    pub fn from_key(key: &str) -> Option<Quantile> {
        [
            Quantile::P50,
            Quantile::P90,
            Quantile::P95,
            Quantile::P99,
            Quantile::P999,
        ]
        .into_iter()
        .find(|q| q.key() == key)
    }
}

/// Judge settings of one route.
#[derive(Clone, Debug, PartialEq)]
pub struct JudgeSettings {
    /// Enforce or observe.
    pub mode: JudgeMode,
    /// How often a verdict is computed.
    pub interval: Duration,
    /// Sliding window of per-version statistics.
    pub window: Duration,
    /// Requests per version in the window before a relative verdict.
    pub min_requests: u64,
    /// Absolute guard on the canary's error rate.
    pub max_error_rate: Option<f64>,
    /// Guard on canary error rate / stable error rate.
    pub max_error_rate_ratio: Option<f64>,
    /// Absolute guards on canary latency quantiles, in milliseconds.
    pub max_latency_ms: Vec<(Quantile, f64)>,
    /// Guards on canary quantile / stable quantile.
    pub max_latency_ratio: Vec<(Quantile, f64)>,
    /// Bound on reverting a canary that is as good as stable, over a whole rollout.
    pub false_revert_rate: f64,
    /// Relative risk tolerated before the sequential tests count against the
    /// canary (r₀ ≥ 1; 1 = none).
    pub margin: f64,
    /// blue-green: how long after a flip the new colour is tested against
    /// the old colour's statistics from before the flip.
    pub watch: Duration,
    /// How long after a new canary identity's first request its latency is
    /// kept out of the latency tests (a cold canary is often slower for its
    /// first seconds); the error tests and the gross-failure guards apply
    /// from the first request.
    pub warmup: Duration,
    /// The route is blue-green (its judge budgets α for the watch tests).
    pub blue_green: bool,
    /// The route mirrors requests to the canary (its judge runs the paired
    /// tests too, and budgets α for them).
    pub mirrored: bool,
    /// Where to POST a JSON event for every verdict change, revert,
    /// promotion and operator action (plain `http://` URL).
    pub webhook: Option<Webhook>,
    /// The route's availability objective (e.g. 0.999), for the canary
    /// burn-rate guard.
    pub slo: Option<f64>,
    /// In a fleet that pools its evidence: the seats for local tests per
    /// canary identity (see [`crate::pool`]); 0 alone (the local tests
    /// have all of `false_revert_rate`).
    pub fleet_seats: u32,
    /// Where the route has seen enough distinct client addresses, each has
    /// one vote per kind of bad event, as each sticky key has (so a client
    /// minting keys counts once). False: keys alone.
    pub one_vote_per_client: bool,
}

impl Default for JudgeSettings {
    /// The documented defaults of `[route.judge]`.
    fn default() -> JudgeSettings {
        use validate::defaults;
        JudgeSettings {
            mode: JudgeMode::Enforce,
            interval: defaults::JUDGE_INTERVAL,
            window: defaults::JUDGE_WINDOW,
            min_requests: defaults::MIN_REQUESTS,
            max_error_rate: None,
            max_error_rate_ratio: None,
            max_latency_ms: Vec::new(),
            max_latency_ratio: Vec::new(),
            false_revert_rate: defaults::FALSE_REVERT_RATE,
            margin: 1.0,
            watch: defaults::WATCH,
            warmup: defaults::WARMUP,
            blue_green: false,
            mirrored: false,
            webhook: None,
            slo: None,
            fleet_seats: 0,
            one_vote_per_client: true,
        }
    }
}

/// A webhook target: `http://` or `https://`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    /// The URL as written.
    pub url: String,
    /// `host:port` to connect to.
    pub authority: String,
    /// The host alone (TLS server name; brackets removed from IPv6).
    pub host: String,
    /// Path and query to POST to.
    pub path: String,
    /// `https://`: TLS, the certificate verified against the Mozilla roots
    /// built into veer, or against `ca_file` when set.
    pub tls: bool,
    /// PEM bundle of the CAs an https webhook must chain to (`webhook_ca_file`).
    pub ca_file: Option<PathBuf>,
    /// What is POSTed (`webhook_format`).
    pub format: WebhookFormat,
    /// Link to the proxy's `/status` in chat messages (`[admin] public_url`).
    pub status_url: Option<String>,
}

/// The body of a webhook POST.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WebhookFormat {
    /// The event as a JSON object (for programs).
    #[default]
    Json,
    /// A Slack incoming-webhook message (for people).
    Slack,
    /// A Microsoft Teams (Workflows) message with an Adaptive Card (for people).
    Teams,
}

impl WebhookFormat {
    /// From its name in the config file.
    pub fn parse(s: &str) -> Option<WebhookFormat> {
        Some(match s {
            "json" => WebhookFormat::Json,
            "slack" => WebhookFormat::Slack,
            "teams" => WebhookFormat::Teams,
            _ => return None,
        })
    }
}

/// A URL fit for logs and `/status`: scheme and host kept, credentials
/// (userinfo), path and query replaced by `…`. Chat webhooks carry their
/// secret in the path, some services in the query or userinfo.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (s, r),
        None => return "…".to_string(),
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let user = if authority.contains('@') { "…@" } else { "" };
    let tail = if end < rest.len() && &rest[end..] != "/" {
        "/…"
    } else {
        ""
    };
    format!("{scheme}://{user}{host}{tail}")
}

impl Webhook {
    /// The URL as logs may show it ([`redact_url`]).
    pub fn redacted(&self) -> String {
        redact_url(&self.url)
    }

    /// Parses `http[s]://host[:port][/path]` (no CA file).
    pub fn parse(url: &str) -> Option<Webhook> {
        let (rest, tls, port) = match url.strip_prefix("https://") {
            Some(rest) => (rest, true, 443),
            None => (url.strip_prefix("http://")?, false, 80),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') || path.contains(' ') {
            return None;
        }
        let (host, authority) = match authority.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() && (!h.contains(':') || h.ends_with(']')) => {
                (h, authority.to_string())
            }
            _ => (authority, format!("{authority}:{port}")),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return None;
        }
        Some(Webhook {
            url: url.to_string(),
            authority,
            host: host.to_string(),
            path: path.to_string(),
            tls,
            ca_file: None,
            format: WebhookFormat::Json,
            status_url: None,
        })
    }
}

/// Progressive promotion.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    /// Canary weight at each step, in basis points, strictly increasing.
    pub steps_bp: Vec<u16>,
    /// Healthy time required before the next step.
    pub hold: Duration,
    /// A confirmation gate: asked (POST) before each step, which is taken
    /// only on a 2xx answer.
    pub confirm: Option<Webhook>,
}

impl Config {
    /// Parses and validates a config file's text. `base` is the directory
    /// relative paths in the file are taken from (the file's own directory).
    pub fn parse(text: &str, base: &Path) -> Result<Config, Diagnostics> {
        let (raw, mut found) = raw::RawConfig::parse(text);
        let Some(raw) = raw else {
            return Err(Diagnostics(found));
        };
        match validate::validate(raw, text, base) {
            Ok(c) if found.is_empty() => Ok(c),
            Ok(_) => Err(Diagnostics(found)),
            Err(Diagnostics(more)) => {
                found.extend(more);
                found.sort_by_key(|d| (d.line, d.col));
                Err(Diagnostics(found))
            }
        }
    }

    /// The settings alone, without the routes: what is kept of the config
    /// a process started with (settings read only at start), which must
    /// not keep that config's routes alive past a reload.
    pub fn without_routes(&self) -> Config {
        Config {
            proxy: self.proxy.clone(),
            admin: self.admin.clone(),
            state: self.state.clone(),
            fleet: self.fleet.clone(),
            routes: Vec::new(),
            warnings: self.warnings.clone(),
        }
    }

    /// Finds a route by name.
    pub fn route(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.name == name).map(|r| &**r)
    }
}

impl Route {
    /// The configured canary weight in percent.
    pub fn canary_weight_percent(&self) -> f64 {
        f64::from(self.canary_weight_bp) / 100.0
    }
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn secrets_in_urls_are_never_shown() {
        assert_eq!(
            redact_url("https://hooks.slack.com/services/T0/B0/SECRET"),
            "https://hooks.slack.com/…"
        );
        assert_eq!(
            redact_url("http://user:pw@h:8080/x?token=1"),
            "http://…@h:8080/…"
        );
        assert_eq!(redact_url("https://h.test/"), "https://h.test");
        assert_eq!(redact_url("https://h.test?k=SECRET"), "https://h.test/…");
        assert_eq!(redact_url("not a url SECRET"), "…");
    }
}
