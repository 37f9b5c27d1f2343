//! Client-facing listeners: accept, TLS, HTTP/1.1 + HTTP/2, limits, and
//! graceful shutdown.
//!
//! Every connection holds a permit of one semaphore sized `max_connections`;
//! when none is free, veer stops accepting (new clients wait in the kernel
//! backlog) instead of failing. On shutdown the accept loops stop, every
//! connection is asked to finish its in-flight requests and close, and the
//! caller waits for all permits to come back, at most the grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use veer_control::config::ProxySettings;

use crate::headers::Scheme;
use crate::service::handle;
use crate::shared::Shared;

/// Connection-level settings fixed at start.
#[derive(Clone)]
pub struct Limits {
    /// See [`ProxySettings::max_header_bytes`].
    pub max_header_bytes: usize,
    /// See [`ProxySettings::idle_timeout`].
    pub idle_timeout: Duration,
}

impl Limits {
    /// From the proxy settings.
    pub fn from_settings(p: &ProxySettings) -> Limits {
        Limits {
            max_header_bytes: p.max_header_bytes,
            idle_timeout: p.idle_timeout,
        }
    }
}

/// Accepts connections on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.idle_timeout / 2))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_header_list_size(limits.max_header_bytes as u32);
    let builder = Arc::new(builder);
    let scheme = if tls.is_some() {
        Scheme::Https
    } else {
        Scheme::Http
    };
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let idle = limits.idle_timeout;
        tokio::spawn(async move {
            shared.metrics.open_connections.inc();
            match tls {
                None => connection(stream, peer, shared.clone(), &builder, scheme, shutdown).await,
                Some(acceptor) => match tokio::time::timeout(idle, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        connection(s, peer, shared.clone(), &builder, scheme, shutdown).await
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                },
            }
            shared.metrics.open_connections.dec();
            drop(permit);
        });
    }
}

async fn connection<S>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    builder: &auto::Builder<TokioExecutor>,
    scheme: Scheme,
    mut shutdown: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(shared.clone(), req, peer, scheme));
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
        }
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Binds every address, or none: a failure names the address.
pub fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, (SocketAddr, std::io::Error)> {
    let mut out = Vec::with_capacity(addrs.len());
    for a in addrs {
        let l = bind(*a).map_err(|e| (*a, e))?;
        out.push(l);
    }
    Ok(out)
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}
