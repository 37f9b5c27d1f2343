//! Whose fault a failed request is, and what the client is told.
//!
//! As in pingora's `ErrorSource`, every failure is either the upstream's
//! (it counts against the version), the downstream client's, or veer's own.
//! Each kind maps to exactly one client status and one `kind` label.

use http::StatusCode;

/// A failure on the request path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// Could not connect to any endpoint of the version (refused, unreachable, connect timeout).
    #[error("could not connect to the upstream")]
    UpstreamConnect,
    /// The upstream did not answer within the route's `timeout`.
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    /// The upstream closed or reset the connection before a complete answer.
    #[error("the upstream closed the connection")]
    UpstreamReset,
    /// The upstream's answer was not valid HTTP.
    #[error("the upstream sent an invalid response")]
    UpstreamProtocol,
    /// No route matches the request's host and path.
    #[error("no route")]
    NoRoute,
    /// The request cannot be forwarded as it is.
    #[error("bad request")]
    BadRequest,
    /// The client stopped sending its request body for `body_timeout`.
    #[error("the client's request body stalled")]
    ClientTimeout,
    /// The client went away before sending its whole request body.
    #[error("the client aborted its request body")]
    ClientAborted,
    /// The client closed its connection (or reset its stream) after its
    /// whole request was sent, before the answer came: never answered,
    /// counted (as nginx's 499), never the version's failure.
    #[error("the client left before the answer came")]
    ClientClosed,
    /// The client's request body was malformed (e.g. bad chunked framing).
    #[error("the client's request body was malformed")]
    ClientBadBody,
    /// The client's request body is longer than the route takes
    /// (`max_request_body`): announced so (answered before any of it is
    /// read or sent upstream), or found so as it streamed (the upstream's
    /// request is then broken off).
    #[error("the request body is larger than the route takes")]
    BodyTooLarge,
    /// The client made more requests than the route's
    /// `[route.rate_limit]` allows it.
    #[error("too many requests from the client")]
    RateLimited,
    /// The client's address is not one the route serves (`allow_from`,
    /// `deny_from`).
    #[error("the route does not serve the client's address")]
    Forbidden,
    /// Every connection to the endpoint is busy and the wait for one is
    /// full or over (`max_upstream_connections`).
    #[error("the upstream has no free connection")]
    Overloaded,
    /// A connection over `max_connections_per_ip`, closed on accept.
    #[error("too many connections from the client's address")]
    TooManyConnections,
    /// An upgrade (WebSocket) to a version whose endpoints speak h2c://,
    /// which has no HTTP/1.1 upgrade.
    #[error("upgrades are not supported to this upstream")]
    UpgradeUnsupported,
    /// An HTTP/1.1 request whose `Transfer-Encoding` names a coding other
    /// than one `chunked` (`gzip, chunked`, `chunked, chunked`): veer
    /// decodes only the chunking, and would pass the rest on as if it
    /// were the body (501, as nginx and Envoy answer; never sent).
    #[error("the request's transfer coding is not supported")]
    TransferCoding,
    /// A `TRACE` request (or IIS's `TRACK`): it echoes the request, cookies
    /// and credentials included, and scanners (PCI DSS among them) flag an
    /// edge that passes it on. 405, as nginx answers; never sent.
    #[error("the method is not allowed")]
    MethodNotAllowed,
    /// A gRPC call's own deadline (`grpc-timeout`, shorter than the route's
    /// timeout) passed before the upstream answered: the caller asked for
    /// less time than the route allows, so it is not the version's failure.
    #[error("the call's deadline passed")]
    ClientDeadline,
    /// A client connection closed because a request head (or its TLS
    /// handshake) was not complete within `header_timeout`: a slow or
    /// silent client. Counted, never answered (the connection is closed).
    #[error("the client did not send a complete request head in time")]
    HeaderTimeout,
    /// A connection that had to start with a PROXY protocol header
    /// (`[proxy] proxy_protocol`) did not: closed, nothing answered.
    #[error("no valid PROXY protocol header")]
    BadProxyHeader,
    /// A TLS handshake that failed on the client's certificate (none where
    /// `[proxy.tls] client_ca` requires one, or one that does not verify):
    /// closed by the handshake's alert, nothing answered.
    #[error("no valid client certificate")]
    ClientCert,
    /// A request to a route with `require_client_cert` over a connection
    /// without a verified client certificate (one that presented none
    /// under `client_auth = "optional"`, or a plain one): 403.
    #[error("the route needs a client certificate")]
    ClientCertRequired,
    /// Any other TLS handshake that failed in the protocol (no version or
    /// cipher in common, a malformed message, a client's alert), not
    /// because the connection closed or broke: closed, nothing answered.
    #[error("the TLS handshake failed")]
    TlsHandshake,
    /// A client connection closed because the client took nothing of its
    /// answer for `body_timeout` (it stopped reading: nginx's
    /// `send_timeout`). The answer is given up; never the version's.
    #[error("the client took nothing of its answer in time")]
    SendTimeout,
}

impl ProxyError {
    /// The status the client sees.
    pub fn status(self) -> StatusCode {
        match self {
            ProxyError::UpstreamConnect
            | ProxyError::UpstreamReset
            | ProxyError::UpstreamProtocol => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadRequest
            | ProxyError::ClientAborted
            | ProxyError::ClientClosed
            | ProxyError::ClientBadBody
            | ProxyError::BadProxyHeader
            | ProxyError::ClientCert
            | ProxyError::TlsHandshake => StatusCode::BAD_REQUEST,
            ProxyError::ClientTimeout | ProxyError::HeaderTimeout | ProxyError::SendTimeout => {
                StatusCode::REQUEST_TIMEOUT
            }
            ProxyError::TooManyConnections | ProxyError::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpgradeUnsupported | ProxyError::TransferCoding => {
                StatusCode::NOT_IMPLEMENTED
            }
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ClientDeadline => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Forbidden | ProxyError::ClientCertRequired => StatusCode::FORBIDDEN,
        }
    }

    /// The `kind` label value.
    pub fn kind(self) -> &'static str {
        match self {
            ProxyError::UpstreamConnect => "connect",
            ProxyError::UpstreamTimeout => "timeout",
            ProxyError::UpstreamReset => "reset",
            ProxyError::UpstreamProtocol => "protocol",
            ProxyError::NoRoute => "no_route",
            ProxyError::BadRequest => "bad_request",
            ProxyError::ClientTimeout => "client_timeout",
            ProxyError::ClientAborted => "client_aborted",
            ProxyError::ClientClosed => "client_closed",
            ProxyError::ClientBadBody => "client_bad_body",
            ProxyError::BodyTooLarge => "body_too_large",
            ProxyError::RateLimited => "rate_limited",
            ProxyError::Forbidden => "forbidden",
            ProxyError::TooManyConnections => "too_many_connections",
            ProxyError::Overloaded => "overloaded",
            ProxyError::UpgradeUnsupported => "upgrade_unsupported",
            ProxyError::TransferCoding => "transfer_coding",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::ClientDeadline => "client_deadline",
            ProxyError::HeaderTimeout => "header_timeout",
            ProxyError::BadProxyHeader => "bad_proxy_header",
            ProxyError::ClientCert => "client_cert",
            ProxyError::ClientCertRequired => "client_cert_required",
            ProxyError::TlsHandshake => "tls_handshake",
            ProxyError::SendTimeout => "send_timeout",
        }
    }

    /// Index into per-kind counter arrays (upstream kinds only).
    pub(crate) fn upstream_index(self) -> Option<usize> {
        match self {
            ProxyError::UpstreamConnect => Some(0),
            ProxyError::UpstreamTimeout => Some(1),
            ProxyError::UpstreamReset => Some(2),
            ProxyError::UpstreamProtocol => Some(3),
            _ => None,
        }
    }

    /// The short body sent to the client; it names no internals.
    pub fn body(self) -> &'static str {
        match self {
            ProxyError::UpstreamConnect
            | ProxyError::UpstreamReset
            | ProxyError::UpstreamProtocol => "bad gateway\n",
            ProxyError::UpstreamTimeout => "gateway timeout\n",
            ProxyError::NoRoute => "not found\n",
            ProxyError::BadRequest
            | ProxyError::ClientAborted
            | ProxyError::ClientClosed
            | ProxyError::ClientBadBody
            | ProxyError::BadProxyHeader
            | ProxyError::ClientCert
            | ProxyError::TlsHandshake => "bad request\n",
            ProxyError::ClientTimeout | ProxyError::HeaderTimeout | ProxyError::SendTimeout => {
                "request timeout\n"
            }
            ProxyError::TooManyConnections | ProxyError::Overloaded => "service unavailable\n",
            ProxyError::UpgradeUnsupported | ProxyError::TransferCoding => "not implemented\n",
            ProxyError::MethodNotAllowed => "method not allowed\n",
            ProxyError::ClientDeadline => "deadline exceeded\n",
            ProxyError::BodyTooLarge => "content too large\n",
            ProxyError::RateLimited => "too many requests\n",
            ProxyError::Forbidden => "forbidden\n",
            ProxyError::ClientCertRequired => "client certificate required\n",
        }
    }

    /// Classifies an error from an upstream HTTP/1 connection after the
    /// request was handed to it.
    pub fn from_hyper(e: &hyper::Error) -> ProxyError {
        if e.is_parse() || e.is_parse_status() || e.is_user() {
            return ProxyError::UpstreamProtocol;
        }
        if e.is_timeout() {
            return ProxyError::UpstreamTimeout;
        }
        ProxyError::UpstreamReset
    }
}

/// The kinds of failure veer answers without a version, in the order of
/// [`crate::metrics::ProxyErrorMetrics::by_kind`].
pub const PROXY_KINDS: [ProxyError; 21] = [
    ProxyError::NoRoute,
    ProxyError::BadRequest,
    ProxyError::ClientTimeout,
    ProxyError::ClientAborted,
    ProxyError::ClientClosed,
    ProxyError::ClientBadBody,
    ProxyError::TooManyConnections,
    ProxyError::Overloaded,
    ProxyError::UpgradeUnsupported,
    ProxyError::ClientDeadline,
    ProxyError::HeaderTimeout,
    ProxyError::SendTimeout,
    ProxyError::BodyTooLarge,
    ProxyError::RateLimited,
    ProxyError::Forbidden,
    ProxyError::BadProxyHeader,
    ProxyError::ClientCert,
    ProxyError::TlsHandshake,
    ProxyError::ClientCertRequired,
    ProxyError::TransferCoding,
    ProxyError::MethodNotAllowed,
];

/// The upstream error kinds, in `upstream_index` order.
pub const UPSTREAM_KINDS: [&str; 4] = ["connect", "timeout", "reset", "protocol"];
