//! The training run of veer's profile-guided build (`PGO=1
//! deploy/build-veer.sh`): the instrumented binary, run as `veer run`,
//! carries every protocol it serves at once, so that no path is laid out
//! as cold code because the training never took it.
//!
//! veer runs `config.example.toml` (its judge settings as shipped) with the
//! listeners, state dir and endpoints moved to this run's, plus a TLS
//! listener and three routes: gRPC to h2c upstreams, HTTPS upstreams (h2
//! by ALPN, the CA trusted by file) and a mirrored route. Upstreams (one
//! stable, one canary for each) and clients are in this process:
//!
//! - HTTP/1.1 keep-alive GETs with sticky keys (most of the load), 1 KiB
//!   POSTs, 64 KiB answers, chunked 64 KiB uploads with
//!   `Expect: 100-continue`, a new connection for every request;
//! - h2c (prior knowledge) gRPC calls, with trailers;
//! - HTTP/2 and HTTP/1.1 over TLS (ALPN);
//! - GETs to the HTTPS upstreams and to the mirrored route;
//! - upgrades (a WebSocket-like tunnel, 100 echoed messages each).
//!
//! The time is split between `workers = 1` (a current-thread runtime) and
//! the default (one worker per core), the two runtimes veer starts. Each
//! veer is stopped with SIGTERM, as an orchestrator does, so that it writes
//! its counts as it exits. Exits non-zero if veer fails to start or exit
//! cleanly, or if any kind of request never got a 2xx answer.
//!
//! usage: pgo-train VEER_BINARY SECONDS
//!
//! Only 127.0.0.1 is targeted; the load is closed-loop (a request at a time
//! per client) and ends with SECONDS.

// A tool run from outside, timing real work: the wall clock is what it
// measures (clippy.toml bans it in the proxy's own code).
#![allow(clippy::disallowed_methods)]
// A training driver: a failure to set up should abort it loudly.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

/// The shipped reference configuration: its judge settings are the ones
/// trained.
const EXAMPLE: &str = include_str!("../config.example.toml");

type Out = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Out {
    Full::new(b.into()).boxed()
}

/// The upstreams' answers: a gRPC reply with trailers to
/// `application/grpc`, 64 KiB to `/big` (also under `/secure`), the body's
/// length to anything with a body, else "ok".
async fn answer(
    mut req: Request<Incoming>,
    version: &'static str,
) -> Result<Response<Out>, Infallible> {
    if req.headers().contains_key("upgrade") {
        // A tunnel (WebSocket-like): 101, then every byte echoed.
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(io) = upgrade.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(io));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("connection", HeaderValue::from_static("upgrade"));
        r.headers_mut()
            .insert("upgrade", HeaderValue::from_static("websocket"));
        return Ok(r);
    }
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let big = req.uri().path().ends_with("/big");
    let with_body = req.method() == http::Method::POST;
    let read = req.into_body().collect().await.map(|b| b.to_bytes().len());
    let body = if grpc {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let reply = Full::new(Bytes::from_static(&[0, 0, 0, 0, 0]))
            .with_trailers(async move { Some(Ok(trailers)) })
            .boxed();
        let mut r = Response::new(reply);
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        return Ok(r);
    } else if big {
        full(vec![b'x'; 64 * 1024])
    } else if with_body {
        full(format!("{}\n", read.unwrap_or(0)))
    } else {
        full("ok\n")
    };
    let mut r = Response::new(body);
    r.headers_mut()
        .insert("x-version", HeaderValue::from_static(version));
    Ok(r)
}

/// Serves HTTP/1.1 and HTTP/2 (h2c by its preface, or inside TLS) on
/// every connection a listener accepts.
async fn upstream(version: &'static str, tls: Option<tokio_rustls::TlsAcceptor>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| answer(req, version));
                let auto = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                match tls {
                    Some(acceptor) => {
                        if let Ok(s) = acceptor.accept(s).await {
                            let _ = auto
                                .serve_connection_with_upgrades(TokioIo::new(s), svc)
                                .await;
                        }
                    }
                    None => {
                        let _ = auto
                            .serve_connection_with_upgrades(TokioIo::new(s), svc)
                            .await;
                    }
                }
            });
        }
    });
    addr
}

/// A CA made for this run, and a certificate for localhost and 127.0.0.1
/// it signed, with its key: each as PEM (files for veer) and DER (for the
/// run's own TLS peers).
struct Certs {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    leaf_pem: String,
    key_pem: String,
    leaf_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

fn certs() -> Certs {
    let ca_key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "veer pgo-train CA");
    let ca = p.self_signed(&ca_key).expect("CA");
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    p.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let leaf = p.signed_by(&key, &ca, &ca_key).expect("leaf");
    Certs {
        ca_pem: ca.pem(),
        ca_der: ca.der().clone(),
        leaf_pem: leaf.pem(),
        key_pem: key.serialize_pem(),
        leaf_der: leaf.der().clone(),
        key_der: key.serialize_der(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn acceptor(c: &Certs) -> tokio_rustls::TlsAcceptor {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key_der.clone()));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![c.leaf_der.clone()], key)
        .expect("server TLS");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

fn connector(c: &Certs, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(c.ca_der.clone()).expect("CA");
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// Three loopback ports free at the time of the call and distinct from
/// each other (their listeners are held together, then closed).
fn free_ports() -> [u16; 3] {
    let held: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("free port"))
        .collect();
    let port = |i: usize| held[i].local_addr().expect("free port").port();
    [port(0), port(1), port(2)]
}

/// The `[route.judge]` table of config.example.toml, as shipped.
fn judge_table() -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in EXAMPLE.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            inside = t.starts_with("[route.judge]");
        }
        if inside && !t.is_empty() && !t.starts_with('#') {
            out += line;
            out.push('\n');
        }
    }
    assert!(
        out.contains("false_revert_rate"),
        "no [route.judge] in config.example.toml"
    );
    out
}

/// Where this run's veer and its peers listen.
struct Ports {
    proxy: u16,
    tls: u16,
    admin: u16,
    stable: SocketAddr,
    canary: SocketAddr,
    stable_tls: SocketAddr,
    canary_tls: SocketAddr,
}

/// config.example.toml with its listeners, state dir, endpoints and
/// workers moved to this run's, a TLS listener and three more routes.
fn config(dir: &Path, p: &Ports, workers: u32) -> String {
    let judge = judge_table();
    let path = |name: &str| format!("{:?}", dir.join(name).display().to_string());
    let (cert, key, ca) = (path("tls.crt"), path("tls.key"), path("ca.crt"));
    let (s, c, st, ct) = (p.stable, p.canary, p.stable_tls, p.canary_tls);
    let text = EXAMPLE
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{}", p.proxy))
        .replace("127.0.0.1:9901", &format!("127.0.0.1:{}", p.admin))
        .replace("\".veer-state\"", &path("state"))
        .replace("127.0.0.1:18001", &s.to_string())
        .replace("127.0.0.1:18002", &c.to_string())
        .replacen("workers = 0 ", &format!("workers = {workers} "), 1);
    assert!(
        text.contains(&format!("workers = {workers} ")),
        "no workers key"
    );
    let tls_table = format!("ca_file = {ca}\nserver_name = \"localhost\"\n");
    let routes = [
        route(
            "grpc",
            "/grpc.",
            &format!("h2c://{s}"),
            &format!("h2c://{c}"),
            20.0,
            None,
            &judge,
        ),
        route(
            "secure",
            "/secure",
            &format!("https://{st}"),
            &format!("https://{ct}"),
            20.0,
            Some(&tls_table),
            &judge,
        ),
        route(
            "shadow",
            "/shadow",
            &s.to_string(),
            &c.to_string(),
            0.0,
            None,
            &judge,
        ) + "[route.mirror]\npercent = 50\n",
    ];
    format!(
        "{text}\n[proxy.tls]\nlisten = [\"127.0.0.1:{tls}\"]\ncert = {cert}\nkey = {key}\n{}",
        routes.concat(),
        tls = p.tls,
    )
}

/// One more route: a stable and a canary endpoint (with `tls` as both
/// versions' `tls` table, for https:// endpoints) and the judge as shipped.
fn route(
    name: &str,
    prefix: &str,
    stable: &str,
    canary: &str,
    weight: f64,
    tls: Option<&str>,
    judge: &str,
) -> String {
    let version = |key: &str, name: &str, endpoint: &str| {
        let mut t = format!("[route.{key}]\nversion = \"{name}\"\nendpoints = [\"{endpoint}\"]\n");
        if key == "canary" {
            t += &format!("weight = {weight:.1}\n");
        }
        if let Some(tls) = tls {
            t += &format!("[route.{key}.tls]\n{tls}");
        }
        t
    };
    format!(
        "\n[[route]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nsticky = [\"header:x-user-id\", \"client-ip\"]\n{}{}{judge}",
        version("stable", "v1", stable),
        version("canary", "v2", canary),
    )
}

/// A request body of `left` bytes in 8 KiB frames whose length is not
/// known in advance: sent chunked.
struct Chunked {
    left: usize,
}

impl Body for Chunked {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(8 * 1024);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'u'; n])))))
    }
}

type ReqBody = BoxBody<Bytes, Infallible>;

/// What one kind of client sends.
#[derive(Clone, Copy)]
enum Kind {
    Get,
    Post1k,
    Big,
    ChunkedUpload,
    Grpc,
    Secure,
    Shadow,
}

impl Kind {
    /// A request of this kind: with `authority` (HTTP/2: "http://app" or
    /// "https://localhost") in absolute form, else with a Host header.
    fn request(self, authority: Option<&str>) -> Request<ReqBody> {
        let user = format!("u{}", fastrand::u32(0..5_000));
        let (path, b) = match self {
            Kind::Get => ("/", Request::builder()),
            Kind::Big => ("/big", Request::builder()),
            Kind::Secure => ("/secure/big", Request::builder()),
            Kind::Shadow => ("/shadow", Request::builder()),
            Kind::Post1k => ("/orders", Request::builder().method("POST")),
            Kind::ChunkedUpload => (
                "/upload",
                Request::builder()
                    .method("POST")
                    .header("expect", "100-continue"),
            ),
            Kind::Grpc => (
                "/grpc.health.v1.Health/Check",
                Request::builder()
                    .method("POST")
                    .header("content-type", "application/grpc")
                    .header("te", "trailers"),
            ),
        };
        let b = match authority {
            Some(a) => b.uri(format!("{a}{path}")),
            None => b.uri(path).header("host", "app"),
        };
        let body: ReqBody = match self {
            Kind::Post1k => full(vec![b'p'; 1024]),
            Kind::ChunkedUpload => Chunked { left: 64 * 1024 }.boxed(),
            Kind::Grpc => full(&[0u8, 0, 0, 0, 0][..]),
            _ => Empty::new().boxed(),
        };
        b.header("x-user-id", user).body(body).expect("request")
    }
}

/// A kind of client: its address, TLS connector (none: plain) and load.
#[derive(Clone)]
enum Client {
    /// HTTP/1.1 requests of a kind, one at a time; `true`: a new
    /// connection for each.
    Http1(SocketAddr, Option<tokio_rustls::TlsConnector>, Kind, bool),
    /// HTTP/2 requests of a kind, this many streams at once.
    Http2(SocketAddr, Option<tokio_rustls::TlsConnector>, Kind, usize),
    /// Upgrades to a tunnel.
    Upgrade(SocketAddr),
}

/// Answers with a 2xx status and the rest, per kind of client.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    other: AtomicU64,
}

async fn send_h1(
    tx: &mut hyper::client::conn::http1::SendRequest<ReqBody>,
    req: Request<ReqBody>,
) -> bool {
    match tokio::time::timeout(Duration::from_secs(5), async {
        let r = tx.send_request(req).await.ok()?;
        let ok = r.status().is_success();
        r.into_body().collect().await.ok()?;
        Some(ok)
    })
    .await
    {
        Ok(Some(ok)) => ok,
        _ => false,
    }
}

/// The name veer's certificate is checked for.
fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").expect("name")
}

/// An HTTP/1.1 client connection to `addr`, inside TLS with `tls`.
async fn open_h1(
    addr: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Option<hyper::client::conn::http1::SendRequest<ReqBody>> {
    let s = connect(addr).await.ok()?;
    match tls {
        Some(c) => h1(c.connect(localhost(), s).await.ok()?).await,
        None => h1(s).await,
    }
}

/// An HTTP/2 client connection to `addr`: inside TLS with `tls`, else h2c
/// by prior knowledge.
async fn open_h2(
    addr: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Option<hyper::client::conn::http2::SendRequest<ReqBody>> {
    let s = connect(addr).await.ok()?;
    match tls {
        Some(c) => h2(c.connect(localhost(), s).await.ok()?).await,
        None => h2(s).await,
    }
}

async fn h1<S>(io: S) -> Option<hyper::client::conn::http1::SendRequest<ReqBody>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(tx)
}

async fn h2<S>(io: S) -> Option<hyper::client::conn::http2::SendRequest<ReqBody>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(tx)
}

/// A client connection, without Nagle's delay (as veer's own).
async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn count(t: &Tally, ok: bool) {
    let c = if ok { &t.ok } else { &t.other };
    c.fetch_add(1, Ordering::Relaxed);
}

/// HTTP/1.1 keep-alive requests of one kind until `until`, on one
/// connection (inside TLS with `tls`; `reconnect`: a new connection for
/// every request).
async fn h1_loop(
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
    kind: Kind,
    reconnect: bool,
    until: Instant,
    t: Arc<Tally>,
) {
    let mut tx = None;
    while Instant::now() < until {
        if tx.is_none() || reconnect {
            tx = open_h1(addr, tls.as_ref()).await;
        }
        let Some(sender) = tx.as_mut() else {
            // Refused: count it, and do not spin.
            count(&t, false);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let ok = send_h1(sender, kind.request(None)).await;
        if !ok {
            tx = None;
        }
        count(&t, ok);
    }
}

/// `streams` concurrent requests of one kind on one HTTP/2 connection
/// (h2c by prior knowledge, or TLS with ALPN h2) until `until`.
async fn h2_loop(
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
    kind: Kind,
    streams: usize,
    until: Instant,
    t: Arc<Tally>,
) {
    while Instant::now() < until {
        let Some(tx) = open_h2(addr, tls.as_ref()).await else {
            count(&t, false);
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let tasks: Vec<_> = (0..streams)
            .map(|_| {
                let (mut tx, t) = (tx.clone(), t.clone());
                let authority = if tls.is_some() {
                    "https://localhost"
                } else {
                    "http://app"
                };
                tokio::spawn(async move {
                    while Instant::now() < until {
                        let ok = tokio::time::timeout(Duration::from_secs(5), async {
                            tx.ready().await.ok()?;
                            let r = tx.send_request(kind.request(Some(authority))).await.ok()?;
                            let ok = r.status().is_success();
                            r.into_body().collect().await.ok()?;
                            Some(ok)
                        })
                        .await;
                        let ok = matches!(ok, Ok(Some(true)));
                        count(&t, ok);
                        if !ok {
                            return;
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Upgrades (a WebSocket-like tunnel) until `until`: each connection
/// asks for one, echoes 100 messages of 64 bytes through it and closes.
async fn upgrade_loop(addr: SocketAddr, until: Instant, t: Arc<Tally>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while Instant::now() < until {
        let ok = tokio::time::timeout(Duration::from_secs(5), async {
            let (mut tx, conn) = hyper::client::conn::http1::handshake::<_, ReqBody>(TokioIo::new(
                connect(addr).await.ok()?,
            ))
            .await
            .ok()?;
            tokio::spawn(conn.with_upgrades());
            let req = Request::builder()
                .uri("/ws")
                .header("host", "app")
                .header("x-user-id", format!("u{}", fastrand::u32(0..5_000)))
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(Empty::new().boxed())
                .ok()?;
            let resp = tx.send_request(req).await.ok()?;
            if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                return Some(false);
            }
            let mut io = TokioIo::new(hyper::upgrade::on(resp).await.ok()?);
            let (msg, mut back) = ([b'w'; 64], [0u8; 64]);
            for _ in 0..100 {
                io.write_all(&msg).await.ok()?;
                io.read_exact(&mut back).await.ok()?;
            }
            Some(back == msg)
        })
        .await;
        count(&t, matches!(ok, Ok(Some(true))));
    }
}

async fn ready(admin: SocketAddr) -> bool {
    let Some(mut tx) = open_h1(admin, None).await else {
        return false;
    };
    let req = Request::get("/readyz")
        .header("host", "admin")
        .body(Empty::new().boxed())
        .expect("request");
    send_h1(&mut tx, req).await
}

/// veer, stopped with SIGTERM when dropped if still running.
struct Proc(Child);

impl Proc {
    fn term(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// One veer with `workers`, carrying every kind of client for `seconds`.
/// Returns what each kind got.
async fn phase(
    veer: &str,
    dir: &Path,
    certs: &Certs,
    workers: u32,
    seconds: u64,
) -> Vec<(&'static str, u64, u64)> {
    let acc = acceptor(certs);
    // The upstreams hold their ports before veer's are picked, so that no
    // upstream takes a port just picked for veer (as happened in CI).
    let (stable, canary) = (upstream("v1", None).await, upstream("v2", None).await);
    let stable_tls = upstream("v1", Some(acc.clone())).await;
    let canary_tls = upstream("v2", Some(acc)).await;
    let path = dir.join(format!("veer-{workers}.toml"));
    let log_path = dir.join(format!("veer-{workers}.log"));
    // Another process may still take a picked port before veer binds it:
    // then veer exits saying so, and is started again on new ports.
    let mut attempt = 0;
    let (mut veer, p) = loop {
        attempt += 1;
        let [proxy, tls, admin] = free_ports();
        let p = Ports {
            proxy,
            tls,
            admin,
            stable,
            canary,
            stable_tls,
            canary_tls,
        };
        std::fs::write(&path, config(dir, &p, workers)).expect("config");
        let log = std::fs::File::create(&log_path).expect("log");
        let mut veer = Proc(
            Command::new(veer)
                .args(["run", "--config"])
                .arg(&path)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn veer"),
        );
        let admin: SocketAddr = ([127, 0, 0, 1], p.admin).into();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut up = true;
        while !ready(admin).await {
            if Instant::now() > deadline || !matches!(veer.0.try_wait(), Ok(None)) {
                up = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if up {
            break (veer, p);
        }
        let said = std::fs::read_to_string(&log_path).unwrap_or_default();
        if attempt < 3 && said.contains("Address already in use") {
            eprintln!("a picked port was taken before veer bound it; again on new ports");
            continue;
        }
        eprintln!("veer did not become ready; see {}", dir.display());
        std::process::exit(1);
    };
    let until = Instant::now() + Duration::from_secs(seconds);
    let plain: SocketAddr = ([127, 0, 0, 1], p.proxy).into();
    let tls: SocketAddr = ([127, 0, 0, 1], p.tls).into();
    let (h1tls, h2tls) = (
        Some(connector(certs, b"http/1.1")),
        Some(connector(certs, b"h2")),
    );
    use Client::{Http1, Http2, Upgrade};
    // (name, connections, what each sends)
    let kinds = [
        ("h1 GET", 4, Http1(plain, None, Kind::Get, false)),
        ("h1 POST 1 KiB", 1, Http1(plain, None, Kind::Post1k, false)),
        ("h1 GET 64 KiB", 1, Http1(plain, None, Kind::Big, false)),
        (
            "h1 chunked upload",
            1,
            Http1(plain, None, Kind::ChunkedUpload, false),
        ),
        ("h1 new connection", 1, Http1(plain, None, Kind::Get, true)),
        (
            "h1 to https upstreams",
            1,
            Http1(plain, None, Kind::Secure, false),
        ),
        ("h1 mirrored", 1, Http1(plain, None, Kind::Shadow, false)),
        ("h1 TLS GET", 1, Http1(tls, h1tls, Kind::Get, false)),
        ("h2c gRPC", 1, Http2(plain, None, Kind::Grpc, 8)),
        ("h2c GET", 1, Http2(plain, None, Kind::Get, 8)),
        ("h2 TLS GET", 1, Http2(tls, h2tls.clone(), Kind::Get, 8)),
        ("h2 TLS gRPC", 1, Http2(tls, h2tls, Kind::Grpc, 4)),
        ("h1 upgrade (tunnel)", 1, Upgrade(plain)),
    ];
    let tallies: Vec<Arc<Tally>> = kinds.iter().map(|_| Arc::default()).collect();
    let mut tasks = Vec::new();
    for ((_, conns, client), t) in kinds.iter().zip(&tallies) {
        for _ in 0..*conns {
            let t = t.clone();
            tasks.push(match client.clone() {
                Http1(addr, c, kind, reconnect) => {
                    tokio::spawn(h1_loop(addr, c, kind, reconnect, until, t))
                }
                Http2(addr, c, kind, streams) => {
                    tokio::spawn(h2_loop(addr, c, kind, streams, until, t))
                }
                Upgrade(addr) => tokio::spawn(upgrade_loop(addr, until, t)),
            });
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    veer.term();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Ok(Some(s)) = veer.0.try_wait() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if !status.is_some_and(|s| s.success()) {
        eprintln!("veer (workers = {workers}) did not exit cleanly on SIGTERM: {status:?}");
        std::process::exit(1);
    }
    kinds
        .iter()
        .zip(&tallies)
        .map(|((name, _, _), t)| {
            (
                *name,
                t.ok.load(Ordering::Relaxed),
                t.other.load(Ordering::Relaxed),
            )
        })
        .collect()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(veer), Some(seconds)) =
        (args.get(1), args.get(2).and_then(|s| s.parse::<u64>().ok()))
    else {
        eprintln!("usage: pgo-train VEER_BINARY SECONDS");
        std::process::exit(2);
    };
    let dir = std::env::temp_dir().join(format!("veer-pgo-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let certs = certs();
    std::fs::write(dir.join("tls.crt"), &certs.leaf_pem).expect("cert");
    std::fs::write(dir.join("tls.key"), &certs.key_pem).expect("key");
    std::fs::write(dir.join("ca.crt"), &certs.ca_pem).expect("ca");
    let mut failed = false;
    println!("| workers | client | 2xx | other |");
    println!("|---|---|---|---|");
    for workers in [1, 0] {
        for (name, ok, other) in phase(veer, &dir, &certs, workers, seconds.div_ceil(2)).await {
            println!("| {workers} | {name} | {ok} | {other} |");
            failed |= ok == 0;
        }
    }
    if failed {
        eprintln!(
            "a kind of client never got a 2xx answer; veer's logs: {}",
            dir.display()
        );
        std::process::exit(1);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
