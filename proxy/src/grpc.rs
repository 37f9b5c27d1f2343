//! gRPC on the request path: recognising a call, its deadline
//! (`grpc-timeout`), its outcome (`grpc-status`, in the trailers or a
//! trailers-only answer), and the answers veer writes itself in gRPC's form.

use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};

use crate::body::ProxyBody;
use crate::error::ProxyError;
use crate::record::Outcome;

/// `grpc-status`.
pub const GRPC_STATUS: &str = "grpc-status";
/// `grpc-timeout`.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";
/// UNKNOWN: what a call that ends without a `grpc-status` counts as.
pub const UNKNOWN: u8 = 2;
/// DEADLINE_EXCEEDED.
pub const DEADLINE_EXCEEDED: u8 = 4;
/// UNAVAILABLE: the server did not take the call (`[route.retry]`'s
/// `"unavailable"`).
pub const UNAVAILABLE: u8 = 14;

/// Whether a request is a gRPC call (`content-type: application/grpc`,
/// `application/grpc+proto`, ...).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let ct = ct.as_bytes();
            ct.len() >= 16
                && ct[..16].eq_ignore_ascii_case(b"application/grpc")
                && matches!(ct.get(16), None | Some(b'+' | b';'))
        })
}

/// The call's deadline from `grpc-timeout` (1-8 digits and a unit of
/// H, M, S, m, u, n); None when absent or malformed (gRPC servers ignore a
/// malformed one too).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(GRPC_TIMEOUT)?.as_bytes();
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n.saturating_mul(3600)),
        b"M" => Duration::from_secs(n.saturating_mul(60)),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `d` as a `grpc-timeout` value: at most 8 digits of microseconds, else
/// milliseconds, else seconds.
pub fn encode_timeout(d: Duration) -> HeaderValue {
    let micros = d.as_micros();
    let text = if micros < 100_000_000 {
        format!("{}u", micros.max(1))
    } else {
        let millis = d.as_millis();
        if millis < 100_000_000 {
            format!("{millis}m")
        } else {
            format!("{}S", d.as_secs().min(99_999_999))
        }
    };
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("1S"))
}

/// The status code in `headers` (trailers, or a trailers-only head);
/// a value that is not a code 0-16 counts as UNKNOWN.
pub fn status(headers: &HeaderMap) -> Option<u8> {
    let v = headers.get(GRPC_STATUS)?;
    Some(
        std::str::from_utf8(v.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse::<u8>().ok())
            .filter(|c| *c <= 16)
            .unwrap_or(UNKNOWN),
    )
}

/// A `HealthCheckRequest { service }`, framed as a gRPC message (not
/// compressed). Its one field, written by hand: the proxy links no
/// protobuf code for two messages of one field each.
pub fn health_check_request(service: &str) -> bytes::Bytes {
    let mut msg = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        msg.push(0x0a); // field 1, length-delimited
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(msg.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    framed.into()
}

/// The `status` of a `HealthCheckResponse` framed as a gRPC message:
/// 1 is SERVING (0 UNKNOWN, 2 NOT_SERVING, 3 SERVICE_UNKNOWN). Fields other
/// than the status are skipped; a message that is not one is an error.
pub fn health_check_status(framed: &[u8]) -> Result<u64, String> {
    let Some((head, msg)) = framed.split_at_checked(5) else {
        return Err("no gRPC message in the answer".into());
    };
    if head[0] != 0 {
        return Err("a compressed answer (veer asked for none)".into());
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let msg = msg.get(..len).ok_or("a gRPC message cut short")?;
    let mut rest = msg;
    let mut status = 0; // proto3: absent is the default, UNKNOWN
    while !rest.is_empty() {
        let key = varint(&mut rest)?;
        match (key >> 3, key & 7) {
            (1, 0) => status = varint(&mut rest)?,
            (_, 0) => {
                varint(&mut rest)?;
            }
            (_, 1) => rest = rest.get(8..).ok_or("a field cut short")?,
            (_, 2) => {
                let n = usize::try_from(varint(&mut rest)?).map_err(|e| e.to_string())?;
                rest = rest.get(n..).ok_or("a field cut short")?;
            }
            (_, 5) => rest = rest.get(4..).ok_or("a field cut short")?,
            (_, w) => return Err(format!("not a HealthCheckResponse (wire type {w})")),
        }
    }
    Ok(status)
}

/// A protobuf varint taken off the front of `b`.
fn varint(b: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first().ok_or("a varint cut short")?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("a varint too long".into())
}

/// The name of a `HealthCheckResponse` status.
pub fn serving_status(s: u64) -> &'static str {
    match s {
        0 => "UNKNOWN",
        1 => "SERVING",
        2 => "NOT_SERVING",
        3 => "SERVICE_UNKNOWN",
        _ => "an unknown status",
    }
}

/// The judge's outcome of a call that ended with `code`: an error when the
/// route lists it, except DEADLINE_EXCEEDED on a call whose own deadline
/// was shorter than the route's (`client_bound`: the caller's choice).
pub fn outcome(code: u8, errors: u32, client_bound: bool) -> Outcome {
    let listed = code != 0 && code < 32 && errors & (1 << code) != 0;
    if listed && !(client_bound && code == DEADLINE_EXCEEDED) {
        Outcome::Error
    } else {
        Outcome::Ok
    }
}

/// The gRPC code a failure of veer's own is reported as (the HTTP to gRPC
/// mapping of the gRPC spec, with veer's timeouts as DEADLINE_EXCEEDED).
fn code_of(e: ProxyError) -> u8 {
    match e {
        ProxyError::UpstreamTimeout | ProxyError::ClientDeadline => DEADLINE_EXCEEDED,
        ProxyError::ClientClosed => 1, // CANCELLED
        ProxyError::NoRoute | ProxyError::UpgradeUnsupported => 12, // UNIMPLEMENTED
        // RESOURCE_EXHAUSTED: gRPC's own message limit, and a quota.
        ProxyError::BodyTooLarge | ProxyError::RateLimited => 8,
        // PERMISSION_DENIED (a handshake's failure is never answered).
        ProxyError::Forbidden | ProxyError::ClientCert => 7,
        ProxyError::ClientCertRequired => 16, // UNAUTHENTICATED
        ProxyError::BadRequest
        | ProxyError::ClientTimeout
        | ProxyError::ClientAborted
        | ProxyError::ClientBadBody
        | ProxyError::HeaderTimeout
        | ProxyError::BadProxyHeader
        | ProxyError::TlsHandshake
        | ProxyError::SendTimeout => 13, // INTERNAL
        ProxyError::UpstreamConnect
        | ProxyError::UpstreamReset
        | ProxyError::UpstreamProtocol
        | ProxyError::Overloaded
        | ProxyError::TooManyConnections => UNAVAILABLE,
    }
}

/// veer's own answer to a gRPC call: a trailers-only response (HTTP 200,
/// `grpc-status`, `grpc-message`), which every gRPC client reads as the
/// call's status.
pub fn error_response(e: ProxyError) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::empty());
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS, HeaderValue::from(u16::from(code_of(e))));
    // The message is plain ASCII without '%': no percent-encoding needed.
    if let Ok(v) = HeaderValue::from_str(&format!("veer: {e}")) {
        h.insert("grpc-message", v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &'static str, v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn recognises_grpc_content_types_only() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC+json",
            "application/grpc; charset=utf-8",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).expect("ct"));
            assert!(is_grpc(&h), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/json",
            "application/grp",
        ] {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).expect("ct"));
            assert!(!is_grpc(&h), "{ct}");
        }
    }

    #[test]
    fn parses_and_encodes_timeouts() {
        assert_eq!(
            timeout(&headers(GRPC_TIMEOUT, "250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            timeout(&headers(GRPC_TIMEOUT, "2S")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            timeout(&headers(GRPC_TIMEOUT, "1H")),
            Some(Duration::from_secs(3600))
        );
        for bad in ["", "m", "123456789m", "10x", "-1m", "1.5S"] {
            let mut h = HeaderMap::new();
            h.insert(GRPC_TIMEOUT, HeaderValue::from_str(bad).expect("v"));
            assert_eq!(timeout(&h), None, "{bad:?}");
        }
        for d in [
            Duration::from_micros(1),
            Duration::from_millis(250),
            Duration::from_secs(30),
            Duration::from_secs(1_000_000),
        ] {
            let mut h = HeaderMap::new();
            h.insert(GRPC_TIMEOUT, encode_timeout(d));
            let back = timeout(&h).expect("round trip");
            assert!(
                back >= d.min(Duration::from_secs(99_999_999)),
                "{d:?} -> {back:?}"
            );
            assert!(back <= d + Duration::from_secs(1), "{d:?} -> {back:?}");
        }
    }

    #[test]
    fn outcome_follows_the_listed_codes() {
        let mask = [2u8, 4, 13, 14, 15].iter().fold(0u32, |m, c| m | 1 << c);
        assert_eq!(outcome(0, mask, false), Outcome::Ok);
        assert_eq!(outcome(5, mask, false), Outcome::Ok); // NOT_FOUND
        assert_eq!(outcome(13, mask, false), Outcome::Error);
        assert_eq!(outcome(4, mask, false), Outcome::Error);
        // The caller's own short deadline is not the version's failure.
        assert_eq!(outcome(4, mask, true), Outcome::Ok);
        assert_eq!(outcome(14, mask, true), Outcome::Error);
        assert_eq!(status(&headers(GRPC_STATUS, "13")), Some(13));
        assert_eq!(status(&headers(GRPC_STATUS, "99")), Some(UNKNOWN));
        assert_eq!(status(&headers(GRPC_STATUS, "x")), Some(UNKNOWN));
    }

    #[test]
    fn veers_own_failures_reach_callers_as_grpc_codes() {
        let code = |e| error_response(e).headers()[GRPC_STATUS].clone();
        // gRPC's own code for a message over a limit.
        assert_eq!(code(ProxyError::BodyTooLarge), "8");
        assert_eq!(code(ProxyError::RateLimited), "8");
        assert_eq!(code(ProxyError::Forbidden), "7");
        assert_eq!(code(ProxyError::UpstreamConnect), "14");
        assert_eq!(code(ProxyError::ClientDeadline), "4");
        assert_eq!(
            error_response(ProxyError::BodyTooLarge).status(),
            StatusCode::OK
        );
    }

    #[test]
    fn health_check_messages_match_the_protobuf_codes() {
        use prost::Message;
        use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
        for service in ["", "checkout.v1.Checkout", &"s".repeat(300)] {
            let framed = health_check_request(service);
            let want = HealthCheckRequest {
                service: service.to_string(),
            }
            .encode_to_vec();
            assert_eq!(framed[0], 0);
            assert_eq!(&framed[1..5], &(want.len() as u32).to_be_bytes());
            assert_eq!(&framed[5..], &want[..], "{service}");
        }
        for status in [0, 1, 2, 3] {
            let msg = HealthCheckResponse { status }.encode_to_vec();
            let mut framed = vec![0];
            framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            framed.extend_from_slice(&msg);
            assert_eq!(health_check_status(&framed), Ok(status as u64));
        }
        // Unknown fields before the status are skipped.
        let framed = [0, 0, 0, 0, 7, 0x12, 0x02, b'h', b'i', 0x08, 0x02, 0x18];
        assert_eq!(
            health_check_status(&framed[..11]).ok(),
            None,
            "cut short: length says 7"
        );
        let framed = [0, 0, 0, 0, 6, 0x12, 0x02, b'h', b'i', 0x08, 0x02];
        assert_eq!(health_check_status(&framed), Ok(2));
        assert!(health_check_status(&[0, 0, 0]).is_err());
        assert!(health_check_status(&[1, 0, 0, 0, 0]).is_err());
        assert!(health_check_status(&[0, 0, 0, 0, 1, 0x0b]).is_err());
    }
}
