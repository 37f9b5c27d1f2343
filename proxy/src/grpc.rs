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
/// than the status are skipped (groups too); a message that is not one is
/// an error. Read as protobuf's decoders read it (prost's, under tonic's
/// health client: a test compares the two on mangled messages): the
/// status must be a varint and is an `int32`'s low 32 bits; a key must fit
/// 32 bits, name a field above 0 and a wire type up to 5; a varint has at
/// most ten bytes, the tenth 0 or 1; groups nest at most 100 deep.
pub fn health_check_status(framed: &[u8]) -> Result<i32, String> {
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
        match key(&mut rest)? {
            (1, 0) => status = varint(&mut rest)? as i32, // int32: the low 32 bits
            (1, w) => return Err(format!("the status is not a varint (wire type {w})")),
            (field, w) => skip(&mut rest, field, w, 0)?,
        }
    }
    Ok(status)
}

/// A protobuf field key taken off the front of `b`: its field number and
/// wire type.
fn key(b: &mut &[u8]) -> Result<(u64, u8), String> {
    let key = varint(b)?;
    let wire = (key & 7) as u8;
    if key > u64::from(u32::MAX) {
        return Err(format!("a field key too large ({key})"));
    }
    if wire > 5 {
        return Err(format!("not a protobuf message (wire type {wire})"));
    }
    if key >> 3 == 0 {
        return Err("a field numbered 0".into());
    }
    Ok((key >> 3, wire))
}

/// Past the value of a field the reader does not know (numbered `field`,
/// its wire type `wire`), `depth` groups deep.
fn skip(b: &mut &[u8], field: u64, wire: u8, depth: u32) -> Result<(), String> {
    if depth >= 100 {
        return Err("groups nested too deep".into());
    }
    let len = match wire {
        0 => return varint(b).map(drop),
        1 => 8,
        2 => usize::try_from(varint(b)?).map_err(|e| e.to_string())?,
        3 => loop {
            match key(b)? {
                (end, 4) if end == field => return Ok(()),
                (_, 4) => return Err("a group ended by another's end".into()),
                (inner, w) => skip(b, inner, w, depth + 1)?,
            }
        },
        4 => return Err("a group's end without its start".into()),
        _ => 4,
    };
    *b = b.get(len..).ok_or("a field cut short")?;
    Ok(())
}

/// A protobuf varint taken off the front of `b`: at most ten bytes, the
/// tenth carrying only the 64th bit.
fn varint(b: &mut &[u8]) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first().ok_or("a varint cut short")?;
        *b = rest;
        if shift == 63 && byte > 1 {
            return Err("a varint too long".into());
        }
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("a varint too long".into())
}

/// The name of a `HealthCheckResponse` status.
pub fn serving_status(s: i32) -> &'static str {
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
        ProxyError::NoRoute
        | ProxyError::UpgradeUnsupported
        | ProxyError::TransferCoding
        | ProxyError::MethodNotAllowed => 12, // UNIMPLEMENTED
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
            assert_eq!(health_check_status(&framed), Ok(status));
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
        // Groups nest as deep as prost reads them, no deeper.
        for depth in [1, 99, 100, 101] {
            let mut msg = vec![0x13; depth]; // field 2, a group's start
            msg.extend(std::iter::repeat_n(0x14, depth)); // its end
            msg.extend_from_slice(&[0x08, 0x01]);
            let want = HealthCheckResponse::decode(&msg[..]).map(|r| r.status).ok();
            let mut framed = vec![0];
            framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            framed.extend_from_slice(&msg);
            assert_eq!(health_check_status(&framed).ok(), want, "{depth} deep");
            assert_eq!(want.is_some(), depth <= 100, "{depth} deep");
        }
    }

    /// A varint written with `pad` more bytes than it needs (protobuf
    /// allows up to ten in all; more is the decoder's to refuse).
    fn put_varint(out: &mut Vec<u8>, mut v: u64, pad: usize) {
        let mut bytes = Vec::new();
        loop {
            bytes.push((v & 0x7f) as u8);
            v >>= 7;
            if v == 0 {
                break;
            }
        }
        bytes.extend(std::iter::repeat_n(0, pad));
        let last = bytes.len() - 1;
        for (i, b) in bytes.iter().enumerate() {
            out.push(if i < last { b | 0x80 } else { *b });
        }
    }

    /// Fields as a writer (or a broken one) might put them: any field
    /// number and wire type, values of any size, varints written longer
    /// than they need.
    fn message(fields: &[(u64, u8, u64, usize, Vec<u8>)]) -> Vec<u8> {
        let mut msg = Vec::new();
        for (field, wire, value, pad, bytes) in fields {
            put_varint(&mut msg, field << 3 | u64::from(*wire), 0);
            match wire {
                0 => put_varint(&mut msg, *value, *pad),
                1 => msg.extend_from_slice(&value.to_le_bytes()),
                2 => {
                    put_varint(&mut msg, bytes.len() as u64, *pad);
                    msg.extend_from_slice(bytes);
                }
                5 => msg.extend_from_slice(&(*value as u32).to_le_bytes()),
                3 => {
                    // A group holding a field 1 (not the status: it is
                    // the group's), then its end, another's, or none.
                    msg.extend_from_slice(&[0x08, bytes.len() as u8]);
                    match pad {
                        0 | 1 => put_varint(&mut msg, field << 3 | 4, 0),
                        8 => put_varint(&mut msg, (field + 1) << 3 | 4, 0),
                        _ => {}
                    }
                }
                _ => {} // a group's end alone, and the unused 6 and 7
            }
        }
        msg
    }

    proptest::proptest! {
        // A fixed seed: the suite reads the same 2 048 messages every time
        // (a few milliseconds). For a longer search: `PROPTEST_CASES=1000000
        // cargo test -p veer-proxy --lib health_answers_are_read_as_prost`.
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(2048),
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x7665_6572),
            failure_persistence: None,
            ..Default::default()
        })]

        /// A health check's answer (any fields, then mangled) gives the
        /// status prost's generated `HealthCheckResponse` decodes (what a
        /// tonic client of the health service reads), or an error where
        /// prost refuses it: never SERVING from a message a gRPC client
        /// would not read as SERVING, nor the other way round.
        #[test]
        fn health_answers_are_read_as_prost_reads_them(
            fields in proptest::collection::vec(
                (
                    proptest::sample::select(vec![0u64, 1, 1, 1, 2, 3, 16, 2047, (1 << 29) - 1, 1 << 29, 1 << 32]),
                    proptest::sample::select(vec![0u8, 0, 0, 1, 2, 2, 3, 4, 5, 6, 7]),
                    proptest::sample::select(vec![0u64, 1, 1, 2, 3, 127, 128, 1 << 31, (1 << 32) + 1, u64::MAX, u64::MAX - 1]),
                    proptest::sample::select(vec![0usize, 0, 0, 1, 8, 9]),
                    proptest::collection::vec(proptest::sample::select(vec![0u8, 1, 8, 0x0b, 0x0c, 0x80, 0xff]), 0..6),
                ),
                0..6,
            ),
            edits in proptest::collection::vec(
                (0usize..4096, 0u8..4, proptest::sample::select(vec![0u8, 1, 2, 8, 0x0b, 0x0c, 0x10, 0x7f, 0x80, 0xff])),
                0..3,
            ),
        ) {
            use prost::Message;
            let mut msg = message(&fields);
            for &(at, what, b) in &edits {
                let i = at % (msg.len() + 1);
                match what {
                    0 => msg.insert(i, b),
                    1 if i < msg.len() => {
                        msg.remove(i);
                    }
                    2 if i < msg.len() => msg[i] = b,
                    3 => msg.truncate(i),
                    _ => {}
                }
            }
            let want = tonic_health::pb::HealthCheckResponse::decode(&msg[..]).map(|r| r.status);
            let mut framed = vec![0];
            framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            framed.extend_from_slice(&msg);
            let got = health_check_status(&framed);
            proptest::prop_assert_eq!(
                got.clone().ok(),
                want.clone().ok(),
                "{:02x?}: veer {:?}, prost {:?}",
                msg,
                got,
                want
            );
        }
    }
}
