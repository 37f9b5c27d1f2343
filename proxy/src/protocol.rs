//! A client connection served by hyper as HTTP/1.1 (with upgrades) or as
//! HTTP/2 with prior knowledge, told apart by its first bytes (the HTTP/2
//! connection preface, RFC 9113 §3.4), as hyper-util's `auto` builder
//! does.
//!
//! veer does it itself for one setting `auto` does not pass on: hyper's
//! HTTP/1.1 `max_header_size`. With it the request head is capped at
//! `max_header_bytes` (a larger one gets 431) while the read buffer may
//! grow past it, up to [`BODY_READ`]: a request body then comes in reads
//! of up to 32 KiB instead of `max_header_bytes` (16 KiB in the example
//! config). Each read's bytes are a frame that veer writes upstream, and
//! each write wakes the upstream (benches/RESULTS.md, session 31).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::HttpService;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::BoxError;

/// The HTTP/2 connection preface: a client that starts with it speaks
/// HTTP/2 with prior knowledge; any other first bytes are HTTP/1.1.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The largest read of a client's HTTP/1.1 connection (hyper's
/// `max_buf_size`; `max_header_bytes` if larger). hyper starts at 8 KiB and
/// doubles a read's size only while reads fill it, so a connection that
/// carries no large body keeps 8 KiB reads; one that does keeps a buffer of
/// up to this size while it lives.
///
/// 32 KiB, not more: hyper's limit on what it queues for writing to the
/// client is the same setting, and with 32 KiB an answer still streams
/// holding one 32 KiB chunk queued and one being read, as README says;
/// 64 KiB reads served 64 KiB uploads no faster on this machine.
pub const BODY_READ: usize = 32 * 1024;

/// How veer's client connections are served: hyper's HTTP/1.1 and HTTP/2
/// settings.
#[derive(Clone)]
pub struct Builders {
    /// HTTP/1.1 connections.
    pub h1: http1::Builder,
    /// HTTP/2 connections (prior knowledge, or a TLS client that sent the
    /// preface after negotiating `h2`).
    pub h2: http2::Builder<TokioExecutor>,
}

/// The stream hyper reads: the client's, with the bytes read to tell its
/// protocol given back first.
pub type Io<S> = TokioIo<Replay<S>>;

/// A stream whose first bytes were read already: they are read again
/// before the stream's own.
pub struct Replay<S> {
    first: [u8; 24],
    /// `first[at..len]` is still to be read.
    at: usize,
    len: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.len {
            let n = (this.len - this.at).min(buf.remaining());
            if let Some(b) = this.first.get(this.at..this.at + n) {
                buf.put_slice(b);
            }
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// One client connection being served (a future: poll it to the end).
    pub struct Served<'a, S, Svc>
    where
        Svc: HttpService<Incoming>,
    {
        #[pin]
        state: State<'a, S, Svc>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<'a, S, Svc>
    where
        Svc: HttpService<Incoming>,
    {
        // Reading the first bytes (up to the preface's length);
        // `cancelled`: shut down before the protocol was known.
        Hello {
            stream: Option<S>,
            first: [u8; 24],
            len: usize,
            service: Option<Svc>,
            builders: &'a Builders,
            cancelled: bool,
        },
        H1 {
            #[pin]
            conn: http1::UpgradeableConnection<Io<S>, Svc>,
        },
        H2 {
            #[pin]
            conn: http2::Connection<Io<S>, Svc, TokioExecutor>,
        },
    }
}

/// Serves `stream` with `service`, as HTTP/1.1 or HTTP/2 by its first bytes.
pub fn serve<S, Svc>(stream: S, service: Svc, builders: &Builders) -> Served<'_, S, Svc>
where
    Svc: HttpService<Incoming>,
{
    Served {
        state: State::Hello {
            stream: Some(stream),
            first: [0; 24],
            len: 0,
            service: Some(service),
            builders,
            cancelled: false,
        },
    }
}

impl<S, Svc, B> Served<'_, S, Svc>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = B>,
    Svc::Error: Into<BoxError>,
    Svc::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Starts a graceful shutdown (hyper's: an idle HTTP/1.1 connection
    /// closes, HTTP/2 sends GOAWAY); keep polling until it ends. Before the
    /// first bytes told the protocol, the connection just ends.
    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        match self.project().state.project() {
            StateProj::Hello { cancelled, .. } => *cancelled = true,
            StateProj::H1 { conn } => conn.graceful_shutdown(),
            StateProj::H2 { conn } => conn.graceful_shutdown(),
        }
    }
}

impl<S, Svc, B> Future for Served<'_, S, Svc>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = B>,
    Svc::Error: Into<BoxError>,
    Svc::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Output = Result<(), BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let next = match this.state.as_mut().project() {
                StateProj::H1 { conn } => return conn.poll(cx).map_err(Into::into),
                StateProj::H2 { conn } => return conn.poll(cx).map_err(Into::into),
                StateProj::Hello {
                    stream,
                    first,
                    len,
                    service,
                    builders,
                    cancelled,
                } => {
                    if *cancelled {
                        return Poll::Ready(Ok(()));
                    }
                    let Some(s) = stream.as_mut() else {
                        return Poll::Ready(Ok(()));
                    };
                    // HTTP/2 only if all 24 bytes are the preface's; a
                    // first byte that differs (any HTTP/1.1 request) or the
                    // end of the stream decides HTTP/1.1 at once.
                    let h2 = loop {
                        let Some(room) = first.get_mut(*len..) else {
                            break false;
                        };
                        let mut buf = ReadBuf::new(room);
                        ready!(Pin::new(&mut *s).poll_read(cx, &mut buf))?;
                        let n = buf.filled().len();
                        if n == 0 {
                            break false;
                        }
                        let was = *len;
                        *len += n;
                        if first.get(was..*len) != H2_PREFACE.get(was..*len) {
                            break false;
                        }
                        if *len == H2_PREFACE.len() {
                            break true;
                        }
                    };
                    let (Some(s), Some(svc)) = (stream.take(), service.take()) else {
                        return Poll::Ready(Ok(()));
                    };
                    let io = TokioIo::new(Replay {
                        first: *first,
                        at: 0,
                        len: *len,
                        inner: s,
                    });
                    if h2 {
                        State::H2 {
                            conn: builders.h2.serve_connection(io, svc),
                        }
                    } else {
                        State::H1 {
                            conn: builders.h1.serve_connection(io, svc).with_upgrades(),
                        }
                    }
                }
            };
            this.state.set(next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn replay_gives_the_first_bytes_back_before_the_rest() {
        let (mut a, b) = tokio::io::duplex(64);
        let mut first = [0u8; 24];
        first[..3].copy_from_slice(b"GET");
        let mut r = Replay {
            first,
            at: 0,
            len: 3,
            inner: b,
        };
        tokio::io::AsyncWriteExt::write_all(&mut a, b" / HTTP/1.1\r\n")
            .await
            .unwrap();
        drop(a);
        let mut small = [0u8; 2];
        assert_eq!(r.read(&mut small).await.unwrap(), 2);
        assert_eq!(&small, b"GE");
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"T / HTTP/1.1\r\n");
    }
}
