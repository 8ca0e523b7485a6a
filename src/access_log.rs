//! The access log: one line per proxied request, formatted straight into a buffer (no tracing
//! event, no allocation) that all workers share, so lines keep the order requests were answered
//! in; the buffer reaches the log writer when it is full or when a worker runs out of work.

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use tracing_appender::non_blocking::NonBlocking;

use crate::config::LogFormat;

/// The buffered lines are handed to the writer once they reach this size.
const BATCH_BYTES: usize = 32 * 1024;

struct Sink {
    writer: NonBlocking,
    format: LogFormat,
    /// Lines not yet handed to the writer, in the order they were recorded.
    pending: Mutex<Vec<u8>>,
}

/// The writer the rest of the log goes to, with its format; set by `logging::init`.
static SINK: OnceLock<Sink> = OnceLock::new();

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

/// Makes the access log write to the process's log writer (the same stream and format).
pub fn install(writer: NonBlocking, format: LogFormat) {
    let _ = SINK.set(Sink {
        writer,
        format,
        pending: Mutex::new(Vec::with_capacity(BATCH_BYTES)),
    });
}

/// Whether access lines have somewhere to go and info-level events of `access` are enabled.
pub fn is_active() -> bool {
    SINK.get().is_some() && tracing::enabled!(target: "access", tracing::Level::INFO)
}

/// One proxied request, as logged.
pub struct Entry<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub upstream: Option<Duration>,
    pub total: Duration,
    pub request_id: &'a [u8],
}

/// Records one line for `entry`, before its response goes out.
pub fn record(entry: &Entry<'_>) {
    let Some(sink) = SINK.get() else {
        return;
    };
    LINE.with(|line| {
        let mut line = line.borrow_mut();
        line.clear();
        let _ = match sink.format {
            LogFormat::Json => write_json(&mut line, entry),
            LogFormat::Text => write_text(&mut line, entry),
        };
        let mut pending = sink.pending();
        pending.extend_from_slice(&line);
        if pending.len() >= BATCH_BYTES {
            sink.hand_over(&mut pending);
        }
    });
}

/// Hands the recorded lines to the log writer. Each proxy worker calls it before it sleeps,
/// so at low load a line reaches the log as soon as its request is answered.
pub fn flush() {
    if let Some(sink) = SINK.get() {
        sink.hand_over(&mut sink.pending());
    }
}

impl Sink {
    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called with the buffer locked, so batches reach the writer in the order they were
    /// filled; the writer thread writes each whole.
    fn hand_over(&self, pending: &mut Vec<u8>) {
        if !pending.is_empty() {
            let _ = self.writer.clone().write_all(pending);
            pending.clear();
        }
    }
}

fn write_millis(out: &mut Vec<u8>, d: Duration) -> std::io::Result<()> {
    let micros = d.as_micros();
    write!(out, "{}.{:03}", micros / 1000, micros % 1000)
}

/// Writes `bytes` as the inside of a JSON string (also used, quoted, in text lines).
fn write_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x20..=0x7e => out.push(b),
            _ => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
    }
}

fn write_json(out: &mut Vec<u8>, e: &Entry<'_>) -> std::io::Result<()> {
    write!(
        out,
        "{{\"timestamp\":\"{}\",\"level\":\"INFO\",\"message\":\"request\",\"method\":\"",
        humantime::format_rfc3339_micros(SystemTime::now())
    )?;
    write_escaped(out, e.method.as_bytes());
    out.extend_from_slice(b"\",\"path\":\"");
    write_escaped(out, e.path.as_bytes());
    write!(out, "\",\"status\":{}", e.status)?;
    if let Some(upstream) = e.upstream {
        out.extend_from_slice(b",\"upstream_ms\":");
        write_millis(out, upstream)?;
    }
    out.extend_from_slice(b",\"total_ms\":");
    write_millis(out, e.total)?;
    out.extend_from_slice(b",\"request_id\":\"");
    write_escaped(out, e.request_id);
    out.extend_from_slice(b"\"}\n");
    Ok(())
}

fn write_text(out: &mut Vec<u8>, e: &Entry<'_>) -> std::io::Result<()> {
    write!(
        out,
        "{}  INFO request method={} path=\"",
        humantime::format_rfc3339_micros(SystemTime::now()),
        e.method
    )?;
    write_escaped(out, e.path.as_bytes());
    write!(out, "\" status={}", e.status)?;
    if let Some(upstream) = e.upstream {
        out.extend_from_slice(b" upstream_ms=");
        write_millis(out, upstream)?;
    }
    out.extend_from_slice(b" total_ms=");
    write_millis(out, e.total)?;
    out.extend_from_slice(b" request_id=\"");
    write_escaped(out, e.request_id);
    out.extend_from_slice(b"\"\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            method: "GET",
            path: "/seldon-deploy/api/v1alpha1/a%2Fb",
            status: 200,
            upstream: Some(Duration::from_micros(1234)),
            total: Duration::from_micros(56_789),
            request_id: b"id-\"1\"",
        }
    }

    #[test]
    fn json_lines_are_json_with_the_documented_fields() {
        let mut out = Vec::new();
        write_json(&mut out, &entry()).unwrap();
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["message"], "request");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/seldon-deploy/api/v1alpha1/a%2Fb");
        assert_eq!(v["status"], 200);
        assert_eq!(v["upstream_ms"], 1.234);
        assert_eq!(v["total_ms"], 56.789);
        assert_eq!(v["request_id"], "id-\"1\"");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn text_lines_quote_and_escape() {
        let mut out = Vec::new();
        let e = Entry {
            upstream: None,
            ..entry()
        };
        write_text(&mut out, &e).unwrap();
        let line = String::from_utf8(out).unwrap();
        assert!(line.contains("  INFO request method=GET path=\"/seldon-deploy/api/v1alpha1/a%2Fb\" status=200 total_ms=56.789 request_id=\"id-\\\"1\\\"\"\n"), "{line}");
        assert!(!line.contains("upstream_ms"));
    }
}
