//! The request log's line (docs/ARCHITECTURE.md, "Logging"): one per request, target
//! [`TARGET`], at `info`.
//!
//! Under `berth serve` the line is formatted here and handed straight to the log writer thread
//! ([`install`]), byte for byte the line `tracing-subscriber`'s text or JSON formatter would
//! write for the same event. Measured on the hot manifest path (2 CPUs, wrk -c8), the generic
//! formatter cost about a quarter of the throughput: every field goes through `dyn Debug`, the
//! visitor and `core::fmt`. Here the fixed fields are copied, integers written with `itoa`,
//! floats with `ryu`, and the timestamp's date and time of day formatted once a second.
//! Everywhere else (tests, a terminal with colours, another embedder) the line is an ordinary
//! `tracing` event with the same fields.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::sync::OnceLock;
use std::time::SystemTime;

use http::Method;

use crate::logwriter::LogWriter;

/// The target of the request log's events: `RUST_LOG=info,berth::request=off` drops the lines.
pub const TARGET: &str = "berth::request";

/// How [`install`]ed lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    /// `tracing-subscriber`'s default text format, without colours.
    Text,
    /// `tracing-subscriber`'s JSON format with the fields flattened into the object.
    Json,
}

struct Sink {
    writer: LogWriter,
    format: LineFormat,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sends request lines straight to `writer` in `format` from now on, instead of through
/// `tracing`'s formatter. Once per process; later calls change nothing and return false.
pub fn install(writer: LogWriter, format: LineFormat) -> bool {
    SINK.set(Sink { writer, format }).is_ok()
}

/// Whether request lines are logged: decided once per request, before any of their strings
/// is built.
pub fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// One request's line: method, path and what the handler found, never a header value.
#[derive(Debug)]
pub struct RequestLine<'a> {
    /// The request method.
    pub method: &'a Method,
    /// The request path, without the query.
    pub path: &'a str,
    /// The route's metric label.
    pub route: &'static str,
    /// The upstream's name, `-` when none was chosen.
    pub upstream: &'a str,
    /// The repository, `-` when none.
    pub repository: &'a str,
    /// The tag or digest, `-` when none.
    pub reference: &'a str,
    /// The response status.
    pub status: u16,
    /// The cache result label.
    pub cache: &'static str,
    /// Body bytes sent.
    pub bytes: u64,
    /// Milliseconds to the response head.
    pub head_ms: f64,
    /// Milliseconds to the end of the body.
    pub duration_ms: f64,
}

thread_local! {
    /// Each thread formats its lines in one reused buffer.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

impl RequestLine<'_> {
    /// Logs the line: to the installed sink, or as a `tracing` event.
    pub fn emit(&self) {
        let Some(sink) = SINK.get() else {
            tracing::info!(
                target: TARGET,
                method = %self.method,
                path = %self.path,
                route = self.route,
                upstream = self.upstream,
                repository = self.repository,
                reference = self.reference,
                status = self.status,
                cache = self.cache,
                bytes = self.bytes,
                head_ms = self.head_ms,
                duration_ms = self.duration_ms,
                "request"
            );
            return;
        };
        LINE.with_borrow_mut(|line| {
            line.clear();
            self.format(sink.format, SystemTime::now(), line);
            let _ = (&sink.writer).write_all(line);
        });
    }

    /// Appends the line as `tracing-subscriber` formats it at `now`, newline included.
    fn format(&self, format: LineFormat, now: SystemTime, out: &mut Vec<u8>) {
        match format {
            LineFormat::Text => {
                timestamp(now, out);
                out.extend_from_slice(b"  INFO ");
                out.extend_from_slice(TARGET.as_bytes());
                out.extend_from_slice(b": request method=");
                out.extend_from_slice(self.method.as_str().as_bytes());
                out.extend_from_slice(b" path=");
                out.extend_from_slice(self.path.as_bytes());
                debug_field(out, "route", self.route);
                debug_field(out, "upstream", self.upstream);
                debug_field(out, "repository", self.repository);
                debug_field(out, "reference", self.reference);
                out.extend_from_slice(b" status=");
                int(out, self.status.into());
                debug_field(out, "cache", self.cache);
                out.extend_from_slice(b" bytes=");
                int(out, self.bytes);
                out.extend_from_slice(b" head_ms=");
                float(out, self.head_ms);
                out.extend_from_slice(b" duration_ms=");
                float(out, self.duration_ms);
            }
            LineFormat::Json => {
                out.extend_from_slice(br#"{"timestamp":""#);
                timestamp(now, out);
                out.extend_from_slice(br#"","level":"INFO","message":"request","method":"#);
                json_str(out, self.method.as_str());
                for (name, value) in [
                    ("path", self.path),
                    ("route", self.route),
                    ("upstream", self.upstream),
                    ("repository", self.repository),
                    ("reference", self.reference),
                ] {
                    let _ = write!(out, r#","{name}":"#);
                    json_str(out, value);
                }
                out.extend_from_slice(br#","status":"#);
                int(out, self.status.into());
                out.extend_from_slice(br#","cache":"#);
                json_str(out, self.cache);
                out.extend_from_slice(br#","bytes":"#);
                int(out, self.bytes);
                out.extend_from_slice(br#","head_ms":"#);
                let _ = serde_json::to_writer(&mut *out, &self.head_ms);
                out.extend_from_slice(br#","duration_ms":"#);
                let _ = serde_json::to_writer(&mut *out, &self.duration_ms);
                let _ = write!(out, r#","target":"{TARGET}"}}"#);
            }
        }
        out.push(b'\n');
    }
}

/// ` name="value"`, quoted and escaped as `{:?}` does (names, tags and labels need no escape:
/// they are copied).
fn debug_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(b' ');
    out.extend_from_slice(name.as_bytes());
    out.push(b'=');
    if value
        .bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\' && b != b'\'')
    {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{value:?}");
    }
}

thread_local! {
    /// The second last formatted on this thread and its `YYYY-MM-DDTHH:MM:SS.` prefix.
    static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
}

/// `now` as RFC 3339 in microseconds, UTC (`2026-12-04T17:20:00.123456Z`), as
/// tracing-subscriber writes it; the date and time of day are formatted once a second.
fn timestamp(now: SystemTime, out: &mut Vec<u8>) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut prefix) = SECOND.get();
    if cached != secs {
        let whole = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let text = humantime::format_rfc3339_seconds(whole).to_string();
        prefix[..19].copy_from_slice(&text.as_bytes()[..19]);
        prefix[19] = b'.';
        SECOND.set((secs, prefix));
    }
    out.extend_from_slice(&prefix);
    let micros = since.subsec_micros();
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(micros);
    out.extend(std::iter::repeat_n(b'0', 6 - digits.len()));
    out.extend_from_slice(digits.as_bytes());
    out.push(b'Z');
}

/// `x` as `{:?}` writes it: the shortest decimal that reads back as `x`, with `.0` when whole.
/// ryu writes the same digits without `core::fmt`; outside the range where both write plain
/// decimals (they differ in when they switch to an exponent), `{:?}` itself.
fn float(out: &mut Vec<u8>, x: f64) {
    if x == 0.0 || (1e-4..1e15).contains(&x.abs()) {
        out.extend_from_slice(ryu::Buffer::new().format_finite(x).as_bytes());
    } else {
        let _ = write!(out, "{x:?}");
    }
}

/// A JSON string, escaped by serde_json.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *out, s);
}

/// An integer in decimal.
fn int(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a `tracing` subscriber wrote.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line `tracing-subscriber` writes for `line` (no sink installed in unit tests).
    fn via_tracing(line: &RequestLine<'_>, format: LineFormat) -> String {
        let captured = Captured::default();
        let writer = {
            let c = captured.clone();
            move || c.clone()
        };
        let b = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(writer);
        let dispatch = match format {
            LineFormat::Text => tracing::Dispatch::new(b.finish()),
            LineFormat::Json => tracing::Dispatch::new(b.json().flatten_event(true).finish()),
        };
        tracing::dispatcher::with_default(&dispatch, || line.emit());
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn direct(line: &RequestLine<'_>, format: LineFormat) -> String {
        let mut out = Vec::new();
        line.format(format, SystemTime::now(), &mut out);
        String::from_utf8(out).unwrap()
    }

    /// The line without its timestamp (the two were formatted at different instants).
    fn untimed(line: &str, format: LineFormat) -> String {
        match format {
            LineFormat::Text => line.split_once("Z ").expect("timestamp").1.to_owned(),
            LineFormat::Json => {
                let (head, rest) = line.split_once(r#""timestamp":""#).expect("timestamp");
                format!("{head}{}", rest.split_once('"').unwrap().1)
            }
        }
    }

    #[test]
    fn lines_are_the_ones_tracing_subscriber_writes() {
        let get = Method::GET;
        let head = Method::HEAD;
        let odd = Method::from_bytes(b"PURGE").unwrap();
        let lines = [
            RequestLine {
                method: &get,
                path: "/v2/library/alpine/manifests/latest",
                route: "manifest",
                upstream: "hub",
                repository: "library/alpine",
                reference: "latest",
                status: 200,
                cache: "hit",
                bytes: 1234,
                head_ms: 0.123,
                duration_ms: 1.0,
            },
            RequestLine {
                method: &head,
                path: "/v2/a/b/blobs/sha256:00",
                route: "blob",
                upstream: "-",
                repository: "-",
                reference: "-",
                status: 404,
                cache: "none",
                bytes: 0,
                head_ms: 1e-7,
                duration_ms: 12345.678,
            },
            // Strings that need escaping, and numbers at the edges of their formats.
            RequestLine {
                method: &odd,
                path: "/v2/x\"y\\z/%22/\u{e9}",
                route: "unknown",
                upstream: "up \"quoted\"\\ \u{e9}\t",
                repository: "it's",
                reference: "\u{1}",
                status: 599,
                cache: "miss",
                bytes: u64::MAX,
                head_ms: 1e16,
                duration_ms: 0.0,
            },
        ];
        for format in [LineFormat::Text, LineFormat::Json] {
            for line in &lines {
                let want = via_tracing(line, format);
                let got = direct(line, format);
                assert!(
                    got.ends_with('\n') && got.matches('\n').count() == 1,
                    "{got}"
                );
                assert_eq!(untimed(&got, format), untimed(&want, format), "{format:?}");
            }
        }
    }

    #[test]
    fn floats_are_written_as_debug_writes_them() {
        let mut x = 1e-7_f64;
        let mut seen = 0;
        while x < 1e17 {
            for m in [1.0, 1.5, 2.345_678_9, 3.0, 7.123, 9.999_999_999_9] {
                for v in [x * m, -x * m] {
                    let mut out = Vec::new();
                    float(&mut out, v);
                    assert_eq!(String::from_utf8(out).unwrap(), format!("{v:?}"));
                    seen += 1;
                }
            }
            x *= 10.0;
        }
        for v in [
            0.0,
            -0.0,
            0.040005,
            0.111088,
            1e-4,
            1e15,
            f64::MIN_POSITIVE,
            f64::MAX,
        ] {
            let mut out = Vec::new();
            float(&mut out, v);
            assert_eq!(String::from_utf8(out).unwrap(), format!("{v:?}"));
        }
        assert!(seen > 250);
    }

    #[test]
    fn the_timestamp_is_rfc3339_in_microseconds() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_764_867_600_123_456);
        let line = RequestLine {
            method: &Method::GET,
            path: "/v2/",
            route: "base",
            upstream: "-",
            repository: "-",
            reference: "-",
            status: 200,
            cache: "none",
            bytes: 2,
            head_ms: 0.5,
            duration_ms: 0.5,
        };
        let mut out = Vec::new();
        line.format(LineFormat::Text, at, &mut out);
        assert!(
            out.starts_with(b"2025-12-04T17:00:00.123456Z  INFO berth::request: request "),
            "{}",
            String::from_utf8_lossy(&out)
        );
        // The cached second, then another second, and microseconds that need padding.
        for (micros, want) in [
            (1_764_867_600_999_999, "2025-12-04T17:00:00.999999Z"),
            (1_764_867_601_000_042, "2025-12-04T17:00:01.000042Z"),
            (0, "1970-01-01T00:00:00.000000Z"),
        ] {
            let mut ts = Vec::new();
            timestamp(
                SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(micros),
                &mut ts,
            );
            assert_eq!(String::from_utf8(ts).unwrap(), want);
        }
        out.clear();
        line.format(LineFormat::Json, at, &mut out);
        assert!(out.starts_with(br#"{"timestamp":"2025-12-04T17:00:00.123456Z","level":"INFO""#));
    }
}
