//! HTTP/1.1 on one upstream connection: writes a request (its head, then its body as it
//! streams, with Content-Length or chunked), reads the response head with `httparse`, and
//! reads the response body (Content-Length, chunked, or until the upstream closes).
//!
//! Why not hyper's client, which did this before: a connection of ours carries one request at
//! a time for one worker, and hyper's client runs each connection as a task of its own, with a
//! channel for requests, one for each response and one for each response body between it and
//! the request. Reading and writing in the request's own task, with nothing in between, takes
//! a quarter fewer instructions per proxied request (bench/README.md). What is left to do is
//! the plain HTTP/1.1 of RFC 9112 a proxy to one platform needs: no upgrades, no pipelining;
//! interim 1xx responses are skipped, trailers dropped, and the fields about the connection
//! itself (`Connection`, `Keep-Alive`, `Transfer-Encoding`) are taken in here.

use std::future::{poll_fn, Future};
use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use http_body::{Body, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::body::ForwardBody;
use crate::lazy_deadline::{LazyDeadline, StallWatch};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The largest response head accepted.
const MAX_HEAD_BYTES: usize = 256 * 1024;
/// The most header fields a response head may have.
const MAX_HEADERS: usize = 128;
/// Room made in the read buffer before each read.
const READ_CHUNK: usize = 16 * 1024;
/// Request body frames up to this size are copied behind their chunk framing and written with
/// it; larger ones are written from where they are.
const COPY_LIMIT: usize = 8 * 1024;
/// The longest chunk-size line (with any extensions), and all trailer fields together.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 64 * 1024;

/// A request head as it is written upstream: the fields of `set` first, then the caller's,
/// less those of the same names and those `leave_out` names. The proxy replaces fields this
/// way instead of editing the caller's `HeaderMap`, whose every insert and removal hashes a
/// name and may grow the map.
pub struct RequestHead<'a> {
    /// Method, target (in origin form) and the caller's fields.
    pub parts: &'a http::request::Parts,
    /// Written before the caller's fields, in this order, in place of the caller's fields of
    /// the same names.
    pub set: &'a [(&'a HeaderName, &'a HeaderValue)],
    /// Whether one of the caller's fields is left out.
    pub leave_out: fn(&HeaderName) -> bool,
}

/// What went wrong on an upstream connection.
#[derive(Debug, thiserror::Error)]
pub enum Http1Error {
    #[error("the upstream closed the connection before answering")]
    ClosedBeforeAnswer,
    #[error("the upstream closed the connection in the middle of its response")]
    Incomplete,
    #[error("the upstream sent nothing more of its response for {0:?} (idle_timeout)")]
    Stalled(Duration),
    #[error("the upstream's response is not valid HTTP/1.1: {0}")]
    Malformed(String),
    #[error("the upstream's response head is larger than {} KiB", MAX_HEAD_BYTES / 1024)]
    HeadTooLarge,
    #[error("the caller's request body could not be read")]
    RequestBody(#[source] BoxError),
    #[error("reading from or writing to the upstream failed")]
    Io(#[from] io::Error),
}

impl Http1Error {
    /// Whether the connection turned out to be closed or reset before an answer came: a
    /// pooled connection the upstream had given up, which a fresh connection may well not be.
    pub fn is_stale(&self) -> bool {
        match self {
            Http1Error::ClosedBeforeAnswer => true,
            Http1Error::Io(e) => crate::outbound::is_stale_connection(e),
            _ => false,
        }
    }

    fn malformed(what: impl Into<String>) -> Http1Error {
        Http1Error::Malformed(what.into())
    }
}

/// Why [`Connection::send`] got no response head.
pub enum SendFailure {
    /// Nothing of the request was written: its body is handed back, for another connection.
    Unsent(ForwardBody, Http1Error),
    Failed(Http1Error),
    /// No response head by the deadline.
    TimedOut,
}

/// How the rest of the response body is delimited.
enum Framing {
    /// This many bytes are left (`Content-Length`), never 0 (that is `Done`).
    Length(u64),
    Chunked(Chunked),
    /// Until the upstream closes the connection.
    UntilClose,
    /// The body has been read to its end.
    Done,
}

/// Where a chunked body's decoding stands.
#[derive(Clone, Copy)]
enum Chunked {
    /// Before a chunk-size line.
    Size,
    /// Within a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk, in the trailer section; this many bytes of it read so far.
    Trailers(usize),
}

/// What the connection has yet to write: head or framing bytes first, then a large frame.
#[derive(Default)]
struct Outgoing {
    buf: Vec<u8>,
    written: usize,
    data: Option<Bytes>,
    /// What follows `data`: a chunk's closing CRLF, and the last chunk when the body ended.
    after_data: &'static [u8],
    /// Whether any byte of the current request went out.
    sent_any: bool,
    /// Whether bytes were written and not yet flushed (TLS keeps some until flushed).
    unflushed: bool,
}

/// A request body still being written.
struct RequestBody {
    body: ForwardBody,
    chunked: bool,
}

/// One HTTP/1.1 connection to the upstream, carrying one exchange at a time.
pub struct Connection<T> {
    io: T,
    read_buf: BytesMut,
    out: Outgoing,
    request_body: Option<RequestBody>,
    framing: Framing,
    /// Whether the upstream lets the connection carry another request after this response.
    keep_alive: bool,
    /// Where each field of the head being parsed is (name, value), kept to reuse its room.
    fields: Vec<(Range<usize>, Range<usize>)>,
    /// The deadline of [`Connection::send_by`], and of a body that stalls, kept from one
    /// request to the next.
    deadline: Option<LazyDeadline>,
    /// How long a response body may send nothing before it is cut short (`None`: for ever).
    stall_limit: Option<Duration>,
    stall: StallWatch,
}

/// What [`Connection::parse_head`] found at the start of the read buffer.
enum Parsed {
    /// Not all of a head yet.
    Partial,
    /// An interim (1xx) response, now skipped.
    Interim,
    Final(http::response::Parts),
}

impl<T: AsyncRead + AsyncWrite + Unpin> Connection<T> {
    pub fn new(io: T) -> Connection<T> {
        Connection {
            io,
            read_buf: BytesMut::new(),
            out: Outgoing::default(),
            request_body: None,
            framing: Framing::Done,
            keep_alive: true,
            fields: Vec::new(),
            deadline: None,
            stall_limit: None,
            stall: StallWatch::default(),
        }
    }

    /// Cuts a response body short once the upstream has sent nothing of it for `limit`, as
    /// the caller would otherwise wait for the rest, and the connection's place stay taken,
    /// for as long as the connection stays open.
    pub fn with_stall_limit(mut self, limit: Duration) -> Connection<T> {
        self.stall_limit = Some(limit);
        self
    }

    /// Whether an idle connection can carry a request: the upstream has neither closed it
    /// nor sent anything unasked. Costs no system call when the last read drained the socket.
    pub fn is_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        self.is_reusable() && self.poll_read_more(&mut cx).is_pending()
    }

    /// Whether the exchange is over and the connection may carry another.
    pub fn is_reusable(&self) -> bool {
        self.keep_alive
            && self.response_done()
            && !self.request_body_pending()
            && self.read_buf.is_empty()
    }

    /// Whether the response body has been read to its end.
    pub fn response_done(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    /// Whether the request body is still being written (the upstream answered early).
    fn request_body_pending(&self) -> bool {
        self.request_body.is_some() || !self.out.is_empty() || self.out.unflushed
    }

    /// The response body's size, when it is known.
    pub fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }

    /// Sends a request with `head` (its target in origin form) and `body`, and reads the
    /// response head, writing the body meanwhile; what may remain of the body is written while
    /// the response body is read. Interim 1xx responses are skipped.
    pub async fn send(
        &mut self,
        head: &RequestHead<'_>,
        body: ForwardBody,
    ) -> Result<http::response::Parts, SendFailure> {
        debug_assert!(
            self.is_reusable(),
            "a request goes on a new or reusable connection"
        );
        let chunked = encode_head(&mut self.out.buf, head, &body);
        self.out.sent_any = false;
        if let Err(e) = poll_fn(|cx| self.poll_write_out(cx)).await {
            self.keep_alive = false;
            return Err(if self.out.sent_any {
                SendFailure::Failed(e.into())
            } else {
                self.out = Outgoing::default();
                SendFailure::Unsent(body, e.into())
            });
        }
        if !body.is_end_stream() {
            self.request_body = Some(RequestBody { body, chunked });
        }
        let head_request = head.parts.method == Method::HEAD;
        poll_fn(|cx| {
            if self.request_body_pending() {
                match self.poll_send_body(cx) {
                    // The caller's body failed: the upstream would wait for the rest forever.
                    Poll::Ready(Err(e @ Http1Error::RequestBody(_))) => return Poll::Ready(Err(e)),
                    // A failure to write: a head may still come (an upstream refusing the body
                    // early), or reading fails too and says why.
                    Poll::Ready(Err(e)) => {
                        tracing::debug!("the request body could not be sent whole: {e}")
                    }
                    _ => {}
                }
            }
            self.poll_head(cx, head_request)
        })
        .await
        .map_err(|e| {
            self.keep_alive = false;
            SendFailure::Failed(e)
        })
    }

    /// [`Connection::send`], given up when no response head has come by `deadline`. The
    /// connection keeps one timer for all its requests (and its bodies' stall limit), moved
    /// only when it fires before the deadline at hand or the deadline comes before it,
    /// instead of one set and cancelled per request.
    pub async fn send_by(
        &mut self,
        head: &RequestHead<'_>,
        body: ForwardBody,
        deadline: Instant,
    ) -> Result<http::response::Parts, SendFailure> {
        self.stall.progressed();
        let mut timer = LazyDeadline::reused(self.deadline.take(), deadline);
        let sent = {
            let mut sending = pin!(self.send(head, body));
            poll_fn(|cx| match sending.as_mut().poll(cx) {
                Poll::Ready(sent) => Poll::Ready(sent),
                Poll::Pending => timer.poll_passed(cx).map(|()| Err(SendFailure::TimedOut)),
            })
            .await
        };
        if matches!(sent, Err(SendFailure::TimedOut)) {
            self.keep_alive = false; // a request is still under way on it
        }
        self.deadline = Some(timer);
        sent
    }

    /// Reads the next piece of the response body; `None` at its end. Writes whatever of the
    /// request body remains first. A body that sends nothing for the stall limit is an error.
    pub fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Http1Error>>> {
        let polled = self.poll_body_as_it_comes(cx);
        let Some(limit) = self.stall_limit else {
            return polled;
        };
        // While the request body is still being sent, the wait is the upload's, not a stall.
        if polled.is_ready() || self.request_body_pending() {
            self.stall.progressed();
            return polled;
        }
        ready!(self.stall.poll_stalled(&mut self.deadline, limit, cx));
        self.keep_alive = false;
        Poll::Ready(Some(Err(Http1Error::Stalled(limit))))
    }

    fn poll_body_as_it_comes(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Http1Error>>> {
        if self.request_body_pending() {
            if let Poll::Ready(Err(e)) = self.poll_send_body(cx) {
                tracing::debug!("the rest of the request body could not be sent: {e}");
            }
        }
        loop {
            match self.framing {
                Framing::Done => return Poll::Ready(None),
                Framing::Length(left) => {
                    if self.read_buf.is_empty() {
                        ready!(self.poll_read_some(cx))?;
                    }
                    let (data, left) = self.take_body(left);
                    self.framing = match left {
                        0 => Framing::Done,
                        left => Framing::Length(left),
                    };
                    return Poll::Ready(Some(Ok(data)));
                }
                Framing::UntilClose => {
                    if self.read_buf.is_empty() && ready!(self.poll_read_more(cx))? == 0 {
                        self.framing = Framing::Done;
                        self.keep_alive = false;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(self.read_buf.split().freeze())));
                }
                Framing::Chunked(state) => {
                    if let Some(data) = ready!(self.poll_chunked(cx, state))? {
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
            }
        }
    }

    fn cut_short(&mut self) -> Http1Error {
        self.keep_alive = false;
        Http1Error::Incomplete
    }

    /// Writes what is waiting in `out`, then flushes.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let out = &mut self.out;
        loop {
            let pending: &[u8] = if out.written < out.buf.len() {
                &out.buf[out.written..]
            } else if let Some(data) = &out.data {
                data
            } else {
                break;
            };
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            out.sent_any = true;
            out.unflushed = true;
            if out.written < out.buf.len() {
                out.written += n;
                if out.written == out.buf.len() {
                    out.buf.clear();
                    out.written = 0;
                }
            } else if let Some(data) = &mut out.data {
                data.advance(n);
                if data.is_empty() {
                    out.data = None;
                    out.buf
                        .extend_from_slice(std::mem::take(&mut out.after_data));
                }
            }
        }
        if out.unflushed {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            out.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes the request body as its frames come, until its end.
    fn poll_send_body(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Http1Error>> {
        loop {
            if let Err(e) = ready!(self.poll_write_out(cx)) {
                self.abandon_request_body();
                return Poll::Ready(Err(e.into()));
            }
            let Some(request_body) = &mut self.request_body else {
                return Poll::Ready(Ok(()));
            };
            let chunked = request_body.chunked;
            match ready!(Pin::new(&mut request_body.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let ended = request_body.body.is_end_stream();
                    if let Ok(data) = frame.into_data() {
                        self.out.queue(data, chunked);
                    }
                    if ended {
                        self.end_request_body(chunked);
                    }
                }
                Some(Err(e)) => {
                    self.abandon_request_body();
                    return Poll::Ready(Err(Http1Error::RequestBody(e)));
                }
                None => self.end_request_body(chunked),
            }
        }
    }

    fn end_request_body(&mut self, chunked: bool) {
        if chunked {
            // After the chunk still waiting to be written, if there is one.
            if self.out.data.is_some() {
                self.out.after_data = b"\r\n0\r\n\r\n";
            } else {
                self.out.buf.extend_from_slice(b"0\r\n\r\n");
            }
        }
        self.request_body = None;
    }

    /// The request cannot be completed: the connection cannot carry another.
    fn abandon_request_body(&mut self) {
        self.request_body = None;
        self.out = Outgoing::default();
        self.keep_alive = false;
    }

    /// Reads until a whole final response head is in, and parses it.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_request: bool,
    ) -> Poll<Result<http::response::Parts, Http1Error>> {
        let mut read_any = !self.read_buf.is_empty();
        loop {
            if !self.read_buf.is_empty() {
                match self.parse_head(head_request)? {
                    Parsed::Final(parts) => return Poll::Ready(Ok(parts)),
                    Parsed::Interim => continue,
                    Parsed::Partial if self.read_buf.len() >= MAX_HEAD_BYTES => {
                        return Poll::Ready(Err(Http1Error::HeadTooLarge))
                    }
                    Parsed::Partial => {}
                }
            }
            if ready!(self.poll_read_more(cx))? == 0 {
                return Poll::Ready(Err(if read_any {
                    Http1Error::Incomplete
                } else {
                    Http1Error::ClosedBeforeAnswer
                }));
            }
            read_any = true;
        }
    }

    /// Parses a response head at the start of the read buffer and takes it out.
    fn parse_head(&mut self, head_request: bool) -> Result<Parsed, Http1Error> {
        let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            &self.read_buf,
            &mut slots,
        );
        let head_len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Http1Error::malformed(format!(
                    "more than {MAX_HEADERS} header fields"
                )))
            }
            Err(e) => return Err(Http1Error::malformed(e.to_string())),
        };
        let code = response.code.unwrap_or_default();
        let status = StatusCode::from_u16(code)
            .map_err(|_| Http1Error::malformed(format!("status {code}")))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Http1Error::malformed(
                "101 Switching Protocols (upgrades are not forwarded)",
            ));
        }
        if status.is_informational() {
            self.read_buf.advance(head_len);
            return Ok(Parsed::Interim);
        }
        let version = match response.version {
            Some(1) => Version::HTTP_11,
            _ => Version::HTTP_10,
        };

        // Where each field is in the head, and what the framing fields say.
        let base = self.read_buf.as_ptr() as usize;
        self.fields.clear();
        let mut content_length: Option<u64> = None;
        // Whether a Transfer-Encoding came, how many of its codings were `chunked`, and the
        // first other coding (an error, should there be a body to read).
        let mut transfer_encoding = false;
        let mut chunked_codings = 0;
        let mut other_coding: Option<String> = None;
        let mut close = version == Version::HTTP_10;
        for field in response.headers.iter() {
            let name = field.name.as_bytes();
            let value = field.value;
            // Fields about this connection only are taken in here and not passed on; a
            // `Connection` naming other fields stays, for the proxy to remove those too.
            let mut this_hop_only = false;
            if name.eq_ignore_ascii_case(b"content-length") {
                let length = parse_content_length(value)?;
                if content_length.is_some_and(|l| l != length) {
                    return Err(Http1Error::malformed("two different Content-Length values"));
                }
                content_length = Some(length);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                transfer_encoding = true;
                for coding in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if coding.eq_ignore_ascii_case(b"chunked") {
                        chunked_codings += 1;
                    } else if !coding.is_empty() {
                        other_coding
                            .get_or_insert_with(|| String::from_utf8_lossy(coding).into_owned());
                    }
                }
                this_hop_only = true;
            } else if name.eq_ignore_ascii_case(b"keep-alive") {
                this_hop_only = true;
            } else if name.eq_ignore_ascii_case(b"connection") {
                this_hop_only = true;
                for token in value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        if version == Version::HTTP_10 {
                            close = false;
                        }
                    } else if !token.is_empty() {
                        this_hop_only = false;
                    }
                }
            }
            if this_hop_only {
                continue;
            }
            let name_at = field.name.as_ptr() as usize - base;
            let value_at = value.as_ptr() as usize - base;
            self.fields.push((
                name_at..name_at + name.len(),
                value_at..value_at + value.len(),
            ));
        }

        let head = self.read_buf.split_to(head_len).freeze();
        // Room for the one field the proxy adds (`X-Request-Id`) without growing the map.
        let mut headers = HeaderMap::with_capacity(self.fields.len() + 1);
        for (name, value) in &self.fields {
            let name = HeaderName::from_bytes(&head[name.clone()])
                .map_err(|_| Http1Error::malformed("a header name that is not a token"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(value.clone()))
                .map_err(|_| Http1Error::malformed("a header value with control characters"))?;
            headers.append(name, value);
        }

        self.framing = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Done
        } else if transfer_encoding {
            // Only `chunked` alone is taken: Transfer-Encoding is not passed on, so a body
            // still in another coding (`gzip, chunked`) would reach the caller with nothing to
            // say how to read it.
            if let Some(coding) = other_coding {
                return Err(Http1Error::malformed(format!(
                    "the transfer coding {coding:?}, which the proxy cannot pass on (only chunked)"
                )));
            }
            if chunked_codings > 1 {
                return Err(Http1Error::malformed("chunked applied twice"));
            }
            // Transfer-Encoding decides; a Content-Length beside it means nothing.
            headers.remove(http::header::CONTENT_LENGTH);
            if chunked_codings == 1 {
                Framing::Chunked(Chunked::Size)
            } else {
                Framing::UntilClose // a field with no coding in it
            }
        } else {
            match content_length {
                Some(0) => Framing::Done,
                Some(length) => Framing::Length(length),
                None => Framing::UntilClose,
            }
        };
        // Both framings at once smells of request smuggling: not reused (RFC 9112 6.3).
        let both_framings = transfer_encoding && content_length.is_some();
        let until_close = matches!(self.framing, Framing::UntilClose);
        // Once the request body was abandoned, the connection stays unusable.
        self.keep_alive = self.keep_alive && !close && !until_close && !both_framings;

        let mut response = http::Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        Ok(Parsed::Final(response.into_parts().0))
    }

    /// Decodes chunked data from `state` on: the next piece of data, or `None` once the body
    /// has ended.
    fn poll_chunked(
        &mut self,
        cx: &mut Context<'_>,
        mut state: Chunked,
    ) -> Poll<Result<Option<Bytes>, Http1Error>> {
        loop {
            self.framing = Framing::Chunked(state);
            match state {
                Chunked::Size => {
                    let Some(line) = take_line(&mut self.read_buf, MAX_CHUNK_LINE)? else {
                        ready!(self.poll_read_some(cx))?;
                        continue;
                    };
                    state = match parse_chunk_size(&line)? {
                        0 => Chunked::Trailers(0),
                        size => Chunked::Data(size),
                    };
                }
                Chunked::Data(left) => {
                    if self.read_buf.is_empty() {
                        ready!(self.poll_read_some(cx))?;
                    }
                    let (data, left) = self.take_body(left);
                    self.framing = Framing::Chunked(match left {
                        0 => Chunked::DataEnd,
                        left => Chunked::Data(left),
                    });
                    return Poll::Ready(Ok(Some(data)));
                }
                Chunked::DataEnd => {
                    let Some(line) = take_line(&mut self.read_buf, 2)? else {
                        ready!(self.poll_read_some(cx))?;
                        continue;
                    };
                    if !line.trim_ascii().is_empty() {
                        return Poll::Ready(Err(Http1Error::malformed(
                            "a chunk longer than its size",
                        )));
                    }
                    state = Chunked::Size;
                }
                Chunked::Trailers(read) => {
                    let limit = MAX_TRAILERS.saturating_sub(read);
                    let Some(line) = take_line(&mut self.read_buf, limit)? else {
                        ready!(self.poll_read_some(cx))?;
                        continue;
                    };
                    if line.trim_ascii().is_empty() {
                        self.framing = Framing::Done;
                        return Poll::Ready(Ok(None));
                    }
                    state = Chunked::Trailers(read + line.len() + 2);
                }
            }
        }
    }

    /// Takes up to `left` bytes of body from the read buffer; returns them and how many of
    /// `left` remain after them.
    fn take_body(&mut self, left: u64) -> (Bytes, u64) {
        let take = left.min(self.read_buf.len() as u64);
        (self.read_buf.split_to(take as usize).freeze(), left - take)
    }

    /// Reads more, failing when the upstream closed the connection.
    fn poll_read_some(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Http1Error>> {
        match ready!(self.poll_read_more(cx))? {
            0 => Poll::Ready(Err(self.cut_short())),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// Reads what has arrived into the read buffer; 0 when the upstream closed.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK / 4 {
            self.read_buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf)
    }
}

impl Outgoing {
    fn is_empty(&self) -> bool {
        self.buf.is_empty() && self.data.is_none()
    }

    /// Queues a frame of the request body, in a chunk when `chunked`.
    fn queue(&mut self, data: Bytes, chunked: bool) {
        if data.is_empty() {
            return;
        }
        if chunked {
            let _ = write!(self.buf, "{:X}\r\n", data.len()); // writing to a Vec cannot fail
        }
        if data.len() <= COPY_LIMIT {
            self.buf.extend_from_slice(&data);
            if chunked {
                self.buf.extend_from_slice(b"\r\n");
            }
        } else {
            self.data = Some(data);
            self.after_data = if chunked { b"\r\n" } else { b"" };
        }
    }
}

/// Writes the request head into `out`; returns whether the body goes chunked (its size is not
/// known in advance). A body of known size gets its `Content-Length`.
fn encode_head(out: &mut Vec<u8>, head: &RequestHead<'_>, body: &ForwardBody) -> bool {
    let parts = head.parts;
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut write_field = |name: &HeaderName, value: &HeaderValue| {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in head.set {
        write_field(name, value);
    }
    let size = body.size_hint().exact();
    let has_body = !body.is_end_stream();
    let mut length_written = false;
    for (name, value) in &parts.headers {
        // A body's length is written below from the body itself; an empty body's (a POST's
        // `Content-Length: 0`) is passed once.
        if *name == http::header::CONTENT_LENGTH {
            if has_body || length_written {
                continue;
            }
            length_written = true;
        } else if (head.leave_out)(name) || head.set.iter().any(|(set, _)| *set == name) {
            continue;
        }
        write_field(name, value);
    }
    let chunked = match (has_body, size) {
        (true, None) => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            true
        }
        (true, Some(size)) => {
            let _ = write!(out, "content-length: {size}\r\n"); // writing to a Vec cannot fail
            false
        }
        (false, _) => false,
    };
    out.extend_from_slice(b"\r\n");
    chunked
}

fn parse_content_length(value: &[u8]) -> Result<u64, Http1Error> {
    let invalid = || Http1Error::malformed("a Content-Length that is not a number");
    let text = std::str::from_utf8(value.trim_ascii()).map_err(|_| invalid())?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    text.parse().map_err(|_| invalid())
}

/// A chunk-size line's size: hex digits, then optionally extensions after `;`.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Http1Error> {
    let invalid = || Http1Error::malformed("a chunk size that is not a hex number");
    let digits = line
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return Err(invalid());
    }
    let text = std::str::from_utf8(digits).map_err(|_| invalid())?;
    u64::from_str_radix(text, 16).map_err(|_| invalid())
}

/// Takes a line ending in LF (the CR before it is optional) from the front of `buf`, without
/// its line ending; `None` when none is complete yet. Fails once `limit` bytes hold no end.
fn take_line(buf: &mut BytesMut, limit: usize) -> Result<Option<Bytes>, Http1Error> {
    match buf.iter().take(limit + 2).position(|&b| b == b'\n') {
        Some(end) => {
            let mut line = buf.split_to(end + 1).freeze();
            line.truncate(end);
            if line.ends_with(b"\r") {
                line.truncate(end - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() >= limit + 2 => Err(Http1Error::malformed(
            "a chunk line or trailer section too long",
        )),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// A connection to a scripted upstream: what the proxy writes is returned by the task,
    /// and `answer` is written back.
    fn scripted(
        answer: &'static [u8],
    ) -> (Connection<DuplexStream>, tokio::task::JoinHandle<Vec<u8>>) {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let upstream = tokio::spawn(async move {
            let mut received = Vec::new();
            let mut buf = [0u8; 4096];
            // Read the head (and what of the body came with it) before answering.
            while !received.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = theirs.read(&mut buf).await.unwrap();
                if n == 0 {
                    return received;
                }
                received.extend_from_slice(&buf[..n]);
            }
            theirs.write_all(answer).await.unwrap();
            theirs.shutdown().await.unwrap();
            while let Ok(n) = theirs.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                received.extend_from_slice(&buf[..n]);
            }
            received
        });
        (Connection::new(ours), upstream)
    }

    fn get(path: &str) -> http::Request<ForwardBody> {
        http::Request::builder()
            .uri(path)
            .header("host", "platform")
            .body(ForwardBody::Empty)
            .unwrap()
    }

    /// Sends `GET /x` as it is and reads the answer's head.
    async fn send_get(connection: &mut Connection<DuplexStream>) {
        let (parts, body) = get("/x").into_parts();
        let head = RequestHead {
            parts: &parts,
            set: &[],
            leave_out: |_| false,
        };
        assert!(connection.send(&head, body).await.is_ok());
    }

    async fn read_body(connection: &mut Connection<DuplexStream>) -> Result<Vec<u8>, Http1Error> {
        let mut body = Vec::new();
        while let Some(piece) = poll_fn(|cx| connection.poll_body(cx)).await {
            body.extend_from_slice(&piece?);
        }
        Ok(body)
    }

    type Outcome = (
        Result<(http::response::Parts, Vec<u8>), Http1Error>,
        bool,
        String,
    );

    async fn exchange(request: http::Request<ForwardBody>, answer: &'static [u8]) -> Outcome {
        exchange_rewritten(request, &[], |_| false, answer).await
    }

    /// Sends `request` with `set` and `leave_out` applied to its head and reads the answer:
    /// returns the response, whether the connection can be reused, and what the upstream got.
    async fn exchange_rewritten(
        request: http::Request<ForwardBody>,
        set: &[(&HeaderName, &HeaderValue)],
        leave_out: fn(&HeaderName) -> bool,
        answer: &'static [u8],
    ) -> Outcome {
        let (mut connection, upstream) = scripted(answer);
        let (parts, body) = request.into_parts();
        let head = RequestHead {
            parts: &parts,
            set,
            leave_out,
        };
        let result = match connection.send(&head, body).await {
            Ok(parts) => read_body(&mut connection).await.map(|body| (parts, body)),
            Err(SendFailure::Failed(e) | SendFailure::Unsent(_, e)) => Err(e),
            Err(SendFailure::TimedOut) => unreachable!("no deadline here"),
        };
        let reusable = connection.is_reusable();
        drop(connection);
        let sent = String::from_utf8(upstream.await.unwrap()).unwrap();
        (result, reusable, sent)
    }

    #[tokio::test]
    async fn a_content_length_response_is_read_whole_and_the_connection_kept() {
        let (result, reusable, sent) = exchange(
            get("/api/x?a=1"),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nX-Two: a\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Two: b\r\n\r\n{}",
        )
        .await;
        let (parts, body) = result.unwrap();
        assert!(
            parts.headers.get("connection").is_none() && parts.headers.get("keep-alive").is_none(),
            "fields about this connection are not passed on: {:?}",
            parts.headers
        );
        assert_eq!(sent, "GET /api/x?a=1 HTTP/1.1\r\nhost: platform\r\n\r\n");
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["content-type"], "application/json");
        assert_eq!(parts.headers.get_all("x-two").iter().count(), 2);
        assert_eq!(body, b"{}");
        assert!(reusable);
    }

    #[tokio::test]
    async fn a_chunked_response_is_decoded_and_its_trailers_dropped() {
        let (result, reusable, _) = exchange(
            get("/x"),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n",
        )
        .await;
        let (parts, body) = result.unwrap();
        assert_eq!(body, b"hello world");
        assert!(parts.headers.get("transfer-encoding").is_none());
        assert!(reusable);

        // Both framings at once: Transfer-Encoding decides, and the connection is not reused.
        let (result, reusable, _) = exchange(
            get("/x"),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        )
        .await;
        let (parts, body) = result.unwrap();
        assert_eq!(body, b"ok");
        assert!(parts.headers.get("content-length").is_none());
        assert!(!reusable);
    }

    #[tokio::test]
    async fn a_chunked_request_body_ends_after_its_last_chunk_however_large() {
        let (ours, mut theirs) = tokio::io::duplex(1024 * 1024);
        let mut connection = Connection::new(ours);
        let large = Bytes::from(vec![b'x'; COPY_LIMIT + 1]);
        connection.out.queue(Bytes::from_static(b"abc"), true);
        connection.out.queue(large.clone(), true);
        connection.end_request_body(true);
        poll_fn(|cx| connection.poll_write_out(cx)).await.unwrap();
        assert!(!connection.request_body_pending());
        drop(connection);
        let mut sent = Vec::new();
        theirs.read_to_end(&mut sent).await.unwrap();
        let mut expected = format!("3\r\nabc\r\n{:X}\r\n", large.len()).into_bytes();
        expected.extend_from_slice(&large);
        expected.extend_from_slice(b"\r\n0\r\n\r\n");
        assert!(sent == expected, "the last chunk comes after the data");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_for_the_limit_is_cut_short_and_a_slow_one_is_not() {
        const LIMIT: Duration = Duration::from_secs(30);
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut connection = Connection::new(ours).with_stall_limit(LIMIT);
        let upstream = tokio::spawn(async move {
            let mut request = [0; 512];
            let _ = theirs.read(&mut request).await.unwrap();
            theirs
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab")
                .await
                .unwrap();
            // Slow, each pause under the limit and all of them together over it.
            for piece in [&b"cd"[..], b"e"] {
                tokio::time::sleep(LIMIT * 6 / 10).await;
                theirs.write_all(piece).await.unwrap();
            }
            theirs // open, with the last byte never sent
        });
        send_get(&mut connection).await;
        let started = Instant::now();
        let mut received = Vec::new();
        let error = tokio::time::timeout(LIMIT * 10, async {
            loop {
                match poll_fn(|cx| connection.poll_body(cx)).await {
                    Some(Ok(piece)) => received.extend_from_slice(&piece),
                    Some(Err(e)) => break e,
                    None => panic!("the body ended: {received:?}"),
                }
            }
        })
        .await
        .expect("the stalled body is cut short");
        assert_eq!(received, b"abcde");
        assert!(matches!(error, Http1Error::Stalled(LIMIT)), "{error:?}");
        assert_eq!(started.elapsed(), LIMIT * 12 / 10 + LIMIT);
        assert!(!connection.is_reusable());
        drop(upstream.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_waiting_while_the_request_body_is_still_sent_is_not_cut_short() {
        const LIMIT: Duration = Duration::from_secs(30);
        const UPLOAD: usize = 8 * 1024;
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut connection = Connection::new(ours).with_stall_limit(LIMIT);
        let upstream = tokio::spawn(async move {
            let mut head = [0; 512];
            let _ = theirs.read(&mut head).await.unwrap();
            theirs
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
                .await
                .unwrap();
            // The upload is taken slowly, twice the limit in all, and answered at its end.
            let mut taken = 0;
            let mut buf = [0; 1024];
            while taken < UPLOAD {
                tokio::time::sleep(LIMIT / 4).await;
                taken += theirs.read(&mut buf).await.unwrap();
            }
            theirs.write_all(b"ok").await.unwrap();
            theirs
        });
        send_get(&mut connection).await;
        // The rest of a request body, still to be sent once the answer's head has come.
        connection.out.queue(Bytes::from(vec![b'u'; UPLOAD]), false);
        let started = Instant::now();
        let body = tokio::time::timeout(LIMIT * 10, read_body(&mut connection))
            .await
            .expect("an answer");
        assert_eq!(body.unwrap(), b"ok");
        assert!(started.elapsed() >= LIMIT * 2, "{:?}", started.elapsed());
        drop(upstream.await.unwrap());
    }

    #[tokio::test]
    async fn a_transfer_coding_on_an_answer_without_a_body_is_no_error() {
        let mut head = get("/x");
        *head.method_mut() = Method::HEAD;
        let (result, _, _) = exchange(
            head,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        )
        .await;
        assert!(result.unwrap().1.is_empty());
        let (result, _, _) = exchange(
            get("/x"),
            b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        )
        .await;
        assert_eq!(result.unwrap().0.status, 204);
    }

    #[tokio::test]
    async fn an_idle_connection_closed_or_talked_to_by_the_upstream_is_not_usable() {
        let (ours, theirs) = tokio::io::duplex(1024);
        let mut open = Connection::new(ours);
        assert!(open.is_usable());
        drop(theirs);
        assert!(!open.is_usable(), "closed by the upstream");

        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut spoken_to = Connection::new(ours);
        theirs
            .write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
            .await
            .unwrap();
        assert!(!spoken_to.is_usable(), "bytes nobody asked for");
    }

    #[tokio::test]
    async fn interim_responses_are_skipped_and_head_responses_have_no_body() {
        let mut head = get("/x");
        *head.method_mut() = Method::HEAD;
        let (result, reusable, _) = exchange(
            head,
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
        )
        .await;
        let (parts, body) = result.unwrap();
        assert_eq!(parts.status, 200);
        assert_eq!(parts.headers["content-length"], "1234");
        assert!(body.is_empty());
        assert!(reusable);
    }

    #[tokio::test]
    async fn a_response_without_length_runs_until_close_and_the_connection_goes() {
        let (result, reusable, _) = exchange(get("/x"), b"HTTP/1.1 200 OK\r\n\r\nall of it").await;
        assert_eq!(result.unwrap().1, b"all of it");
        assert!(!reusable);
        let (_, reusable, _) = exchange(
            get("/x"),
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(!reusable, "Connection: close");
    }

    #[tokio::test]
    async fn a_body_cut_short_and_a_close_before_answering_are_told_apart() {
        let (result, _, _) = exchange(
            get("/x"),
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        )
        .await;
        assert!(matches!(result, Err(Http1Error::Incomplete)), "{result:?}");
        let (result, _, _) = exchange(get("/x"), b"").await;
        let error = result.unwrap_err();
        assert!(matches!(error, Http1Error::ClosedBeforeAnswer));
        assert!(error.is_stale());
        let (result, _, _) = exchange(get("/x"), b"HTTP/1.1 200 OK\r\nContent-Le").await;
        assert!(matches!(result, Err(Http1Error::Incomplete)), "{result:?}");
    }

    #[tokio::test]
    async fn malformed_responses_are_errors_that_say_what_was_wrong() {
        for (answer, says) in [
            (
                &b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"[..],
                "Content-Length",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "two different",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "hex",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
                "\"gzip\", which the proxy cannot pass on",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
                "\"gzip\"",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
                "chunked applied twice",
            ),
            (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "upgrades"),
            (b"NOT HTTP\r\n\r\n", "not valid"),
        ] {
            let (result, _, _) = exchange(get("/x"), answer).await;
            let message = result.unwrap_err().to_string();
            assert!(message.contains(says), "{message}");
        }
    }

    #[tokio::test]
    async fn bodies_go_with_their_length_or_in_chunks() {
        let buffered = http::Request::post("/x")
            .header("content-length", "999")
            .body(ForwardBody::Buffered(Some(Bytes::from_static(
                b"{\"a\":1}",
            ))))
            .unwrap();
        let (_, _, sent) = exchange(buffered, b"HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(
            sent,
            "POST /x HTTP/1.1\r\ncontent-length: 7\r\n\r\n{\"a\":1}"
        );

        let empty_post = http::Request::post("/x")
            .header("content-length", "0")
            .body(ForwardBody::Empty)
            .unwrap();
        let (_, _, sent) = exchange(empty_post, b"HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(sent, "POST /x HTTP/1.1\r\ncontent-length: 0\r\n\r\n");

        let mut out = Outgoing::default();
        out.queue(Bytes::from_static(b"hello"), true);
        out.queue(Bytes::from(vec![b'x'; COPY_LIMIT + 1]), true);
        assert_eq!(
            out.buf,
            format!("5\r\nhello\r\n{:X}\r\n", COPY_LIMIT + 1).as_bytes()
        );
        assert!(out.after_data == b"\r\n" && out.data.is_some());
    }

    #[tokio::test]
    async fn fields_set_by_the_proxy_go_first_in_place_of_the_callers() {
        let request = http::Request::get("/x")
            .header("host", "caller.example")
            .header("authorization", "Bearer theirs")
            .header("accept", "application/json")
            .header("x-dropped", "1")
            .header("content-length", "0")
            .body(ForwardBody::Empty)
            .unwrap();
        let host = HeaderValue::from_static("platform");
        let token = HeaderValue::from_static("Bearer ours");
        let set = [
            (&http::header::HOST, &host),
            (&http::header::AUTHORIZATION, &token),
        ];
        // The names in `set` need not be named here: the caller's fields of those go anyway.
        let leave_out = |name: &HeaderName| name == "x-dropped";
        let (_, _, sent) =
            exchange_rewritten(request, &set, leave_out, b"HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(
            sent,
            "GET /x HTTP/1.1\r\nhost: platform\r\nauthorization: Bearer ours\r\n\
             accept: application/json\r\ncontent-length: 0\r\n\r\n"
        );
    }

    #[test]
    fn chunk_lines_and_sizes() {
        let mut buf = BytesMut::from(&b"1a;name=value\r\nrest"[..]);
        let line = take_line(&mut buf, MAX_CHUNK_LINE).unwrap().unwrap();
        assert_eq!(parse_chunk_size(&line).unwrap(), 26);
        assert_eq!(&buf[..], b"rest");
        assert!(take_line(&mut buf, MAX_CHUNK_LINE).unwrap().is_none());
        let mut long = BytesMut::from(&[b'1'; 100][..]);
        assert!(take_line(&mut long, 10).is_err());
        assert!(
            parse_chunk_size(b"ffffffffffffffff").is_err(),
            "no overflow"
        );
        assert!(parse_chunk_size(b"").is_err());
    }
}
