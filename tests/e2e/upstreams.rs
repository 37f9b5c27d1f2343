//! Upstream protocols: gRPC peers (tonic) over h2c and TLS, calls judged by
//! their grpc-status, deadlines; TLS to upstreams verified against a test
//! CA, with server names and client certificates; h2c upstreams serving
//! plain HTTP.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::outlier::EJECTED;
use super::support::{get, metric, reference_judge, wait_route, wait_verdict, Veer, FAST_JUDGE};

// ---------------------------------------------------------------- test CA

/// A certificate authority made for one test.
pub(super) struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    pub(super) fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).unwrap();
        TestCa { cert, key }
    }

    pub(super) fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A client certificate signed by this CA, named `dn` (its parts in
    /// the certificate's order) with `sans`: its DER and its key's.
    pub(super) fn client(
        &self,
        dn: &[(DnType, &str)],
        sans: Vec<SanType>,
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            p.distinguished_name.push(t.clone(), *v);
        }
        p.subject_alt_names = sans;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        let key = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (cert.der().clone(), key)
    }

    /// A server certificate for `name` signed by this CA, and its key
    /// (PEM each).
    pub(super) fn server(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let p = CertificateParams::new(vec![name.to_string()]).unwrap();
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A revocation list (PEM) this CA signed, number `number`, revoking
    /// `revoked` (certificates it signed), due to be replaced in
    /// `next_update`.
    pub(super) fn revoking(
        &self,
        number: u64,
        revoked: &[&CertificateDer<'_>],
        next_update: time::Duration,
    ) -> String {
        let now = time::OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .map(|der| {
                let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
                rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(cert.raw_serial()),
                    revocation_time: now - time::Duration::minutes(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                }
            })
            .collect();
        rcgen::CertificateRevocationListParams {
            this_update: (now - time::Duration::minutes(1))
                .min(now + next_update - time::Duration::days(1)),
            next_update: now + next_update,
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.cert, &self.key)
        .unwrap()
        .pem()
        .unwrap()
    }

    /// A leaf for `names` (and 127.0.0.1), signed by this CA: (cert, key) PEM.
    fn leaf(&self, names: &[&str], client: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// A TLS server set-up offering h2 and http/1.1, with a certificate
    /// for localhost and 127.0.0.1; `clients`: require client certificates
    /// signed by that CA.
    fn server_config(&self, clients: Option<&TestCa>) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self.leaf(&["localhost"], false);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match clients {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.cert.der().clone()).unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_single_cert(chain, key).unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

// ------------------------------------------------------------ gRPC peers

const OK: u8 = 0;
const FAIL_HALF: u8 = 1;
const NOT_FOUND: u8 = 2;
const NOT_SERVING: u8 = 3;
/// Every call fails with INTERNAL, before any message.
const FAIL_ALL: u8 = 4;
/// Every call fails with UNAVAILABLE, before any message (a server
/// draining, or shedding load).
const UNAVAILABLE: u8 = 5;

/// A gRPC server (the standard health service, implemented here so that
/// it can fail on purpose).
struct GrpcPeer {
    name: &'static str,
    addr: SocketAddr,
    mode: AtomicU8,
    calls: AtomicU64,
    delay_ms: AtomicU64,
    /// `grpc-timeout` of the last call, as received.
    last_timeout: Mutex<Option<String>>,
    /// The `service` of the last `Check`, as decoded.
    last_service: Mutex<Option<String>>,
}

type WatchStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl Health for GrpcPeer {
    async fn check(
        &self,
        req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        *self.last_service.lock().unwrap() = Some(req.get_ref().service.clone());
        *self.last_timeout.lock().unwrap() = req
            .metadata()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        match self.mode.load(Ordering::SeqCst) {
            FAIL_HALF if n % 2 == 0 => Err(tonic::Status::internal("broken on purpose")),
            NOT_FOUND => Err(tonic::Status::not_found("no such service")),
            FAIL_ALL => Err(tonic::Status::internal("broken on purpose")),
            UNAVAILABLE => Err(tonic::Status::unavailable("draining")),
            mode => {
                let status = if mode == NOT_SERVING {
                    ServingStatus::NotServing
                } else {
                    ServingStatus::Serving
                };
                let mut r = tonic::Response::new(HealthCheckResponse {
                    status: status as i32,
                });
                r.metadata_mut()
                    .insert("x-upstream", self.name.parse().unwrap());
                Ok(r)
            }
        }
    }

    type WatchStream = WatchStream;

    /// Three messages, then the end of the call: OK, or (failing) INTERNAL
    /// in the trailers after the first message.
    async fn watch(
        &self,
        _req: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<WatchStream>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let msg = || {
            Ok(HealthCheckResponse {
                status: ServingStatus::Serving as i32,
            })
        };
        let items: Vec<Result<HealthCheckResponse, tonic::Status>> =
            if self.mode.load(Ordering::SeqCst) == FAIL_HALF {
                vec![msg(), Err(tonic::Status::internal("broke mid-stream"))]
            } else {
                vec![msg(), msg(), msg()]
            };
        let mut r =
            tonic::Response::new(Box::pin(futures_util::stream::iter(items)) as WatchStream);
        r.metadata_mut()
            .insert("x-upstream", self.name.parse().unwrap());
        Ok(r)
    }
}

impl GrpcPeer {
    /// Serves over h2c, or over TLS with `tls`.
    async fn start(name: &'static str, tls: Option<Arc<rustls::ServerConfig>>) -> Arc<GrpcPeer> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = Arc::new(GrpcPeer {
            name,
            addr: listener.local_addr().unwrap(),
            mode: AtomicU8::new(OK),
            calls: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            last_timeout: Mutex::new(None),
            last_service: Mutex::new(None),
        });
        let svc = HealthServer::from_arc(peer.clone());
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let svc = TowerToHyperService::new(svc.clone());
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(a) => {
                            let Ok(s) = a.accept(stream).await else {
                                return;
                            };
                            let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        peer
    }
}

async fn grpc_client(veer: &Veer) -> HealthClient<tonic::transport::Channel> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", veer.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(ch)
}

fn check_request(key: &str) -> tonic::Request<HealthCheckRequest> {
    let mut r = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    r.metadata_mut().insert("x-user-id", key.parse().unwrap());
    r
}

/// veer with one route whose stable version is the h2c endpoint `addr`.
async fn veer_before_h2c(addr: SocketAddr) -> Veer {
    Veer::start(&config(
        &format!("version = \"v1\"\nendpoints = [\"h2c://{addr}\"]"),
        None,
        "",
    ))
    .await
}

/// One route: `stable` and `canary` are whole TOML version tables' bodies.
fn config(stable: &str, canary: Option<&str>, extra: &str) -> String {
    let canary = canary.map_or(String::new(), |c| format!("[route.canary]\n{c}\n"));
    format!(
        r#"[proxy]
listen = ["127.0.0.1:0"]
shutdown_grace = "10s"
[admin]
listen = "127.0.0.1:0"
[state]
dir = "@STATE@"

[[route]]
name = "web"
sticky = ["header:x-user-id"]
{extra}
[route.stable]
{stable}
{canary}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_reach_h2c_and_tls_upstreams() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("veer test CA");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let s = GrpcPeer::start("stable", None).await;
    let c = GrpcPeer::start("canary", Some(ca.server_config(None))).await;
    let veer = Veer::start(&config(
        &format!("version = \"v1\"\nendpoints = [\"h2c://{}\"]", s.addr),
        Some(&format!(
            "version = \"v2\"\nendpoints = [\"https://{}\"]\nweight = 50\n[route.canary.tls]\nca_file = \"{ca_file}\"",
            c.addr
        )),
        "",
    ))
    .await;
    let mut client = grpc_client(&veer).await;
    let mut seen = std::collections::HashMap::new();
    for i in 0..60 {
        let key = format!("user-{i}");
        let r = client.check(check_request(&key)).await.unwrap();
        assert_eq!(r.get_ref().status, ServingStatus::Serving as i32);
        let who = r
            .metadata()
            .get("x-upstream")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        *seen.entry(who.clone()).or_insert(0) += 1;
        // Server streaming: every message, then OK in the trailers.
        let mut req = check_request(&key);
        req.set_timeout(Duration::from_secs(5));
        let resp = client.watch(req).await.unwrap();
        assert_eq!(
            resp.metadata().get("x-upstream").unwrap().to_str().unwrap(),
            who,
            "a key's calls all go to one version"
        );
        let mut stream = resp.into_inner();
        let mut n = 0;
        while let Some(m) = stream.message().await.unwrap() {
            assert_eq!(m.status, ServingStatus::Serving as i32);
            n += 1;
        }
        assert_eq!(n, 3);
    }
    assert!(seen.get("stable").copied().unwrap_or(0) > 5, "{seen:?}");
    assert!(seen.get("canary").copied().unwrap_or(0) > 5, "{seen:?}");
    assert_eq!(
        s.calls.load(Ordering::SeqCst) + c.calls.load(Ordering::SeqCst),
        120
    );
    let m = veer.metrics().await;
    let ok = |v: &str| {
        metric(
            &m,
            &format!(r#"veer_grpc_responses_total{{grpc_code="OK",route="web",version="{v}"}}"#),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(ok("v1") + ok("v2"), 120.0, "{m}");
    // Each version's calls shared one HTTP/2 connection, idle now (once
    // the last stream's end is seen).
    let until = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = veer.metrics().await;
        let conns = |endpoint: &str, v: &str, state: &str| {
            metric(
                &m,
                &format!(
                    r#"veer_upstream_connections{{endpoint="{endpoint}",route="web",state="{state}",version="{v}"}}"#
                ),
            )
        };
        let now = [
            conns(&s.addr.to_string(), "v1", "idle"),
            conns(&s.addr.to_string(), "v1", "busy"),
            conns(&c.addr.to_string(), "v2", "idle"),
            conns(&c.addr.to_string(), "v2", "busy"),
        ];
        if now == [Some(1.0), Some(0.0), Some(1.0), Some(0.0)] {
            break;
        }
        assert!(std::time::Instant::now() < until, "{now:?}\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_callers_over_a_routes_limits_get_resource_exhausted_never_the_versions() {
    let s = GrpcPeer::start("stable", None).await;
    let veer = Veer::start(&config(
        &format!("version = \"v1\"\nendpoints = [\"h2c://{}\"]", s.addr),
        None,
        "max_request_body = 64\n[route.rate_limit]\nrequests_per_second = 0.05\nburst = 3",
    ))
    .await;
    let mut client = grpc_client(&veer).await;
    let code = |r: Result<tonic::Response<HealthCheckResponse>, tonic::Status>| match r {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    assert_eq!(
        code(client.check(check_request("a")).await),
        tonic::Code::Ok
    );
    // A message over the route's body limit (its length not announced:
    // found so as it streams).
    let mut big = check_request("a");
    big.get_mut().service = "s".repeat(200);
    assert_eq!(
        code(client.check(big).await),
        tonic::Code::ResourceExhausted
    );
    assert_eq!(
        code(client.check(check_request("a")).await),
        tonic::Code::Ok
    );
    // The fourth call in the burst of three.
    assert_eq!(
        code(client.check(check_request("a")).await),
        tonic::Code::ResourceExhausted
    );
    assert_eq!(s.calls.load(Ordering::SeqCst), 2);
    let m = veer.metrics().await;
    for kind in ["body_too_large", "rate_limited"] {
        let v = metric(&m, &format!(r#"veer_proxy_errors_total{{kind="{kind}"}}"#));
        assert_eq!(v, Some(1.0), "{kind}: {m}");
    }
    let exhausted = metric(
        &m,
        r#"veer_grpc_responses_total{grpc_code="RESOURCE_EXHAUSTED",route="web",version="v1"}"#,
    );
    assert_eq!(exhausted.unwrap_or(0.0), 0.0, "never the version's: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_split_by_a_metadata_key_within_the_contract() {
    let s = GrpcPeer::start("stable", None).await;
    let c = GrpcPeer::start("canary", None).await;
    let veer = Veer::start(&config(
        &format!("version = \"v1\"\nendpoints = [\"h2c://{}\"]", s.addr),
        Some(&format!(
            "version = \"v2\"\nendpoints = [\"h2c://{}\"]\nweight = 20",
            c.addr
        )),
        "",
    ))
    .await;
    let mut client = grpc_client(&veer).await;
    let keys = 2000;
    let mut canary = 0;
    for i in 0..keys {
        let r = client.check(check_request(&format!("k{i}"))).await.unwrap();
        if r.metadata().get("x-upstream").unwrap() == "canary" {
            canary += 1;
        }
    }
    // Contract: the canary's share of distinct keys is within ±2 points of
    // the weight at 10 000 keys; at 2000 keys the binomial spread alone is
    // ±0.9 points (1 sd), so ±4 points (4.5 sd) cannot fail by chance.
    let share = f64::from(canary) / f64::from(keys) * 100.0;
    assert!((16.0..=24.0).contains(&share), "canary share {share:.1} %");
    // The same key keeps its version.
    for i in 0..50 {
        let key = format!("k{i}");
        let a = client.check(check_request(&key)).await.unwrap();
        let b = client.check(check_request(&key)).await.unwrap();
        assert_eq!(
            a.metadata().get("x-upstream"),
            b.metadata().get("x-upstream")
        );
    }
}

/// Calls with fresh keys until `done` says stop or `limit` passes.
async fn call_until(veer: &Veer, limit: Duration, mut done: impl FnMut(u64) -> bool) -> u64 {
    let mut client = grpc_client(veer).await;
    let deadline = std::time::Instant::now() + limit;
    let mut n = 0u64;
    while std::time::Instant::now() < deadline {
        n += 1;
        let _ = client.check(check_request(&format!("u{n}"))).await;
        if done(n) {
            break;
        }
    }
    n
}

/// A stable and a canary gRPC peer at weight 50 with the fast judge; the
/// canary in `mode`.
async fn judged_grpc_pair(mode: u8) -> (Veer, Arc<GrpcPeer>, Arc<GrpcPeer>) {
    let s = GrpcPeer::start("stable", None).await;
    let c = GrpcPeer::start("canary", None).await;
    c.mode.store(mode, Ordering::SeqCst);
    let veer = Veer::start(&config(
        &format!("version = \"v1\"\nendpoints = [\"h2c://{}\"]", s.addr),
        Some(&format!(
            "version = \"v2\"\nendpoints = [\"h2c://{}\"]\nweight = 50",
            c.addr
        )),
        FAST_JUDGE,
    ))
    .await;
    (veer, s, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_canary_failing_with_internal_is_reverted() {
    let (veer, _s, _c) = judged_grpc_pair(FAIL_HALF).await;
    // Every INTERNAL is an HTTP 200: only the grpc-status says it failed.
    let load = tokio::spawn({
        let addr = veer.addr;
        async move {
            let mut client = HealthClient::new(
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect()
                    .await
                    .unwrap(),
            );
            for n in 0..20_000u64 {
                let _ = client.check(check_request(&format!("u{n}"))).await;
            }
        }
    });
    let route = wait_route(&veer, "reverted", Duration::from_secs(60), |r| {
        r["verdict"] == "reverted"
    })
    .await;
    load.abort();
    // Either the error-rate test or the gross-failure guard, by timing.
    let reason = route["reason"].as_str().unwrap();
    assert!(
        reason.contains("error") || reason.contains("failed"),
        "{reason}"
    );
    let m = veer.metrics().await;
    assert!(
        metric(
            &m,
            r#"veer_grpc_responses_total{grpc_code="INTERNAL",route="web",version="v2"}"#
        )
        .unwrap_or(0.0)
            > 0.0,
        "{m}"
    );
    // HTTP saw nothing wrong: every answer was a 200.
    assert_eq!(
        metric(
            &m,
            r#"veer_requests_total{code="5xx",route="web",version="v2"}"#
        ),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_canary_answering_not_found_is_not_reverted() {
    let (veer, _s, c) = judged_grpc_pair(NOT_FOUND).await;
    // Enough calls for the judge to have looked many times.
    call_until(&veer, Duration::from_secs(60), |_| {
        c.calls.load(Ordering::SeqCst) >= 300
    })
    .await;
    let m = veer.metrics().await;
    let not_found = metric(
        &m,
        r#"veer_grpc_responses_total{grpc_code="NOT_FOUND",route="web",version="v2"}"#,
    )
    .unwrap_or(0.0);
    assert!(not_found >= 300.0, "{m}");
    // Wait until the judge has seen those calls, then check its verdict.
    let route = wait_route(&veer, "judged", Duration::from_secs(30), |r| {
        r["window"]["canary"]["requests"].as_u64().unwrap_or(0) >= 100
    })
    .await;
    assert_ne!(route["verdict"], "reverted", "{route}");
    assert_eq!(route["window"]["canary"]["errors"], 0, "{route}");
}

/// Sends one raw gRPC call (an empty HealthCheckRequest) over h2c with
/// the given grpc-timeout; returns the response head's headers and the
/// trailers.
async fn raw_grpc_call(
    addr: SocketAddr,
    timeout: &str,
    key: &str,
) -> (http::HeaderMap, http::HeaderMap) {
    let mut sender = super::support::h2c(addr).await;
    let req = Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .header("x-user-id", key)
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    (parts.headers, trailers)
}

/// A gRPC canary that hangs behind callers whose own deadline (1 s) is
/// shorter than the route's `timeout` (15 s): every call to it ends in
/// the caller's DEADLINE_EXCEEDED, a request given up past the latency
/// tests' thresholds, and the canary is reverted on latency once its
/// warm-up (the example's 30 s) ends, never on errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_canary_that_hangs_past_its_callers_deadlines_is_reverted_after_its_warm_up() {
    let s = GrpcPeer::start("stable", None).await;
    let c = GrpcPeer::start("canary", None).await;
    c.delay_ms.store(60_000, Ordering::SeqCst);
    let veer = Veer::start(
        &(config(
            &format!("version = \"v1\"\nendpoints = [\"h2c://{}\"]", s.addr),
            Some(&format!(
                "version = \"v2\"\nendpoints = [\"h2c://{}\"]\nweight = 20",
                c.addr
            )),
            "timeout = \"15s\"",
        ) + &reference_judge()),
    )
    .await;
    // 8 callers, a key a call, each call with a 1 s deadline; bounded by
    // the stop flag and 120 s.
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..8)
        .map(|w| {
            let (stop, addr) = (stop.clone(), veer.addr);
            tokio::spawn(async move {
                let start = std::time::Instant::now();
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) && start.elapsed() < Duration::from_secs(120) {
                    let _ = raw_grpc_call(addr, "1S", &format!("caller-{w}-{i}")).await;
                    i += 1;
                }
            })
        })
        .collect();
    let route = wait_verdict(&veer, "reverted", Duration::from_secs(90)).await;
    stop.store(true, Ordering::SeqCst);
    for c in callers {
        let _ = c.await;
    }
    let guard = route["reverted"]["guard"].as_str().unwrap_or_default();
    assert!(
        guard == "latency_ratio" || guard == "max_latency",
        "{route}"
    );
    assert_eq!(route["window"]["canary"]["errors"], 0, "{route}");
    let m = veer.metrics().await;
    let given_up = |v: &str| {
        let series = format!(r#"veer_requests_given_up_total{{route="web",version="{v}"}}"#);
        metric(&m, &series).unwrap_or(0.0)
    };
    assert!(given_up("v2") >= 10.0, "{m}");
    assert_eq!(given_up("v1"), 0.0, "stable answered every call: {m}");
    let deadlines = metric(&m, r#"veer_proxy_errors_total{kind="client_deadline"}"#);
    assert!(deadlines >= Some(10.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_deadlines_propagate_and_the_callers_own_deadline_is_not_the_versions_failure() {
    let s = GrpcPeer::start("stable", None).await;
    let veer = Veer::start(&config(
        &format!("version = \"v1\"\nendpoints = [\"h2c://{}\"]", s.addr),
        None,
        "timeout = \"3s\"",
    ))
    .await;
    let seen = |p: &GrpcPeer| {
        let t = p
            .last_timeout
            .lock()
            .unwrap()
            .clone()
            .expect("a grpc-timeout");
        let (n, unit) = t.split_at(t.len() - 1);
        let n: f64 = n.parse().unwrap();
        n * match unit {
            "u" => 1e-6,
            "m" => 1e-3,
            "S" => 1.0,
            other => panic!("unit {other}"),
        }
    };
    let mut client = grpc_client(&veer).await;
    // The caller's 1 s is shorter than the route's 3 s: the upstream sees ≤ 1 s.
    let mut req = check_request("a");
    req.set_timeout(Duration::from_secs(1));
    client.check(req).await.unwrap();
    let t = seen(&s);
    assert!(t <= 1.0 && t > 0.5, "upstream saw {t} s");
    // No deadline, or a longer one: the route's 3 s.
    client.check(check_request("b")).await.unwrap();
    let t = seen(&s);
    assert!(t <= 3.0 && t > 2.5, "upstream saw {t} s");
    let mut req = check_request("c");
    req.set_timeout(Duration::from_secs(30));
    client.check(req).await.unwrap();
    let t = seen(&s);
    assert!(t <= 3.0 && t > 2.5, "upstream saw {t} s");

    // A slow upstream and a caller that asked for 50 ms: veer answers
    // DEADLINE_EXCEEDED itself, counted as the caller's, not the version's.
    s.delay_ms.store(400, Ordering::SeqCst);
    let (head, _) = raw_grpc_call(veer.addr, "50m", "d").await;
    assert_eq!(head.get("grpc-status").unwrap(), "4", "{head:?}");
    let m = veer.metrics().await;
    assert_eq!(
        metric(&m, r#"veer_proxy_errors_total{kind="client_deadline"}"#),
        Some(1.0),
        "{m}"
    );
    // A request given up, as by a client that left.
    assert_eq!(
        metric(
            &m,
            r#"veer_requests_given_up_total{route="web",version="v1"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"veer_upstream_errors_total{kind="timeout",route="web",version="v1"}"#
        ),
        Some(0.0)
    );
    // The route's own timeout is the version's failure, told as gRPC.
    let veer_slow = Veer::start(&config(
        &format!("version = \"v1\"\nendpoints = [\"h2c://{}\"]", s.addr),
        None,
        "timeout = \"100ms\"\nconnect_timeout = \"100ms\"",
    ))
    .await;
    let (head, _) = raw_grpc_call(veer_slow.addr, "10S", "e").await;
    assert_eq!(head.get("grpc-status").unwrap(), "4", "{head:?}");
    let m = veer_slow.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"veer_upstream_errors_total{kind="timeout",route="web",version="v1"}"#
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_in_the_trailers_after_messages_is_the_calls_outcome() {
    let s = GrpcPeer::start("stable", None).await;
    s.mode.store(FAIL_HALF, Ordering::SeqCst);
    let veer = Veer::start(
        &config(
            &format!("version = \"v1\"\nendpoints = [\"h2c://{}\"]", s.addr),
            None,
            "",
        )
        .replacen("[proxy]\n", "[proxy]\naccess_log = \"errors\"\n", 1),
    )
    .await;
    let mut client = grpc_client(&veer).await;
    let mut stream = client.watch(check_request("a")).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());
    let err = stream.message().await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Internal);
    drop(stream);
    let m = wait_metric(
        &veer,
        r#"veer_grpc_responses_total{grpc_code="INTERNAL",route="web",version="v1"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &m,
            r#"veer_requests_total{code="2xx",route="web",version="v1"}"#
        ),
        Some(1.0)
    );
    // A call that ends OK (no line in `errors`), then a failing one again.
    s.mode.store(OK, Ordering::SeqCst);
    let mut stream = client.watch(check_request("b")).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}
    drop(stream);
    s.mode.store(FAIL_HALF, Ordering::SeqCst);
    let mut stream = client.watch(check_request("c")).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());
    assert!(stream.message().await.is_err());
    drop(stream);
    // `access_log = "errors"` has a line for each failed call, whose
    // status came in the trailers, with it; none for the call that ended OK.
    let lines = veer.logs_with_at_least("request", 2).await;
    let access: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "veer::access")
        .collect();
    assert_eq!(access.len(), 2, "{access:?}");
    for l in access {
        assert_eq!(l["path"], "/grpc.health.v1.Health/Watch", "{l}");
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["grpc_status"], 13, "{l}");
        assert!(l["bytes"].as_u64().is_some_and(|b| b > 0), "{l}");
    }
}

/// Polls `/metrics` until `series` reaches `want` (10 s at most).
async fn wait_metric(veer: &Veer, series: &str, want: f64) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = veer.metrics().await;
        if metric(&m, series).unwrap_or(0.0) >= want {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} never reached {want}:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ------------------------------------------------------- TLS to upstreams

/// An HTTPS upstream (h2 or http/1.1 by ALPN) answering its name; counts
/// the requests it served.
async fn https_upstream(cfg: Arc<rustls::ServerConfig>) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicU64::new(0));
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let counter = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, counter) = (acceptor.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = service_fn(move |mut req: Request<Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let version = format!("{:?}", req.version());
                    let upgrade = req
                        .headers()
                        .contains_key(http::header::UPGRADE)
                        .then(|| super::support::websocket_echo(&mut req));
                    async move {
                        if let Some(r) = upgrade {
                            return Ok::<_, Infallible>(r);
                        }
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("x-upstream-version", version)
                                .body(Full::new(Bytes::from_static(b"tls-upstream")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, served)
}

/// An HTTPS upstream speaking HTTP/1.1 only, answering `status` with a
/// short body and its name in `x-upstream`; counts the connections it
/// accepted and the requests it served.
async fn https_h1_upstream(
    cfg: Arc<rustls::ServerConfig>,
    name: &'static str,
    status: u16,
) -> (SocketAddr, Arc<AtomicU64>, Arc<AtomicU64>) {
    let mut cfg = (*cfg).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (accepted, served) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (a, s) = (accepted.clone(), served.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let (acceptor, s) = (acceptor.clone(), s.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = service_fn(move |_req: Request<Incoming>| {
                    s.fetch_add(1, Ordering::SeqCst);
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .header("x-upstream", name)
                                .body(Full::new(Bytes::from_static(b"not now, try another")))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, accepted, served)
}

/// A retried try's short answer from an HTTPS endpoint (read by hyper's
/// client) is read to its end and its connection kept: a failing
/// endpoint is not also made to take a TLS handshake for each try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_short_answer_keeps_its_tls_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("veer test CA");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let (a, _, _) = https_h1_upstream(ca.server_config(None), "a", 200).await;
    let (b, b_accepted, b_served) = https_h1_upstream(ca.server_config(None), "b", 503).await;
    let stable = format!(
        "version = \"v1\"\nendpoints = [\"https://{a}\", \"https://{b}\"]\n[route.stable.tls]\nca_file = \"{ca_file}\""
    );
    let veer = Veer::start(&config(&stable, None, "[route.retry]\non = [\"503\"]\n")).await;
    let mut c = super::support::Client::connect(veer.addr).await.unwrap();
    for i in 0..40 {
        let r = c
            .get("/", &[("x-user-id", &format!("user-{i}"))])
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-upstream"], "a");
        // The 503's connection back in the pool, or closed, before the
        // next request takes one.
        super::support::wait_endpoint_not_busy(&veer, b).await;
    }
    let tries = b_served.load(Ordering::SeqCst);
    assert!(tries >= 5, "only {tries} of 40 keys tried b first");
    let accepted = b_accepted.load(Ordering::SeqCst);
    assert_eq!(
        accepted, 1,
        "b took {accepted} connections for {tries} tries"
    );
}

/// An `https://` stable version with a CA and a client certificate.
fn mtls_version(addr: SocketAddr, ca_file: &str, cert_file: &str, key_file: &str) -> String {
    https_version(
        addr,
        &format!("ca_file = \"{ca_file}\"\ncert_file = \"{cert_file}\"\nkey_file = \"{key_file}\""),
    )
}

fn https_version(addr: SocketAddr, tls: &str) -> String {
    format!("version = \"v1\"\nendpoints = [\"https://{addr}\"]\n[route.stable.tls]\n{tls}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstreams_are_verified_by_ca_and_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("veer test CA");
    let other = TestCa::new("someone else's CA");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let other_file = write(dir.path(), "other.pem", &other.pem());
    let (addr, served) = https_upstream(ca.server_config(None)).await;

    // The right CA; the endpoint's IP verified as an IP; h2 by ALPN.
    let veer = Veer::start(&config(
        &https_version(addr, &format!("ca_file = \"{ca_file}\"")),
        None,
        "",
    ))
    .await;
    let r = get(veer.addr, "/", &[]).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(&r.body()[..], b"tls-upstream");
    assert_eq!(r.headers()["x-upstream-version"], "HTTP/2.0");
    // A name in the certificate, sent as SNI and verified.
    let veer_named = Veer::start(&config(
        &https_version(
            addr,
            &format!("ca_file = \"{ca_file}\"\nserver_name = \"localhost\""),
        ),
        None,
        "",
    ))
    .await;
    assert_eq!(get(veer_named.addr, "/", &[]).await.unwrap().status(), 200);
    let before = served.load(Ordering::SeqCst);
    assert_eq!(before, 2);

    // Another CA: 502, and the upstream serves nothing.
    let veer_wrong_ca = Veer::start(&config(
        &https_version(addr, &format!("ca_file = \"{other_file}\"")),
        None,
        "",
    ))
    .await;
    // The built-in roots do not know the test CA either.
    let veer_no_ca = Veer::start(&config(
        &format!("version = \"v1\"\nendpoints = [\"https://{addr}\"]"),
        None,
        "",
    ))
    .await;
    // A name the certificate does not have.
    let veer_wrong_name = Veer::start(&config(
        &https_version(
            addr,
            &format!("ca_file = \"{ca_file}\"\nserver_name = \"wrong.test\""),
        ),
        None,
        "",
    ))
    .await;
    let connect_errors = |m: &str| {
        metric(
            m,
            r#"veer_upstream_errors_total{kind="connect",route="web",version="v1"}"#,
        )
        .unwrap_or(0.0)
    };
    for v in [&veer_wrong_ca, &veer_no_ca, &veer_wrong_name] {
        let r = get(v.addr, "/", &[]).await.unwrap();
        assert_eq!(r.status(), 502);
        let m = v.metrics().await;
        assert!(connect_errors(&m) >= 1.0, "{m}");
        assert!(!v
            .logs_with_at_least("TLS handshake with the upstream failed", 1)
            .await
            .is_empty());
        // `/status` says why the endpoint fails.
        let start = std::time::Instant::now();
        loop {
            let st = v.status().await;
            let why = st["routes"][0]["stable"]["endpoints"][0]["connect_error"].as_str();
            if why.is_some_and(|w| w.starts_with("TLS handshake: ")) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{st}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // A handshake failing for every request is said once every 10 s,
    // not once a request (the next line counts those not said).
    for _ in 0..20 {
        let r = get(veer_wrong_ca.addr, "/", &[]).await.unwrap();
        assert_eq!(r.status(), 502);
    }
    let m = veer_wrong_ca.metrics().await;
    assert!(connect_errors(&m) >= 21.0, "{m}");
    // (A line logged would reach the test well within this wait.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let said = veer_wrong_ca.logs_with("TLS handshake with the upstream failed");
    assert_eq!(said.len(), 1, "{:?}", said.first());
    assert_eq!(
        served.load(Ordering::SeqCst),
        before,
        "no request reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_reach_an_https_upstream_over_an_http1_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("veer test CA");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let (addr, _) = https_upstream(ca.server_config(None)).await;
    let veer = Veer::start(&config(
        &https_version(addr, &format!("ca_file = \"{ca_file}\"")),
        None,
        "",
    ))
    .await;
    // Plain requests ride h2 (ALPN) to this upstream ...
    let r = get(veer.addr, "/", &[]).await.unwrap();
    assert_eq!(r.headers()["x-upstream-version"], "HTTP/2.0");
    // ... and an upgrade gets its own HTTP/1.1 connection.
    super::support::websocket_round_trips(veer.addr, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_upstreams_accept_veers_client_certificate_and_refuse_without() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("veer test CA");
    let clients = TestCa::new("client CA");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    let (cert, key) = clients.leaf(&["veer.test"], true);
    let cert_file = write(dir.path(), "client.pem", &cert);
    let key_file = write(dir.path(), "client.key", &key);
    let (addr, served) = https_upstream(ca.server_config(Some(&clients))).await;

    let with = Veer::start(&config(
        &mtls_version(addr, &ca_file, &cert_file, &key_file),
        None,
        "",
    ))
    .await;
    let r = get(with.addr, "/", &[]).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(served.load(Ordering::SeqCst), 1);
    // Its expiry is exported as a served certificate's is.
    let m = with.metrics().await;
    let expires = metric(
        &m,
        &format!("veer_tls_certificate_expiry_timestamp_seconds{{certificate=\"{cert_file}\"}}"),
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(expires.is_some_and(|t| t > now), "{m}");

    let without = Veer::start(&config(
        &https_version(addr, &format!("ca_file = \"{ca_file}\"")),
        None,
        "",
    ))
    .await;
    assert_eq!(get(without.addr, "/", &[]).await.unwrap().status(), 502);
    assert_eq!(served.load(Ordering::SeqCst), 1);

    // A client certificate from a CA the upstream does not trust.
    let (bad_cert, bad_key) = TestCa::new("stranger").leaf(&["veer.test"], true);
    let bad_cert = write(dir.path(), "bad.pem", &bad_cert);
    let bad_key = write(dir.path(), "bad.key", &bad_key);
    let stranger = Veer::start(&config(
        &mtls_version(addr, &ca_file, &bad_cert, &bad_key),
        None,
        "",
    ))
    .await;
    assert_eq!(get(stranger.addr, "/", &[]).await.unwrap().status(), 502);
    assert_eq!(served.load(Ordering::SeqCst), 1);
}

// ------------------------------------------------------------- h2c + HTTP

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upstream_serves_http_clients_and_refuses_upgrades_clearly() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let conns = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            conns.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let version = format!("{:?}", req.version());
                    let authority = req
                        .uri()
                        .authority()
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("x-upstream-version", version)
                            .header("x-authority", authority)
                            .body(Full::new(if body.is_empty() {
                                Bytes::from_static(b"h2c-upstream")
                            } else {
                                body
                            }))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let veer = veer_before_h2c(addr).await;
    // An HTTP/1.1 client; its Host becomes the :authority.
    let r = get(veer.addr, "/", &[("host", "shop.example")])
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(&r.body()[..], b"h2c-upstream");
    assert_eq!(r.headers()["x-upstream-version"], "HTTP/2.0");
    assert_eq!(r.headers()["x-authority"], "shop.example");
    // A body goes through.
    let stream = TcpStream::connect(veer.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::post("/echo")
                .header("host", "shop.example")
                .body(Full::new(Bytes::from(vec![b'x'; 100_000])))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes().len(),
        100_000
    );
    // Many requests share one multiplexed connection.
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let a = veer.addr;
        tasks.push(tokio::spawn(async move {
            get(a, "/", &[]).await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert!(connections.load(Ordering::SeqCst) <= 2, "{connections:?}");
    // A WebSocket upgrade has no HTTP/2 path here: 501, nobody's failure.
    let r = get(
        veer.addr,
        "/ws",
        &[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 501);
    let m = veer.metrics().await;
    assert_eq!(
        metric(&m, r#"veer_proxy_errors_total{kind="upgrade_unsupported"}"#),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            r#"veer_upstream_errors_total{kind="connect",route="web",version="v1"}"#
        ),
        Some(0.0)
    );
    // A route that sets `Host` sends it as the :authority.
    veer.write_config(&config(
        &format!("version = \"v1\"\nendpoints = [\"h2c://{addr}\"]"),
        None,
        "[route.request_headers]\nset = { host = \"api.internal:8443\" }",
    ));
    veer.wait_generation(2).await;
    let r = get(veer.addr, "/", &[("host", "shop.example")])
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-authority"], "api.internal:8443");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_client_certificate_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("veer test CA");
    let clients = TestCa::new("client CA");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem());
    // The files first hold a certificate the upstream does not trust.
    let (bad_cert, bad_key) = TestCa::new("stranger").leaf(&["veer.test"], true);
    let cert_file = write(dir.path(), "client.pem", &bad_cert);
    let key_file = write(dir.path(), "client.key", &bad_key);
    let (addr, served) = https_upstream(ca.server_config(Some(&clients))).await;
    let veer = Veer::start(&config(
        &mtls_version(addr, &ca_file, &cert_file, &key_file),
        None,
        "",
    ))
    .await;
    assert_eq!(get(veer.addr, "/", &[]).await.unwrap().status(), 502);
    assert_eq!(served.load(Ordering::SeqCst), 0);
    // Renewed in place (as cert-manager does): the next connection uses it.
    let (cert, key) = clients.leaf(&["veer.test"], true);
    write(dir.path(), "client.key", &key);
    write(dir.path(), "client.pem", &cert);
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let status = get(veer.addr, "/", &[]).await.unwrap().status();
        if status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!veer
        .logs_with_at_least("upstream client certificate reloaded", 1)
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upstream_closing_its_connections_loses_no_request() {
    // Every connection is closed gracefully (GOAWAY) after 3 requests, as
    // servers do on a max-requests limit or a rolling restart.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let conns = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            conns.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let served = Arc::new(AtomicU64::new(0));
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
                let svc = service_fn(move |_req: Request<Incoming>| {
                    let (served, tx) = (served.clone(), tx.clone());
                    async move {
                        if served.fetch_add(1, Ordering::SeqCst) + 1 >= 3 {
                            let _ = tx.send(());
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = rx.recv() => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            });
        }
    });
    let veer = veer_before_h2c(addr).await;
    let mut client = super::support::Client::connect(veer.addr).await.unwrap();
    for i in 0..30 {
        let r = client.get("/", &[]).await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
    }
    assert!(connections.load(Ordering::SeqCst) >= 5, "{connections:?}");
    let m = veer.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"veer_requests_total{code="5xx",route="web",version="v1"}"#
        ),
        Some(0.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_streaming_calls_flow_both_ways_message_by_message() {
    use http_body::Frame;
    use http_body_util::StreamBody;
    type Frames = tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, Infallible>>;
    fn stream(rx: Frames) -> StreamBody<tokio_stream_shim::Rx<Result<Frame<Bytes>, Infallible>>> {
        StreamBody::new(tokio_stream_shim::Rx(rx))
    }
    // An h2c upstream echoing each message of a call as it comes, then
    // ending the call with grpc-status 0 in the trailers.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<Incoming>| async move {
                    let (tx, rx) = tokio::sync::mpsc::channel(8);
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(f)) = body.frame().await {
                            if let Ok(d) = f.into_data() {
                                if tx.send(Ok(Frame::data(d))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        let mut t = http::HeaderMap::new();
                        t.insert("grpc-status", "0".parse().unwrap());
                        let _ = tx.send(Ok(Frame::trailers(t))).await;
                    });
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", "application/grpc")
                            .body(stream(rx))
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let veer = veer_before_h2c(addr).await;
    let mut sender = super::support::h2c(veer.addr).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let req = Request::post(format!("http://{}/echo.Echo/Chat", veer.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(stream(rx))
        .unwrap();
    let resp = sender.send_request(req);
    // The first message goes out before the response head can exist.
    tx.send(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01a"))))
        .await
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("head while the call is open")
        .unwrap();
    let mut body = resp.into_body();
    for msg in [&b"\0\0\0\0\x01a"[..], b"\0\0\0\0\x01b", b"\0\0\0\0\x01c"] {
        if msg != b"\0\0\0\0\x01a" {
            tx.send(Ok(Frame::data(Bytes::copy_from_slice(msg))))
                .await
                .unwrap();
        }
        // Each echo arrives while the request is still open.
        let f = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("an echo per message")
            .unwrap()
            .unwrap();
        assert_eq!(f.into_data().unwrap(), Bytes::copy_from_slice(msg));
    }
    drop(tx); // the client half-closes: the call ends
    let mut trailers = None;
    while let Some(f) = body.frame().await {
        if let Ok(t) = f.unwrap().into_trailers() {
            trailers = Some(t);
        }
    }
    assert_eq!(trailers.unwrap()["grpc-status"], "0");
    let m = wait_metric(
        &veer,
        r#"veer_grpc_responses_total{grpc_code="OK",route="web",version="v1"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &m,
            r#"veer_grpc_responses_total{grpc_code="OK",route="web",version="v1"}"#
        ),
        Some(1.0),
        "one call, counted once"
    );
}

/// A `Stream` over an mpsc receiver (what tokio-stream's ReceiverStream
/// does), for request and response bodies fed message by message.
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct Rx<T>(pub tokio::sync::mpsc::Receiver<T>);

    impl<T> futures_util::Stream for Rx<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

/// gRPC calls are mirrored too: the copy of a unary call goes to an h2c
/// canary, and copies answered INTERNAL (an HTTP 200 whose grpc-status
/// says it failed) revert a weight-0 canary on the pairs while every
/// caller gets stable's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_grpc_calls_are_judged_by_their_grpc_status() {
    let s = GrpcPeer::start("stable", None).await;
    let c = GrpcPeer::start("canary", None).await;
    c.mode.store(FAIL_HALF, Ordering::SeqCst);
    let veer = Veer::start(&config(
        &format!("version = \"v1\"\nendpoints = [\"h2c://{}\"]", s.addr),
        Some(&format!(
            "version = \"v2\"\nendpoints = [\"h2c://{}\"]\nweight = 0",
            c.addr
        )),
        &format!("{FAST_JUDGE}[route.mirror]\npercent = 100\n"),
    ))
    .await;
    let mut client = grpc_client(&veer).await;
    let start = std::time::Instant::now();
    let mut n = 0u64;
    let route = loop {
        n += 1;
        let r = client.check(check_request(&format!("u{n}"))).await;
        let r = r.expect("every caller gets stable's answer");
        assert_eq!(r.metadata().get("x-upstream").unwrap(), "stable");
        if n % 20 == 0 {
            let route = veer.status().await["routes"][0].clone();
            if !route["reverted"].is_null() {
                break route;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never reverted");
    };
    assert_eq!(route["reverted"]["guard"], "mirror_error_test", "{route}");
    assert!(c.calls.load(Ordering::SeqCst) > 0);
}

/// A TCP relay to `to` whose connections can be made to go silent: bytes
/// stop flowing both ways and the sockets stay open, as when a peer vanishes
/// without a FIN or RST, or a NAT forgets the flow. Connections accepted
/// after [`SilentRelay::silence`] flow normally.
struct SilentRelay {
    addr: SocketAddr,
    /// One flag per connection accepted so far.
    flags: Arc<Mutex<Vec<Arc<std::sync::atomic::AtomicBool>>>>,
    accepted: Arc<AtomicU64>,
}

impl SilentRelay {
    async fn start(to: SocketAddr) -> SilentRelay {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = SilentRelay {
            addr: listener.local_addr().unwrap(),
            flags: Arc::new(Mutex::new(Vec::new())),
            accepted: Arc::new(AtomicU64::new(0)),
        };
        let (flags, accepted) = (relay.flags.clone(), relay.accepted.clone());
        tokio::spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    return;
                };
                let Ok(up) = TcpStream::connect(to).await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
                flags.lock().unwrap().push(silent.clone());
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                for (mut r, mut w) in [
                    (
                        Box::new(dr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(uw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    ),
                    (Box::new(ur) as _, Box::new(dw) as _),
                ] {
                    let silent = silent.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match r.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if silent.load(Ordering::SeqCst) {
                                // Swallow everything, close nothing.
                                let _hold = (r, w);
                                std::future::pending::<()>().await;
                                return;
                            }
                            if w.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    });
                }
            }
        });
        relay
    }

    /// Every connection open now goes silent.
    fn silence(&self) {
        for f in self.flags.lock().unwrap().iter() {
            f.store(true, Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstream_connection_gone_silent_is_replaced_after_one_timeout() {
    // An h2c upstream behind a relay whose connection then goes silent: TCP
    // stays open, nothing comes back, not even a PING's answer.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let relay = SilentRelay::start(origin).await;
    let veer = Veer::start(&config(
        &format!("version = \"v1\"\nendpoints = [\"h2c://{}\"]", relay.addr),
        None,
        "timeout = \"1s\"",
    ))
    .await;
    let mut client = super::support::Client::connect(veer.addr).await.unwrap();
    for i in 0..3 {
        let r = client.get("/", &[]).await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
    }
    assert_eq!(relay.accepted.load(Ordering::SeqCst), 1);
    relay.silence();
    // The first request on the silent connection times out (the route's
    // 1 s); the connection answered nothing meanwhile, so the next goes
    // to a fresh one. Before, every request went to the dead connection
    // and timed out, forever.
    let mut statuses = Vec::new();
    for _ in 0..6 {
        let r = client.get("/", &[]).await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 200 {
            break;
        }
    }
    assert_eq!(statuses.first(), Some(&504), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
    assert!(statuses.len() <= 3, "{statuses:?}");
    assert!(relay.accepted.load(Ordering::SeqCst) >= 2);
    for i in 0..5 {
        let r = client.get("/", &[]).await.unwrap();
        assert_eq!(r.status(), 200, "request {i} after the new connection");
    }
    veer.logs_containing("answered nothing for a whole request timeout")
        .await;
}

// ------------------------------------------------ HTTP/1.1 upstream framings

/// A plain HTTP/1.1 upstream answering by path with fixed bytes: the
/// framings a proxy must read exactly (veer reads GET and HEAD answers
/// itself, not through hyper's client).
async fn framing_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>, Arc<AtomicU64>) {
    super::support::scripted_upstream(|line, _| {
        Some(match line.split(' ').nth(1) {
            Some("/chunked") => (&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n1\r\n!\r\n0\r\nX-Sum: 6\r\n\r\n"[..], false),
            Some("/to-end") => (b"HTTP/1.1 200 OK\r\n\r\nuntil the close", true),
            Some("/early") => (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", false),
            // A second response behind the first: smuggled.
            Some("/stray") => (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSTOLEN", false),
            Some("/bad-length") => (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nab", true),
            Some("/cut") => (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf.", true),
            Some("/head") => (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n", false),
            Some("/listed") => (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\ncontent-length: 2\r\n\r\nok", false),
            _ => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_upstream_framings_reach_clients_whole_and_never_cross() {
    let (addr, lines, accepted) = framing_upstream().await;
    let veer = Veer::start(&super::support::route_config(&[addr], &[], 0.0, "")).await;
    let mut c = super::support::Client::connect(veer.addr).await.unwrap();
    let body = |r: &Response<Bytes>| String::from_utf8_lossy(r.body()).to_string();

    let r = c.get("/chunked", &[]).await.unwrap();
    assert_eq!((r.status().as_u16(), body(&r).as_str()), (200, "hello!"));
    let r = c.get("/to-end", &[]).await.unwrap();
    assert_eq!(body(&r), "until the close");
    let r = c.get("/early", &[]).await.unwrap();
    assert_eq!((r.status().as_u16(), body(&r).as_str()), (200, "hi"));
    let r = c
        .send(http::Method::HEAD, "/head", &[], Bytes::new())
        .await
        .unwrap();
    assert_eq!(
        (
            r.headers()["content-length"].to_str().unwrap(),
            r.body().len()
        ),
        ("4", 0)
    );
    // A length listed (one value, repeated) reaches the client as one
    // value: strict clients refuse a list.
    let r = c.get("/listed", &[]).await.unwrap();
    let lengths: Vec<_> = r
        .headers()
        .get_all("content-length")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!((lengths, body(&r).as_str()), (vec!["2"], "ok"));
    // The smuggled second response is never any request's answer.
    let r = c.get("/stray", &[]).await.unwrap();
    assert_eq!(body(&r), "a");
    for i in 0..5 {
        let r = c.get(&format!("/after-{i}"), &[]).await.unwrap();
        assert_eq!(body(&r), "ok", "request {i} after the stray bytes");
    }
    // An answer that cannot be framed is the upstream's protocol error; one
    // cut short fails its body (the client sees the message broken off).
    assert_eq!(c.get("/bad-length", &[]).await.unwrap().status(), 502);
    let mut fresh = super::support::Client::connect(veer.addr).await.unwrap();
    assert!(fresh.get("/cut", &[]).await.is_err());
    let m = veer.metrics().await;
    for kind in ["protocol", "reset"] {
        let series =
            format!(r#"veer_upstream_errors_total{{kind="{kind}",route="web",version="v1"}}"#);
        assert_eq!(metric(&m, &series), Some(1.0), "{series}:\n{m}");
    }
    let lines = lines.lock().unwrap().clone();
    assert!(
        lines.contains(&"GET /chunked HTTP/1.1".to_string()),
        "{lines:?}"
    );
    assert!(
        lines.contains(&"HEAD /head HTTP/1.1".to_string()),
        "{lines:?}"
    );
    // Keep-alive where the framing allows it: not one connection a request.
    let n = accepted.load(Ordering::SeqCst);
    assert!(
        n < lines.len() as u64,
        "{n} connections for {} requests",
        lines.len()
    );
}

/// An answer framed twice, by `Transfer-Encoding: chunked` and a
/// `Content-Length` that disagrees with its chunks, is read by its chunks
/// (the transfer coding overrides the length) and reaches the client whole,
/// without the length (RFC 9112, section 6.3: an intermediary removes it);
/// it was forwarded with it, and the client's copy cut to 3 bytes of 10
/// with nothing to tell it so. The upstream connection is not used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answer_framed_twice_is_read_by_its_chunks_and_forwarded_without_its_length() {
    const TWICE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n";
    // A GET (veer's own client reads the answer), a POST with a body (its
    // upload path) and one that expects a 100 Continue (hyper's client),
    // each through a veer and an upstream of its own; the next request
    // takes the same path.
    let cases = [
        (http::Method::GET, "", None),
        (http::Method::POST, "up", None),
        (http::Method::POST, "up", Some(("expect", "100-continue"))),
    ];
    for (method, body, header) in cases {
        let headers: Vec<(&str, &str)> = header.into_iter().collect();
        let case = format!("{method} {headers:?}");
        let (addr, lines, accepted) = super::support::scripted_upstream(|line, before| {
            // A body's bytes come before the next head on its connection.
            let path = line.split(' ').nth(1).unwrap_or("");
            Some(match (path, before) {
                ("/twice", _) => (TWICE, false),
                (_, 0) => (
                    &b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"[..],
                    false,
                ),
                _ => (
                    &b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nreused"[..],
                    false,
                ),
            })
        })
        .await;
        let veer = Veer::start(&super::support::route_config(&[addr], &[], 0.0, "")).await;
        let mut c = super::support::Client::connect(veer.addr).await.unwrap();
        let r = c
            .send(method.clone(), "/twice", &headers, Bytes::from(body))
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{case}");
        assert_eq!(&r.body()[..], b"0123456789", "{case}: {:?}", r.headers());
        assert!(
            r.headers().get("content-length").is_none_or(|v| v == "10"),
            "{case}: {:?}",
            r.headers()
        );
        // The next request goes on a new connection, not the one that
        // answered framed twice (the only one the upstream had opened).
        let r = c
            .send(method.clone(), "/next", &headers, Bytes::from(body))
            .await
            .unwrap();
        assert_eq!(
            &r.body()[..],
            b"fresh",
            "{case}: after the answer framed twice"
        );
        let opened = accepted.load(Ordering::SeqCst);
        assert_eq!(opened, 2, "{case}: {:?}", lines.lock().unwrap());
    }
}

/// An HTTP/1.0 upstream's answers (Python's `http.server`, old
/// appliances) reach an HTTP/1.1 client as HTTP/1.1, and its connection
/// stays open: they went out as `HTTP/1.0 200`, and hyper's server closed
/// the client's connection after each (RFC 9110, section 6.2: a proxy
/// sends its own version). On veer's own client and hyper's alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_upstreams_answers_go_out_as_http11_on_a_kept_connection() {
    let (addr, _, accepted) = super::support::scripted_upstream(|_, _| {
        Some((&b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"[..], true))
    })
    .await;
    let veer = Veer::start(&super::support::route_config(&[addr], &[], 0.0, "")).await;
    let mut c = super::support::Client::connect(veer.addr).await.unwrap();
    for i in 0..3 {
        for method in [http::Method::GET, http::Method::POST] {
            let body = Bytes::from(if method == http::Method::POST {
                "up"
            } else {
                ""
            });
            // (An error here is the client connection closed under it.)
            let r = c.send(method.clone(), "/old", &[], body).await.unwrap();
            assert_eq!(r.version(), http::Version::HTTP_11, "{method} {i}");
            assert_eq!((r.status().as_u16(), &r.body()[..]), (200, &b"ok"[..]));
        }
    }
    // One upstream connection an answer: HTTP/1.0 keeps none open.
    assert_eq!(accepted.load(Ordering::SeqCst), 6);
}

/// An answer in a transfer coding besides `chunked` (`gzip, chunked`, or
/// `gzip` alone, read to the close) is the upstream's protocol error (502),
/// as nginx has it: veer decodes only the chunking (and never asks for
/// another coding), and forwarded the gzip bytes as a plain chunked body,
/// with nothing left to tell the client they were compressed. On veer's
/// own client (a GET) and on hyper's (a POST with a body) alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_in_a_transfer_coding_veer_cannot_pass_on_is_a_protocol_error() {
    let (addr, _, _) = super::support::scripted_upstream(|line, _| {
        Some(match line.split(' ').nth(1) {
            Some("/gzip-chunked") => (
                &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n"[..],
                false,
            ),
            Some("/gzip") => (
                &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00"[..],
                true,
            ),
            _ => (&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"[..], false),
        })
    })
    .await;
    let veer = Veer::start(&super::support::route_config(&[addr], &[], 0.0, "")).await;
    let mut c = super::support::Client::connect(veer.addr).await.unwrap();
    let mut refused = 0.0;
    for method in [http::Method::GET, http::Method::POST] {
        for path in ["/gzip-chunked", "/gzip"] {
            let body = Bytes::from(if method == http::Method::POST {
                "up"
            } else {
                ""
            });
            let r = c.send(method.clone(), path, &[], body.clone()).await;
            // (A connection hyper's server closes with the 502 is dialled again.)
            let r = match r {
                Ok(r) => r,
                Err(_) => {
                    c = super::support::Client::connect(veer.addr).await.unwrap();
                    c.send(method.clone(), path, &[], body).await.unwrap()
                }
            };
            assert_eq!(r.status(), 502, "{method} {path}: {:?}", r.headers());
            refused += 1.0;
        }
        let r = c
            .send(method.clone(), "/plain", &[], Bytes::new())
            .await
            .unwrap();
        assert_eq!(
            (r.status().as_u16(), &r.body()[..]),
            (200, &b"ok"[..]),
            "{method}"
        );
    }
    let m = veer.metrics().await;
    let series = r#"veer_upstream_errors_total{kind="protocol",route="web",version="v1"}"#;
    assert_eq!(metric(&m, series), Some(refused), "{m}");
}

/// An HTTP/1.1 upstream's trailers reach an HTTP/2 client without the
/// fields a trailer may not carry: `Connection`, `Transfer-Encoding` or a
/// `Content-Length` among them reset the client's stream (HTTP/2 refuses
/// connection-specific fields), and the whole answer was lost. An
/// HTTP/1.1 client that asks for trailers (`TE: trailers`) gets those its
/// answer's `Trailer` field names: that field was dropped as hop-by-hop,
/// and hyper's server then sent none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_trailers_reach_clients_without_the_fields_a_trailer_may_not_carry() {
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 6\r\nContent-Length: 5\r\nConnection: close, x-gone\r\nX-Gone: 1\r\nTransfer-Encoding: chunked\r\nHost: elsewhere\r\n\r\n";
    let (addr, _, _) = super::support::scripted_upstream(|_, _| Some((ANSWER, false))).await;
    let veer = Veer::start(&super::support::route_config(&[addr], &[], 0.0, "")).await;
    let mut h2 = super::support::h2c(veer.addr).await;
    for i in 0..2 {
        let req = Request::get(format!("http://{}/t", veer.addr))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        assert_eq!(&collected.to_bytes()[..], b"hello", "request {i}");
        let names: Vec<&str> = trailers.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-sum"], "request {i}: {trailers:?}");
    }
    let mut h1 = super::support::Client::connect(veer.addr).await.unwrap();
    let trailers = h1
        .send_for_trailers("/t", &[("te", "trailers")])
        .await
        .unwrap();
    assert_eq!(
        trailers.get("x-sum").map(|v| v.to_str().unwrap()),
        Some("6"),
        "{trailers:?}"
    );
}

/// A plain HTTP/1.1 upstream that reads each request's `Content-Length`
/// body exactly and keeps (request line, body). `/echo` answers the body;
/// `/continue` first sends an interim `100 Continue`; `/early` answers
/// `413` with `Connection: close` as soon as the head came, then reads and
/// drops what still comes (a lingering close, as nginx's) and closes;
/// `/early-keep` answers as soon as the head came and keeps the
/// connection, reading the body after (as nginx's `return` does).
async fn body_upstream() -> BodyUpstream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = BodyUpstream {
        addr: l.local_addr().unwrap(),
        seen: Arc::default(),
        accepted: Arc::default(),
        early: Arc::default(),
    };
    let (kept, a, answered) = (up.seen.clone(), up.accepted.clone(), up.early.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let (kept, answered) = (kept.clone(), answered.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let end = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end;
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end + 4);
                    let line = head.lines().next().unwrap_or("").to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    let path = line.split(' ').nth(1).unwrap_or("").to_string();
                    if path == "/early" {
                        let _ = s
                            .write_all(
                                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!",
                            )
                            .await;
                        answered.fetch_add(1, Ordering::SeqCst);
                        kept.lock().unwrap().push((line, Bytes::new()));
                        while let Ok(n) = s.read(&mut chunk).await {
                            if n == 0 {
                                break;
                            }
                        }
                        return;
                    }
                    let first: &[u8] = match path.as_str() {
                        "/continue" => b"HTTP/1.1 100 Continue\r\n\r\n",
                        "/early-keep" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly",
                        _ => b"",
                    };
                    if s.write_all(first).await.is_err() {
                        return;
                    }
                    if path == "/early-keep" {
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    while buf.len() < len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = Bytes::from(buf.drain(..len).collect::<Vec<u8>>());
                    if path == "/early-keep" {
                        kept.lock().unwrap().push((line, body));
                        continue;
                    }
                    let mut answer =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                            .into_bytes();
                    answer.extend_from_slice(&body);
                    kept.lock().unwrap().push((line, body));
                    if s.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    up
}

/// [`body_upstream`]: where it listens, the (request line, body) pairs it
/// read, the connections it accepted and the early answers it sent.
struct BodyUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<(String, Bytes)>>>,
    accepted: Arc<AtomicU64>,
    early: Arc<AtomicU64>,
}

/// The body of `/echo`'s answer to `body`, sent with `method` on `c`.
async fn echo(c: &mut super::support::Client, method: http::Method, body: Bytes) -> Bytes {
    let r = c.send(method, "/echo", &[], body).await.unwrap();
    assert_eq!(r.status(), 200);
    r.into_body()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_reach_http1_upstreams_whole_and_an_early_answer_ends_them() {
    use tokio::io::AsyncWriteExt;
    let BodyUpstream {
        addr,
        seen,
        accepted,
        early,
    } = body_upstream().await;
    let veer = Veer::start(&super::support::route_config(&[addr], &[], 0.0, "")).await;
    let mut c = super::support::Client::connect(veer.addr).await.unwrap();

    // Bodies of every size, on one client connection: each arrives whole
    // and exactly once, and the upstream connection is kept between them.
    let sizes = [1usize, 1024, 70 * 1024, 1 << 20];
    for (i, n) in sizes.iter().enumerate() {
        let body: Bytes = (0..*n)
            .map(|j| (j * 7 + i) as u8)
            .collect::<Vec<u8>>()
            .into();
        let method = if i % 2 == 0 {
            http::Method::POST
        } else {
            http::Method::PUT
        };
        let back = echo(&mut c, method, body.clone()).await;
        assert!(back == body, "a {n}-byte body came back changed");
    }
    let r = c
        .send(
            http::Method::POST,
            "/continue",
            &[],
            Bytes::from_static(b"after 100"),
        )
        .await
        .unwrap();
    assert_eq!(
        (r.status().as_u16(), &r.body()[..]),
        (200, &b"after 100"[..])
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.len(),
            sizes.len() + 1,
            "{:?}",
            seen.iter().map(|s| &s.0).collect::<Vec<_>>()
        );
        for ((line, body), n) in seen.iter().zip(sizes) {
            assert!(line.ends_with(" /echo HTTP/1.1"), "{line}");
            assert_eq!(body.len(), n);
        }
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection for them all"
    );

    // An upstream answering before the body is all sent: the client gets
    // that answer at once (not after the rest of a body it may never send),
    // and the version is not failed for it.
    let mut s = TcpStream::connect(veer.addr).await.unwrap();
    s.write_all(b"POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\nfirst bytes")
        .await
        .unwrap();
    let text = read_until(&mut s, "big!").await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");
    drop(s);

    // The next request gets a fresh upstream connection (the early one's
    // framing was lost), and its answer is its own.
    let back = echo(&mut c, http::Method::POST, Bytes::from_static(b"next")).await;
    assert_eq!(&back[..], b"next");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);

    // An early answer that keeps the connection: the server reads the rest
    // of the body, so it all goes (however late the client sends it), and
    // the connection serves the next request. (A body streamed as it
    // comes: one over `request_buffer`, 16 KiB, is not read whole first.)
    let last = [b"-last".as_slice(), &[b'x'; 16 * 1024]].concat();
    let answered = early.load(Ordering::SeqCst) + 1;
    let mut s = TcpStream::connect(veer.addr).await.unwrap();
    let head = format!(
        "POST /early-keep HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\nfirst",
        5 + last.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // The rest only once the upstream has answered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while early.load(Ordering::SeqCst) < answered {
        assert!(tokio::time::Instant::now() < deadline, "no early answer");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.write_all(&last).await.unwrap();
    let text = read_until(&mut s, "early").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    let back = echo(&mut c, http::Method::POST, Bytes::from_static(b"again")).await;
    assert_eq!(&back[..], b"again");
    {
        let seen = seen.lock().unwrap();
        assert!(
            seen.iter().any(|(l, b)| l.starts_with("POST /early-keep ")
                && b.starts_with(b"first")
                && b[5..] == last[..]),
            "the early answer's request body did not all go"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the connection kept by the early answer served the next request"
    );

    // The same early answer with most of a large body still to come: the
    // client gets it at once, and the connection is not used again.
    let mut s = TcpStream::connect(veer.addr).await.unwrap();
    s.write_all(b"POST /early-keep HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\nfirst")
        .await
        .unwrap();
    let text = read_until(&mut s, "early").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    drop(s);
    let back = echo(&mut c, http::Method::PUT, Bytes::from_static(b"last")).await;
    assert_eq!(&back[..], b"last");
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    let m = veer.metrics().await;
    let resets = r#"veer_upstream_errors_total{kind="reset",route="web",version="v1"}"#;
    assert_eq!(metric(&m, resets).unwrap_or(0.0), 0.0, "{m}");
}

/// What `s` receives until it ends with `end` (or closes, or 10 s pass).
async fn read_until(s: &mut TcpStream, end: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while !got.ends_with(end.as_bytes()) {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got).to_string()
}

/// Two h2c gRPC peers, a and b, as one version's endpoints, the route's
/// last table `extra`.
async fn two_grpc_peers(extra: &str) -> (Arc<GrpcPeer>, Arc<GrpcPeer>, Veer) {
    let a = GrpcPeer::start("a", None).await;
    let b = GrpcPeer::start("b", None).await;
    let veer = Veer::start(
        &(config(
            &format!(
                "version = \"v1\"\nendpoints = [\"h2c://{}\", \"h2c://{}\"]",
                a.addr, b.addr
            ),
            None,
            "",
        ) + extra),
    )
    .await;
    (a, b, veer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_endpoint_whose_health_service_says_not_serving_is_taken_out_until_it_serves() {
    let check = "[route.health_check]\ngrpc_service = \"checkout.v1.Checkout\"\ninterval = \"500ms\"\ntimeout = \"400ms\"\nunhealthy = 2\nhealthy = 2\n";
    let (_a, b, veer) = two_grpc_peers(check).await;
    let b_addr = b.addr.to_string();
    let b_state = |st: &serde_json::Value| {
        st["routes"][0]["stable"]["endpoints"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["resolved"] == b_addr.as_str()))
            .cloned()
            .expect("b in /status")
    };
    // The checks reach the health service, asking about the service named
    // (veer's own encoding of the request, decoded by tonic).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.last_service.lock().unwrap().as_deref() != Some("checkout.v1.Checkout") {
        assert!(std::time::Instant::now() < deadline, "no check reached b");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let served_by = |client: &mut HealthClient<tonic::transport::Channel>| {
        let mut client = client.clone();
        async move {
            let mut who = std::collections::HashSet::new();
            for i in 0..60 {
                let r = client
                    .check(check_request(&format!("user-{i}")))
                    .await
                    .expect("answered");
                who.insert(
                    r.metadata()
                        .get("x-upstream")
                        .unwrap()
                        .to_str()
                        .unwrap()
                        .to_string(),
                );
            }
            who
        }
    };
    let mut client = grpc_client(&veer).await;
    assert!(served_by(&mut client).await.contains("b"));

    b.mode.store(NOT_SERVING, Ordering::SeqCst);
    let start = std::time::Instant::now();
    let out = loop {
        let e = b_state(&veer.status().await);
        if e["healthy"] == false {
            break e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never taken out: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        out["health_check"],
        "gRPC Check(\"checkout.v1.Checkout\"): the health service says NOT_SERVING",
        "{out}"
    );
    assert_eq!(
        served_by(&mut client).await,
        std::collections::HashSet::from(["a".to_string()])
    );

    b.mode.store(OK, Ordering::SeqCst);
    let start = std::time::Instant::now();
    while b_state(&veer.status().await)["healthy"] != true {
        assert!(start.elapsed() < Duration::from_secs(10), "never back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served_by(&mut client).await.contains("b"));
}

/// The keys (of 60) that the endpoint answering as `name` serves (at
/// least 3).
async fn grpc_keys_of(
    client: &mut HealthClient<tonic::transport::Channel>,
    name: &str,
) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..60 {
        let key = format!("user-{i}");
        let r = client.check(check_request(&key)).await.expect("answered");
        if r.metadata().get("x-upstream").unwrap() == name {
            keys.push(key);
        }
    }
    assert!(keys.len() >= 3, "{name}: {keys:?}");
    keys
}

/// Two gRPC endpoints of stable, a and b, whose failures outlier detection
/// counts (two in a row eject one for an hour): b, veer, a client, and the
/// keys (of 60) b serves.
async fn grpc_outlier_pair() -> (
    Arc<GrpcPeer>,
    Veer,
    HealthClient<tonic::transport::Channel>,
    Vec<String>,
) {
    let detect = "[route.outlier_detection]\nconsecutive_errors = 2\nejection_time = \"1h\"\n";
    let (_a, b, veer) = two_grpc_peers(detect).await;
    let mut client = grpc_client(&veer).await;
    let of_b = grpc_keys_of(&mut client, "b").await;
    (b, veer, client, of_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_endpoint_whose_calls_fail_in_a_row_is_ejected_by_outlier_detection() {
    let (b, veer, mut client, of_b) = grpc_outlier_pair().await;
    // NOT_FOUND is not one of the route's grpc_error_codes: the caller's
    // business, not a failure of b's.
    b.mode.store(NOT_FOUND, Ordering::SeqCst);
    for key in &of_b {
        let e = client
            .check(check_request(key))
            .await
            .expect_err("NOT_FOUND");
        assert_eq!(e.code(), tonic::Code::NotFound);
    }
    // INTERNAL, answered before any message (a trailers-only answer), is:
    // the second in a row takes b out, and a answers its keys.
    b.mode.store(FAIL_ALL, Ordering::SeqCst);
    for key in &of_b[..2] {
        let e = client
            .check(check_request(key))
            .await
            .expect_err("INTERNAL");
        assert_eq!(e.code(), tonic::Code::Internal);
    }
    for key in &of_b {
        let r = client
            .check(check_request(key))
            .await
            .expect("answered by a");
        assert_eq!(r.metadata().get("x-upstream").unwrap(), "a");
    }
    let lines = veer.logs_with_at_least(EJECTED, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["last"], "grpc-status 13", "{}", lines[0]);
    assert_eq!(lines[0]["endpoint"], b.addr.to_string(), "{}", lines[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_endpoint_whose_streams_fail_after_their_messages_is_ejected_too() {
    let (b, veer, mut client, of_b) = grpc_outlier_pair().await;
    // Each of b's streams sends a message, then INTERNAL in its trailers:
    // the answer's head (200, no status yet) counts for nothing, its
    // trailers do. The second in a row takes b out.
    b.mode.store(FAIL_HALF, Ordering::SeqCst);
    for key in &of_b[..2] {
        let mut stream = client.watch(check_request(key)).await.unwrap().into_inner();
        assert!(stream.message().await.unwrap().is_some());
        let e = stream.message().await.expect_err("INTERNAL");
        assert_eq!(e.code(), tonic::Code::Internal);
    }
    for key in &of_b {
        let r = client.watch(check_request(key)).await.expect("answered");
        assert_eq!(r.metadata().get("x-upstream").unwrap(), "a", "{key}");
    }
    let lines = veer.logs_with_at_least(EJECTED, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["last"], "grpc-status 13", "{}", lines[0]);
    assert_eq!(lines[0]["endpoint"], b.addr.to_string(), "{}", lines[0]);
}

/// `[route.retry] on = ["unavailable"]`: a gRPC call its server refused
/// with UNAVAILABLE before any message goes again to the next endpoint of
/// its version, with its request message (copied as it went); the judge
/// hears the call failed. Other failures of a call (INTERNAL) never go
/// again, nor does a call on a route that does not name "unavailable".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_refused_with_unavailable_goes_to_the_next_endpoint() {
    let retry = "[route.retry]\non = [\"unavailable\"]\n";
    let (a, b, veer) = two_grpc_peers(retry).await;
    let mut client = grpc_client(&veer).await;
    let of_b = grpc_keys_of(&mut client, "b").await;
    b.mode.store(UNAVAILABLE, Ordering::SeqCst);
    let (a_before, b_before) = (
        a.calls.load(Ordering::SeqCst),
        b.calls.load(Ordering::SeqCst),
    );
    for key in &of_b {
        let mut req = check_request(key);
        req.get_mut().service = format!("svc-{key}");
        let r = client.check(req).await.expect("answered by a");
        assert_eq!(r.metadata().get("x-upstream").unwrap(), "a", "{key}");
        // a got the call's own message.
        assert_eq!(
            a.last_service.lock().unwrap().as_deref(),
            Some(format!("svc-{key}").as_str())
        );
    }
    let n = of_b.len() as u64;
    assert_eq!(b.calls.load(Ordering::SeqCst) - b_before, n);
    assert_eq!(a.calls.load(Ordering::SeqCst) - a_before, n);
    let sent = "veer_retries_total{result=\"sent\",route=\"web\",version=\"v1\"}";
    let m = veer.metrics().await;
    assert_eq!(metric(&m, sent), Some(n as f64), "{m}");
    // UNAVAILABLE is one of the route's grpc_error_codes: each call failed
    // once, for the judge.
    let route = wait_route(&veer, "failures heard", Duration::from_secs(10), |r| {
        r["window"]["stable"]["errors"].as_u64() >= Some(n)
    })
    .await;
    assert_eq!(route["window"]["stable"]["errors"], n, "{route}");

    // INTERNAL is not sent again: b's answer is the caller's.
    b.mode.store(FAIL_ALL, Ordering::SeqCst);
    let e = client
        .check(check_request(&of_b[0]))
        .await
        .expect_err("INTERNAL");
    assert_eq!(e.code(), tonic::Code::Internal);
    let m = veer.metrics().await;
    assert_eq!(metric(&m, sent), Some(n as f64), "{m}");

    // A route retrying resets only: a gRPC call (a POST) never goes again.
    let (_a, b, veer) = two_grpc_peers("[route.retry]\non = [\"reset\", \"503\"]\n").await;
    let mut client = grpc_client(&veer).await;
    b.mode.store(UNAVAILABLE, Ordering::SeqCst);
    let mut refused = 0;
    for i in 0..60 {
        let key = format!("user-{i}");
        match client.check(check_request(&key)).await {
            Ok(r) => assert_eq!(r.metadata().get("x-upstream").unwrap(), "a"),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::Unavailable);
                refused += 1;
            }
        }
    }
    assert!(refused >= 3, "{refused}");
    let m = veer.metrics().await;
    assert_eq!(metric(&m, sent), Some(0.0), "{m}");
}

/// An HTTP/2 upstream refusing every other stream unprocessed
/// (RST_STREAM REFUSED_STREAM, as a server shedding streams at its
/// concurrency limit or on shutdown does): a request whose body veer read
/// whole first (a POST among them, which the server never saw) is sent
/// again on a fresh connection with that body; one whose body streams is
/// the client's 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_refused_unprocessed_goes_again_with_its_read_body() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = Arc::new(AtomicU64::new(0));
    let seen = streams.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    if seen.fetch_add(1, Ordering::SeqCst) % 2 == 0 {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        let mut got = Vec::new();
                        while let Some(Ok(chunk)) = body.data().await {
                            let _ = body.flow_control().release_capacity(chunk.len());
                            got.extend_from_slice(&chunk);
                        }
                        let Ok(mut send) = respond.send_response(Response::new(()), false) else {
                            return;
                        };
                        let _ = send.send_data(Bytes::from(got), true);
                    });
                }
            });
        }
    });
    let veer = veer_before_h2c(addr).await;
    let mut client = super::support::Client::connect(veer.addr).await.unwrap();
    for i in 0..6 {
        let body = Bytes::from(format!("order {i}: two lattes"));
        let r = client
            .send(http::Method::POST, "/orders", &[], body.clone())
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        assert_eq!(r.body(), &body, "request {i}");
    }
    // A body announced longer than request_buffer streams: refused, it is
    // the client's 502 (its bytes are gone).
    let mut failed = 0;
    for i in 0..4 {
        let r = client
            .send(
                http::Method::POST,
                "/upload",
                &[],
                Bytes::from(vec![b'u'; 20_000]),
            )
            .await
            .unwrap();
        if r.status() == 502 {
            failed += 1;
        } else {
            assert_eq!(r.status(), 200, "upload {i}");
        }
    }
    assert!(failed >= 1, "no streamed body was refused");
}

/// An HTTP/2 upstream that reads every request's body as it comes and
/// answers only once `release` is sent true; `bytes` counts the body bytes
/// read, `bodies` the bodies read to their end, `open` its connections
/// open.
struct SlowH2 {
    addr: SocketAddr,
    bytes: Arc<AtomicU64>,
    bodies: Arc<AtomicU64>,
    open: Arc<AtomicU64>,
    release: tokio::sync::watch::Sender<bool>,
}

impl SlowH2 {
    async fn start() -> SlowH2 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (bytes, bodies) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (release, released) = tokio::sync::watch::channel(false);
        let counts = (bytes.clone(), bodies.clone());
        let open = Arc::new(AtomicU64::new(0));
        let opened = open.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (counts, released, open) = (counts.clone(), released.clone(), opened.clone());
                tokio::spawn(async move {
                    open.fetch_add(1, Ordering::SeqCst);
                    /// Counts the connection closed when its task ends.
                    struct Closed(Arc<AtomicU64>);
                    impl Drop for Closed {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    let _closed = Closed(open);
                    let Ok(mut conn) = h2::server::handshake(stream).await else {
                        return;
                    };
                    while let Some(Ok((req, mut respond))) = conn.accept().await {
                        let ((bytes, bodies), mut released) = (counts.clone(), released.clone());
                        tokio::spawn(async move {
                            let mut body = req.into_body();
                            while let Some(Ok(chunk)) = body.data().await {
                                let _ = body.flow_control().release_capacity(chunk.len());
                                bytes.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                            }
                            bodies.fetch_add(1, Ordering::SeqCst);
                            let _ = released.wait_for(|r| *r).await;
                            let _ = respond.send_response(Response::new(()), true);
                        });
                    }
                });
            }
        });
        SlowH2 {
            addr,
            bytes,
            bodies,
            open,
            release,
        }
    }

    /// A config of veer before it, with 1 MiB request buffers and `extra`
    /// route keys.
    fn config(&self, extra: &str) -> String {
        config(
            &format!("version = \"v1\"\nendpoints = [\"h2c://{}\"]", self.addr),
            None,
            &format!("timeout = \"60s\"\n{extra}"),
        )
        .replace(
            "shutdown_grace = \"10s\"",
            "shutdown_grace = \"10s\"\nrequest_buffer = 1048576",
        )
    }

    /// Veer before it, with [`SlowH2::config`].
    async fn veer(&self, extra: &str) -> Veer {
        Veer::start(&self.config(extra)).await
    }

    /// Waits until `count` reaches `n`.
    async fn wait(count: &AtomicU64, n: u64) {
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while count.load(Ordering::SeqCst) < n {
            assert!(
                std::time::Instant::now() < until,
                "the upstream counted {}, not {n}",
                count.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Bodies small enough to be read whole that streamed part-way: the held
/// bytes' budget was spent.
async fn buffer_full(veer: &Veer) -> f64 {
    let m = veer.metrics().await;
    metric(&m, "veer_request_buffer_full_total").unwrap_or_else(|| panic!("no count:\n{m}"))
}

/// A body veer read whole, kept to go again should its HTTP/2 stream be
/// refused, stays counted in what such bodies may hold at once (64 MiB)
/// until its answer's head: with 64 bodies of 1 MiB waiting on a slow
/// HTTP/2 upstream (which read them), the next finds the budget spent and
/// streams. (Uncounted, the copies' memory grew with the requests
/// waiting, past the budget.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_kept_for_a_refused_stream_stay_within_the_held_budget_until_answered() {
    const MIB: usize = 1 << 20;
    let up = SlowH2::start().await;
    let veer = up.veer("").await;
    let upload = |n: usize| {
        let addr = veer.addr;
        tokio::spawn(async move {
            let mut c = super::support::Client::connect(addr).await.unwrap();
            let r = c
                .send(http::Method::POST, "/", &[], Bytes::from(vec![b'x'; MIB]))
                .await
                .unwrap();
            (n, r.status().as_u16())
        })
    };
    // 64 MiB of bodies read whole, sent, and waiting for their answers.
    let mut tasks: Vec<_> = (0..64).map(upload).collect();
    SlowH2::wait(&up.bodies, 64).await;
    assert_eq!(buffer_full(&veer).await, 0.0);
    // One more: its read finds the budget spent, and it streams.
    tasks.push(upload(64));
    SlowH2::wait(&up.bodies, 65).await;
    assert_eq!(buffer_full(&veer).await, 1.0);
    up.release.send_replace(true);
    for t in tasks {
        let (n, status) = t.await.unwrap();
        assert_eq!(status, 200, "upload {n}");
    }
}

/// A gRPC call's messages, copied as they go so that the call can go
/// again if its server refuses it with UNAVAILABLE (`on =
/// ["unavailable"]`), count in what bodies held by veer may hold at once
/// (64 MiB) while the copy is kept: 64 calls that sent 1 MiB each and
/// hold their streams open spend it, and a POST after them streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_messages_kept_for_a_retry_count_in_the_held_budget() {
    const MIB: usize = 1 << 20;
    let up = SlowH2::start().await;
    let veer = up.veer("[route.retry]\non = [\"unavailable\"]").await;
    let tcp = TcpStream::connect(veer.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut calls = Vec::new();
    for _ in 0..64 {
        let mut client = client.clone().ready().await.unwrap();
        let req = Request::post(format!("http://{}/veer.Test/Upload", veer.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        let (resp, mut send) = client.send_request(req, false).unwrap();
        // One 1 MiB message (its 5-byte frame header first); the stream
        // stays open.
        let mut message = vec![0u8; 5 + MIB - 5];
        message[1..5].copy_from_slice(&((MIB - 5) as u32).to_be_bytes());
        send.reserve_capacity(message.len());
        send.send_data(Bytes::from(message), false).unwrap();
        calls.push((resp, send));
    }
    SlowH2::wait(&up.bytes, 64 * MIB as u64).await;
    assert_eq!(buffer_full(&veer).await, 0.0);
    // A POST's read-whole finds the budget spent: it streams.
    let mut c = super::support::Client::connect(veer.addr).await.unwrap();
    let post = tokio::spawn(async move {
        c.send(http::Method::POST, "/", &[], Bytes::from(vec![b'x'; MIB]))
            .await
            .map(|r| r.status().as_u16())
    });
    SlowH2::wait(&up.bodies, 1).await;
    assert_eq!(buffer_full(&veer).await, 1.0);
    up.release.send_replace(true);
    assert_eq!(post.await.unwrap().unwrap(), 200);
    drop(calls);
}

/// A reload lowering an HTTP/2 endpoint's connection cap closes its idle
/// connections over the cap at once, and busy ones once a request finds
/// them without a stream (it kept both until they had been idle for 50 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_cap_closes_http2_connections_over_it() {
    let up = SlowH2::start().await;
    let veer = up.veer("max_upstream_connections = 4").await;
    // `n` calls at once, on two client connections (veer takes 128 streams
    // on one), waiting for their answers.
    let calls = |n: usize| async move {
        let mut calls = Vec::new();
        for _ in 0..2 {
            let tcp = TcpStream::connect(veer.addr).await.unwrap();
            let (client, conn) = h2::client::handshake(tcp).await.unwrap();
            tokio::spawn(conn);
            for _ in 0..n / 2 {
                let mut client = client.clone().ready().await.unwrap();
                let req = Request::get(format!("http://{}/", veer.addr))
                    .body(())
                    .unwrap();
                let (resp, _) = client.send_request(req, true).unwrap();
                calls.push(resp);
            }
        }
        calls
    };
    let open = || up.open.load(Ordering::SeqCst);
    let down_to_1 = || async {
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while open() > 1 {
            assert!(
                std::time::Instant::now() < until,
                "{} HTTP/2 connections open under a cap of 1",
                open()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    // 150 at once: more than one connection's 100 streams, so veer opens
    // two.
    let waiting = calls(150).await;
    SlowH2::wait(&up.bodies, 150).await;
    assert!(open() >= 2);
    up.release.send_replace(true);
    for c in waiting {
        assert_eq!(c.await.unwrap().status(), 200);
    }
    // Both idle; the cap drops to 1: one closes at once.
    veer.write_config(&up.config("max_upstream_connections = 1"));
    veer.wait_generation(2).await;
    down_to_1().await;
    // Two busy again when the cap drops to 1: one closes once the next
    // request finds it without a stream.
    veer.write_config(&up.config("max_upstream_connections = 4"));
    veer.wait_generation(3).await;
    up.release.send_replace(false);
    let waiting = calls(150).await;
    SlowH2::wait(&up.bodies, 300).await;
    assert!(open() >= 2);
    veer.write_config(&up.config("max_upstream_connections = 1"));
    veer.wait_generation(4).await;
    assert!(open() >= 2, "busy connections stay until their streams end");
    up.release.send_replace(true);
    for c in waiting {
        assert_eq!(c.await.unwrap().status(), 200);
    }
    let r = get(veer.addr, "/", &[]).await.unwrap();
    assert_eq!(r.status(), 200);
    down_to_1().await;
}
