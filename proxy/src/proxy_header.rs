//! The PROXY protocol header (HAProxy's, versions 1 and 2) a load
//! balancer in front sends at the start of each connection it passes on,
//! saying whom the connection is from (`[proxy] proxy_protocol`).
//!
//! The header is read exactly, nothing after it: the bytes that follow are
//! the client's (a TLS handshake or an HTTP request) and stay in the
//! socket. It is looked at with `MSG_PEEK` and then consumed by its
//! length. The protocol asks a sender to send the header at once; one
//! that comes in pieces is waited for in short steps, within the
//! connection's `header_timeout` (the caller's deadline). Parsing is the
//! `ppp` crate's.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The longest header taken: a version 1 header is at most 107 bytes; a
/// version 2 one is 16 bytes and its addresses (36 for IPv6) and TLVs
/// (a cloud load balancer's endpoint ids: tens of bytes).
const MAX_HEADER: usize = 1024;

/// Why a connection's header was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The connection closed before sending a byte: a load balancer's TCP
    /// health check (an AWS NLB's sends no header), not a bad header. (A
    /// peek never sees the close behind bytes not read: a header cut
    /// short waits out `header_timeout`.)
    #[error("closed before sending anything")]
    Silent,
    /// The bytes are no PROXY header (a client that connected directly, or a garbled one).
    #[error("not a PROXY protocol header: {0}")]
    Invalid(String),
    /// A header longer than veer takes.
    #[error("a PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    /// Reading the socket failed.
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// What a connection's PROXY header says.
#[derive(Debug, PartialEq, Eq)]
pub struct Said {
    /// The client's address (`None` when the header names none: a load
    /// balancer's own health check, `LOCAL`, or `UNKNOWN`, whose
    /// connection is its own).
    pub client: Option<SocketAddr>,
    /// The client came over TLS that the balancer ended (version 2's
    /// `PP2_TYPE_SSL` with `PP2_CLIENT_SSL`, HAProxy's `send-proxy-v2-ssl`):
    /// the request's scheme is `https`.
    pub tls: bool,
}

/// Reads the PROXY header at the start of `stream`.
pub async fn read(stream: &mut TcpStream) -> Result<Said, Refused> {
    let mut buf = vec![0u8; MAX_HEADER];
    let mut seen = 0;
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(Refused::Silent);
        }
        let (length, said) = match parse(&buf[..n]) {
            Parsed::Header { length, said } => (length, said),
            Parsed::Invalid(why) => return Err(Refused::Invalid(why)),
            Parsed::Incomplete if n == buf.len() => return Err(Refused::TooLong),
            Parsed::Incomplete => {
                // Only a sender that splits its header gets here: wait
                // for more (the caller's deadline bounds the wait).
                if n == seen {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                seen = n;
                continue;
            }
        };
        let mut header = vec![0u8; length];
        stream.read_exact(&mut header).await?;
        return Ok(said);
    }
}

/// What the bytes at a connection's start are.
#[derive(Debug, PartialEq)]
enum Parsed {
    /// A whole header of `length` bytes.
    Header { length: usize, said: Said },
    /// The start of one: more is needed.
    Incomplete,
    /// No header.
    Invalid(String),
}

/// `PP2_TYPE_SSL`'s client flag: the client connected over TLS.
const PP2_CLIENT_SSL: u8 = 0x01;

fn parse(bytes: &[u8]) -> Parsed {
    let result = HeaderResult::parse(bytes);
    if result.is_incomplete() {
        return Parsed::Incomplete;
    }
    match result {
        HeaderResult::V1(Ok(h)) => Parsed::Header {
            length: h.header.len(),
            said: Said {
                client: match h.addresses {
                    v1::Addresses::Tcp4(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    v1::Addresses::Tcp6(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    v1::Addresses::Unknown => None,
                },
                tls: false,
            },
        },
        HeaderResult::V2(Ok(h)) => {
            let tls = h.tlvs().filter_map(Result::ok).any(|t| {
                t.kind == v2::Type::SSL as u8
                    && t.value.first().is_some_and(|f| f & PP2_CLIENT_SSL != 0)
            });
            let client = match (h.command, h.addresses) {
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            };
            Parsed::Header {
                length: h.len(),
                said: Said { client, tls },
            }
        }
        HeaderResult::V1(Err(e)) => Parsed::Invalid(e.to_string()),
        HeaderResult::V2(Err(e)) => Parsed::Invalid(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 2 header from `client` to `server`, with a TLV (and
    /// `PP2_TYPE_SSL` with these client flags).
    fn v2_header(client: SocketAddr, server: SocketAddr, ssl: Option<u8>) -> Vec<u8> {
        let b = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (client, server),
        )
        .write_tlv(v2::Type::NoOp, b"vpce-0abc");
        let b = match ssl {
            Some(flags) => b.and_then(|b| b.write_tlv(v2::Type::SSL, &[flags, 0, 0, 0, 0])),
            None => b,
        };
        b.and_then(|b| b.build()).expect("a header")
    }

    fn from(client: Option<&str>, tls: bool) -> Said {
        Said {
            client: client.map(|c| c.parse().expect("addr")),
            tls,
        }
    }

    #[test]
    fn headers_of_both_versions_name_the_client_and_their_length() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(v1),
            Parsed::Header {
                length: 43,
                said: from(Some("203.0.113.7:51234"), false)
            }
        );
        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n";
        assert_eq!(
            parse(v6),
            Parsed::Header {
                length: v6.len(),
                said: from(Some("[2001:db8::7]:4000"), false)
            }
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n\x16\x03\x01"),
            Parsed::Header {
                length: 15,
                said: from(None, false)
            }
        );
        let (client, server) = ("198.51.100.4:6000", "10.0.0.1:443".parse().expect("addr"));
        for (ssl, tls) in [
            (None, false),
            (Some(0x01), true),
            (Some(0x07), true),
            (Some(0x00), false),
        ] {
            let mut v2 = v2_header(client.parse().expect("addr"), server, ssl);
            let length = v2.len();
            v2.extend_from_slice(b"\x16\x03\x01 a TLS hello");
            assert_eq!(
                parse(&v2),
                Parsed::Header {
                    length,
                    said: from(Some(client), tls)
                },
                "{ssl:?}"
            );
        }
    }

    #[test]
    fn a_header_in_pieces_is_incomplete_and_other_bytes_are_none() {
        let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 443\r\n";
        assert_eq!(parse(&v1[..20]), Parsed::Incomplete);
        let v2 = v2_header(
            "198.51.100.4:6000".parse().expect("addr"),
            "10.0.0.1:443".parse().expect("addr"),
            None,
        );
        assert_eq!(parse(&v2[..10]), Parsed::Incomplete);
        assert_eq!(parse(&v2[..20]), Parsed::Incomplete);
        for bytes in [
            &b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(matches!(parse(bytes), Parsed::Invalid(_)), "{bytes:?}");
        }
    }
}
