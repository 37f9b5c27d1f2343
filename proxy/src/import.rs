//! `veer import ingress-nginx`: Ingress manifests with ingress-nginx canary
//! annotations become a veer config.
//!
//! ingress-nginx does a canary with two Ingresses for the same host and
//! path: the main one (the stable backend) and one annotated
//! `nginx.ingress.kubernetes.io/canary: "true"` (the canary backend, and how
//! much traffic it gets). Each such host and path becomes one route. What
//! veer cannot express (other annotations, TLS secrets without `--tls-dir`, named ports,
//! header patterns, exact paths, ...) is reported, on stderr and as a
//! comment in the output, never dropped silently.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Deserialize;
use serde_yaml_ng::Value;

mod configmap;
mod paths;

const PREFIX: &str = "nginx.ingress.kubernetes.io/";

/// How to import.
#[derive(Debug, Default)]
pub struct Options {
    /// Where the Ingresses' TLS Secrets are mounted (`DIR/NAMESPACE/NAME/`
    /// holding `tls.crt` and `tls.key`): given, they are written as
    /// `[proxy.tls]` certificates; else noted.
    pub tls_dir: Option<String>,
}

/// What an import produced.
#[derive(Debug, Default)]
pub struct Imported {
    /// The config (TOML), with the notes as comments.
    pub config: String,
    /// What could not be expressed, one line each (also in `config`).
    pub notes: Vec<String>,
    /// Routes written.
    pub routes: usize,
}

/// Why nothing could be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A file is not YAML.
    #[error("{0}: not YAML: {1}")]
    Yaml(String, String),
    /// No canary Ingress with a main Ingress was found.
    #[error("no route to import: {0}")]
    Nothing(String),
}

/// One backend: a Service and its port.
#[derive(Clone, Debug, PartialEq)]
struct Backend {
    service: String,
    namespace: String,
    port: Port,
}

#[derive(Clone, Debug, PartialEq)]
enum Port {
    Number(u16),
    Name(String),
    Missing,
}

/// One host and path of one Ingress.
#[derive(Clone, Debug)]
struct Rule {
    host: String,
    path: String,
    path_type: String,
    backend: Backend,
}

#[derive(Debug)]
struct Ingress {
    /// `file: namespace/name`, for notes.
    origin: String,
    namespace: String,
    annotations: BTreeMap<String, String>,
    rules: Vec<Rule>,
    tls: Vec<(Vec<String>, String)>,
    default_backend: Option<Backend>,
}

impl Ingress {
    fn canary(&self) -> bool {
        self.annotation("canary")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }

    fn annotation(&self, name: &str) -> Option<&str> {
        self.annotations
            .get(&format!("{PREFIX}{name}"))
            .map(String::as_str)
    }
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    metadata: Value,
    #[serde(default)]
    spec: Value,
    /// A ConfigMap's.
    #[serde(default)]
    data: Value,
}

/// Imports the manifests `files` (name, text).
pub fn ingress_nginx(
    files: &[(String, String)],
    options: &Options,
) -> Result<Imported, ImportError> {
    let mut notes = Vec::new();
    let mut ingresses = Vec::new();
    let mut controllers = Vec::new();
    for (name, text) in files {
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            let value = Value::deserialize(doc)
                .map_err(|e| ImportError::Yaml(name.clone(), e.to_string()))?;
            if value.is_null() {
                continue;
            }
            for m in objects(value) {
                let Some(m) = m else {
                    notes.push(format!(
                        "{name}: a document that is not a Kubernetes object was skipped"
                    ));
                    continue;
                };
                read(name, m, (&mut ingresses, &mut controllers), &mut notes);
            }
        }
    }
    if ingresses.is_empty() {
        return Err(ImportError::Nothing("no Ingress in the input".into()));
    }
    let mut controllers = controllers.into_iter();
    let controller = controllers.next();
    for other in controllers {
        notes.push(format!(
            "{}: a second controller ConfigMap, not read (give the one your ingress-nginx uses)",
            other.origin
        ));
    }
    if let Some(c) = &controller {
        c.apply(&mut ingresses);
        c.notes(&mut notes);
    }
    build(&ingresses, notes, controller.as_ref(), options)
}

/// The TLS Secrets (namespace, name) of the Ingresses' TLS sections that
/// name a host of `routes` (or no host: all of theirs), in the order
/// first named.
fn secrets(ingresses: &[Ingress], routes: &[Route]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for i in ingresses {
        for (hosts, secret) in &i.tls {
            let serves = hosts.is_empty()
                || hosts
                    .iter()
                    .any(|h| routes.iter().any(|r| r.host.eq_ignore_ascii_case(h)));
            let key = (i.namespace.clone(), secret.clone());
            // (No secretName: ingress-nginx serves its default certificate.)
            if serves && !secret.is_empty() && !out.contains(&key) {
                out.push(key);
            }
        }
    }
    out
}

/// `[proxy.tls]` serving `secrets` as mounted under `dir` (the first is
/// also the default certificate), with a note on mounting each; empty
/// when there are none.
fn tls_table(
    dir: &str,
    secrets: &[(String, String)],
    (client_cas, pass_cert): (&[&(String, String)], bool),
    notes: &mut Vec<String>,
) -> String {
    let dir = dir.trim_end_matches('/');
    let mut out = String::new();
    for (n, (ns, name)) in secrets.iter().enumerate() {
        let at = format!("{dir}/{ns}/{name}");
        notes.push(format!(
            "TLS Secret {ns}/{name}: mount it at {at}/ (tls.crt, tls.key; a pod mounts Secrets of its own namespace only: copy it to veer's)"
        ));
        let cert = toml_str(&format!("{at}/tls.crt"));
        let key = toml_str(&format!("{at}/tls.key"));
        if n == 0 {
            let _ = writeln!(
                out,
                "\n[proxy.tls]\nlisten = [\"0.0.0.0:8443\"]\npublic_port = 443  # where clients reach it (a Service's 443 to this 8443): https_redirect sends them there\n# Secret {ns}/{name}; also the default, for a client asking for no name or one no pair covers\ncert = {cert}\nkey = {key}"
            );
            if let Some((ca_ns, ca_name)) = client_cas.first() {
                let at = format!("{dir}/{ca_ns}/{ca_name}");
                notes.push(format!(
                    "auth-tls-secret {ca_ns}/{ca_name}: its ca.crt verifies client certificates (client_ca); mount it at {at}/"
                ));
                for (other_ns, other) in client_cas.iter().skip(1) {
                    notes.push(format!("auth-tls-secret {other_ns}/{other}: veer has one client_ca for every route: put its ca.crt in {at}/ca.crt too (a file of both CAs), or its clients are refused"));
                }
                let _ = writeln!(
                    out,
                    "client_ca = {}  # auth-tls-secret {ca_ns}/{ca_name}\nclient_auth = \"optional\"  # routes with require_client_cert refuse clients without one",
                    toml_str(&format!("{at}/ca.crt"))
                );
                if pass_cert {
                    notes.push("auth-tls-pass-certificate-to-upstream: the upstream gets the client's certificate in X-Forwarded-Client-Cert's Cert= (its PEM URL-encoded, as Envoy's), not ingress-nginx's ssl-client-cert field".into());
                    let _ = writeln!(
                        out,
                        "forward_client_cert = true  # auth-tls-pass-certificate-to-upstream"
                    );
                }
            }
        } else {
            let _ = writeln!(
                out,
                "\n[[proxy.tls.certificates]]  # Secret {ns}/{name}\ncert = {cert}\nkey = {key}"
            );
        }
    }
    out
}

/// The objects of a document: itself, or the items of a list (what
/// `kubectl get ... -o yaml` writes: `kind: List`, or `IngressList` from
/// the API); `None` for what is no object.
fn objects(value: Value) -> Vec<Option<Manifest>> {
    let Ok(m) = serde_yaml_ng::from_value::<Manifest>(value.clone()) else {
        return vec![None];
    };
    if !m.kind.ends_with("List") {
        return vec![Some(m)];
    }
    match value.get("items") {
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|i| serde_yaml_ng::from_value::<Manifest>(i.clone()).ok())
            .collect(),
        _ => Vec::new(),
    }
}

/// Takes one object: an Ingress is read, anything else noted.
fn read(
    name: &str,
    m: Manifest,
    (ingresses, controllers): (&mut Vec<Ingress>, &mut Vec<configmap::Controller>),
    notes: &mut Vec<String>,
) {
    if m.kind == "ConfigMap" {
        let field = |k: &str| m.metadata.get(k).and_then(str_of).unwrap_or_default();
        let (namespace, object) = (field("namespace"), field("name"));
        let origin = format!("{name}: ConfigMap {namespace}/{object}");
        if !configmap::is_controller(&object) {
            notes.push(format!("{origin} skipped (not the ingress-nginx controller's: ingress-nginx-controller, RELEASE-ingress-nginx-controller or nginx-configuration)"));
            return;
        }
        let mut data = BTreeMap::new();
        if let Value::Mapping(map) = &m.data {
            for (k, v) in map {
                if let (Some(k), Some(v)) = (str_of(k), str_of(v)) {
                    data.insert(k, v);
                }
            }
        }
        controllers.push(configmap::Controller { origin, data });
        return;
    }
    if m.kind != "Ingress" {
        let kind = if m.kind.is_empty() {
            "an object without kind"
        } else {
            &m.kind
        };
        notes.push(format!(
            "{name}: {kind} skipped (only Ingress objects are imported)"
        ));
        return;
    }
    ingresses.push(ingress(name, &m, notes));
}

fn str_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn backend(v: &Value, namespace: &str) -> Option<Backend> {
    // networking.k8s.io/v1: service.name, service.port.number | .name
    if let Some(svc) = v.get("service") {
        let service = svc.get("name").and_then(str_of)?;
        let port = match svc.get("port") {
            Some(p) => match (
                p.get("number").and_then(Value::as_u64),
                p.get("name").and_then(str_of),
            ) {
                (Some(n), _) => u16::try_from(n).map_or(Port::Missing, Port::Number),
                (None, Some(name)) => Port::Name(name),
                _ => Port::Missing,
            },
            None => Port::Missing,
        };
        return Some(Backend {
            service,
            namespace: namespace.to_string(),
            port,
        });
    }
    // extensions/v1beta1: serviceName, servicePort (number or name)
    let service = v.get("serviceName").and_then(str_of)?;
    let port = match v.get("servicePort") {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .map_or(Port::Missing, Port::Number),
        Some(Value::String(s)) => s.parse().map_or(Port::Name(s.clone()), Port::Number),
        _ => Port::Missing,
    };
    Some(Backend {
        service,
        namespace: namespace.to_string(),
        port,
    })
}

fn ingress(file: &str, m: &Manifest, notes: &mut Vec<String>) -> Ingress {
    let namespace = m
        .metadata
        .get("namespace")
        .and_then(str_of)
        .unwrap_or_else(|| "default".into());
    let name = m
        .metadata
        .get("name")
        .and_then(str_of)
        .unwrap_or_else(|| "(unnamed)".into());
    let origin = format!("{file}: Ingress {namespace}/{name}");
    let mut annotations = BTreeMap::new();
    if let Some(Value::Mapping(map)) = m.metadata.get("annotations") {
        for (k, v) in map {
            if let (Some(k), Some(v)) = (str_of(k), str_of(v)) {
                annotations.insert(k, v);
            }
        }
    }
    let mut rules = Vec::new();
    if let Some(Value::Sequence(rs)) = m.spec.get("rules") {
        for r in rs {
            let host = r
                .get("host")
                .and_then(str_of)
                .unwrap_or_default()
                .to_ascii_lowercase();
            let Some(Value::Sequence(paths)) = r.get("http").and_then(|h| h.get("paths")) else {
                notes.push(format!(
                    "{origin}: a rule for host {host:?} without http paths was skipped"
                ));
                continue;
            };
            for p in paths {
                let path = p.get("path").and_then(str_of).unwrap_or_else(|| "/".into());
                let path_type = p
                    .get("pathType")
                    .and_then(str_of)
                    .unwrap_or_else(|| "ImplementationSpecific".into());
                match p.get("backend").and_then(|b| backend(b, &namespace)) {
                    Some(backend) => rules.push(Rule {
                        host: host.clone(),
                        path,
                        path_type,
                        backend,
                    }),
                    None => notes.push(format!(
                        "{origin}: host {host:?} path {path:?}: the backend is not a Service (resource backends cannot be imported)"
                    )),
                }
            }
        }
    }
    let default_backend = m
        .spec
        .get("defaultBackend")
        .or_else(|| m.spec.get("backend"))
        .and_then(|b| backend(b, &namespace));
    let mut tls = Vec::new();
    if let Some(Value::Sequence(ts)) = m.spec.get("tls") {
        for t in ts {
            let hosts = match t.get("hosts") {
                Some(Value::Sequence(h)) => h.iter().filter_map(str_of).collect(),
                _ => Vec::new(),
            };
            let secret = t.get("secretName").and_then(str_of).unwrap_or_default();
            tls.push((hosts, secret));
        }
    }
    Ingress {
        origin,
        namespace,
        annotations,
        rules,
        tls,
        default_backend,
    }
}

/// A route to write.
struct Route {
    name: String,
    host: String,
    /// `path_prefix` (see [`paths::translate`]).
    path: String,
    /// `rewrite_prefix`, from `rewrite-target`.
    rewrite: Option<String>,
    stable: Backend,
    canary: Option<Backend>,
    weight: f64,
    header: Option<String>,
    cookie: Option<String>,
    /// `canary-by-header-value`, when the header has one.
    header_value: Option<String>,
    /// What the main Ingress sets that veer has a route key for.
    carried: Carried,
    notes: Vec<String>,
}

/// The main Ingress's annotations that become route keys: ingress-nginx
/// reads them from the main Ingress of a host and path, the canary
/// Ingress's own being ignored.
#[derive(Clone, Debug, Default)]
struct Carried {
    /// `proxy-body-size`, in bytes (0: no limit): `max_request_body`.
    max_body: Option<u64>,
    /// `proxy-read-timeout`, in seconds: `timeout` (until the answer's
    /// head; between later reads veer's `[proxy] body_timeout`).
    read_timeout: Option<u64>,
    /// `proxy-connect-timeout`, in seconds: `connect_timeout`.
    connect_timeout: Option<u64>,
    /// `limit-rps` and its burst (`limit-burst-multiplier` times it,
    /// 5 unless set): `[route.rate_limit]`.
    rate: Option<(u64, u64)>,
    /// `whitelist-source-range` (or its newer name
    /// `allowlist-source-range`): `allow_from`.
    allow: Vec<String>,
    /// `denylist-source-range`: `deny_from`.
    deny: Vec<String>,
    /// `upstream-vhost`: the `Host` upstream (`[route.request_headers]`).
    vhost: Option<String>,
    /// `x-forwarded-prefix`: that field upstream.
    forwarded_prefix: Option<String>,
    /// `backend-protocol`: the endpoints' scheme (`h2c://`, `https://`).
    scheme: Option<&'static str>,
    /// `use-regex` or `rewrite-target` is set: paths are regexes.
    regex: bool,
    /// `rewrite-target`.
    target: Option<String>,
    /// `ssl-redirect` (on unless "false" where the Ingress has TLS for
    /// the host) or `force-ssl-redirect`: `https_redirect`.
    https_redirect: bool,
    /// The Ingress has TLS for the host: its answers carry the
    /// ConfigMap's `Strict-Transport-Security` (`hsts`).
    has_tls: bool,
    /// `affinity: cookie`, for `[route.sticky_cookie]`.
    affinity: Option<Affinity>,
    /// `upstream-hash-by` as a sticky source (`header:NAME`,
    /// `cookie:NAME`, `client-ip`).
    hash_by: Option<String>,
    /// `enable-cors` and its `cors-*`: the `[route.cors]` lines.
    cors: Option<String>,
    /// `auth-tls-verify-client: "on"` with `auth-tls-secret`
    /// (`namespace/name`): `require_client_cert`, the Secret's `ca.crt`
    /// as `client_ca`.
    client_ca: Option<(String, String)>,
    /// `auth-tls-pass-certificate-to-upstream: "true"` beside it:
    /// `forward_client_cert`.
    pass_cert: bool,
    /// `proxy-next-upstream` (ingress-nginx's default `"error timeout"`)
    /// and `proxy-next-upstream-tries` (3): `[route.retry]`.
    retry: Option<NextUpstream>,
}

/// `[route.retry]` from `proxy-next-upstream` and its tries.
#[derive(Clone, Debug)]
struct NextUpstream {
    /// veer's `on` conditions, in order.
    on: Vec<&'static str>,
    /// Retries after the first try (1 or 2).
    retries: u64,
    /// Where the values came from, for the table's comment.
    from: String,
}

/// ingress-nginx's `proxy-next-upstream` when neither the Ingress nor the
/// controller's ConfigMap sets it.
const NEXT_UPSTREAM_DEFAULT: &str = "error timeout";
/// ingress-nginx's `proxy-next-upstream-tries` when unset: the first try
/// and two more.
const NEXT_UPSTREAM_TRIES_DEFAULT: u64 = 3;

/// The annotations [`Carried`] reads.
const CARRIED_KEYS: [&str; 39] = [
    "proxy-body-size",
    "proxy-read-timeout",
    "proxy-connect-timeout",
    "limit-rps",
    "limit-burst-multiplier",
    "whitelist-source-range",
    "allowlist-source-range",
    "denylist-source-range",
    "upstream-vhost",
    "x-forwarded-prefix",
    "backend-protocol",
    "use-regex",
    "rewrite-target",
    "ssl-redirect",
    "force-ssl-redirect",
    "affinity",
    "upstream-hash-by",
    "enable-cors",
    "cors-allow-origin",
    "cors-allow-methods",
    "cors-allow-headers",
    "cors-expose-headers",
    "cors-allow-credentials",
    "cors-max-age",
    "session-cookie-name",
    "session-cookie-max-age",
    "session-cookie-expires",
    "session-cookie-path",
    "session-cookie-domain",
    "session-cookie-samesite",
    "session-cookie-secure",
    "auth-tls-verify-client",
    "auth-tls-secret",
    "auth-tls-pass-certificate-to-upstream",
    "proxy-next-upstream",
    "proxy-next-upstream-tries",
    "proxy-next-upstream-timeout",
    // Noted with what veer does instead.
    "session-cookie-conditional-samesite-none",
    "session-cookie-change-on-failure",
];

/// `affinity: cookie` and its `session-cookie-*`.
#[derive(Clone, Debug)]
struct Affinity {
    name: String,
    /// `Max-Age`, seconds.
    max_age: Option<u64>,
    path: Option<String>,
    /// The `domain`, `same_site` and `secure` lines, when set.
    lines: String,
}

/// A source-range annotation's addresses and CIDR ranges (comma-separated),
/// with a note for each entry that is neither.
fn source_ranges(key: &str, v: &str, notes: &mut Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    for entry in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if veer_control::config::ip_range(entry).is_some() {
            out.push(entry.to_string());
        } else {
            notes.push(format!(
                "{key} entry {entry:?} is not an address or a CIDR range: left out"
            ));
        }
    }
    out
}

/// veer's `[[route]] timeout` when none is written, in seconds.
const VEER_TIMEOUT_SECS: u64 = veer_control::config::validate::defaults::TIMEOUT.as_secs();

/// nginx's size syntax, as `proxy-body-size` takes it: a count of bytes,
/// or of kilobytes, megabytes or gigabytes with `k`, `m` or `g` (either
/// case); `0` is no limit.
fn nginx_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (digits, unit) = match v.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&v[..i], c.to_ascii_lowercase()),
        _ => (v, 'b'),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let shift = match unit {
        'b' => 0,
        'k' => 10,
        'm' => 20,
        'g' => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift).filter(|n| *n <= i64::MAX as u64)
}

/// What a main Ingress sets that veer carries over ([`Carried`]), with a
/// note for each value that could not be.
fn carried(main: &Ingress, host: &str, notes: &mut Vec<String>) -> Carried {
    let max_body = main.annotation("proxy-body-size").and_then(|v| {
        let n = nginx_size(v);
        if n.is_none() {
            notes.push(format!(
                "proxy-body-size {v:?} is not an nginx size (bytes, or with k, m or g): no body limit written"
            ));
        }
        n
    });
    let mut seconds = |key: &str| {
        let v = main.annotation(key)?;
        let n = v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| (1..=86_400).contains(n));
        if n.is_none() {
            notes.push(format!(
                "{key} {v:?} is not a number of seconds (1 to 86400; ingress-nginx ignores it too): not written"
            ));
        }
        n
    };
    let read_timeout = seconds("proxy-read-timeout");
    let mut connect_timeout = seconds("proxy-connect-timeout");
    let timeout = read_timeout.unwrap_or(VEER_TIMEOUT_SECS);
    if let Some(c) = connect_timeout.filter(|c| *c > timeout) {
        notes.push(format!(
            "proxy-connect-timeout {c}s is longer than the route's timeout ({timeout}s): veer allows no connect attempt longer than the whole request, so none is written (1 s a try, then the next endpoint)"
        ));
        connect_timeout = None;
    }
    let rate = main.annotation("limit-rps").and_then(|v| {
        let rps = v.trim().parse::<u64>().ok().filter(|n| (1..=1_000_000).contains(n));
        if rps.is_none() {
            notes.push(format!(
                "limit-rps {v:?} is not a whole number of requests a second (1 to 1000000): no rate limit written"
            ));
        }
        let times = match main.annotation("limit-burst-multiplier") {
            None => 5,
            Some(m) => m.trim().parse::<u64>().ok().filter(|m| (1..=1000).contains(m)).unwrap_or_else(|| {
                notes.push(format!("limit-burst-multiplier {m:?} is not a whole number (1 to 1000): 5 assumed"));
                5
            }),
        };
        rps.map(|r| (r, (r * times).min(1_000_000)))
    });
    if main.annotation("limit-burst-multiplier").is_some() && main.annotation("limit-rps").is_none()
    {
        notes.push(
            "limit-burst-multiplier without limit-rps does nothing (ingress-nginx ignores it too)"
                .into(),
        );
    }
    let mut allow = Vec::new();
    for key in ["whitelist-source-range", "allowlist-source-range"] {
        if let Some(v) = main.annotation(key) {
            allow.extend(source_ranges(key, v, notes));
        }
    }
    if allow.is_empty()
        && ["whitelist-source-range", "allowlist-source-range"]
            .iter()
            .any(|k| main.annotation(k).is_some())
    {
        // Every entry was bad: serving everyone would open what the
        // Ingress closed.
        notes.push("an allowlist with no valid entry: allow_from = [\"0.0.0.0/32\"] written, so that the route serves no one until you correct it".into());
        allow.push("0.0.0.0/32".into());
    }
    let deny = main
        .annotation("denylist-source-range")
        .map(|v| source_ranges("denylist-source-range", v, notes))
        .unwrap_or_default();
    let mut field = |key: &str| {
        let v = main.annotation(key)?.trim();
        // A field value veer's config takes (visible ASCII and spaces).
        if !v.is_empty() && v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            Some(v.to_string())
        } else {
            notes.push(format!(
                "{key} {v:?} is not a field value veer can send: not written"
            ));
            None
        }
    };
    let vhost = field("upstream-vhost");
    let forwarded_prefix = field("x-forwarded-prefix");
    let scheme = main.annotation("backend-protocol").and_then(|p| {
        match p.trim().to_ascii_uppercase().as_str() {
            "HTTP" => None,
            "GRPC" => Some("h2c://"),
            "HTTPS" | "GRPCS" => {
                notes.push(format!(
                    "backend-protocol {p}: veer verifies the upstream's certificate for the endpoint's name (NAME.NAMESPACE.svc), where ingress-nginx does not unless proxy-ssl-verify is on: set [route.stable.tls] / [route.canary.tls] ca_file and server_name"
                ));
                Some("https://")
            }
            _ => {
                notes.push(format!(
                    "backend-protocol {p:?} has no veer form (HTTP, HTTPS, GRPC, GRPCS do): HTTP/1.1 written"
                ));
                None
            }
        }
    });
    let flag = |key: &str| {
        main.annotation(key)
            .map(|v| v.trim().eq_ignore_ascii_case("true"))
    };
    // ingress-nginx redirects plain HTTP to HTTPS where the Ingress has
    // TLS for the host (its ConfigMap's ssl-redirect, true unless set
    // otherwise there), and everywhere with force-ssl-redirect.
    let has_tls = main
        .tls
        .iter()
        .any(|(hosts, _)| hosts.is_empty() || hosts.iter().any(|h| h.eq_ignore_ascii_case(host)));
    let https_redirect = (has_tls && flag("ssl-redirect") != Some(false))
        || flag("force-ssl-redirect") == Some(true);
    let affinity = match main.annotation("affinity").map(str::trim) {
        Some("cookie") => {
            let name = main
                .annotation("session-cookie-name")
                .map(str::trim)
                .filter(|n| veer_control::config::http_token(n))
                .unwrap_or("INGRESSCOOKIE");
            let seconds = |key: &str| {
                main.annotation(key)
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .filter(|n| *n > 0)
            };
            let max_age =
                seconds("session-cookie-max-age").or_else(|| seconds("session-cookie-expires"));
            let path = main
                .annotation("session-cookie-path")
                .map(|p| p.trim().to_string());
            let mut lines = String::new();
            if let Some(d) = main.annotation("session-cookie-domain").map(str::trim) {
                if let Some(domain) = veer_control::config::cookie_domain(d) {
                    let _ = writeln!(lines, "domain = {}", toml_str(&domain));
                } else {
                    notes.push(format!("session-cookie-domain {d:?} is not a DNS name: left out (the cookie goes to the request's host only)"));
                }
            }
            match main
                .annotation("session-cookie-samesite")
                .map(|v| v.trim().to_ascii_lowercase())
                .as_deref()
            {
                None => {}
                Some(v @ ("none" | "lax" | "strict")) => {
                    let _ = writeln!(lines, "same_site = \"{v}\"");
                }
                Some(other) => notes.push(format!(
                    "session-cookie-samesite {other:?} is not None, Lax or Strict: left out (Lax)"
                )),
            }
            if main
                .annotation("session-cookie-secure")
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
            {
                lines.push_str("secure = true\n");
            }
            if main
                .annotation("session-cookie-conditional-samesite-none")
                .is_some()
            {
                notes.push("session-cookie-conditional-samesite-none: veer sends SameSite=None to every browser (the old ones that refuse it are not told apart)".into());
            }
            if main
                .annotation("session-cookie-change-on-failure")
                .is_some()
            {
                notes.push("session-cookie-change-on-failure has no veer form: a client keeps its key, and its endpoint while it is up".into());
            }
            notes.push(format!("affinity cookie {name}: veer makes it for a client without one and keys both the version and the endpoint by it (ingress-nginx's affinity-canary-behavior \"sticky\"); the other sticky sources are left out, as a made cookie is always there"));
            Some(Affinity {
                name: name.to_string(),
                max_age,
                path,
                lines,
            })
        }
        Some(other) => {
            notes.push(format!(
                "affinity {other:?} has no veer form (\"cookie\" does): sticky by client address"
            ));
            None
        }
        None => None,
    };
    let hash_by = main.annotation("upstream-hash-by").and_then(|v| {
        let v = v.trim();
        let token = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        let source = match v {
            "$remote_addr" | "$binary_remote_addr" => Some("client-ip".to_string()),
            _ => v
                .strip_prefix("$http_")
                .filter(|n| token(n))
                .map(|n| format!("header:{}", n.replace('_', "-")))
                .or_else(|| v.strip_prefix("$cookie_").filter(|n| token(n)).map(|n| format!("cookie:{n}"))),
        };
        if source.is_none() {
            notes.push(format!("upstream-hash-by {v:?} has no veer form (a header $http_NAME, a cookie $cookie_NAME or the address $remote_addr do): sticky by client address"));
        } else if affinity.is_some() {
            notes.push(format!("upstream-hash-by {v:?} beside affinity: the affinity cookie is the key, as ingress-nginx's"));
            return None;
        }
        source
    });
    let regex = main
        .annotation("use-regex")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || main.annotation("rewrite-target").is_some();
    Carried {
        max_body,
        read_timeout,
        connect_timeout,
        rate,
        allow,
        deny,
        vhost,
        forwarded_prefix,
        scheme,
        regex,
        target: main
            .annotation("rewrite-target")
            .map(|t| t.trim().to_string()),
        https_redirect,
        has_tls,
        affinity,
        hash_by,
        cors: cors(main),
        client_ca: client_ca(main, notes),
        pass_cert: flag("auth-tls-pass-certificate-to-upstream") == Some(true),
        retry: next_upstream(main, notes),
    }
}

/// `proxy-next-upstream` and `proxy-next-upstream-tries` (ingress-nginx's
/// defaults, `"error timeout"` and 3, when unset) as `[route.retry]`:
/// `error` and `invalid_header` are veer's `"reset"` (a connect failure
/// veer sends to the next endpoint anyway), `http_502`, `http_503`,
/// `http_504` those statuses; the other conditions have no veer form and
/// are noted when the Ingress or ConfigMap names them (`timeout`: veer's
/// route timeout bounds every try together, so a try's own needs a
/// `try_timeout` the import cannot choose). `None`: no retry (`off`,
/// one try, or no condition veer has).
fn next_upstream(main: &Ingress, notes: &mut Vec<String>) -> Option<NextUpstream> {
    let set = main.annotation("proxy-next-upstream").map(str::trim);
    let mut on: Vec<&'static str> = Vec::new();
    for cond in set.unwrap_or(NEXT_UPSTREAM_DEFAULT).split_whitespace() {
        let veer = match cond {
            "off" => return None,
            "error" | "invalid_header" => "reset",
            "http_502" => "502",
            "http_503" => "503",
            "http_504" => "504",
            // ingress-nginx's default has it: noted only when set.
            "timeout" if set.is_none() => continue,
            "timeout" => {
                notes.push("proxy-next-upstream timeout: veer's route timeout bounds every try together; to send a slow try again, add \"timeout\" to [route.retry] on with a try_timeout shorter than the route's timeout: left out".into());
                continue;
            }
            "non_idempotent" => {
                notes.push("proxy-next-upstream non_idempotent: veer never sends a POST or PATCH again (it may have done its work): left out".into());
                continue;
            }
            "http_500" | "http_403" | "http_404" | "http_429" => {
                notes.push(format!("proxy-next-upstream {cond}: veer retries a 502, 503 or 504, not this answer: left out"));
                continue;
            }
            other => {
                notes.push(format!(
                    "proxy-next-upstream {other:?} is not an nginx condition: left out"
                ));
                continue;
            }
        };
        if !on.contains(&veer) {
            on.push(veer);
        }
    }
    if on.is_empty() {
        if set.is_some() {
            notes.push(
                "proxy-next-upstream: no condition veer retries on: no [route.retry] written"
                    .into(),
            );
        }
        return None;
    }
    let tries_set = main.annotation("proxy-next-upstream-tries").map(str::trim);
    let tries = match tries_set {
        None => NEXT_UPSTREAM_TRIES_DEFAULT,
        Some(v) => match v.parse::<u64>() {
            Ok(0) => {
                notes.push("proxy-next-upstream-tries 0 (no limit): veer tries at most 3 times (retries = 2)".into());
                3
            }
            Ok(n @ 4..) => {
                notes.push(format!(
                    "proxy-next-upstream-tries {n}: veer tries at most 3 times (retries = 2)"
                ));
                3
            }
            Ok(1) => {
                notes.push(
                    "proxy-next-upstream-tries 1: the first try only, no [route.retry] written"
                        .into(),
                );
                return None;
            }
            Ok(n) => n,
            Err(_) => {
                notes.push(format!("proxy-next-upstream-tries {v:?} is not a whole number: ingress-nginx's 3 assumed"));
                NEXT_UPSTREAM_TRIES_DEFAULT
            }
        },
    };
    if let Some(t) = main
        .annotation("proxy-next-upstream-timeout")
        .map(str::trim)
        .filter(|t| *t != "0")
    {
        notes.push(format!("proxy-next-upstream-timeout {t:?}: veer's retries end with the route's timeout (its tries' time together)"));
    }
    let from = match (set, tries_set) {
        (None, None) => format!("proxy-next-upstream {NEXT_UPSTREAM_DEFAULT:?} and -tries {NEXT_UPSTREAM_TRIES_DEFAULT}, ingress-nginx's defaults"),
        _ => format!(
            "proxy-next-upstream {:?}, -tries {}",
            set.unwrap_or(NEXT_UPSTREAM_DEFAULT),
            tries_set.unwrap_or("3")
        ),
    };
    Some(NextUpstream {
        on,
        retries: tries - 1,
        from,
    })
}

/// `auth-tls-verify-client: "on"` and its `auth-tls-secret`
/// (`namespace/name`, or `name` in the Ingress's namespace), with a note
/// for what veer cannot follow.
fn client_ca(main: &Ingress, notes: &mut Vec<String>) -> Option<(String, String)> {
    let verify = main.annotation("auth-tls-verify-client")?.trim();
    let secret = main.annotation("auth-tls-secret").map(str::trim);
    match (verify.to_ascii_lowercase().as_str(), secret) {
        ("on", Some(s)) if !s.is_empty() => Some(match s.split_once('/') {
            Some((ns, name)) => (ns.to_string(), name.to_string()),
            None => (main.namespace.clone(), s.to_string()),
        }),
        ("on", _) => {
            notes.push("auth-tls-verify-client \"on\" without auth-tls-secret: no client certificate required (ingress-nginx ignores it too)".into());
            None
        }
        ("off", _) => None,
        (other, _) => {
            notes.push(format!("auth-tls-verify-client {other:?}: veer's routes require a verified client certificate or take every client (require_client_cert), not written: under client_auth = \"optional\" a certificate presented must verify (optional_no_ca's unverified ones are refused)"));
            None
        }
    }
}

/// `enable-cors: "true"` and its `cors-*` annotations as `[route.cors]`
/// lines (ingress-nginx's defaults are veer's; a value veer would refuse
/// is left out, and `veer check` names it).
fn cors(main: &Ingress) -> Option<String> {
    if !main
        .annotation("enable-cors")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
    {
        return None;
    }
    let list = |key: &str| {
        main.annotation(key).map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .map(toml_str)
                .collect::<Vec<_>>()
                .join(", ")
        })
    };
    let origins = list("cors-allow-origin").unwrap_or_else(|| toml_str("*"));
    let mut out = format!("[route.cors]  # enable-cors\nallow_origins = [{origins}]\n");
    for (key, name) in [
        ("cors-allow-methods", "allow_methods"),
        ("cors-allow-headers", "allow_headers"),
        ("cors-expose-headers", "expose_headers"),
    ] {
        if let Some(l) = list(key) {
            out.push_str(&format!("{name} = [{l}]\n"));
        }
    }
    if let Some(c) = main.annotation("cors-allow-credentials") {
        out.push_str(&format!(
            "allow_credentials = {}\n",
            c.trim().eq_ignore_ascii_case("true")
        ));
    }
    if let Some(s) = main
        .annotation("cors-max-age")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
    {
        out.push_str(&format!("max_age = \"{s}s\"\n"));
    }
    Some(out)
}

/// The canary annotations veer expresses (the rest is reported).
const CANARY_KEYS: [&str; 6] = [
    "canary",
    "canary-weight",
    "canary-weight-total",
    "canary-by-header",
    "canary-by-cookie",
    "canary-by-header-value",
];

fn build(
    ingresses: &[Ingress],
    mut notes: Vec<String>,
    controller: Option<&configmap::Controller>,
    options: &Options,
) -> Result<Imported, ImportError> {
    let (canaries, mains): (Vec<&Ingress>, Vec<&Ingress>) =
        ingresses.iter().partition(|i| i.canary());
    let mut routes: Vec<Route> = Vec::new();
    let mut used = std::collections::HashSet::new();
    let mut matched = std::collections::HashSet::new();
    let mut claimed = std::collections::HashSet::new();
    for c in &canaries {
        let mut route_notes = Vec::new();
        let total = match c.annotation("canary-weight-total") {
            Some(t) => match t.trim().parse::<f64>() {
                Ok(t) if t > 0.0 => t,
                _ => {
                    route_notes.push(format!(
                        "canary-weight-total {t:?} is not a positive number: 100 assumed"
                    ));
                    100.0
                }
            },
            None => 100.0,
        };
        let weight = match c.annotation("canary-weight") {
            Some(w) => match w.trim().parse::<f64>() {
                Ok(w) if w >= 0.0 => (w / total * 100.0).clamp(0.0, 100.0),
                _ => {
                    route_notes.push(format!(
                        "canary-weight {w:?} is not a number: weight 0 written"
                    ));
                    0.0
                }
            },
            None => 0.0,
        };
        let header = c.annotation("canary-by-header").map(str::to_string);
        let cookie = c.annotation("canary-by-cookie").map(str::to_string);
        // ingress-nginx's values: `always` / `never` (a header's own value
        // instead, when set); veer's names (`canary`, `stable`, a
        // version) work beside them.
        let header_value = header
            .as_ref()
            .and_then(|_| c.annotation("canary-by-header-value"))
            .map(str::to_string);
        if let (Some(h), Some(v)) = (&header, &header_value) {
            if cookie.is_some() {
                route_notes.push(format!(
                    "canary-by-header-value {v:?}: veer takes it, and the cookie's \"always\" / \"never\", from the {h} header and the cookie alike (ingress-nginx takes only {v:?} from the header)"
                ));
            }
        } else if let Some(v) = c.annotation("canary-by-header-value") {
            route_notes.push(format!("canary-by-header-value {v:?} without canary-by-header does nothing (ingress-nginx ignores it too)"));
        }
        if let Some(p) = c.annotation("canary-by-header-pattern") {
            route_notes.push(if header_value.is_some() {
                format!("canary-by-header-pattern {p:?} is ignored beside canary-by-header-value (by ingress-nginx too)")
            } else {
                format!("canary-by-header-pattern {p:?} is not supported: veer forces by exact values (\"canary\", \"stable\", a version name, canary_values): list the values your clients send")
            });
        }
        for (k, v) in &c.annotations {
            let Some(short) = k.strip_prefix(PREFIX) else {
                continue;
            };
            if !CANARY_KEYS.contains(&short) && short != "canary-by-header-pattern" {
                route_notes.push(format!(
                    "canary Ingress annotation {k}: {v:?} is not expressible in veer"
                ));
            }
        }
        if c.rules.is_empty() {
            notes.push(format!(
                "{}: a canary Ingress without host/path rules was skipped",
                c.origin
            ));
        }
        for rule in &c.rules {
            let main = mains.iter().find_map(|m| {
                m.rules
                    .iter()
                    .find(|r| {
                        r.host == rule.host && r.path == rule.path && m.namespace == c.namespace
                    })
                    .map(|r| (*m, r))
            });
            let Some((main, stable_rule)) = main else {
                notes.push(format!(
                    "{}: host {:?} path {:?} has no main Ingress with the same host and path: skipped (ingress-nginx ignores such a canary too)",
                    c.origin, rule.host, rule.path
                ));
                continue;
            };
            matched.insert((main.origin.clone(), rule.host.clone(), rule.path.clone()));
            let mut rn = route_notes.clone();
            let carried = carried(main, &rule.host, &mut rn);
            for (k, v) in &main.annotations {
                let kept = k
                    .strip_prefix(PREFIX)
                    .is_some_and(|short| CARRIED_KEYS.contains(&short));
                if k.starts_with(PREFIX) && !kept {
                    rn.push(format!(
                        "main Ingress annotation {k}: {v:?} is not expressible in veer"
                    ));
                }
            }
            if rule.path_type == "Exact" {
                rn.push(format!("pathType Exact for {:?}: veer matches path prefixes, so longer paths match too", rule.path));
            }
            for (hosts, secret) in main.tls.iter().chain(&c.tls) {
                if options.tls_dir.is_none()
                    && (hosts.iter().any(|h| h.eq_ignore_ascii_case(&rule.host))
                        || hosts.is_empty())
                {
                    rn.push(format!("TLS from Secret {secret:?}: mount its tls.crt/tls.key and list them as a [[proxy.tls.certificates]] pair (served to clients asking for a host its certificate names; [proxy.tls] cert and key are the default)"));
                }
            }
            let target = carried.target.as_deref();
            let path = match paths::translate(&rule.path, carried.regex, target, &mut rn) {
                Ok(p) => p,
                Err(why) => {
                    notes.push(format!(
                        "{}: host {:?}: {why}: skipped",
                        c.origin, rule.host
                    ));
                    continue;
                }
            };
            if !claimed.insert((rule.host.clone(), path.prefix.clone())) {
                notes.push(format!(
                    "{}: host {:?} path {:?} already has a canary from another Ingress: skipped (ingress-nginx allows one canary per host and path)",
                    c.origin, rule.host, rule.path
                ));
                continue;
            }
            let mut seen = std::collections::HashSet::new();
            rn.retain(|n| seen.insert(n.clone()));
            let name = unique(route_name(&rule.host, &path.prefix), &mut used);
            routes.push(Route {
                name,
                host: rule.host.clone(),
                path: path.prefix,
                rewrite: path.rewrite,
                stable: stable_rule.backend.clone(),
                canary: Some(rule.backend.clone()),
                weight,
                header: header.clone(),
                cookie: cookie.clone(),
                header_value: header_value.clone(),
                carried,
                notes: rn,
            });
        }
    }
    // Paths without a canary on a host that has one are imported too, as
    // routes without a canary: otherwise a shorter prefix of that host
    // would take their traffic to another Service.
    let canary_hosts: std::collections::HashSet<String> =
        routes.iter().map(|r| r.host.clone()).collect();
    for m in &mains {
        for r in &m.rules {
            if matched.contains(&(m.origin.clone(), r.host.clone(), r.path.clone())) {
                continue;
            }
            if !canary_hosts.contains(&r.host) {
                notes.push(format!(
                    "{}: host {:?} path {:?} has no canary: not imported (veer routes only what it rolls out here; add a [[route]] without [route.canary] to serve it)",
                    m.origin, r.host, r.path
                ));
                continue;
            }
            let mut rn = vec![format!(
                "{} has no canary for this path: imported without one, so that the host's other routes do not take its traffic",
                m.origin
            )];
            if r.path_type == "Exact" {
                rn.push(format!("pathType Exact for {:?}: veer matches path prefixes, so longer paths match too", r.path));
            }
            let carried = carried(m, &r.host, &mut rn);
            let target = carried.target.as_deref();
            let path = paths::translate(&r.path, carried.regex, target, &mut rn);
            let path = match path {
                Ok(p) => p,
                Err(why) => {
                    notes.push(format!("{}: host {:?}: {why}: skipped", m.origin, r.host));
                    continue;
                }
            };
            if claimed.insert((r.host.clone(), path.prefix.clone())) {
                routes.push(Route {
                    name: unique(route_name(&r.host, &path.prefix), &mut used),
                    host: r.host.clone(),
                    path: path.prefix,
                    rewrite: path.rewrite,
                    stable: r.backend.clone(),
                    canary: None,
                    weight: 0.0,
                    header: None,
                    cookie: None,
                    header_value: None,
                    carried,
                    notes: rn,
                });
            } else {
                notes.push(format!(
                    "{}: host {:?} path {:?} has no canary: not imported (veer routes only what it rolls out here; add a [[route]] without [route.canary] to serve it)",
                    m.origin, r.host, r.path
                ));
            }
        }
        if m.default_backend.is_some() {
            notes.push(format!("{}: defaultBackend is not imported", m.origin));
        }
    }
    if routes.iter().all(|r| r.canary.is_none()) {
        let why = notes.join("; ");
        return Err(ImportError::Nothing(if why.is_empty() {
            "no canary Ingress (nginx.ingress.kubernetes.io/canary: \"true\") in the input".into()
        } else {
            why
        }));
    }
    let hsts = configmap::hsts(controller.map(|c| &c.data), &mut notes);
    let head = configmap::head_line(controller.map(|c| &c.data), &mut notes);
    let body = match controller {
        Some(c) => c.body_line(&mut notes),
        None => "# ingress-nginx takes request bodies up to its ConfigMap's proxy-body-size (1m unless set);\n# veer has no limit unless told: uncomment with yours (routes with the annotation keep theirs),\n# or give the ConfigMap to the import too.\n# max_request_body = 1048576".into(),
    };
    let mut client_cas: Vec<&(String, String)> = Vec::new();
    for ca in routes.iter().filter_map(|r| r.carried.client_ca.as_ref()) {
        if !client_cas.contains(&ca) {
            client_cas.push(ca);
        }
    }
    let secrets = secrets(ingresses, &routes);
    let tls = match &options.tls_dir {
        Some(dir) => {
            let pass_cert = routes
                .iter()
                .any(|r| r.carried.client_ca.is_some() && r.carried.pass_cert);
            tls_table(dir, &secrets, (&client_cas, pass_cert), &mut notes)
        }
        None => String::new(),
    };
    // Only with a client_ca written (in a TLS table, which the Secrets
    // make) may a route require a certificate.
    let verifies = options.tls_dir.is_some() && !secrets.is_empty() && !client_cas.is_empty();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Imported by `veer import ingress-nginx` from ingress-nginx canary Ingresses."
    );
    let _ = writeln!(
        out,
        "# Review the NOTE lines: what veer could not express is listed, not dropped."
    );
    let _ = writeln!(
        out,
        "# ingress-nginx splits each request at random; veer splits by user key (sticky),"
    );
    let _ = writeln!(
        out,
        "# and its judge reverts a canary that does worse than stable ([route.judge])."
    );
    let _ = writeln!(
        out,
        "# Timeouts: ingress-nginx waits 60 s for an answer (proxy-read-timeout) and 5 s to\n# connect unless its ConfigMap or an annotation says otherwise; a route here waits 15 s\n# (timeout) and 1 s a connect try (connect_timeout) unless it says otherwise below."
    );
    let _ = writeln!(
        out,
        "# Retries: ingress-nginx sends a request whose try failed to the next endpoint\n# (proxy-next-upstream, \"error timeout\" and 3 tries unless set); each route's\n# [route.retry] below does so for the failures veer retries (a connection closed or\n# reset, 502, 503, 504), for GET, PUT, DELETE and other idempotent requests, within\n# the route's timeout and at most 20 % of its requests (budget_percent). A try that\n# times out is not sent again unless you add \"timeout\" and a try_timeout."
    );
    let _ = writeln!(
        out,
        "# Pods: ingress-nginx balances over a Service's pods itself; an endpoint below is the\n# Service's name, one address for a ClusterIP Service (kube-proxy picks a pod per\n# connection). A headless Service (clusterIP: None) names every ready pod, and veer\n# then keys, checks and balances each pod, as ingress-nginx did."
    );
    for n in &notes {
        let _ = writeln!(out, "# NOTE: {n}");
    }
    let _ = writeln!(
        out,
        "\n[proxy]\nlisten = [\"0.0.0.0:8080\"]\n{head}\n{body}\n{tls}\n[admin]\nlisten = \"127.0.0.1:9901\""
    );
    let mut all_notes = notes;
    for r in &routes {
        let _ = writeln!(out, "\n[[route]]\nname = \"{}\"", r.name);
        if !r.host.is_empty() {
            let _ = writeln!(out, "hosts = [{}]", toml_str(&r.host));
        }
        let _ = writeln!(out, "path_prefix = {}", toml_str(&r.path));
        let c = &r.carried;
        if let Some(Affinity { name, .. }) = &c.affinity {
            let _ = writeln!(
                out,
                "sticky = [{}]  # affinity: cookie",
                toml_str(&format!("cookie:{name}"))
            );
        } else if let Some(source) = &c.hash_by {
            // Requests without it fall back to the address, as veer's default.
            let sources = if source == "client-ip" {
                toml_str(source)
            } else {
                format!("{}, \"client-ip\"", toml_str(source))
            };
            let _ = writeln!(out, "sticky = [{sources}]  # upstream-hash-by");
        }
        if c.https_redirect {
            let _ = writeln!(
                out,
                "https_redirect = true  # ssl-redirect (the Ingress has TLS for the host) or force-ssl-redirect"
            );
        }
        if c.client_ca.is_some() && verifies {
            let _ = writeln!(
                out,
                "require_client_cert = true  # auth-tls-verify-client: on"
            );
        } else if c.client_ca.is_some() {
            let n = "auth-tls-verify-client \"on\": not written (require_client_cert needs [proxy.tls] client_ca: give --tls-dir, where the TLS and auth-tls Secrets are mounted)";
            let _ = writeln!(out, "# NOTE: {n}");
            all_notes.push(format!("route {}: {n}", r.name));
        }
        if let Some(p) = &r.rewrite {
            let _ = writeln!(out, "rewrite_prefix = {}  # rewrite-target", toml_str(p));
        }
        if let Some(n) = c.read_timeout {
            let _ = writeln!(out, "timeout = \"{n}s\"  # proxy-read-timeout");
        }
        if let Some(n) = c.connect_timeout {
            let _ = writeln!(out, "connect_timeout = \"{n}s\"  # proxy-connect-timeout");
        }
        if let Some(n) = c.max_body {
            let _ = writeln!(out, "max_request_body = {n}  # proxy-body-size");
        }
        for (key, list, from) in [
            ("allow_from", &c.allow, "whitelist-source-range"),
            ("deny_from", &c.deny, "denylist-source-range"),
        ] {
            if !list.is_empty() {
                let quoted: Vec<String> = list.iter().map(|e| toml_str(e)).collect();
                let _ = writeln!(out, "{key} = [{}]  # {from}", quoted.join(", "));
            }
        }
        for n in &r.notes {
            let _ = writeln!(out, "# NOTE: {n}");
            all_notes.push(format!("route {}: {n}", r.name));
        }
        for (role, b) in [("stable", Some(&r.stable)), ("canary", r.canary.as_ref())] {
            let Some(b) = b else { continue };
            let (endpoint, note) = endpoint(b);
            let endpoint = format!("{}{endpoint}", c.scheme.unwrap_or(""));
            let _ = writeln!(
                out,
                "[route.{role}]\nversion = {}",
                toml_str(&version_name(&b.service))
            );
            if let Some(n) = note {
                let _ = writeln!(out, "# NOTE: {n}");
                all_notes.push(format!("route {}: {n}", r.name));
            }
            let _ = writeln!(out, "endpoints = [{}]", toml_str(&endpoint));
            if role == "canary" {
                let _ = writeln!(out, "weight = {}", fmt_weight(r.weight));
            }
        }
        if let Some(a) = &c.affinity {
            let _ = writeln!(
                out,
                "[route.sticky_cookie]  # affinity: cookie\nname = {}",
                toml_str(&a.name)
            );
            if let Some(s) = a.max_age {
                let _ = writeln!(out, "max_age = \"{s}s\"");
            }
            // ingress-nginx's default path is the Ingress path's.
            let path = a
                .path
                .clone()
                .filter(|p| p.starts_with('/') && !p.contains([';', ' ']))
                .unwrap_or_else(|| r.path.clone());
            let _ = writeln!(out, "path = {}", toml_str(&path));
            out.push_str(&a.lines);
        }
        if let Some(cors) = &c.cors {
            out.push_str(cors);
        }
        if let Some(n) = &c.retry {
            let on: Vec<String> = n.on.iter().map(|c| toml_str(c)).collect();
            let _ = writeln!(
                out,
                "[route.retry]  # {}\non = [{}]\nretries = {}",
                n.from,
                on.join(", "),
                n.retries
            );
        }
        if let Some((rps, burst)) = r.carried.rate {
            let _ = writeln!(
                out,
                "[route.rate_limit]  # limit-rps, and limit-burst-multiplier times it\nrequests_per_second = {rps}\nburst = {burst}"
            );
        }
        let fields = [
            ("host", &c.vhost, "upstream-vhost"),
            (
                "x-forwarded-prefix",
                &c.forwarded_prefix,
                "x-forwarded-prefix",
            ),
        ];
        if fields.iter().any(|f| f.1.is_some()) {
            let set: Vec<String> = fields
                .iter()
                .filter_map(|(name, v, _)| Some(format!("{name} = {}", toml_str(v.as_deref()?))))
                .collect();
            let from: Vec<&str> = fields
                .iter()
                .filter(|f| f.1.is_some())
                .map(|f| f.2)
                .collect();
            let _ = writeln!(
                out,
                "[route.request_headers]  # {}\nset = {{ {} }}",
                from.join(", "),
                set.join(", ")
            );
        }
        if let Some(v) = hsts.as_ref().filter(|_| c.has_tls) {
            // ingress-nginx gives it on HTTPS answers only; a browser
            // ignores it on a plain one (RFC 6797), where veer gives it too.
            let _ = writeln!(
                out,
                "[route.response_headers]  # hsts (ingress-nginx's ConfigMap: hsts, hsts-max-age, hsts-include-subdomains, hsts-preload)\nset = {{ strict-transport-security = {} }}",
                toml_str(v)
            );
        }
        if r.header.is_some() || r.cookie.is_some() {
            let _ = writeln!(out, "[route.force]");
            if let Some(h) = &r.header {
                let _ = writeln!(out, "header = {}", toml_str(&h.to_ascii_lowercase()));
            }
            if let Some(c) = &r.cookie {
                let _ = writeln!(out, "cookie = {}", toml_str(c));
            }
            // A header's own value alone, or ingress-nginx's always/never.
            let (canary, stable) = match (&r.header_value, &r.cookie) {
                (Some(v), None) => (vec![v.as_str()], vec![]),
                (Some(v), Some(_)) => (vec![v.as_str(), "always"], vec!["never"]),
                (None, _) => (vec!["always"], vec!["never"]),
            };
            let list = |l: &[&str]| l.iter().map(|v| toml_str(v)).collect::<Vec<_>>().join(", ");
            let _ = writeln!(
                out,
                "canary_values = [{}]  # ingress-nginx's",
                list(&canary)
            );
            if !stable.is_empty() {
                let _ = writeln!(out, "stable_values = [{}]", list(&stable));
            }
        }
    }
    Ok(Imported {
        config: out,
        notes: all_notes,
        routes: routes.len(),
    })
}

fn endpoint(b: &Backend) -> (String, Option<String>) {
    let host = format!("{}.{}.svc", b.service, b.namespace);
    match &b.port {
        Port::Number(p) => (format!("{host}:{p}"), None),
        Port::Name(n) => (
            format!("{host}:80"),
            Some(format!(
                "Service {} names its port {n:?}: veer needs the number; 80 written, correct it",
                b.service
            )),
        ),
        Port::Missing => (
            format!("{host}:80"),
            Some(format!(
                "Service {} has no port in the Ingress: 80 written, correct it",
                b.service
            )),
        ),
    }
}

/// A route name (`[a-z0-9_-]+`) from a host and path.
fn route_name(host: &str, path: &str) -> String {
    let raw = format!(
        "{} {}",
        if host.is_empty() { "default" } else { host },
        path
    );
    let mut name = String::new();
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() || c == '_' {
            name.push(c);
        } else if !name.ends_with('-') {
            name.push('-');
        }
    }
    let name = name.trim_matches('-').to_string();
    if name.is_empty() {
        "route".into()
    } else {
        name
    }
}

fn unique(name: String, used: &mut std::collections::HashSet<String>) -> String {
    let mut candidate = name.clone();
    let mut n = 2;
    while !used.insert(candidate.clone()) {
        candidate = format!("{name}-{n}");
        n += 1;
    }
    candidate
}

/// A version label from a Service name.
fn version_name(service: &str) -> String {
    service.to_string()
}

fn fmt_weight(w: f64) -> String {
    let rounded = (w * 100.0).round() / 100.0;
    if rounded.fract() == 0.0 {
        format!("{rounded:.0}")
    } else {
        format!("{rounded}")
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests;
