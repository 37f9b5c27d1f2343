//! Confirmation gates (`[route.rollout] confirm`): a rollout step waits for
//! a 2xx from the gate; a breach never waits.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::support::{
    route_config, veer_status_table, wait_route, wait_verdict, Load, Upstream, Veer, FAST_JUDGE,
};

/// A gate answering `status` to every POST, keeping their JSON bodies.
struct Gate {
    addr: std::net::SocketAddr,
    status: Arc<AtomicU16>,
    asked: Arc<Mutex<Vec<serde_json::Value>>>,
}

async fn gate(status: u16) -> Gate {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let status = Arc::new(AtomicU16::new(status));
    let asked: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let (st, sink) = (status.clone(), asked.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (st, sink) = (st.clone(), sink.clone());
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (st, sink) = (st.clone(), sink.clone());
                        async move {
                            let body = http_body_util::BodyExt::collect(req.into_body())
                                .await
                                .unwrap()
                                .to_bytes();
                            sink.lock()
                                .unwrap()
                                .push(serde_json::from_slice(&body).unwrap_or_default());
                            let mut resp =
                                http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                            *resp.status_mut() =
                                http::StatusCode::from_u16(st.load(Ordering::SeqCst)).unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Gate {
        addr,
        status,
        asked,
    }
}

fn config(s: &Upstream, c: &Upstream, gate: &Gate) -> String {
    route_config(&[s.addr], &[c.addr], 10.0, "")
        + FAST_JUDGE
        + &format!(
            "[route.rollout]\nsteps = [10, 50]\nhold = \"1s\"\nconfirm = \"http://{}/confirm\"\n",
            gate.addr
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_gate_holds_the_step_and_a_yes_takes_it() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let g = gate(403).await;
    let veer = Veer::start(&config(&s, &c, &g)).await;
    let load = Load::start(veer.addr, 2, Duration::from_millis(2));
    let route = wait_route(
        &veer,
        "waiting for confirmation",
        Duration::from_secs(20),
        |r| {
            r["rollout"]["waiting_confirmation"] == true
                && r["rollout"]["confirmation"] == "HTTP 403"
        },
    )
    .await;
    assert_eq!(route["rollout"]["step"], 0, "{route}");
    // Asked again (about once per judge interval while the verdict is
    // healthy), and still held. The whole suite beside two busy loops once
    // took more than 10 s for two more asks (2026-12-05): a step is due
    // only after `hold` of healthy verdicts, which a starved load
    // generator can interrupt; so up to 30 s, and the route's state if not.
    let t = Instant::now();
    while g.asked.lock().unwrap().len() < 3 {
        if t.elapsed() > Duration::from_secs(30) {
            let route = veer.status().await["routes"][0].clone();
            panic!("the gate was not asked again: {route}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let route = veer.status().await["routes"][0].clone();
    assert_eq!(route["rollout"]["step"], 0, "{route}");
    assert_eq!(route["weight"]["effective"], 10.0, "{route}");
    let first = g.asked.lock().unwrap()[0].clone();
    assert_eq!(first["event"], "confirm_step", "{first}");
    assert_eq!(
        (first["from_step"].as_u64(), first["to_step"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(first["to_weight"], 50.0, "{first}");
    assert_eq!(first["promotion"], false, "{first}");
    assert_eq!(
        first["status"]["name"], "web",
        "the route's evidence goes along: {first}"
    );
    let table = veer_status_table(&veer).await;
    assert!(
        table.contains("waiting for confirmation (last answer: HTTP 403)"),
        "{table}"
    );

    g.status.store(200, Ordering::SeqCst);
    let route = wait_route(&veer, "stepped", Duration::from_secs(10), |r| {
        r["rollout"]["step"] == 1
    })
    .await;
    assert_eq!(route["weight"]["effective"], 50.0, "{route}");
    assert_eq!(route["rollout"]["waiting_confirmation"], false, "{route}");
    load.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breach_reverts_while_the_gate_holds() {
    let s = Upstream::start("stable").await;
    let c = Upstream::start("canary").await;
    let g = gate(403).await;
    let veer = Veer::start(&config(&s, &c, &g)).await;
    let load = Load::start(veer.addr, 2, Duration::from_millis(2));
    wait_route(
        &veer,
        "waiting for confirmation",
        Duration::from_secs(20),
        |r| r["rollout"]["waiting_confirmation"] == true,
    )
    .await;
    c.status.store(500, Ordering::SeqCst);
    let route = wait_verdict(&veer, "reverted", Duration::from_secs(15)).await;
    assert_eq!(route["weight"]["effective"], 0.0, "{route}");
    load.stop().await;
    // A reverted canary's rollout is not asked about any more.
    let asked = g.asked.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(g.asked.lock().unwrap().len(), asked);
}
