//! A minimal HTTP/1.1 client over one keep-alive connection, for the
//! `status`, action and `demo` commands (not the proxy's upstream path).

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a client request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The address.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("request: {0}")]
    Request(#[from] http::Error),
}

/// One keep-alive connection.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Conn {
    /// Connects to `addr` (`host:port`).
    pub async fn open(addr: &str) -> Result<Conn, ClientError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender })
    }

    /// Sends a GET and reads the whole response.
    pub async fn get(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<Response<Bytes>, ClientError> {
        self.send(http::Method::GET, host, path, headers, Bytes::new())
            .await
    }

    /// Sends a request with `body` and reads the whole response.
    pub async fn send(
        &mut self,
        method: http::Method,
        host: &str,
        path: &str,
        headers: &[(&'static str, &str)],
        body: Bytes,
    ) -> Result<Response<Bytes>, ClientError> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.sender.ready().await?;
        let resp = self.sender.send_request(req.body(Full::new(body))?).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}

/// One GET on a new connection.
pub async fn get(addr: &str, path: &str) -> Result<Response<Bytes>, ClientError> {
    Conn::open(addr).await?.get(addr, path, &[]).await
}
