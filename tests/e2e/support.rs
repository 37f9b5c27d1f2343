//! Test fixtures: programmable upstreams, a veer process, and small clients.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

pub mod etcd;
mod judging;
pub use judging::*;

/// What an upstream does with each request.
pub struct Upstream {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// Status to answer with.
    pub status: AtomicU16,
    /// Delay before answering, in milliseconds.
    pub delay_ms: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// When non-zero, every n-th request gets a 500 (as does every request
    /// for a path under `/fail`).
    pub fail_one_in: AtomicU64,
    /// When non-zero, every n-th request is delayed by `slow_ms` more (as
    /// is every request for a path under `/slow`).
    pub slow_one_in: AtomicU64,
    /// The extra delay of a slow request, in milliseconds.
    pub slow_ms: AtomicU64,
    /// TCP connections accepted.
    pub connections: AtomicU64,
    /// TCP connections open now (accepted, not ended).
    pub open: AtomicU64,
    /// The most `open` has been (since set).
    pub peak_open: AtomicU64,
    /// Headers of the last request.
    pub last_headers: Mutex<HeaderMap>,
    /// Request target of the last request.
    pub last_uri: Mutex<String>,
    /// Request body bytes received.
    pub body_bytes: AtomicU64,
    /// Requests received per `x-user-id`.
    pub keys: Mutex<std::collections::HashMap<String, u64>>,
    /// Per `x-user-id`, when its first request came, in the order of all
    /// upstreams' requests in this process ([`ARRIVALS`]).
    pub first_seen: Mutex<std::collections::HashMap<String, u64>>,
}

/// The order of requests across every upstream of the test process.
static ARRIVALS: AtomicU64 = AtomicU64::new(0);

impl Upstream {
    /// Starts an upstream answering 200 with its name as body and in `x-upstream`.
    pub async fn start(name: &'static str) -> Arc<Upstream> {
        Upstream::start_at(name, "127.0.0.1:0").await
    }

    /// [`Upstream::start`] on `addr` (another loopback address, a port).
    pub async fn start_at(name: &'static str, addr: &str) -> Arc<Upstream> {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let u = Arc::new(Upstream {
            name,
            addr: listener.local_addr().expect("addr"),
            status: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            fail_one_in: AtomicU64::new(0),
            slow_one_in: AtomicU64::new(0),
            slow_ms: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            open: AtomicU64::new(0),
            peak_open: AtomicU64::new(0),
            last_headers: Mutex::new(HeaderMap::new()),
            last_uri: Mutex::new(String::new()),
            body_bytes: AtomicU64::new(0),
            keys: Mutex::new(std::collections::HashMap::new()),
            first_seen: Mutex::new(std::collections::HashMap::new()),
        });
        let me = u.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                me.connections.fetch_add(1, Ordering::SeqCst);
                let open = me.open.fetch_add(1, Ordering::SeqCst) + 1;
                me.peak_open.fetch_max(open, Ordering::SeqCst);
                let me = me.clone();
                tokio::spawn(async move {
                    let served = me.clone();
                    let svc = service_fn(move |req| {
                        let me = served.clone();
                        async move { Ok::<_, Infallible>(me.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                    me.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        u
    }

    /// [`Upstream::start`] on a runtime of its own (two worker threads
    /// shared by every upstream started so, for the whole test process),
    /// not the test's. For tests that compare two upstreams' timing (a
    /// mirrored pair): on the test's runtime the client's task, woken by
    /// stable's answer, ran on the same two workers as the canary's
    /// connection task, and a copy written right after stable's request
    /// often waited behind it (~0.8 ms in a pair's tail, beside other
    /// tests); an identical shadow canary was then reverted by the paired
    /// latency test. A real canary shares no thread with veer's clients.
    pub async fn start_apart(name: &'static str) -> Arc<Upstream> {
        static APART: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        let rt = APART.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("upstreams-apart")
                .enable_all()
                .build()
                .expect("the upstreams' runtime")
        });
        rt.spawn(Upstream::start(name))
            .await
            .expect("an upstream started")
    }

    async fn answer(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
        let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let one_in = self.fail_one_in.load(Ordering::SeqCst);
        *self.last_headers.lock().unwrap() = req.headers().clone();
        *self.last_uri.lock().unwrap() = req.uri().to_string();
        if let Some(k) = req.headers().get("x-user-id").and_then(|v| v.to_str().ok()) {
            let at = ARRIVALS.fetch_add(1, Ordering::SeqCst);
            *self.keys.lock().unwrap().entry(k.to_string()).or_default() += 1;
            self.first_seen
                .lock()
                .unwrap()
                .entry(k.to_string())
                .or_insert(at);
        }
        // Any path under /fail gets a 500, whatever the other settings.
        let path = req.uri().path().to_string();
        let failing_path = path.starts_with("/fail");
        if req.headers().contains_key(http::header::UPGRADE) {
            return websocket_echo(&mut req);
        }
        let slow_one_in = self.slow_one_in.load(Ordering::SeqCst);
        let slow =
            (slow_one_in > 0 && n % slow_one_in == 0) || req.uri().path().starts_with("/slow");
        let delay = self.delay_ms.load(Ordering::SeqCst)
            + if slow {
                self.slow_ms.load(Ordering::SeqCst)
            } else {
                0
            };
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        self.body_bytes
            .fetch_add(body.len() as u64, Ordering::SeqCst);
        // `/bytes/N`: an answer of N zero bytes.
        let sized = path
            .strip_prefix("/bytes/")
            .and_then(|n| n.parse::<usize>().ok());
        let text = if let Some(n) = sized {
            Bytes::from(vec![0u8; n])
        } else if body.is_empty() {
            Bytes::from(self.name)
        } else {
            body
        };
        let status = if (one_in > 0 && n % one_in == 0) || failing_path {
            500
        } else {
            self.status.load(Ordering::SeqCst)
        };
        Response::builder()
            .status(status)
            .header("x-upstream", self.name)
            .body(Full::new(text))
            .unwrap()
    }
}

/// Answers a WebSocket upgrade and echoes every message.
pub fn websocket_echo(req: &mut Request<Incoming>) -> Response<Full<Bytes>> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let key = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| k.as_bytes().to_vec())
        .unwrap_or_default();
    let on = hyper::upgrade::on(req);
    tokio::spawn(async move {
        use futures_util::{SinkExt, StreamExt};
        let Ok(upgraded) = on.await else { return };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-accept", derive_accept_key(&key))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Opens a WebSocket through veer at `addr` and echoes `n` messages.
pub async fn websocket_round_trips(addr: SocketAddr, n: usize) {
    use futures_util::{SinkExt, StreamExt};
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
        .await
        .expect("websocket handshake through veer");
    assert_eq!(resp.status(), 101);
    for i in 0..n {
        let msg = format!("hello {i}");
        ws.send(msg.clone().into()).await.expect("send");
        let back = ws.next().await.expect("an echo").expect("a message");
        assert_eq!(back.into_text().expect("text").as_str(), msg);
    }
    ws.close(None).await.expect("close");
}

/// An address nothing listens on.
pub async fn dead_addr() -> SocketAddr {
    // Bound but never listening, and kept for the rest of the run: a
    // connection is refused, and no other test (or veer) started in
    // parallel can be handed the port by a bind to port 0, as it could
    // once a listener bound and dropped here had freed it.
    static HELD: std::sync::Mutex<Vec<tokio::net::TcpSocket>> = std::sync::Mutex::new(Vec::new());
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("bind");
    let a = s.local_addr().expect("addr");
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(s);
    a
}

/// A running veer process.
pub struct Veer {
    child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub admin: SocketAddr,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Veer {
    /// Writes `config` (with `@STATE@` replaced by a temp dir) and starts veer on it.
    pub async fn start(config: &str) -> Veer {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("veer.toml");
        std::fs::write(&path, fill(config, dir.path())).expect("write config");
        Veer::start_in(dir, path).await
    }

    /// Writes `config` (`@STATE@` filled) into `dir`, which may hold files
    /// it names (certificates, token files), and starts veer on it.
    pub async fn start_in_dir(dir: tempfile::TempDir, config: &str) -> Veer {
        let path = dir.path().join("veer.toml");
        std::fs::write(&path, fill(config, dir.path())).expect("write config");
        Veer::start_in(dir, path).await
    }

    /// Starts veer on `config` with a TLS listener too (`[proxy.tls]` on a
    /// free port, a self-signed certificate for `localhost`).
    pub async fn start_tls(config: &str) -> Veer {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).expect("write cert");
        std::fs::write(dir.path().join("tls.key"), cert.key_pair.serialize_pem())
            .expect("write key");
        let config = with_tls(config, "cert = \"tls.crt\"\nkey = \"tls.key\"\n");
        Veer::start_in_dir(dir, &config).await
    }

    /// Starts veer on `config` with `hosts` as its `/etc/hosts` (bind-mounted
    /// over it in a mount namespace of veer's own, `unshare -m`: needs
    /// root, as the suite runs), so that test names resolve to the
    /// addresses `hosts` gives them.
    pub async fn start_with_hosts(config: &str, hosts: &str) -> Veer {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("veer.toml");
        std::fs::write(&path, fill(config, dir.path())).expect("write config");
        let hosts_file = dir.path().join("hosts");
        std::fs::write(&hosts_file, hosts).expect("write hosts");
        // `unshare` and `sh` exec in turn: the child's pid is veer's.
        let mut command = Command::new("unshare");
        command
            .args([
                "-m",
                "sh",
                "-c",
                "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
            ])
            .arg(&hosts_file)
            .arg(env!("CARGO_BIN_EXE_veer"));
        Veer::start_command(dir, path, command).await
    }

    /// Starts veer on an existing config file in `dir`.
    pub async fn start_in(dir: tempfile::TempDir, path: PathBuf) -> Veer {
        Veer::start_command(dir, path, Command::new(env!("CARGO_BIN_EXE_veer"))).await
    }

    /// Starts `command` (veer, or what execs it) with `run` on the config
    /// file `path` in `dir`.
    async fn start_command(dir: tempfile::TempDir, path: PathBuf, mut command: Command) -> Veer {
        let mut child = command
            .args(["--log-format", "json", "run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn veer");
        let stderr = child.stderr.take().expect("stderr");
        let logs: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line).unwrap_or(serde_json::Value::String(line));
                sink.lock().unwrap().push(v);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut addr, mut tls_addr, mut admin) = (None, None, None);
        while admin.is_none() || addr.is_none() {
            assert!(
                Instant::now() < deadline,
                "veer did not start: {:?}",
                logs.lock().unwrap()
            );
            if let Ok(Some(status)) = child.try_wait() {
                panic!("veer exited with {status}: {:?}", logs.lock().unwrap());
            }
            for l in logs.lock().unwrap().iter() {
                if l["message"] == "listening" {
                    let a: SocketAddr = l["addr"]
                        .as_str()
                        .unwrap_or_default()
                        .parse()
                        .expect("addr");
                    match l["kind"].as_str() {
                        Some("proxy") => addr = addr.or(Some(a)),
                        Some("tls") => tls_addr = tls_addr.or(Some(a)),
                        Some("admin") => admin = Some(a),
                        _ => {}
                    }
                }
                if l["message"] == "veer ready" && addr.is_none() {
                    // TLS-only config: no plain listener.
                    addr = tls_addr;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let v = Veer {
            child,
            dir,
            config: path,
            addr: addr.expect("addr"),
            tls_addr,
            admin: admin.expect("admin"),
            logs,
        };
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(r) = get(v.admin, "/readyz", &[]).await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(Instant::now() < until, "never ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        v
    }

    /// Replaces the config file the way editors do (write elsewhere, rename).
    pub fn write_config(&self, config: &str) {
        let tmp = self.dir.path().join(".veer.toml.tmp");
        std::fs::write(&tmp, fill(config, self.dir.path())).expect("write");
        std::fs::rename(&tmp, &self.config).expect("rename");
    }

    /// `/status` as JSON.
    /// `/status`, read through its type (so a document that does not
    /// parse back fails the test), as JSON for indexing.
    pub async fn status(&self) -> serde_json::Value {
        serde_json::to_value(self.status_doc().await).expect("json")
    }

    /// `/status` as `veer status` reads it.
    pub async fn status_doc(&self) -> veer_control::status::StatusDoc {
        let r = get(self.admin, "/status", &[]).await.expect("status");
        serde_json::from_slice(r.body()).expect("a /status document")
    }

    /// Waits until the config generation reaches `g` (panics after 20 s:
    /// a reload takes well under a second, but this is a readiness wait on
    /// a machine that may be loaded, not a timing claim).
    pub async fn wait_generation(&self, g: u64) -> Duration {
        let start = Instant::now();
        loop {
            if self.status().await["config"]["generation"].as_u64() >= Some(g) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "generation {g} never reached:\n{}",
                self.all_logs()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// `/metrics` text.
    pub async fn metrics(&self) -> String {
        let r = get(self.admin, "/metrics", &[]).await.expect("metrics");
        String::from_utf8(r.body().to_vec()).expect("utf8")
    }

    /// Log lines whose message is `msg`.
    pub fn logs_with(&self, msg: &str) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l["message"] == msg)
            .cloned()
            .collect()
    }

    /// The log lines with message `msg` once at least `n` have come, or
    /// those so far after 10 s: a line reaches the test a little after
    /// what it reports (veer writes its log from a thread of its own, and
    /// the test reads it on another).
    pub async fn logs_with_at_least(&self, msg: &str, n: usize) -> Vec<serde_json::Value> {
        let start = Instant::now();
        loop {
            let lines = self.logs_with(msg);
            if lines.len() >= n || start.elapsed() > Duration::from_secs(10) {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every log line once one contains `text` (or after 10 s).
    pub async fn logs_containing(&self, text: &str) -> String {
        let start = Instant::now();
        loop {
            let all = self.all_logs();
            if all.contains(text) || start.elapsed() > Duration::from_secs(10) {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every log line so far, one per line (for failure messages).
    pub fn all_logs(&self) -> String {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -TERM failed");
    }

    /// Waits for the process to exit (at most `limit`).
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(start.elapsed() < limit, "veer did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Veer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `config` with a TLS listener on a free port, `keys` (lines) the rest of
/// its `[proxy.tls]` table and any `[[proxy.tls.certificates]]`.
pub fn with_tls(config: &str, keys: &str) -> String {
    let tls = format!("[proxy.tls]\nlisten = [\"127.0.0.1:0\"]\n{keys}");
    config.replacen("[admin]\n", &format!("{tls}[admin]\n"), 1)
}

fn fill(config: &str, dir: &Path) -> String {
    config.replace("@STATE@", &dir.join("state").display().to_string())
}

/// A config with one default route; `stable`/`canary` are endpoint lists.
pub fn route_config(
    stable: &[SocketAddr],
    canary: &[SocketAddr],
    weight: f64,
    extra_route: &str,
) -> String {
    let list = |a: &[SocketAddr]| {
        a.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let canary = if canary.is_empty() {
        String::new()
    } else {
        format!(
            "[route.canary]\nversion = \"v2\"\nendpoints = [{}]\nweight = {weight}\n",
            list(canary)
        )
    };
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
sticky = ["header:x-user-id", "client-ip"]
{extra_route}
[route.stable]
version = "v1"
endpoints = [{stable}]
{canary}"#,
        stable = list(stable)
    )
}

/// A keep-alive HTTP/1.1 client connection.
pub struct Client {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        Client::handshake(addr, TcpStream::connect(addr).await?).await
    }

    /// A connection from `source` (any address of 127.0.0.0/8 on loopback).
    pub async fn connect_from(
        addr: SocketAddr,
        source: std::net::IpAddr,
    ) -> std::io::Result<Client> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        Client::handshake(addr, socket.connect(addr).await?).await
    }

    async fn handshake(addr: SocketAddr, stream: TcpStream) -> std::io::Result<Client> {
        stream.set_nodelay(true)?;
        // Answers of up to 1 000 fields are read (hyper's default is 100):
        // what veer passes on is veer's limit to test, not the client's.
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_headers(1000)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client { sender, addr })
    }

    /// Whether veer closed the connection (as far as this side has seen).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// GET `path` with extra headers; the whole body is read.
    pub async fn get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Response<Bytes>, hyper::Error> {
        self.send(Method::GET, path, headers, Bytes::new()).await
    }

    /// A request with a body; the whole answer is read.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Response<Bytes>, hyper::Error> {
        let mut req = Request::builder().method(method).uri(path);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req = req.header("host", self.addr.to_string());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.sender.ready().await?;
        let resp = self
            .sender
            .send_request(req.body(Full::new(body)).unwrap())
            .await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Response::from_parts(parts, body))
    }

    /// A GET's trailers (the answer's body read whole).
    pub async fn send_for_trailers(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<HeaderMap, hyper::Error> {
        let mut req = Request::get(path).header("host", self.addr.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.sender.ready().await?;
        let resp = self
            .sender
            .send_request(req.body(Full::new(Bytes::new())).unwrap())
            .await?;
        let collected = resp.into_body().collect().await?;
        Ok(collected.trailers().cloned().unwrap_or_default())
    }
}

/// An HTTP/2 connection to `addr` with prior knowledge (h2c), driven by a
/// task of its own.
pub async fn h2c<B>(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// One GET on a fresh connection.
pub async fn get(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Response<Bytes>, Box<dyn std::error::Error + Send + Sync>> {
    let mut c = Client::connect(addr).await?;
    Ok(c.get(path, headers).await?)
}

/// Which upstream answered each user key, over `conns` parallel connections.
pub async fn upstream_of_keys(
    addr: SocketAddr,
    keys: &[String],
    conns: usize,
) -> HashMap<String, String> {
    let chunks: Vec<Vec<String>> = keys
        .chunks(keys.len().div_ceil(conns))
        .map(<[String]>::to_vec)
        .collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await.expect("connect");
            let mut out = Vec::with_capacity(chunk.len());
            for k in chunk {
                let r = c.get("/", &[("x-user-id", &k)]).await.expect("request");
                assert_eq!(r.status(), 200, "key {k}");
                let up = r.headers()["x-upstream"].to_str().unwrap().to_string();
                out.push((k, up));
            }
            out
        }));
    }
    let mut map = HashMap::new();
    for t in tasks {
        map.extend(t.await.expect("task"));
    }
    map
}

/// Polls `ready` every 20 ms until it holds; panics after `limit`, saying
/// what never came and what `ready` last saw.
pub async fn wait_until<T: std::fmt::Debug>(
    what: &str,
    limit: Duration,
    mut seen: impl FnMut() -> T,
    ready: impl Fn(&T) -> bool,
) {
    let start = Instant::now();
    loop {
        let now = seen();
        if ready(&now) {
            return;
        }
        assert!(start.elapsed() < limit, "never {what}: {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `/metrics` until the series `name_and_labels` satisfies `ready`
/// (panics after 30 s, saying `what` never came).
pub async fn wait_metric(
    veer: &Veer,
    name_and_labels: &str,
    what: &str,
    ready: impl Fn(f64) -> bool,
) {
    let start = Instant::now();
    loop {
        let value = metric(&veer.metrics().await, name_and_labels);
        if value.is_some_and(&ready) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never {what}: {name_and_labels} is {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Value of a metric sample line `name{labels} value` (labels as written by veer).
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// POSTs an admin action with the token veer generated in its state dir;
/// returns the status code.
pub async fn admin_post(veer: &Veer, path: &str) -> u16 {
    let token = std::fs::read_to_string(veer.dir.path().join("state/admin.token"))
        .expect("generated admin token");
    admin_request(veer.admin, "POST", path, Some(token.trim())).await
}

/// An admin request with an optional bearer token; returns the status code.
pub async fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> u16 {
    admin_request_with(admin, method, path, token, "").await
}

/// An admin request with an optional bearer token and `body`; returns the
/// status code.
pub async fn admin_request_with(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> u16 {
    let stream = TcpStream::connect(admin).await.expect("connect admin");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    sender
        .send_request(req)
        .await
        .expect("admin answer")
        .status()
        .as_u16()
}

/// Waits (at most 10 s) until none of `veer`'s connections to `endpoint`
/// (of route `web`, version `v1`) is busy: the last answer's connection
/// back in its pool, or closed.
pub async fn wait_endpoint_not_busy(veer: &Veer, endpoint: SocketAddr) {
    let busy = format!(
        "veer_upstream_connections{{endpoint=\"{endpoint}\",route=\"web\",state=\"busy\",version=\"v1\"}}"
    );
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let m = veer.metrics().await;
        if metric(&m, &busy).unwrap_or(0.0) == 0.0 {
            return;
        }
        assert!(Instant::now() < until, "still busy:\n{m}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes `text` to `path` with Unix permissions `mode` (token files).
pub fn write_with_mode(path: &Path, text: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Makes `veer`'s state dir stop answering: a FIFO where the state file's
/// temporary goes, so that a write opens it and waits there (until its
/// 5 s bound), as on a file system that does not answer. Returns its path.
pub fn stuck_state_dir(veer: &Veer) -> PathBuf {
    let fifo = veer.dir.path().join("state/.state.json.tmp");
    mkfifo(&fifo);
    fifo
}

/// Makes a FIFO at `path` (opening it waits for the other end: a file
/// system that does not answer, for veer's reads and writes).
pub fn mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(made.success());
}

/// The state dir answers again: the FIFO of [`stuck_state_dir`] opened
/// for reading (which lets the stuck write's open return), removed, and
/// drained (that write fails: a FIFO cannot be synced). Panics unless the
/// stuck write came within 30 s and wrote something.
pub async fn unstick_state_dir(fifo: PathBuf) {
    let drained = tokio::task::spawn_blocking(move || {
        let mut reader = std::fs::File::open(&fifo)?;
        std::fs::remove_file(&fifo)?;
        let mut sink = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut sink).map(|_| sink.len())
    });
    let bytes = tokio::time::timeout(Duration::from_secs(30), drained)
        .await
        .expect("the stuck write never came")
        .expect("join")
        .expect("drain");
    assert!(bytes > 0);
}

/// Reads from `stream` until a whole request head came; false if the
/// connection ended first.
pub async fn read_head(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// An upstream that sends a good head, part of the body, and hangs up.
pub async fn truncating_upstream() -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if !read_head(&mut stream).await {
                    return;
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nx-upstream: canary\r\ncontent-length: 1000\r\n\r\npartial")
                    .await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// What a [`scripted_upstream`] sends for a request: bytes, and whether to
/// close the connection after them; `None` closes it unanswered.
pub type Answer = Option<(&'static [u8], bool)>;

/// A plain HTTP/1.1 upstream written byte by byte, for framings hyper's
/// server would never send: `answer` gets each request line and how many
/// requests came before it on its connection. Keeps the request lines;
/// counts the connections it accepted.
pub async fn scripted_upstream(
    answer: impl Fn(&str, usize) -> Answer + Send + Sync + 'static,
) -> (SocketAddr, Arc<Mutex<Vec<String>>>, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let accepted = Arc::new(AtomicU64::new(0));
    let (seen, a) = (lines.clone(), accepted.clone());
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            let (seen, answer) = (seen.clone(), answer.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let mut before = 0;
                loop {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        let head = String::from_utf8_lossy(&head).to_string();
                        let line = head.lines().next().unwrap_or("").to_string();
                        seen.lock().unwrap().push(line.clone());
                        let Some((bytes, close)) = answer(&line, before) else {
                            return;
                        };
                        before += 1;
                        if s.write_all(bytes).await.is_err() || close {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, lines, accepted)
}

/// Runs the `veer` binary with `args` to its end.
pub fn veer_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_veer"))
        .args(args)
        .output()
        .expect("run veer")
}
