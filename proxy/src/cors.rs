//! Cross-origin requests a route allows (`[route.cors]`), as
//! ingress-nginx's `enable-cors` answers them: a browser's preflight (an
//! `OPTIONS` with `Access-Control-Request-Method`) from an allowed origin
//! is answered by veer itself (204, never the upstream's nor the
//! version's), and every other answer to an allowed origin carries
//! `Access-Control-Allow-Origin` (and `-Credentials`, `-Expose-Headers`).
//! A request from an origin not allowed goes on as it would without CORS:
//! no header says the browser may read it.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use veer_control::config::Cors;

use crate::body::ProxyBody;

/// `[route.cors]`, ready for requests.
#[derive(Debug)]
pub struct CorsTarget {
    /// `*` is allowed.
    any: bool,
    /// Allowed origins, lower-case.
    origins: Box<[Box<str>]>,
    methods: HeaderValue,
    headers: HeaderValue,
    expose: Option<HeaderValue>,
    credentials: bool,
    max_age: HeaderValue,
}

/// A header value of a validated list (names joined by `, `).
fn joined(list: &[String]) -> Option<HeaderValue> {
    HeaderValue::from_str(&list.join(", ")).ok()
}

impl CorsTarget {
    /// From the config (names were validated as tokens).
    pub fn of(c: &Cors) -> Option<Box<CorsTarget>> {
        Some(Box::new(CorsTarget {
            any: c.allow_origins.iter().any(|o| o == "*"),
            origins: c.allow_origins.iter().map(|o| o.as_str().into()).collect(),
            methods: joined(&c.allow_methods)?,
            headers: joined(&c.allow_headers)?,
            expose: (!c.expose_headers.is_empty())
                .then(|| joined(&c.expose_headers))
                .flatten(),
            credentials: c.allow_credentials,
            max_age: HeaderValue::from(c.max_age.as_secs()),
        }))
    }

    /// The `Access-Control-Allow-Origin` a request from an allowed origin
    /// gets: its `Origin` (or `*` when any is allowed without
    /// credentials: a browser refuses `*` with credentials); `None` when
    /// it names no origin or one not allowed.
    pub fn allowed(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        if self.any {
            return Some(if self.credentials {
                origin.clone()
            } else {
                HeaderValue::from_static("*")
            });
        }
        let text = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|o| matches(o, text))
            .then(|| origin.clone())
    }

    /// Marks an answer to an allowed origin (replacing the upstream's own
    /// fields of the same names).
    pub fn mark(&self, headers: &mut HeaderMap, allow: HeaderValue) {
        if allow != "*" {
            // The answer depends on the origin: caches must keep them apart.
            headers.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
        if self.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(e) = &self.expose {
            headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, e.clone());
        }
    }

    /// veer's own answer to an allowed origin's preflight.
    pub fn preflight(&self, allow: HeaderValue) -> Response<ProxyBody> {
        let mut r = Response::new(ProxyBody::empty());
        *r.status_mut() = StatusCode::NO_CONTENT;
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, self.methods.clone());
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, self.headers.clone());
        h.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        self.mark(h, allow);
        r
    }
}

/// Whether `origin` is `allowed`: the same, any case; or, for
/// `scheme://*.domain[:port]`, a subdomain of it (at any depth) with the
/// same scheme and port.
fn matches(allowed: &str, origin: &str) -> bool {
    match allowed.split_once("://*.") {
        None => allowed.eq_ignore_ascii_case(origin),
        Some((scheme, rest)) => {
            let Some(host) = origin
                .get(..scheme.len() + 3)
                .filter(|p| p.eq_ignore_ascii_case(&format!("{scheme}://")))
                .and_then(|_| origin.get(scheme.len() + 3..))
            else {
                return false;
            };
            // `sub.` + the rest: a label, a dot, then the domain exactly.
            host.len() > rest.len() + 1
                && host
                    .get(host.len() - rest.len()..)
                    .is_some_and(|end| end.eq_ignore_ascii_case(rest))
                && host.as_bytes().get(host.len() - rest.len() - 1) == Some(&b'.')
        }
    }
}

/// Whether a request is a browser's preflight.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cors(origins: &[&str], credentials: bool) -> Box<CorsTarget> {
        CorsTarget::of(&Cors {
            allow_origins: origins.iter().map(|o| o.to_string()).collect(),
            allow_methods: vec!["GET".into(), "POST".into()],
            allow_headers: vec!["Content-Type".into()],
            expose_headers: vec![],
            allow_credentials: credentials,
            max_age: Duration::from_secs(600),
        })
        .expect("valid")
    }

    fn from(origin: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::ORIGIN,
            HeaderValue::from_str(origin).expect("value"),
        );
        h
    }

    #[test]
    fn only_listed_origins_are_allowed_and_any_means_the_origin_with_credentials() {
        let listed = cors(&["https://app.example.com"], true);
        assert_eq!(
            listed.allowed(&from("https://App.example.com")),
            Some(HeaderValue::from_static("https://App.example.com"))
        );
        assert_eq!(listed.allowed(&from("https://evil.example")), None);
        assert_eq!(listed.allowed(&HeaderMap::new()), None);
        let wild = cors(&["https://*.example.com"], true);
        for (origin, ok) in [
            ("https://app.example.com", true),
            ("https://a.b.example.com", true),
            ("https://APP.Example.com", true),
            ("https://example.com", false),
            ("https://evilexample.com", false),
            ("http://app.example.com", false),
            ("https://app.example.com:8443", false),
            ("https://app.example.com.evil.io", false),
        ] {
            assert_eq!(wild.allowed(&from(origin)).is_some(), ok, "{origin}");
        }
        let any = cors(&["*"], false);
        assert_eq!(
            any.allowed(&from("https://x.example")),
            Some(HeaderValue::from_static("*"))
        );
        let any_with_cookies = cors(&["*"], true);
        assert_eq!(
            any_with_cookies.allowed(&from("https://x.example")),
            Some(HeaderValue::from_static("https://x.example"))
        );
    }

    #[test]
    fn a_preflight_answer_says_what_may_come_and_varies_by_origin() {
        let c = cors(&["https://app.example.com"], true);
        let r = c.preflight(HeaderValue::from_static("https://app.example.com"));
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let h = r.headers();
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_METHODS], "GET, POST");
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_HEADERS], "Content-Type");
        assert_eq!(h[header::ACCESS_CONTROL_MAX_AGE], "600");
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(h[header::VARY], "Origin");
        let mut pre = from("https://app.example.com");
        assert!(!is_preflight(&Method::OPTIONS, &pre));
        pre.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("PUT"),
        );
        assert!(is_preflight(&Method::OPTIONS, &pre));
        assert!(!is_preflight(&Method::GET, &pre));
    }
}
