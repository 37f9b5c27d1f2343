//! What a route changes in the messages it carries: the path a request
//! goes upstream with (`rewrite_prefix`) and the header fields it sets or
//! removes on requests (`[route.request_headers]`) and answers
//! (`[route.response_headers]`).
//!
//! A path is rewritten after routing, from the normalised path routing
//! saw: the route's `path_prefix` is replaced by `rewrite_prefix`, the
//! rest and the query kept (as Envoy's `prefix_rewrite` does; bytes, not
//! segments). Where a `rewrite_prefix` ending in `/` meets a rest that
//! starts with one, one slash is kept, so `path_prefix = "/api"` with
//! `rewrite_prefix = "/"` sends `/api/users` as `/users` and `/api` as
//! `/`. The result is normalised again: a rest that would climb above the
//! root (`/api..` with `path_prefix = "/api"` and `rewrite_prefix = "/"`)
//! is refused (400), never sent.
//!
//! Request fields are edited after this hop's forwarding fields are made,
//! so `X-Forwarded-Host` keeps the host the client asked for when `Host`
//! is set. The fields veer writes itself or that frame a message are not
//! the config's to edit (see the config's validation).

use http::header::{HeaderMap, HeaderName, HeaderValue};
use veer_control::config::{HeaderEdits, Route};

use crate::error::ProxyError;

/// `rewrite_prefix`, ready for requests.
#[derive(Debug)]
pub struct Rewrite {
    /// Bytes of the path that `path_prefix` matched.
    strip: usize,
    /// What takes their place.
    prefix: Box<str>,
}

impl Rewrite {
    /// A route's rewrite, if it has one.
    pub fn of(route: &Route) -> Option<Box<Rewrite>> {
        route.rewrite_prefix.as_deref().map(|prefix| {
            Box::new(Rewrite {
                strip: route.path_prefix.len(),
                prefix: prefix.into(),
            })
        })
    }

    /// The path `path` (routed by this route: it starts with its
    /// `path_prefix`) goes upstream with.
    pub fn path(&self, path: &str) -> Result<String, ProxyError> {
        let rest = path.get(self.strip..).unwrap_or("");
        let rest = match rest.strip_prefix('/') {
            Some(r) if self.prefix.ends_with('/') => r,
            _ => rest,
        };
        let mut out = String::with_capacity(self.prefix.len() + rest.len());
        out.push_str(&self.prefix);
        out.push_str(rest);
        // (The path was normalised as it came, its slashes merged or not
        // as `[proxy] merge_slashes` says: only the join is looked at.)
        match crate::path::normalize(&out, false) {
            Ok(std::borrow::Cow::Borrowed(_)) => Ok(out),
            Ok(std::borrow::Cow::Owned(p)) => Ok(p),
            Err(_) => Err(ProxyError::BadRequest),
        }
    }

    /// Rewrites `uri`'s path, keeping its query.
    pub fn apply(&self, uri: &mut http::Uri) -> Result<(), ProxyError> {
        let path = self.path(uri.path())?;
        crate::path::set_path(uri, &path).map_err(|_| ProxyError::BadRequest)
    }
}

/// A header table, ready for messages.
#[derive(Debug)]
pub struct Edits {
    set: Box<[(HeaderName, HeaderValue)]>,
    remove: Box<[HeaderName]>,
}

impl Edits {
    /// `edits`, if it does anything. (Names and values were validated
    /// with the config; one that `http` would still refuse is left out.)
    pub fn of(edits: &HeaderEdits) -> Option<Box<Edits>> {
        if edits.is_empty() {
            return None;
        }
        let set = edits
            .set
            .iter()
            .filter_map(|(n, v)| {
                Some((
                    HeaderName::from_bytes(n.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect();
        let remove = edits
            .remove
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        Some(Box::new(Edits { set, remove }))
    }

    /// Removes, then sets (each set field replaces every one of its name).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &*self.remove {
            headers.remove(name);
        }
        for (name, value) in &*self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// Whether a proxy in front (trusted: `trusted_hops` > 0) says the
/// request came over HTTPS: its `X-Forwarded-Proto`, the last one.
pub fn forwarded_https(headers: &HeaderMap, trusted_hops: usize) -> bool {
    trusted_hops > 0
        && headers
            .get_all("x-forwarded-proto")
            .iter()
            .next_back()
            .and_then(|v| v.as_bytes().rsplit(|b| *b == b',').next())
            .is_some_and(|p| p.trim_ascii().eq_ignore_ascii_case(b"https"))
}

/// Whether `path` is an ACME HTTP-01 challenge's, which a certificate
/// authority fetches over plain HTTP (cert-manager, certbot): never
/// redirected, as ingress-nginx exempts it.
pub fn acme_challenge(path: &str) -> bool {
    path.starts_with("/.well-known/acme-challenge/")
}

/// `https://` + `host` (its port, if any, replaced by `port`, left out
/// when 443) + `uri`'s path and query; `None` if that is no field value.
pub fn https_location(host: &str, port: u16, uri: &http::Uri) -> Option<HeaderValue> {
    let host = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => host,
    };
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let url = if port == 443 {
        format!("https://{host}{pq}")
    } else {
        format!("https://{host}:{port}{pq}")
    };
    HeaderValue::from_str(&url).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(path_prefix: &str, prefix: &str) -> Rewrite {
        Rewrite {
            strip: path_prefix.len(),
            prefix: prefix.into(),
        }
    }

    #[test]
    fn a_rewrite_replaces_the_routes_prefix_and_keeps_the_rest_and_query() {
        let strip = rewrite("/api", "/");
        assert_eq!(strip.path("/api/users").as_deref(), Ok("/users"));
        assert_eq!(strip.path("/api").as_deref(), Ok("/"));
        assert_eq!(strip.path("/api/").as_deref(), Ok("/"));
        // Bytes, as routing matched them.
        assert_eq!(strip.path("/apix").as_deref(), Ok("/x"));
        let trailing = rewrite("/api/", "/v2/");
        assert_eq!(trailing.path("/api/users/7").as_deref(), Ok("/v2/users/7"));
        assert_eq!(trailing.path("/api/").as_deref(), Ok("/v2/"));
        let add = rewrite("/", "/internal/");
        assert_eq!(add.path("/x").as_deref(), Ok("/internal/x"));
        assert_eq!(add.path("/").as_deref(), Ok("/internal/"));
        let no_slash = rewrite("/old", "/new");
        assert_eq!(no_slash.path("/old/a").as_deref(), Ok("/new/a"));
        assert_eq!(no_slash.path("/older").as_deref(), Ok("/newer"));

        let mut uri: http::Uri = "/api/users?page=2&q=a%2Fb".parse().expect("uri");
        strip.apply(&mut uri).expect("rewritten");
        assert_eq!(uri, "/users?page=2&q=a%2Fb");
    }

    #[test]
    fn a_rewrite_never_climbs_above_the_root() {
        let strip = rewrite("/api", "/");
        assert_eq!(strip.path("/api.."), Err(ProxyError::BadRequest));
        assert_eq!(strip.path("/api../etc"), Err(ProxyError::BadRequest));
        // A segment that only looks like one stays.
        assert_eq!(strip.path("/api/..x").as_deref(), Ok("/..x"));
    }

    #[test]
    fn a_redirect_names_the_https_port_and_keeps_path_and_query() {
        let uri: http::Uri = "/a/b?c=1".parse().expect("uri");
        let at = |host, port| https_location(host, port, &uri).expect("a value");
        assert_eq!(at("shop.example", 443), "https://shop.example/a/b?c=1");
        assert_eq!(at("shop.example:8080", 443), "https://shop.example/a/b?c=1");
        assert_eq!(
            at("shop.example:8080", 8443),
            "https://shop.example:8443/a/b?c=1"
        );
        assert_eq!(at("[::1]:8080", 8443), "https://[::1]:8443/a/b?c=1");
        assert_eq!(at("[::1]", 443), "https://[::1]/a/b?c=1");
        let absolute: http::Uri = "http://shop.example/x".parse().expect("uri");
        assert_eq!(
            https_location("shop.example", 443, &absolute).expect("a value"),
            "https://shop.example/x"
        );
    }

    #[test]
    fn only_a_trusted_proxys_last_word_says_https() {
        let mut h = HeaderMap::new();
        assert!(!forwarded_https(&h, 1));
        h.append("x-forwarded-proto", HeaderValue::from_static("https"));
        assert!(forwarded_https(&h, 1));
        assert!(!forwarded_https(&h, 0), "nobody is trusted to say so");
        h.append("x-forwarded-proto", HeaderValue::from_static("https, http"));
        assert!(!forwarded_https(&h, 1), "the nearest proxy's is the last");
        h.append("x-forwarded-proto", HeaderValue::from_static("HTTPS"));
        assert!(forwarded_https(&h, 2));
    }

    #[test]
    fn edits_remove_then_set_replacing_every_field_of_a_name() {
        let edits = Edits::of(&HeaderEdits {
            set: vec![
                ("x-env".into(), "prod".into()),
                ("host".into(), "api.internal".into()),
            ],
            remove: vec!["x-debug".into(), "server".into()],
        })
        .expect("some");
        let mut h = HeaderMap::new();
        h.append("x-env", HeaderValue::from_static("a"));
        h.append("x-env", HeaderValue::from_static("b"));
        h.insert("host", HeaderValue::from_static("shop.example"));
        h.insert("x-debug", HeaderValue::from_static("1"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        edits.apply(&mut h);
        let all: Vec<_> = h.get_all("x-env").iter().collect();
        assert_eq!(all, ["prod"]);
        assert_eq!(h["host"], "api.internal");
        assert!(!h.contains_key("x-debug"));
        assert_eq!(h["accept"], "*/*");
        assert!(Edits::of(&HeaderEdits::default()).is_none());
    }
}
