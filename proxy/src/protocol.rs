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

/// Bytes read from a stream to tell its protocol, to be read again first
/// (a stream that can take them back keeps one: [`GiveBack`]).
#[derive(Default)]
pub struct Replay {
    first: [u8; 24],
    /// `first[at..len]` is still to be read.
    at: u8,
    len: u8,
}

impl Replay {
    /// Moves what is left into `buf` (as much as fits); false if nothing
    /// was left, so that the stream's own bytes are read.
    #[inline]
    pub fn read_into(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.at >= self.len {
            return false;
        }
        let (at, len) = (usize::from(self.at), usize::from(self.len));
        let n = (len - at).min(buf.remaining());
        if let Some(b) = self.first.get(at..at + n) {
            buf.put_slice(b);
        }
        self.at += n as u8;
        true
    }
}

/// A client's stream that takes back the bytes read from it to tell its
/// protocol, and gives them to hyper before its own
/// (`crate::conn::HeadWatch`, which noted them when they were read).
pub trait GiveBack {
    /// `bytes` (at most 24) are read again before the stream's own.
    fn give_back(&mut self, bytes: &[u8]);
}

impl GiveBack for Replay {
    fn give_back(&mut self, bytes: &[u8]) {
        let len = bytes.len().min(self.first.len());
        if let (Some(to), Some(from)) = (self.first.get_mut(..len), bytes.get(..len)) {
            to.copy_from_slice(from);
        }
        self.at = 0;
        self.len = len as u8;
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
            conn: http1::UpgradeableConnection<TokioIo<S>, Svc>,
        },
        H2 {
            #[pin]
            conn: http2::Connection<TokioIo<S>, Svc, TokioExecutor>,
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
    S: AsyncRead + AsyncWrite + GiveBack + Unpin + Send + 'static,
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
    S: AsyncRead + AsyncWrite + GiveBack + Unpin + Send + 'static,
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
                    let (Some(mut s), Some(svc)) = (stream.take(), service.take()) else {
                        return Poll::Ready(Ok(()));
                    };
                    s.give_back(first.get(..*len).unwrap_or_default());
                    let io = TokioIo::new(s);
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

    #[test]
    fn replay_gives_the_bytes_back_in_as_many_reads_as_they_take() {
        let mut r = Replay::default();
        let mut room = [0u8; 2];
        assert!(!r.read_into(&mut ReadBuf::new(&mut room)));
        r.give_back(b"GET");
        let mut buf = ReadBuf::new(&mut room);
        assert!(r.read_into(&mut buf));
        assert_eq!(buf.filled(), b"GE");
        let mut room = [0u8; 8];
        let mut buf = ReadBuf::new(&mut room);
        assert!(r.read_into(&mut buf));
        assert_eq!(buf.filled(), b"T");
        assert!(!r.read_into(&mut buf));
    }
}
