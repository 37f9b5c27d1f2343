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
//!
//! An idle HTTP/1.1 connection can be parked ([`Served::park`]): hyper's
//! connection, which keeps its buffers for the connection's whole life, is
//! dropped until the client's next bytes.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
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

/// Bytes read from a stream and given back, to be read again first (a
/// stream that can take them back keeps one: [`GiveBack`]): the first
/// bytes, read to tell the protocol, or what hyper had read of a parked
/// connection and not used.
#[derive(Default)]
pub struct Replay {
    rest: Bytes,
}

impl Replay {
    /// Moves what is left into `buf` (as much as fits); false if nothing
    /// was left, so that the stream's own bytes are read.
    #[inline]
    pub fn read_into(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.rest.is_empty() {
            return false;
        }
        let n = self.rest.len().min(buf.remaining());
        buf.put_slice(&self.rest.split_to(n));
        true
    }
}

/// A client's stream that takes back the bytes read from it to tell its
/// protocol, and gives them to hyper before its own
/// (`crate::conn::HeadWatch`, which noted them when they were read).
pub trait GiveBack {
    /// `bytes` are read again before the stream's own (after any given
    /// back before and not read yet).
    fn give_back(&mut self, bytes: Bytes);
}

impl GiveBack for Replay {
    fn give_back(&mut self, bytes: Bytes) {
        if self.rest.is_empty() {
            self.rest = bytes;
        } else {
            let mut both = bytes::BytesMut::with_capacity(self.rest.len() + bytes.len());
            both.extend_from_slice(&self.rest);
            both.extend_from_slice(&bytes);
            self.rest = both.freeze();
        }
    }
}

pin_project_lite::pin_project! {
    /// One client connection being served (a future: poll it to the end).
    pub struct Served<'a, S, Svc>
    where
        Svc: HttpService<Incoming>,
    {
        builders: &'a Builders,
        #[pin]
        state: State<S, Svc>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<S, Svc>
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
            cancelled: bool,
        },
        // Boxed, as HTTP/2's: a parked connection's task keeps only the
        // room for `Parked` (inline, the largest protocol's state stayed
        // in every connection's task). Taken out whole to park.
        H1 {
            conn: Option<Box<http1::UpgradeableConnection<TokioIo<S>, Svc>>>,
        },
        // An idle HTTP/1.1 connection without hyper's connection and its
        // buffers, until the client's next bytes (see `Served::park`);
        // `held`: bytes hyper had read and not used (the start of a
        // pipelined request), given back with the next ones; `closing`:
        // shut down meanwhile.
        Parked {
            stream: Option<S>,
            service: Option<Svc>,
            held: Bytes,
            closing: bool,
        },
        H2 {
            conn: Pin<Box<http2::Connection<TokioIo<S>, Svc, TokioExecutor>>>,
        },
    }
}

/// Serves `stream` with `service`, as HTTP/1.1 or HTTP/2 by its first bytes.
pub fn serve<S, Svc>(stream: S, service: Svc, builders: &Builders) -> Served<'_, S, Svc>
where
    Svc: HttpService<Incoming>,
{
    Served {
        builders,
        state: State::Hello {
            stream: Some(stream),
            first: [0; 24],
            len: 0,
            service: Some(service),
            cancelled: false,
        },
    }
}

impl<S, Svc, B> Served<'_, S, Svc>
where
    S: AsyncRead + AsyncWrite + GiveBack + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = B> + Unpin,
    Svc::Error: Into<BoxError>,
    Svc::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Starts a graceful shutdown (hyper's: an idle HTTP/1.1 connection
    /// closes, HTTP/2 sends GOAWAY); keep polling until it ends. Before the
    /// first bytes told the protocol, the connection just ends; a parked
    /// one is shut down.
    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        match self.project().state.project() {
            StateProj::Hello { cancelled, .. } => *cancelled = true,
            StateProj::H1 { conn } => {
                if let Some(c) = conn.as_mut() {
                    Pin::new(&mut **c).graceful_shutdown();
                }
            }
            StateProj::Parked { closing, .. } => *closing = true,
            StateProj::H2 { conn } => conn.as_mut().graceful_shutdown(),
        }
    }

    /// Parks an idle HTTP/1.1 connection: hyper's connection is dropped,
    /// and with it its read and write buffers (8 KiB each, or more after a
    /// large body), kept otherwise for the connection's whole life; what
    /// hyper had read and not used is kept, to be read again first. The
    /// client's next bytes serve it with a new one. False (nothing done)
    /// for any other connection.
    ///
    /// Only for a connection between requests, as its caller knows it: no
    /// request in flight, none of a request body left to read, everything
    /// written flushed, and a request answered before (hyper's state is
    /// then its idle one: a new connection is the same). A request body
    /// given up unread leaves no other state: hyper then drains it at once
    /// or stops reading, which ends the connection.
    pub fn park(self: Pin<&mut Self>) -> bool {
        let mut this = self.project();
        let StateProj::H1 { conn } = this.state.as_mut().project() else {
            return false;
        };
        // `None`: upgraded (the connection is over).
        let Some(parts) = conn.take().and_then(|c| (*c).into_parts()) else {
            return false;
        };
        // A copy: `read_buf` shares hyper's whole read buffer.
        let held = match parts.read_buf.is_empty() {
            true => Bytes::new(),
            false => Bytes::copy_from_slice(&parts.read_buf),
        };
        this.state.set(State::Parked {
            stream: Some(parts.io.into_inner()),
            service: Some(parts.service),
            held,
            closing: false,
        });
        true
    }

    /// Whether the connection is parked.
    pub fn is_parked(&self) -> bool {
        matches!(self.state, State::Parked { .. })
    }

    /// Whether the connection could be parked if idle: an HTTP/1.1
    /// connection not parked (nor upgraded).
    pub fn may_park(&self) -> bool {
        matches!(self.state, State::H1 { conn: Some(_) })
    }
}

impl<S, Svc, B> Future for Served<'_, S, Svc>
where
    S: AsyncRead + AsyncWrite + GiveBack + Unpin + Send + 'static,
    Svc: HttpService<Incoming, ResBody = B> + Unpin,
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
            let builders = *this.builders;
            let next = match this.state.as_mut().project() {
                StateProj::H1 { conn } => {
                    return match conn.as_mut() {
                        Some(c) => Pin::new(&mut **c).poll(cx).map_err(Into::into),
                        None => Poll::Ready(Ok(())),
                    }
                }
                StateProj::H2 { conn } => return conn.as_mut().poll(cx).map_err(Into::into),
                StateProj::Parked {
                    stream,
                    service,
                    held,
                    closing,
                } => {
                    let Some(s) = stream.as_mut() else {
                        return Poll::Ready(Ok(()));
                    };
                    if *closing {
                        // As hyper ends an idle connection.
                        return Pin::new(s).poll_shutdown(cx).map_err(Into::into);
                    }
                    // The client's next bytes (or its close), read through
                    // the stream (which notes a head's first bytes) and
                    // given back to hyper.
                    let mut first = [0u8; 24];
                    let mut buf = ReadBuf::new(&mut first);
                    ready!(Pin::new(&mut *s).poll_read(cx, &mut buf))?;
                    if buf.filled().is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    let (Some(mut s), Some(svc)) = (stream.take(), service.take()) else {
                        return Poll::Ready(Ok(()));
                    };
                    if !held.is_empty() {
                        s.give_back(std::mem::take(held));
                    }
                    s.give_back(Bytes::copy_from_slice(buf.filled()));
                    State::H1 {
                        conn: Some(Box::new(
                            builders
                                .h1
                                .serve_connection(TokioIo::new(s), svc)
                                .with_upgrades(),
                        )),
                    }
                }
                StateProj::Hello {
                    stream,
                    first,
                    len,
                    service,
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
                    if *len > 0 {
                        s.give_back(Bytes::copy_from_slice(
                            first.get(..*len).unwrap_or_default(),
                        ));
                    }
                    let io = TokioIo::new(s);
                    if h2 {
                        State::H2 {
                            conn: Box::pin(builders.h2.serve_connection(io, svc)),
                        }
                    } else {
                        State::H1 {
                            conn: Some(Box::new(
                                builders.h1.serve_connection(io, svc).with_upgrades(),
                            )),
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
        r.give_back(Bytes::from_static(b"GE"));
        r.give_back(Bytes::from_static(b"T"));
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
