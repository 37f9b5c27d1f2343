//! Route matching: host, then longest path prefix.
//!
//! Exact host names are looked up in a hash map, then `*.suffix` wildcards
//! (most specific first); inside a host, the longest matching `path_prefix`
//! wins. Requests whose host has no route, or whose path matches none of that
//! host's prefixes, fall to the routes without hosts. Prefixes match bytes,
//! as Envoy's `prefix` does: `/api` matches `/api/x` and `/apix`.

use std::collections::HashMap;

/// Prefixes of one host, longest first, each with its route index.
#[derive(Debug, Default)]
struct Prefixes(Vec<(Box<str>, usize)>);

impl Prefixes {
    fn add(&mut self, prefix: &str, route: usize) {
        self.0.push((prefix.into(), route));
        self.0.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
    }

    fn find(&self, path: &str) -> Option<usize> {
        self.0
            .iter()
            .find(|(p, _)| path.starts_with(&**p))
            .map(|(_, r)| *r)
    }
}

/// Maps (host, path) to a route index.
#[derive(Debug, Default)]
pub struct Router {
    exact: HashMap<Box<str>, Prefixes>,
    /// `(".suffix", prefixes)`, longest suffix first.
    wildcard: Vec<(Box<str>, Prefixes)>,
    default: Prefixes,
}

impl Router {
    /// Adds a route's hosts (lower-case; `*.x` for wildcards) and prefix.
    pub fn add(&mut self, hosts: &[String], prefix: &str, route: usize) {
        if hosts.is_empty() {
            self.default.add(prefix, route);
        }
        for h in hosts {
            if let Some(suffix) = h.strip_prefix('*') {
                match self.wildcard.iter_mut().find(|(s, _)| &**s == suffix) {
                    Some((_, p)) => p.add(prefix, route),
                    None => {
                        let mut p = Prefixes::default();
                        p.add(prefix, route);
                        self.wildcard.push((suffix.into(), p));
                        self.wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
                    }
                }
            } else {
                self.exact
                    .entry(h.as_str().into())
                    .or_default()
                    .add(prefix, route);
            }
        }
    }

    /// The route for a request. `host` may carry a port and any case.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<usize> {
        // Without host names in the config, a host cannot choose a route
        // (and the exact names' hash is not worth computing).
        if let Some(host) = host.filter(|_| !self.exact.is_empty() || !self.wildcard.is_empty()) {
            let host = strip_port(host);
            let lower;
            let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
                lower = host.to_ascii_lowercase();
                lower.as_str()
            } else {
                host
            };
            let host = host.strip_suffix('.').unwrap_or(host);
            if let Some(r) = self.exact.get(host).and_then(|p| p.find(path)) {
                return Some(r);
            }
            for (suffix, p) in &self.wildcard {
                if host.len() > suffix.len() && host.ends_with(&**suffix) {
                    if let Some(r) = p.find(path) {
                        return Some(r);
                    }
                }
            }
        }
        self.default.find(path)
    }
}

/// The host without its port. Everything from the first `:` on is the
/// port, digits or not, as nginx reads a `Host` to pick its server and
/// Express its `req.hostname`: a port that is no number (`admin.test:80x`)
/// kept the whole value as the name, which matched no route, so the
/// request went to the default route, whose service read it as
/// `admin.test` (past that host's `allow_from`).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host
            .split(']')
            .next()
            .map_or(host, |h| &host[..h.len() + 1]);
    }
    host.split_once(':').map_or(host, |(h, _)| h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let mut r = Router::default();
        r.add(&[], "/", 0);
        r.add(&["api.example.com".into()], "/", 1);
        r.add(&["api.example.com".into()], "/v2", 2);
        r.add(&["*.example.com".into()], "/", 3);
        r.add(&[], "/static", 4);
        r
    }

    #[test]
    fn host_then_longest_prefix() {
        let r = router();
        assert_eq!(r.find(Some("api.example.com"), "/v1/x"), Some(1));
        assert_eq!(r.find(Some("API.example.com:8080"), "/v2/x"), Some(2));
        assert_eq!(r.find(Some("www.example.com"), "/"), Some(3));
        assert_eq!(r.find(Some("example.com"), "/static/a.css"), Some(4));
        assert_eq!(r.find(None, "/x"), Some(0));
        assert_eq!(r.find(Some("[::1]:80"), "/x"), Some(0));
        // A port that is no number is still the port.
        for host in [
            "api.example.com:80x",
            "api.example.com:",
            "api.example.com:1:2",
        ] {
            assert_eq!(r.find(Some(host), "/v1"), Some(1), "{host}");
        }
        assert_eq!(r.find(Some("[::1]:8x"), "/x"), Some(0));
    }

    #[test]
    fn no_default_route_means_no_match() {
        let mut r = Router::default();
        r.add(&["a.test".into()], "/only", 0);
        assert_eq!(r.find(Some("a.test"), "/other"), None);
        assert_eq!(r.find(Some("b.test"), "/only"), None);
    }

    #[test]
    fn without_host_names_every_host_takes_the_prefixes() {
        let mut r = Router::default();
        r.add(&[], "/", 0);
        r.add(&[], "/api", 1);
        for host in [None, Some("a.test"), Some("A.TEST:80"), Some("[::1]:8080")] {
            assert_eq!(r.find(host, "/api/x"), Some(1));
            assert_eq!(r.find(host, "/x"), Some(0));
        }
        // Only a wildcard: it is still looked at.
        r.add(&["*.w.test".into()], "/", 2);
        assert_eq!(r.find(Some("x.w.test"), "/api"), Some(2));
        assert_eq!(r.find(Some("x.v.test"), "/api"), Some(1));
    }
}
