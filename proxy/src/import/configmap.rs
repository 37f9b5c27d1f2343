//! The ingress-nginx controller's ConfigMap (`ingress-nginx-controller`,
//! a Helm release's `NAME-ingress-nginx-controller`, or the older
//! `nginx-configuration`): settings that hold for every Ingress unless its
//! own annotation says otherwise, and one (`proxy-body-size`) that veer
//! keeps for the whole proxy.

use std::collections::BTreeMap;

use super::{nginx_size, Ingress, PREFIX};

/// Keys that are every Ingress's default, read as its annotation would be.
const DEFAULTS: [&str; 9] = [
    "proxy-read-timeout",
    "proxy-next-upstream",
    "proxy-next-upstream-tries",
    "proxy-next-upstream-timeout",
    "proxy-connect-timeout",
    "whitelist-source-range",
    "denylist-source-range",
    "ssl-redirect",
    "force-ssl-redirect",
];

/// ingress-nginx's default `proxy-body-size`: 1m.
const BODY_DEFAULT: u64 = 1 << 20;

/// ingress-nginx's default `large-client-header-buffers`: 4 buffers of 8k.
const HEAD_BUFFERS_DEFAULT: &str = "4 8k";

/// `[proxy] max_header_bytes`' line: what ingress-nginx's
/// `large-client-header-buffers` (`data`'s, else its default, 4 8k: 32 KiB)
/// lets a request head hold, its buffers' count times their size (nginx
/// also needs each line within one buffer; veer caps the whole head
/// only), within veer's 8 KiB to 1 MiB. veer's own default is 16 KiB: a
/// request ingress-nginx took with 20 KiB of fields (three lines of 7 KiB:
/// a cookie, a token; each line within a buffer) would get 431.
pub(super) fn head_line(
    data: Option<&BTreeMap<String, String>>,
    notes: &mut Vec<String>,
) -> String {
    let parse = |v: &str| {
        let mut words = v.split_whitespace();
        let count: u64 = words.next()?.parse().ok()?;
        let size = nginx_size(words.next()?)?;
        words.next().is_none().then(|| count.saturating_mul(size))
    };
    let (bytes, from) = match data.and_then(|d| d.get("large-client-header-buffers")) {
        None => (
            parse(HEAD_BUFFERS_DEFAULT).unwrap_or(32 << 10),
            format!("ingress-nginx's default large-client-header-buffers, {HEAD_BUFFERS_DEFAULT}"),
        ),
        Some(v) => match parse(v) {
            Some(n) => (n, format!("large-client-header-buffers {v:?}")),
            None => {
                notes.push(format!(
                    "large-client-header-buffers {v:?} is not a count and an nginx size: ingress-nginx's default, {HEAD_BUFFERS_DEFAULT}, written"
                ));
                (
                    32 << 10,
                    format!("ingress-nginx's default large-client-header-buffers, {HEAD_BUFFERS_DEFAULT}"),
                )
            }
        },
    };
    let written = bytes.clamp(8 << 10, 1 << 20);
    if written != bytes {
        notes.push(format!(
            "large-client-header-buffers allows {bytes} bytes of request head; veer's max_header_bytes takes 8192 to 1048576: {written} written"
        ));
    }
    format!("max_header_bytes = {written}  # {from}: a request head of up to this many bytes")
}

/// The keys of ingress-nginx's `Strict-Transport-Security` field.
const HSTS_KEYS: [&str; 4] = [
    "hsts",
    "hsts-max-age",
    "hsts-include-subdomains",
    "hsts-preload",
];

/// The `Strict-Transport-Security` value ingress-nginx gives answers on
/// hosts with TLS, from its ConfigMap's `hsts` (on unless "false"),
/// `hsts-max-age` (31536000), `hsts-include-subdomains` (true) and
/// `hsts-preload` (false); `data` None: its defaults. None: `hsts` off.
pub(super) fn hsts(
    data: Option<&BTreeMap<String, String>>,
    notes: &mut Vec<String>,
) -> Option<String> {
    let get = |k: &str| data.and_then(|d| d.get(k)).map(|v| v.trim());
    let on = |k: &str, default: bool| get(k).map_or(default, |v| !v.eq_ignore_ascii_case("false"));
    if !on("hsts", true) {
        return None;
    }
    let age = match get("hsts-max-age") {
        None => "31536000",
        Some(v) if !v.is_empty() && v.len() <= 10 && v.bytes().all(|b| b.is_ascii_digit()) => v,
        Some(v) => {
            notes.push(format!(
                "hsts-max-age {v:?} is not a number of seconds: ingress-nginx's default, 31536000, written"
            ));
            "31536000"
        }
    };
    let mut value = format!("max-age={age}");
    if on("hsts-include-subdomains", true) {
        value.push_str("; includeSubDomains");
    }
    if get("hsts-preload").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        value.push_str("; preload");
    }
    Some(value)
}

/// Whether a ConfigMap of this name is the controller's.
pub(super) fn is_controller(name: &str) -> bool {
    name == "ingress-nginx-controller"
        || name.ends_with("-ingress-nginx-controller")
        || name == "nginx-configuration"
}

/// The controller's ConfigMap, as read.
#[derive(Debug)]
pub(super) struct Controller {
    /// `file: ConfigMap namespace/name`, for notes.
    pub origin: String,
    pub data: BTreeMap<String, String>,
}

impl Controller {
    /// Gives each main Ingress the ConfigMap's value of every default it
    /// has no annotation for (a canary Ingress's own are not read). An
    /// Ingress with an allowlist under the newer name keeps it alone.
    pub fn apply(&self, ingresses: &mut [Ingress]) {
        for ing in ingresses.iter_mut().filter(|i| !i.canary()) {
            for key in DEFAULTS {
                let Some(v) = self.data.get(key) else {
                    continue;
                };
                let own = ing.annotation(key).is_some()
                    || (key == "whitelist-source-range"
                        && ing.annotation("allowlist-source-range").is_some());
                if !own {
                    ing.annotations.insert(format!("{PREFIX}{key}"), v.clone());
                }
            }
        }
    }

    /// `[proxy] max_request_body`'s line: the ConfigMap's `proxy-body-size`,
    /// or ingress-nginx's default (1m) when it sets none.
    pub fn body_line(&self, notes: &mut Vec<String>) -> String {
        let (bytes, from) = match self.data.get("proxy-body-size") {
            None => (BODY_DEFAULT, "ingress-nginx's default proxy-body-size, 1m"),
            Some(v) => match nginx_size(v) {
                Some(n) => (n, "the ConfigMap's proxy-body-size"),
                None => {
                    notes.push(format!(
                        "{}: proxy-body-size {v:?} is not an nginx size: ingress-nginx's default, 1m, written",
                        self.origin
                    ));
                    (BODY_DEFAULT, "ingress-nginx's default proxy-body-size, 1m")
                }
            },
        };
        format!("max_request_body = {bytes}  # {from}; routes with the annotation keep theirs")
    }

    /// A note for each key veer does not read, and what to do instead.
    pub fn notes(&self, notes: &mut Vec<String>) {
        for (k, v) in &self.data {
            if DEFAULTS.contains(&k.as_str())
                || HSTS_KEYS.contains(&k.as_str())
                || k == "proxy-body-size"
                || k == "large-client-header-buffers"
            {
                continue;
            }
            let what = match k.as_str() {
                "use-forwarded-headers" | "compute-full-forwarded-for" | "enable-real-ip" => {
                    "set [proxy] trusted_hops to the number of proxies in front of veer (ingress-nginx trusts X-Forwarded-For from proxy-real-ip-cidr, anywhere by default)"
                }
                "limit-req-status-code" => "veer answers a rate-limited request with 429",
                "use-proxy-protocol" if v.trim().eq_ignore_ascii_case("true") => {
                    "set [proxy] proxy_protocol = true (the load balancer in front sends the PROXY header)"
                }
                "proxy-real-ip-cidr" => {
                    "with proxy_protocol, set [proxy] proxy_protocol_from to these ranges (only their headers name the client); with forwarded headers, trusted_hops counts the proxies in front"
                }
                "ssl-protocols"
                    if v.contains("TLSv1.3") && !v.contains("TLSv1.2") =>
                {
                    "set [proxy.tls] min_version = \"1.3\" (TLS 1.2 clients refused)"
                }
                "ssl-protocols" => {
                    "veer speaks TLS 1.2 and 1.3, never older ([proxy.tls] min_version = \"1.3\" for 1.3 alone)"
                }
                "ssl-session-tickets" if v.trim().eq_ignore_ascii_case("false") => {
                    "set [proxy.tls] session_tickets = false (returning clients resume from session_cache alone; veer gives tickets by default)"
                }
                "ssl-session-tickets" => {
                    "veer gives TLS session tickets by default (a key of each replica's own, or [proxy.tls] ticket_keys shared by replicas)"
                }
                "ssl-session-cache" if v.trim().eq_ignore_ascii_case("false") => {
                    "set [proxy.tls] session_cache = 0 (no session held by veer)"
                }
                "ssl-session-cache" => {
                    "veer holds 20 000 TLS sessions by default ([proxy.tls] session_cache)"
                }
                "ssl-session-cache-size" => {
                    // nginx holds about 4 000 sessions a megabyte.
                    let what = match nginx_size(v) {
                        Some(bytes) => format!(
                            "set [proxy.tls] session_cache = {} (sessions; nginx holds about 4 000 a megabyte)",
                            (bytes.saturating_mul(4_000) >> 20)
                                .min(veer_control::config::MAX_SESSION_CACHE as u64)
                        ),
                        None => "not an nginx size: [proxy.tls] session_cache counts sessions (nginx holds about 4 000 a megabyte)".into(),
                    };
                    notes.push(format!("{}: {k}: {v:?}: {what}", self.origin));
                    continue;
                }
                "ssl-session-ticket-key" => {
                    // A secret: its value is never written out.
                    notes.push(format!(
                        "{}: {k}: (value not shown): [proxy.tls] ticket_keys = [\"FILE\"] on every replica, FILE holding 80 random bytes; this value base64-decoded is such a file if it is 80 bytes long (a 48-byte one is not: make a new key, `openssl rand 80 > FILE`)",
                        self.origin
                    ));
                    continue;
                }
                _ => "not read",
            };
            notes.push(format!("{}: {k}: {v:?}: {what}", self.origin));
        }
    }
}
