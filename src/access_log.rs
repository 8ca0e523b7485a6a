//! The access log: one line per proxied request, formatted straight into a buffer (no tracing
//! event, no allocation) that all workers share, so lines keep the order requests were answered
//! in. A thread of its own writes the buffer out when it holds a batch, or about
//! [`FLUSH_AFTER`] after its first line: requests wake it about once per batch, and its writes
//! go straight to the log's stream (stderr) without passing through the background writer of
//! the rest of the log, which would copy each batch twice and wake a second thread for it.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::config::LogFormat;

/// How long a line may wait in the buffer when the proxy is not busy enough to fill it.
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);

/// The buffered lines are written out once they reach this size: about 15 ms of lines at 90k
/// requests/s. Each batch wakes the writing thread about twice, and each wake takes a core from
/// a busy worker; 32 KiB batches woke it about 1000 times a second at that rate.
const BATCH_BYTES: usize = 256 * 1024;

/// When the writer falls this far behind (a stream nobody reads), the request that finds the
/// buffer this full writes it out itself and waits for that: memory stays bounded, and lines
/// are slowed down rather than lost.
const MOST_PENDING: usize = 8 * BATCH_BYTES;

type Writer = Box<dyn Write + Send>;

struct Sink {
    format: LogFormat,
    /// Lines not yet written, in the order they were recorded.
    pending: Mutex<Vec<u8>>,
    /// Signalled when the first line goes into an empty buffer and when it fills a batch.
    wake: Condvar,
    /// Held while a batch is written, so batches go out whole and in order.
    writer: Mutex<Writer>,
    /// False when the writing thread could not be started: each line then goes at once.
    thread_running: AtomicBool,
}

/// Where lines go, with their format; set by `logging::init`.
static SINK: OnceLock<Sink> = OnceLock::new();

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

/// Makes the access log write to `writer` in `format`, and starts the thread that writes the
/// lines (it sleeps while none wait). With stderr, each batch goes out under stderr's lock,
/// so it lands between the other log lines, not inside one (unless the stream takes a line of
/// theirs in two writes, which files and blocking pipes do not).
pub fn install(writer: impl Write + Send + 'static, format: LogFormat) {
    let installed = SINK.set(Sink::new(Box::new(writer), format));
    if installed.is_ok() {
        let started = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(write_waiting_lines);
        if let (Err(e), Some(sink)) = (started, SINK.get()) {
            // Logging is being set up: this is the one place left to say it.
            eprintln!(
                "seldon-auth-proxy: access lines are written one by one: no thread for them ({e})"
            );
            sink.thread_running.store(false, Ordering::Relaxed);
        }
    }
}

/// Waits for a first line in the buffer, lets more gather until a batch is full or
/// [`FLUSH_AFTER`] has passed, takes them all (the buffer is swapped, not copied), writes
/// them, and waits again.
fn write_waiting_lines() {
    let Some(sink) = SINK.get() else {
        return;
    };
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    loop {
        let mut pending = sink.pending();
        while pending.is_empty() {
            pending = sink.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
        }
        let deadline = Instant::now() + FLUSH_AFTER;
        while pending.len() < BATCH_BYTES {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            pending = sink
                .wake
                .wait_timeout(pending, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        // Taking the writer before letting the buffer go keeps batches in order, and makes
        // `flush` wait for this batch.
        let mut writer = sink.writer();
        std::mem::swap(&mut *pending, &mut batch);
        drop(pending);
        let _ = writer.write_all(&batch);
        drop(writer);
        release_backlog(&mut batch);
    }
}

/// Empties a buffer that was written out, giving back what a backlog made it grow to.
fn release_backlog(buffer: &mut Vec<u8>) {
    buffer.clear();
    if buffer.capacity() > 2 * BATCH_BYTES {
        buffer.shrink_to(BATCH_BYTES);
    }
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
    if let Some(sink) = SINK.get() {
        sink.record(entry);
    }
}

/// Writes the recorded lines now (the proxy does once its workers are done).
pub fn flush() {
    if let Some(sink) = SINK.get() {
        sink.write_out(sink.pending());
    }
}

impl Sink {
    fn new(writer: Writer, format: LogFormat) -> Sink {
        Sink {
            format,
            pending: Mutex::new(Vec::with_capacity(BATCH_BYTES)),
            wake: Condvar::new(),
            writer: Mutex::new(writer),
            thread_running: AtomicBool::new(true),
        }
    }

    fn record(&self, entry: &Entry<'_>) {
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            let syntax = match self.format {
                LogFormat::Json => &JSON,
                LogFormat::Text => &TEXT,
            };
            write_line(&mut line, entry, syntax);
            let mut pending = self.pending();
            let before = pending.len();
            pending.extend_from_slice(&line);
            let after = pending.len();
            if after >= MOST_PENDING || !self.thread_running.load(Ordering::Relaxed) {
                self.write_out(pending);
            } else if before == 0 || (before < BATCH_BYTES && after >= BATCH_BYTES) {
                // Woken after the lock is let go, so the thread does not wait for it.
                drop(pending);
                self.wake.notify_one();
            }
        });
    }

    fn pending(&self) -> MutexGuard<'_, Vec<u8>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes what is pending, with the buffer still locked so no line overtakes it. The
    /// writer is taken even when nothing is pending: a batch the thread is writing has been
    /// written once this returns.
    fn write_out(&self, mut pending: MutexGuard<'_, Vec<u8>>) {
        let mut writer = self.writer();
        if !pending.is_empty() {
            let _ = writer.write_all(&pending).and_then(|()| writer.flush());
            release_backlog(&mut pending);
        }
    }
}

thread_local! {
    /// `YYYY-MM-DDTHH:MM:SS` of the last second a line was stamped in, formatted once.
    static SECOND: RefCell<(u64, [u8; 19])> = const { RefCell::new((u64::MAX, [0; 19])) };
}

/// Appends `n` in decimal.
fn write_number(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Appends `d` in milliseconds with three decimals (`12.345`).
fn write_millis(out: &mut Vec<u8>, d: Duration) {
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    write_number(out, micros / 1000);
    let fraction = micros % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (fraction / 100) as u8,
        b'0' + (fraction / 10 % 10) as u8,
        b'0' + (fraction % 10) as u8,
    ]);
}

/// Appends the current time as RFC 3339 in UTC with microseconds (`2026-11-28T04:02:25.230979Z`).
fn write_timestamp(out: &mut Vec<u8>) {
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since_epoch.as_secs();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != seconds {
            let text = humantime::format_rfc3339_seconds(
                SystemTime::UNIX_EPOCH + Duration::from_secs(seconds),
            )
            .to_string();
            cached.1.copy_from_slice(&text.as_bytes()[..19]);
            cached.0 = seconds;
        }
        out.extend_from_slice(&cached.1);
    });
    let micros = since_epoch.subsec_micros();
    let mut fraction = [b'.', 0, 0, 0, 0, 0, 0, b'Z'];
    for (i, slot) in fraction[1..7].iter_mut().enumerate() {
        *slot = b'0' + (micros / 10u32.pow(5 - i as u32) % 10) as u8;
    }
    out.extend_from_slice(&fraction);
}

/// Writes `bytes` as the inside of a JSON string (also used, quoted, in text lines).
fn write_escaped(out: &mut Vec<u8>, bytes: &[u8]) {
    // Without an early exit, so the check runs over many bytes at once.
    let plain = bytes.iter().fold(true, |plain, &b| {
        plain & (0x20..=0x7e).contains(&b) & (b != b'"') & (b != b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
        return;
    }
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

/// What goes between the fields of a line, for one format; the fields and their order are
/// the same in both.
struct Syntax {
    before_timestamp: &'static [u8],
    before_method: &'static [u8],
    before_path: &'static [u8],
    before_status: &'static [u8],
    before_upstream: &'static [u8],
    before_total: &'static [u8],
    before_request_id: &'static [u8],
    end: &'static [u8],
}

const JSON: Syntax = Syntax {
    before_timestamp: b"{\"timestamp\":\"",
    before_method: b"\",\"level\":\"INFO\",\"message\":\"request\",\"method\":\"",
    before_path: b"\",\"path\":\"",
    before_status: b"\",\"status\":",
    before_upstream: b",\"upstream_ms\":",
    before_total: b",\"total_ms\":",
    before_request_id: b",\"request_id\":\"",
    end: b"\"}\n",
};

const TEXT: Syntax = Syntax {
    before_timestamp: b"",
    before_method: b"  INFO request method=",
    before_path: b" path=\"",
    before_status: b"\" status=",
    before_upstream: b" upstream_ms=",
    before_total: b" total_ms=",
    before_request_id: b" request_id=\"",
    end: b"\"\n",
};

fn write_line(out: &mut Vec<u8>, e: &Entry<'_>, syntax: &Syntax) {
    out.extend_from_slice(syntax.before_timestamp);
    write_timestamp(out);
    out.extend_from_slice(syntax.before_method);
    write_escaped(out, e.method.as_bytes());
    out.extend_from_slice(syntax.before_path);
    write_escaped(out, e.path.as_bytes());
    out.extend_from_slice(syntax.before_status);
    write_number(out, e.status.into());
    if let Some(upstream) = e.upstream {
        out.extend_from_slice(syntax.before_upstream);
        write_millis(out, upstream);
    }
    out.extend_from_slice(syntax.before_total);
    write_millis(out, e.total);
    out.extend_from_slice(syntax.before_request_id);
    write_escaped(out, e.request_id);
    out.extend_from_slice(syntax.end);
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
        write_line(&mut out, &entry(), &JSON);
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
    fn timestamps_match_rfc3339_with_microseconds_and_numbers_are_exact() {
        let before = SystemTime::now();
        let mut out = Vec::new();
        write_timestamp(&mut out);
        let after = SystemTime::now();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.len(), "2026-11-28T04:02:25.230979Z".len(), "{text}");
        let parsed = humantime::parse_rfc3339(&text).unwrap();
        let slack = Duration::from_micros(1);
        assert!(parsed + slack >= before && parsed <= after, "{text}");

        for (micros, expected) in [
            (0, "0.000"),
            (7, "0.007"),
            (1_234, "1.234"),
            (98_765_432, "98765.432"),
        ] {
            let mut out = Vec::new();
            write_millis(&mut out, Duration::from_micros(micros));
            assert_eq!(String::from_utf8(out).unwrap(), expected);
        }
        let mut out = Vec::new();
        write_number(&mut out, u64::MAX);
        assert_eq!(String::from_utf8(out).unwrap(), u64::MAX.to_string());
        let mut out = Vec::new();
        write_escaped(&mut out, b"a\x01\"\\b");
        assert_eq!(String::from_utf8(out).unwrap(), "a\\u0001\\\"\\\\b");
    }

    /// A writer whose output the test reads.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_writer_far_behind_makes_requests_write_and_no_line_is_lost() {
        let out = Captured::default();
        // As if the writing thread were stuck: nothing takes the lines but the requests.
        let sink = Sink::new(Box::new(out.clone()), LogFormat::Json);
        let ids: Vec<String> = (0..12_000).map(|i| format!("backlog-{i:05}")).collect();
        let mut writes_by_requests = 0;
        for id in &ids {
            let written_before = out.0.lock().unwrap().len();
            sink.record(&Entry {
                request_id: id.as_bytes(),
                ..entry()
            });
            let pending = sink.pending();
            assert!(pending.len() < MOST_PENDING, "the buffer stays bounded");
            if out.0.lock().unwrap().len() > written_before {
                writes_by_requests += 1;
                assert!(
                    pending.is_empty() && pending.capacity() <= 2 * BATCH_BYTES,
                    "the backlog written whole and its memory given back"
                );
            }
        }
        assert!(writes_by_requests >= 1, "a request wrote the backlog");
        sink.write_out(sink.pending());
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let logged: Vec<String> = text
            .lines()
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                v["request_id"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(logged, ids, "every line once, in order");
    }

    #[test]
    fn text_lines_quote_and_escape() {
        let mut out = Vec::new();
        let e = Entry {
            upstream: None,
            ..entry()
        };
        write_line(&mut out, &e, &TEXT);
        let line = String::from_utf8(out).unwrap();
        assert!(line.contains("  INFO request method=GET path=\"/seldon-deploy/api/v1alpha1/a%2Fb\" status=200 total_ms=56.789 request_id=\"id-\\\"1\\\"\"\n"), "{line}");
        assert!(!line.contains("upstream_ms"));
    }
}
