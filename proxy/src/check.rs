//! `veer check`: validate a config file and summarise it.

use std::fmt::Write;
use std::path::Path;
use std::process::ExitCode;

use veer_control::config::{Config, Version};

use crate::reload::base_dir;

/// Validates `path`; prints every problem as `PATH:LINE:COL: message` on
/// stderr (exit 1) or a summary on stdout (exit 0).
pub fn check(path: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    let config = match Config::parse(&text, &base_dir(path)) {
        Ok(c) => c,
        Err(d) => {
            eprint!("{}", d.render(path));
            return ExitCode::FAILURE;
        }
    };
    if let Some(tls) = &config.proxy.tls {
        match crate::tls::Certs::open(tls) {
            Ok(certs) => {
                // Served, but soon not for long: said, not refused.
                for (route, host) in certs.uncovered(&config.routes) {
                    eprintln!(
                        "{}: warning: route {route}: no [proxy.tls] certificate names host {host}: a TLS client asking for it gets the default certificate, and refuses it",
                        path.display()
                    );
                }
                for ca in certs.unlisted() {
                    eprintln!(
                        "{}: warning: [proxy.tls] client_crl holds no revocation list from the client_ca CA {ca}: every client certificate it signed is refused",
                        path.display()
                    );
                }
                for (file, issuer) in certs.leaf_alone() {
                    eprintln!(
                        "{}: warning: [proxy.tls] certificate {file} holds no certificate of its issuer ({issuer}): clients that do not fetch it themselves (most but browsers) refuse the chain unless they trust that CA itself; give the full chain (leaf first, then the intermediates: a fullchain.pem)",
                        path.display()
                    );
                }
                for c in &certs.status().certificates {
                    if let Some(days) = c.not_after_unix.and_then(crate::tls::expires_soon) {
                        eprintln!(
                            "{}: warning: [proxy.tls] certificate {} {}",
                            path.display(),
                            c.file,
                            crate::tls::expiry_words(days)
                        );
                    }
                }
            }
            Err(e) => {
                eprintln!("{}: [proxy.tls]: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    if let Some(path) = &config.admin.operators_file {
        if let Err(e) = crate::token::Operators::read(path) {
            eprintln!("{}: [admin] operators_file: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    let tls_errors = crate::upstream_tls::check(&config);
    if !tls_errors.is_empty() {
        for e in tls_errors {
            eprintln!("{}: {e}", path.display());
        }
        return ExitCode::FAILURE;
    }
    for w in &config.warnings {
        eprintln!(
            "{}:{}:{}: warning: {}",
            path.display(),
            w.line,
            w.col,
            w.message
        );
    }
    print!("{}", summary(path, &config));
    ExitCode::SUCCESS
}

/// Address ranges as a list, the first few and how many more.
fn ranges(nets: &[ipnet::IpNet]) -> String {
    let shown: Vec<String> = nets.iter().take(4).map(ToString::to_string).collect();
    match nets.len().saturating_sub(shown.len()) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}

fn endpoints(v: &Version) -> String {
    use veer_control::config::UpstreamProtocol as P;
    let n = v.endpoints.len();
    let proto = match v.protocol {
        P::Http1 => String::new(),
        P::H2c => ", h2c".to_string(),
        P::Https => match &v.tls {
            Some(t) => format!(
                ", https: {}{}",
                if t.ca_file.is_some() {
                    "ca_file"
                } else {
                    "Mozilla roots"
                },
                if t.client_cert.is_some() {
                    ", client certificate"
                } else {
                    ""
                }
            ),
            None => ", https: Mozilla roots".to_string(),
        },
    };
    format!(
        "{} ({n} endpoint{}{proto})",
        v.name,
        if n == 1 { "" } else { "s" }
    )
}

/// A short human summary of a valid config.
pub fn summary(path: &Path, c: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}: OK, {} route(s)", path.display(), c.routes.len());
    let listen: Vec<String> = c.proxy.listen.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        out,
        "  listen {}  admin {}",
        listen.join(", "),
        c.admin.listen
    );
    if let Some(t) = &c.proxy.tls {
        let l: Vec<String> = t.listen.iter().map(ToString::to_string).collect();
        let mut more = match t.certificates.len() {
            0 => String::new(),
            n => format!(" (and {n} more certificates, picked by name)"),
        };
        match (&t.client_ca, t.client_auth_optional) {
            (None, _) => {}
            (Some(_), false) => more += "; clients need a certificate its client_ca signed",
            (Some(_), true) => more += "; a client certificate, if presented, must verify",
        }
        if t.client_crl.is_some() {
            more += " and not be revoked by client_crl";
        }
        let _ = writeln!(out, "  tls    {}{more}", l.join(", "));
    }
    if c.proxy.proxy_protocol {
        let _ = writeln!(
            out,
            "  every connection starts with a PROXY protocol header (without one: closed)"
        );
        if !c.proxy.proxy_protocol_from.is_empty() {
            let _ = writeln!(
                out,
                "  its address believed from {} only",
                ranges(&c.proxy.proxy_protocol_from)
            );
        }
    }
    if let Some(f) = &c.fleet {
        let _ = writeln!(
            out,
            "  fleet  {} as {} via etcd {}{}",
            f.name,
            f.replica.as_deref().unwrap_or("$POD_NAME or the host name"),
            f.endpoints.join(", "),
            match (f.tls(), &f.client_cert) {
                (true, Some(_)) => " (mTLS)",
                (true, None) => " (TLS)",
                _ => "",
            }
        );
    }
    for r in &c.routes {
        let hosts = if r.hosts.is_empty() {
            "*".to_string()
        } else {
            r.hosts.join(",")
        };
        let _ = writeln!(
            out,
            "  route {}  hosts {}  prefix {}  strategy {}",
            r.name,
            hosts,
            r.path_prefix,
            r.strategy.as_str()
        );
        let _ = writeln!(out, "    stable {}", endpoints(&r.stable));
        match &r.canary {
            Some(cv) => {
                let _ = writeln!(
                    out,
                    "    canary {}  weight {}%",
                    endpoints(cv),
                    r.canary_weight_percent()
                );
            }
            None => {
                let _ = writeln!(out, "    canary none");
            }
        }
        let mode = r.judge.mode.as_str();
        let _ = writeln!(
            out,
            "    judge {mode}, every {:?} over {:?}",
            r.judge.interval, r.judge.window
        );
        let max_body = r.max_request_body.unwrap_or(c.proxy.max_request_body);
        if max_body > 0 {
            let _ = writeln!(
                out,
                "    request bodies up to {max_body} bytes (longer: 413)"
            );
        }
        if !r.allow_from.is_empty() || !r.deny_from.is_empty() {
            let _ = writeln!(
                out,
                "    clients from {} (others: 403){}",
                if r.allow_from.is_empty() {
                    "anywhere".to_string()
                } else {
                    ranges(&r.allow_from)
                },
                if r.deny_from.is_empty() {
                    String::new()
                } else {
                    format!(", never from {}", ranges(&r.deny_from))
                }
            );
        }
        if let Some(c) = &r.sticky_cookie {
            let _ = writeln!(
                out,
                "    sticky cookie {} made for clients that bring no key (SameSite={}{}{})",
                c.name,
                c.same_site.as_str(),
                c.domain
                    .as_ref()
                    .map_or(String::new(), |d| format!(", Domain={d}")),
                if c.secure { ", always Secure" } else { "" }
            );
        }
        if r.https_redirect {
            let _ = writeln!(out, "    plain HTTP requests: 308 to https://");
        }
        if let Some(p) = &r.rewrite_prefix {
            let _ = writeln!(out, "    upstream path: {} -> {p}", r.path_prefix);
        }
        for (what, edits) in [
            ("requests", &r.request_headers),
            ("answers", &r.response_headers),
        ] {
            let mut parts = Vec::new();
            if !edits.set.is_empty() {
                let set: Vec<String> = edits.set.iter().map(|(n, v)| format!("{n}: {v}")).collect();
                parts.push(format!("set {}", set.join(", ")));
            }
            if !edits.remove.is_empty() {
                parts.push(format!("remove {}", edits.remove.join(", ")));
            }
            if !parts.is_empty() {
                let _ = writeln!(out, "    {what}: {}", parts.join("; "));
            }
        }
        if let Some(l) = &r.rate_limit {
            let _ = writeln!(
                out,
                "    {} requests a second per {}, bursts of {} (more: 429)",
                l.per_second(),
                l.key_header
                    .as_deref()
                    .map_or("client address".to_string(), |h| format!(
                        "{h} value (else address)"
                    )),
                l.burst
            );
        }
        if let Some(h) = &r.health_check {
            let what = match &h.grpc_service {
                Some(s) => format!("gRPC Check({s:?})"),
                None => format!("{} {}", h.check.method, h.check.path),
            };
            let _ = writeln!(
                out,
                "    health check {what} every {:?}: out after {} failures in a row, back after {} passes{}",
                h.interval,
                h.unhealthy,
                h.healthy,
                if h.start_out {
                    "; a new endpoint out until its first pass"
                } else {
                    ""
                }
            );
        }
        if let Some(o) = &r.outlier_detection {
            let _ = writeln!(
                out,
                "    outlier detection: a stable endpoint out for {:?} after {} failed requests in a row (at most {}% of them at once)",
                o.ejection_time, o.consecutive_errors, o.max_ejected_percent
            );
        }
        if let Some(t) = &r.retry {
            let mut on: Vec<String> = Vec::new();
            if t.on_reset {
                on.push("a connection closed before the answer".into());
            }
            if let Some(d) = t.try_timeout.filter(|_| t.on_timeout) {
                on.push(format!("no answer within {d:?}"));
            }
            on.extend(t.on_status.iter().map(u16::to_string));
            if t.on_unavailable {
                on.push("a gRPC call's UNAVAILABLE before any message".into());
            }
            let bodies = match c.proxy.request_buffer {
                0 => "without a body".to_string(),
                n => format!("without a body or with one of at most {n} bytes announced"),
            };
            let _ = writeln!(
                out,
                "    retry (a request of an idempotent method, {bodies}) on {}: up to {} more time(s), to the next endpoint of its version, at most {}% of the route's requests",
                on.join(", "),
                t.retries,
                t.budget_percent
            );
        }
        if let Some(m) = &r.mirror {
            let _ = writeln!(
                out,
                "    mirror {}% of stable's requests to the canary (bodies up to {} bytes, {} copies in flight){}",
                f64::from(m.percent_bp) / 100.0,
                m.max_body,
                m.max_concurrent,
                if m.methods.is_empty() {
                    String::new()
                } else {
                    format!(", methods {}", m.methods.join(" "))
                }
            );
        }
        if let Some(ro) = &r.rollout {
            let steps: Vec<String> = ro
                .steps_bp
                .iter()
                .map(|s| format!("{}", f64::from(*s) / 100.0))
                .collect();
            let _ = writeln!(
                out,
                "    rollout steps [{}] hold {:?}",
                steps.join(", "),
                ro.hold
            );
        }
    }
    out
}
