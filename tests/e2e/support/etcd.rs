//! A real etcd (Debian's `etcd-server`) on free loopback ports with a
//! temporary data dir: one node, or a cluster of three; plain or TLS.
//! Processes are killed on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use super::*;

/// One etcd member.
pub struct EtcdMember {
    pub name: String,
    pub client: SocketAddr,
    args: Vec<String>,
    child: Option<Child>,
    logs: Arc<Mutex<Vec<String>>>,
}

/// TLS material for an etcd with client certificates required.
pub struct EtcdTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// An etcd node or cluster.
pub struct Etcd {
    pub members: Vec<EtcdMember>,
    pub tls: bool,
    _dir: tempfile::TempDir,
}

fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// The etcd binary, with a clear message when it is missing.
fn etcd_bin() {
    let ok = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the fleet tests need a real etcd: install Debian's etcd-server (.ci/run does)"
    );
}

impl Etcd {
    /// One node, plain HTTP.
    pub async fn single() -> Etcd {
        Etcd::start(1, None).await
    }

    /// Three members, plain HTTP.
    pub async fn cluster() -> Etcd {
        Etcd::start(3, None).await
    }

    /// One node serving TLS with client certificates required.
    pub async fn with_tls(tls: &EtcdTls) -> Etcd {
        Etcd::start(1, Some(tls)).await
    }

    /// Starts `n` members on free ports, again on other ports when one of
    /// them lost its port to another process between the pick and etcd's
    /// bind (a free port is only free when it is picked).
    async fn start(n: usize, tls: Option<&EtcdTls>) -> Etcd {
        etcd_bin();
        for _ in 0..4 {
            if let Some(etcd) = Etcd::try_start(n, tls).await {
                return etcd;
            }
        }
        panic!("etcd lost its ports four times in a row");
    }

    async fn try_start(n: usize, tls: Option<&EtcdTls>) -> Option<Etcd> {
        let dir = tempfile::tempdir().expect("tempdir");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let addrs: Vec<(SocketAddr, SocketAddr)> =
            (0..n).map(|_| (free_addr(), free_addr())).collect();
        let cluster = addrs
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (c, p)) in addrs.iter().enumerate() {
            let mut args: Vec<String> = vec![
                format!("--name=m{i}"),
                format!("--data-dir={}", dir.path().join(format!("m{i}")).display()),
                format!("--listen-client-urls={scheme}://{c}"),
                format!("--advertise-client-urls={scheme}://{c}"),
                format!("--listen-peer-urls=http://{p}"),
                format!("--initial-advertise-peer-urls=http://{p}"),
                format!("--initial-cluster={cluster}"),
                "--initial-cluster-state=new".into(),
                "--initial-cluster-token=veer-test".into(),
                "--logger=zap".into(),
                "--log-outputs=stderr".into(),
                // Fast elections: a killed leader is replaced in well under
                // a second.
                "--heartbeat-interval=50".into(),
                "--election-timeout=500".into(),
            ];
            if let Some(t) = tls {
                args.extend([
                    format!("--cert-file={}", t.server_cert.display()),
                    format!("--key-file={}", t.server_key.display()),
                    format!("--trusted-ca-file={}", t.ca.display()),
                    "--client-cert-auth".into(),
                ]);
            }
            members.push(EtcdMember {
                name: format!("m{i}"),
                client: *c,
                args,
                child: None,
                logs: Arc::default(),
            });
        }
        for m in &mut members {
            m.spawn();
        }
        for i in 0..members.len() {
            if !members[i].wait_serving().await {
                eprintln!(
                    "etcd {} lost a port; starting again elsewhere",
                    members[i].name
                );
                for m in &mut members {
                    m.kill();
                }
                return None;
            }
        }
        Some(Etcd {
            members,
            tls: tls.is_some(),
            _dir: dir,
        })
    }

    /// The client URLs, for `[fleet] endpoints`.
    pub fn endpoints(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        self.members
            .iter()
            .map(|m| format!("\"{scheme}://{}\"", m.client))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The member that is the cluster's leader (plain HTTP clusters).
    pub async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            for (i, m) in self.members.iter().enumerate() {
                if m.child.is_none() {
                    continue;
                }
                if let Some(v) = post_json(m.client, "/v3/maintenance/status", "{}").await {
                    let me = v["header"]["member_id"].as_str().map(str::to_string);
                    if me.is_some() && v["leader"].as_str().map(str::to_string) == me {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no etcd leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Etcd {
    /// The value of `key` (`None`: absent), read through the first
    /// member's JSON gateway (not over TLS).
    pub async fn value(&self, key: &str) -> Option<Vec<u8>> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = format!("{{\"key\": \"{}\"}}", b64.encode(key));
        let answer = post_json(self.members[0].client, "/v3/kv/range", &body)
            .await
            .expect("etcd range");
        let kv = answer["kvs"].as_array()?.first()?.clone();
        Some(
            b64.decode(kv["value"].as_str().expect("a value"))
                .expect("base64"),
        )
    }

    /// Compacts the history up to the current revision (a watch resuming
    /// from before it is told its revision was compacted).
    pub async fn compact(&self) {
        let m = &self.members[0];
        let st = post_json(m.client, "/v3/maintenance/status", "{}")
            .await
            .expect("etcd status");
        let rev = st["header"]["revision"]
            .as_str()
            .expect("revision")
            .to_string();
        let body = format!("{{\"revision\": \"{rev}\", \"physical\": true}}");
        let answer = post_json(m.client, "/v3/kv/compaction", &body)
            .await
            .expect("compaction");
        assert!(
            answer.get("error").is_none(),
            "compaction at {rev}: {answer}"
        );
        eprintln!("etcd compacted at revision {rev}");
    }
}

impl EtcdMember {
    fn spawn(&mut self) {
        let mut child = Command::new("etcd")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn etcd");
        let stderr = child.stderr.take().expect("stderr");
        let sink = self.logs.clone();
        sink.lock().unwrap().clear();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        self.child = Some(child);
    }

    /// Waits until it serves; false if it could not bind its ports.
    async fn wait_serving(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            {
                let logs = self.logs.lock().unwrap();
                if logs.iter().any(|l| l.contains("serving client traffic")) {
                    return true;
                }
                if logs.iter().any(|l| l.contains("address already in use")) {
                    return false;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd {} never served: {:?}",
                self.name,
                self.logs.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the member (SIGKILL), keeping its data dir.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        // A restarted member must not try to bootstrap again.
        for a in &mut self.args {
            if a == "--initial-cluster-state=new" {
                *a = "--initial-cluster-state=existing".into();
            }
        }
        self.spawn();
        assert!(
            self.wait_serving().await,
            "etcd {} could not bind its ports again: {:?}",
            self.name,
            self.logs.lock().unwrap()
        );
    }
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        self.kill();
    }
}

/// POSTs `body` to etcd's JSON gateway; the answer, if any.
pub async fn post_json(addr: SocketAddr, path: &str, body: &str) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: etcd\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split("\r\n\r\n").nth(1)?;
    serde_json::from_str(body.trim()).ok()
}

/// A test CA with a server certificate for 127.0.0.1 and a client
/// certificate, written to `dir`.
pub fn etcd_tls(dir: &Path) -> EtcdTls {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "veer test etcd CA");
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let leaf = |name: &str, ip: bool| {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(vec![name.to_string()]).expect("params");
        if ip {
            p.subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        }
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let cert = p.signed_by(&key, &ca_cert, &ca_key).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf("localhost", true);
    let (client_cert, client_key) = leaf("veer", false);
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    };
    EtcdTls {
        ca: write("ca.pem", &ca_cert.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server-key.pem", &server_key),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client-key.pem", &client_key),
    }
}
