//! The access log's lines (`[proxy] access_log`), written by hand and in
//! batches.
//!
//! Through tracing's formatters a line cost ~17 000 instructions (every
//! field through `core::fmt` and a visitor, the timestamp formatted afresh,
//! the colours' wrappers even when off), about what the proxied request
//! itself costs, against ~3 500 for nginx's JSON access log line
//! (`benches/RESULTS.md`, session 45); and each line woke the log thread,
//! which wrote it alone (a wake-up, a `write`, three `sched_yield`s and a
//! sleep a line). Here a line is written into a buffer its thread keeps, in
//! the shape of the process's other log lines (the same timestamp, level,
//! message, fields in order and target, text or JSON), and appended to a
//! batch that a thread of its own writes to stderr [`BATCH_WAIT`] after
//! the batch's first line, or at [`BATCH_BYTES`] (nginx's `access_log ...
//! buffer= flush=`): a reader sees the same lines, up to 50 ms later.
//! `RUST_LOG` still decides (target `veer::access`, level INFO). When
//! stderr's reader falls [`PENDING_MAX`] bytes behind, new lines are
//! dropped and counted (`veer_log_lines_dropped_total`), as other lines are
//! past the log queue's 16 384: a request never waits for the log. Without
//! a sink (text on a terminal, where tracing colours lines; a library
//! user), a line goes through tracing with its fields in the message.

use std::cell::RefCell;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

/// The access log's target.
pub const TARGET: &str = "veer::access";

/// How long a batch gathers lines after its first.
pub const BATCH_WAIT: Duration = Duration::from_millis(50);

/// A batch this large is written at once.
pub const BATCH_BYTES: usize = 32 * 1024;

/// Lines waiting for stderr, at most (bytes): past it, lines are dropped.
pub const PENDING_MAX: usize = 4 * 1024 * 1024;

/// The shape lines are written in: JSON (true) or text.
static SINK: OnceLock<bool> = OnceLock::new();

/// Lines waiting for the writer, and whether the process is closing.
struct Pending {
    batch: Vec<u8>,
    closing: bool,
    /// The writer thread is writing a batch or gathering one.
    busy: bool,
}

static PENDING: Mutex<Pending> = Mutex::new(Pending {
    batch: Vec::new(),
    closing: false,
    busy: false,
});
static WAKE: Condvar = Condvar::new();
static WRITER: OnceLock<Option<std::thread::JoinHandle<()>>> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// From now on, access log lines are written to stderr in batches, as
/// JSON objects (`json`) or as text lines like the `tracing-subscriber`
/// formatter's without colours. Only the first call counts.
pub fn install(json: bool) {
    let _ = SINK.set(json);
}

/// Access log lines dropped because stderr's reader fell behind.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Has the writer write what is waiting, and stop (at exit; later lines
/// are written by their own thread at once). Waits for it at most 1 s, as
/// the log queue's guard does: a stuck stderr must not hold the exit (what
/// it holds is lost, as it would be anyway).
pub fn flush() {
    if let Ok(mut p) = PENDING.lock() {
        p.closing = true;
    }
    WAKE.notify_all();
    if WRITER.get().is_some_and(Option::is_some) {
        if let Ok(p) = PENDING.lock() {
            let _ = WAKE
                .wait_timeout_while(p, Duration::from_secs(1), |p| !p.batch.is_empty() || p.busy);
        }
    }
}

/// The writer thread: waits for a batch's first line, gathers for
/// [`BATCH_WAIT`] (or until [`BATCH_BYTES`]), writes the batch.
fn writer() {
    let mut spare = Vec::new();
    loop {
        let Ok(p) = PENDING.lock() else { return };
        let Ok(mut p) = WAKE.wait_while(p, |p| p.batch.is_empty() && !p.closing) else {
            return;
        };
        p.busy = true;
        let Ok((mut p, _)) =
            WAKE.wait_timeout_while(p, BATCH_WAIT, |p| p.batch.len() < BATCH_BYTES && !p.closing)
        else {
            return;
        };
        std::mem::swap(&mut p.batch, &mut spare);
        let closing = p.closing;
        drop(p);
        // Lines may wait meanwhile: a stuck stderr holds this thread, not
        // a request.
        let _ = std::io::stderr().lock().write_all(&spare);
        spare.clear();
        if spare.capacity() > 4 * BATCH_BYTES {
            // What a stall grew goes back.
            spare.shrink_to(BATCH_BYTES);
        }
        if let Ok(mut p) = PENDING.lock() {
            p.busy = false;
            if closing && p.batch.is_empty() {
                // (The exit waits for this.)
                WAKE.notify_all();
                return;
            }
        }
    }
}

/// Appends a made line to the batch (waking the writer for its first
/// line or a full batch), or drops it when too much waits.
fn append(line: &[u8]) {
    let started = WRITER
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("veer-access-log".into())
                .spawn(writer)
                .ok()
        })
        .is_some();
    let Ok(mut p) = PENDING.lock() else { return };
    if !started || (p.closing && !p.busy) {
        // No writer (it could not start, or stopped at exit): written
        // from here.
        drop(p);
        let _ = std::io::stderr().lock().write_all(line);
        return;
    }
    if p.batch.len() + line.len() > PENDING_MAX {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let first = p.batch.is_empty();
    p.batch.extend_from_slice(line);
    let full = p.batch.len() >= BATCH_BYTES;
    drop(p);
    if first || full {
        WAKE.notify_all();
    }
}

/// What a thread keeps between its lines.
struct Local {
    buf: Vec<u8>,
    /// The second `stamp` was made for.
    second: u64,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`.
    stamp: [u8; 19],
}

thread_local! {
    static LOCAL: RefCell<Local> = const {
        RefCell::new(Local {
            buf: Vec::new(),
            second: u64::MAX,
            stamp: [0; 19],
        })
    };
}

/// Writes one line with `message` and the fields `fields` adds, if the
/// log filter lets the access log's lines through.
pub fn line(message: &str, fields: impl Fn(&mut Fields<'_>)) {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return;
    }
    let Some(&json) = SINK.get() else {
        return through_tracing(message, fields);
    };
    let written = LOCAL.with(|l| {
        let Ok(mut l) = l.try_borrow_mut() else {
            return false;
        };
        let Local { buf, second, stamp } = &mut *l;
        buf.clear();
        let now = crate::clock::wall_now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if now.as_secs() != *second {
            *second = now.as_secs();
            let text = humantime::format_rfc3339_seconds(UNIX_EPOCH + now).to_string();
            if let Some(s) = text.as_bytes().get(..19) {
                stamp.copy_from_slice(s);
            }
        }
        if json {
            buf.extend_from_slice(b"{\"timestamp\":\"");
        }
        buf.extend_from_slice(&stamp[..]);
        buf.push(b'.');
        let micros = now.subsec_micros();
        let mut digits = itoa::Buffer::new();
        let d = digits.format(micros).as_bytes();
        buf.extend(std::iter::repeat_n(b'0', 6 - d.len()));
        buf.extend_from_slice(d);
        if json {
            buf.extend_from_slice(b"Z\",\"level\":\"INFO\",\"message\":");
            json_str(buf, message);
        } else {
            buf.extend_from_slice(b"Z  INFO veer::access: ");
            buf.extend_from_slice(message.as_bytes());
        }
        fields(&mut Fields { buf, json });
        if json {
            buf.extend_from_slice(b",\"target\":\"veer::access\"}\n");
        } else {
            buf.push(b'\n');
        }
        append(buf);
        true
    });
    if !written {
        through_tracing(message, fields);
    }
}

/// The line through tracing's formatter, its fields as text in the
/// message.
#[cold]
fn through_tracing(message: &str, fields: impl Fn(&mut Fields<'_>)) {
    let mut buf = Vec::new();
    fields(&mut Fields {
        buf: &mut buf,
        json: false,
    });
    tracing::info!(
        target: TARGET,
        "{message}{}",
        String::from_utf8_lossy(&buf)
    );
}

/// A line's fields, written in order.
pub struct Fields<'a> {
    buf: &'a mut Vec<u8>,
    json: bool,
}

impl Fields<'_> {
    fn key(&mut self, key: &str) {
        if self.json {
            self.buf.extend_from_slice(b",\"");
            self.buf.extend_from_slice(key.as_bytes());
            self.buf.extend_from_slice(b"\":");
        } else {
            self.buf.push(b' ');
            self.buf.extend_from_slice(key.as_bytes());
            self.buf.push(b'=');
        }
    }

    /// A string: quoted in text as tracing writes a `&str` field (Rust's
    /// `Debug`), a JSON string in JSON.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        if self.json {
            json_str(self.buf, value);
        } else {
            debug_str(self.buf, value);
        }
        self
    }

    /// [`Fields::str`] when there is a value; nothing when not (as tracing
    /// leaves out a `None`).
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        if let Some(v) = value {
            self.str(key, v);
        }
        self
    }

    /// [`Fields::opt_str`] of a header field's value: bytes that are not
    /// UTF-8 are written as U+FFFD.
    pub fn opt_bytes(&mut self, key: &str, value: Option<&[u8]>) -> &mut Self {
        let Some(value) = value else { return self };
        self.key(key);
        // Printable ASCII (nearly always): in quotes as it is, the same in
        // JSON and text.
        if !quoted(self.buf, value, |b| !(0x20..0x7f).contains(&b)) {
            let value = String::from_utf8_lossy(value);
            if self.json {
                json_str(self.buf, &value);
            } else {
                debug_str(self.buf, &value);
            }
        }
        self
    }

    /// A word shown bare in text (tracing's `%` of a string: a method), a
    /// JSON string in JSON.
    pub fn bare(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        if self.json {
            json_str(self.buf, value);
        } else {
            self.buf.extend_from_slice(value.as_bytes());
        }
        self
    }

    /// An address as its `Display` writes it (bare in text, a JSON string
    /// in JSON); an IPv4 one without `core::fmt`.
    pub fn addr(&mut self, key: &str, value: std::net::SocketAddr) -> &mut Self {
        let std::net::SocketAddr::V4(v4) = value else {
            return self.bare(key, &value.to_string());
        };
        self.key(key);
        if self.json {
            self.buf.push(b'"');
        }
        let mut b = itoa::Buffer::new();
        for (i, octet) in v4.ip().octets().iter().enumerate() {
            if i > 0 {
                self.buf.push(b'.');
            }
            self.buf.extend_from_slice(b.format(*octet).as_bytes());
        }
        self.buf.push(b':');
        self.buf.extend_from_slice(b.format(v4.port()).as_bytes());
        if self.json {
            self.buf.push(b'"');
        }
        self
    }

    /// A whole number.
    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        self.buf
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        self
    }

    /// Milliseconds from `micros`, as tracing writes the `f64`
    /// `micros / 1000.0` (the shortest decimal: `5.395`, `0.1`, `2.0`).
    pub fn millis(&mut self, key: &str, micros: u64) -> &mut Self {
        self.key(key);
        if micros >= 1_000_000_000_000_000 {
            // Beyond where every such value prints as its three decimals.
            let _ = write!(self.buf, "{:?}", micros as f64 / 1000.0);
            return self;
        }
        let mut b = itoa::Buffer::new();
        self.buf
            .extend_from_slice(b.format(micros / 1000).as_bytes());
        self.buf.push(b'.');
        let frac = micros % 1000;
        let digits = [frac / 100, frac / 10 % 10, frac % 10];
        let keep = match digits {
            [_, 0, 0] => 1,
            [_, _, 0] => 2,
            _ => 3,
        };
        for d in &digits[..keep] {
            self.buf.push(b'0' + *d as u8);
        }
        self
    }
}

/// `value` as a JSON string, escaped as serde_json escapes it.
fn json_str(buf: &mut Vec<u8>, value: &str) {
    if !quoted(buf, value.as_bytes(), |b| b < 0x20) {
        let _ = serde_json::to_writer(&mut *buf, value);
    }
}

/// `value` as Rust's `Debug` writes a string (tracing's text for a `&str`
/// field).
fn debug_str(buf: &mut Vec<u8>, value: &str) {
    if !quoted(buf, value.as_bytes(), |b| !(0x20..0x7f).contains(&b)) {
        let _ = write!(buf, "{value:?}");
    }
}

/// `bytes` in quotes with `"` and `\` escaped by a `\` (what JSON and
/// Rust's `Debug` agree on), in one pass; false, and nothing written, if
/// it has a byte `other` says needs more.
fn quoted(buf: &mut Vec<u8>, bytes: &[u8], other: impl Fn(u8) -> bool) -> bool {
    let start = buf.len();
    buf.push(b'"');
    let mut from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'"' || b == b'\\' {
            buf.extend_from_slice(&bytes[from..i]);
            buf.push(b'\\');
            from = i;
        } else if other(b) {
            buf.truncate(start);
            return false;
        }
    }
    buf.extend_from_slice(&bytes[from..]);
    buf.push(b'"');
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(json: bool, f: impl FnOnce(&mut Fields<'_>)) -> String {
        let mut buf = Vec::new();
        f(&mut Fields {
            buf: &mut buf,
            json,
        });
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn milliseconds_print_as_the_f64_would() {
        for micros in [
            0,
            1,
            10,
            100,
            999,
            1000,
            1001,
            1010,
            1100,
            5395,
            123_456_789,
            999_999_999_999_999,
            1_000_000_000_000_000,
            u64::MAX,
        ] {
            let want = format!(" ms={:?}", micros as f64 / 1000.0);
            assert_eq!(
                fields(false, |f| {
                    f.millis("ms", micros);
                }),
                want
            );
            let json = fields(true, |f| {
                f.millis("ms", micros);
            });
            let v: serde_json::Value = serde_json::from_str(&format!("{{{}}}", &json[1..]))
                .unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(v["ms"].as_f64(), Some(micros as f64 / 1000.0), "{json}");
        }
    }

    #[test]
    fn strings_are_escaped_as_tracing_and_serde_json_escape_them() {
        for s in [
            "",
            "plain",
            "a\"b\\c",
            "\\\"",
            "tab\there",
            "new\nline",
            "é",
            "\u{1b}[31m",
            "\u{7f}",
        ] {
            assert_eq!(
                fields(false, |f| {
                    f.str("k", s);
                }),
                format!(" k={s:?}"),
                "{s:?}"
            );
            assert_eq!(
                fields(true, |f| {
                    f.str("k", s);
                }),
                format!(",\"k\":{}", serde_json::to_string(s).unwrap()),
                "{s:?}"
            );
        }
    }

    #[test]
    fn header_bytes_are_written_as_their_text_would_be() {
        for (bytes, text) in [
            (&b"curl/8.0 \"x\" \\"[..], "curl/8.0 \"x\" \\"),
            (b"caf\xe9", "caf\u{fffd}"),
            (b"tab\there", "tab\there"),
            (b"", ""),
        ] {
            for json in [false, true] {
                assert_eq!(
                    fields(json, |f| {
                        f.opt_bytes("k", Some(bytes));
                    }),
                    fields(json, |f| {
                        f.str("k", text);
                    }),
                    "{text:?}"
                );
            }
        }
        assert_eq!(
            fields(true, |f| {
                f.opt_bytes("k", None);
            }),
            ""
        );
    }

    #[test]
    fn addresses_and_words_are_bare_in_text_and_strings_in_json() {
        for addr in [
            "10.1.255.0:65535",
            "0.0.0.0:0",
            "[::1]:8080",
            "[fe80::1%2]:1",
        ] {
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            assert_eq!(
                fields(false, |f| {
                    f.addr("c", addr);
                }),
                format!(" c={addr}")
            );
            assert_eq!(
                fields(true, |f| {
                    f.addr("c", addr);
                }),
                format!(",\"c\":\"{addr}\"")
            );
        }
        assert_eq!(
            fields(false, |f| {
                f.bare("method", "GET");
            }),
            " method=GET"
        );
        assert_eq!(
            fields(true, |f| {
                f.bare("method", "M\"X");
            }),
            ",\"method\":\"M\\\"X\""
        );
        assert_eq!(
            fields(true, |f| {
                f.u64("status", 200).opt_str("none", None);
            }),
            ",\"status\":200"
        );
    }
}
