//! Helpers for judge tests: keyed load, waiting for a verdict or a
//! route state, and the reference judge settings.

use super::*;

/// Keeps sending keyed requests until dropped (bounded to 120 s).
pub struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: std::net::SocketAddr, conns: usize, pause: Duration) -> Load {
        Load::run(addr, conns, pause, None)
    }

    /// As [`Load::start`], with clients that wait at most `patience` for
    /// an answer's head and then leave (close the connection), as users
    /// and callers with their own timeouts do; a connection a request.
    pub fn impatient(addr: std::net::SocketAddr, conns: usize, patience: Duration) -> Load {
        Load::run(addr, conns, Duration::ZERO, Some(patience))
    }

    fn run(
        addr: std::net::SocketAddr,
        conns: usize,
        pause: Duration,
        patience: Option<Duration>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let tasks = (0..conns)
            .map(|w| {
                let (stop, sent) = (stop.clone(), sent.clone());
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let mut kept = None;
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        i += 1;
                        let key = format!("user-{w}-{}", i % 500);
                        match patience {
                            Some(p) => impatient_get(addr, &key, p).await,
                            None => {
                                let c = match &mut kept {
                                    Some(c) => c,
                                    None => kept.insert(Client::connect(addr).await.unwrap()),
                                };
                                if c.get("/", &[("x-user-id", &key)]).await.is_err() {
                                    kept = None;
                                }
                            }
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        Load { stop, sent, tasks }
    }

    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.sent.load(Ordering::Relaxed)
    }
}

/// A keyed GET on a fresh connection, closed once its answer's head came
/// or `patience` passed.
async fn impatient_get(addr: std::net::SocketAddr, key: &str, patience: Duration) {
    use tokio::io::AsyncWriteExt;
    let head = format!("GET / HTTP/1.1\r\nhost: app\r\nx-user-id: {key}\r\n\r\n");
    if let Ok(mut s) = TcpStream::connect(addr).await {
        if s.write_all(head.as_bytes()).await.is_ok() {
            let _ = tokio::time::timeout(patience, read_head(&mut s)).await;
        }
    }
}

pub async fn wait_verdict(veer: &Veer, want: &str, limit: Duration) -> serde_json::Value {
    wait_route(veer, &format!("verdict {want}"), limit, |r| {
        r["verdict"] == want
    })
    .await
}

/// Polls the first route's `/status` entry until `ready` holds of it, and
/// returns it (panics, naming `what`, after `limit`).
pub async fn wait_route(
    veer: &Veer,
    what: &str,
    limit: Duration,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let route = veer.status().await["routes"][0].clone();
        if ready(&route) {
            return route;
        }
        assert!(start.elapsed() < limit, "never {what}: {route}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Judge settings for the e2e tests: a short interval and window, so that
/// verdicts come in well under a second.
pub const FAST_JUDGE: &str =
    "[route.judge]\ninterval = \"200ms\"\nwindow = \"10s\"\nmin_requests = 20\n";

/// Sends `n` requests, one per user key, one after another.
pub async fn send_keyed(addr: std::net::SocketAddr, n: usize) {
    let mut client = Client::connect(addr).await.unwrap();
    for i in 0..n {
        client
            .get("/", &[("x-user-id", &format!("u{i}"))])
            .await
            .unwrap();
    }
}

pub async fn all_on(veer: &Veer, name: &str, keys: usize) {
    let mut c = Client::connect(veer.addr).await.unwrap();
    for i in 0..keys {
        let r = c
            .get("/", &[("x-user-id", &format!("check-{i}"))])
            .await
            .unwrap();
        assert_eq!(r.headers()["x-upstream"], name, "key check-{i}");
    }
}

/// The `[route.judge]` section of `config.example.toml`, as users run it
/// (read from the file, so the tests cannot drift from it).
pub fn reference_judge() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.example.toml");
    let text = std::fs::read_to_string(&path).expect("config.example.toml");
    let start = text.find("[route.judge]").expect("a [route.judge] section");
    let section: Vec<&str> = text[start..]
        .lines()
        .enumerate()
        .take_while(|(i, l)| *i == 0 || !(l.starts_with('[') || l.starts_with("# [")))
        .map(|(_, l)| l)
        .collect();
    section.join("\n") + "\n"
}

/// A canary that never answers (its upstream waits 60 s) at 20 % beside a
/// healthy stable, on a route that waits 15 s for an answer, judged by
/// `judge` (a `[route.judge]` section); the upstreams live as long as the
/// pair does.
pub struct HangingCanary {
    pub veer: Veer,
    _upstreams: [Arc<Upstream>; 2],
}

impl HangingCanary {
    pub async fn start(judge: &str) -> HangingCanary {
        let s = Upstream::start("stable").await;
        let c = Upstream::start("canary").await;
        c.delay_ms.store(60_000, Ordering::SeqCst);
        let config = route_config(&[s.addr], &[c.addr], 20.0, "timeout = \"15s\"\n") + judge;
        let veer = Veer::start(&config).await;
        HangingCanary {
            veer,
            _upstreams: [s, c],
        }
    }
}

/// What `veer status` prints for `veer`.
pub async fn veer_status_table(veer: &Veer) -> String {
    let admin = veer.admin.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_veer"))
            .args(["status", "--admin", &admin])
            .output()
            .expect("veer status")
    })
    .await
    .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
