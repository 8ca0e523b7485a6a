//! The caller's side of a proxy connection. The usual request (HTTP/1.1, a path for a target,
//! no body) is read, forwarded and answered here, at a fraction of a general HTTP server's
//! cost per request. The first request that is anything else (a body, `Expect`, `Upgrade`,
//! HTTP/1.0, a head that is malformed or too large) hands the connection, with every byte
//! already read, to hyper for the rest of its life.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io::{self, Write};
use std::ops::Range;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use crate::credential::manager::Shutdown;
use crate::lazy_deadline::LazyDeadline;
use crate::proxy::{Forwarder, ResponseBody};

/// Most fields a request read here may have; one with more goes to hyper.
const MOST_FIELDS: usize = 64;

/// What the read buffer starts with; a head larger than this makes it grow.
const READ_BUFFER: usize = 4096;

/// The start of a response body is written together with the head when both fit in this.
const WITH_HEAD: usize = 16 * 1024;

/// The limits a connection is served with.
#[derive(Clone, Copy)]
pub struct Settings {
    /// How long a request head may take to arrive, counted from when the connection starts
    /// waiting for it (so it bounds idle keep-alive connections too).
    pub head_timeout: Duration,
    /// A head longer than this goes to hyper, which answers 431.
    pub max_head_bytes: usize,
}

/// Serves one caller connection until the caller closes it, a head is not complete within
/// the head timeout, or `stop` fires (requests in flight are answered first, with
/// `Connection: close`).
pub async fn serve<S>(
    stream: S,
    forwarder: Forwarder,
    hyper: http1::Builder,
    settings: Settings,
    stop: Shutdown,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = Connection {
        stream,
        read: BytesMut::with_capacity(READ_BUFFER),
        write: Vec::with_capacity(1024),
        fields: Vec::with_capacity(16),
        settings,
    };
    let mut stopping = pin!(stop.cancelled());
    let mut head_deadline = LazyDeadline::new(Instant::now() + settings.head_timeout);
    loop {
        head_deadline.set(Instant::now() + settings.head_timeout);
        let request = match connection
            .read_head(&mut head_deadline, stopping.as_mut())
            .await
        {
            Next::Request(request) => request,
            Next::Close => return,
            Next::HandOff => {
                let prefix = connection.read.freeze();
                let stream = Rewind {
                    prefix,
                    inner: connection.stream,
                };
                return hand_to_hyper(stream, forwarder, hyper, stopping).await;
            }
        };
        let is_head = request.parts.method == Method::HEAD;
        let response = {
            let mut responding = pin!(forwarder.respond(request.parts, None));
            poll_fn(|cx| {
                if let Poll::Ready(response) = responding.as_mut().poll(cx) {
                    return Poll::Ready(Some(response));
                }
                // A caller that goes away cancels the forwarding.
                connection.poll_caller_gone(cx).map(|()| None)
            })
            .await
        };
        let Some(response) = response else { return };
        let keep_alive = request.keep_alive && !stop.is_cancelled();
        let written = connection
            .write_response(response, is_head, keep_alive)
            .await;
        if written.is_err() || !keep_alive {
            let _ = connection.stream.shutdown().await;
            return;
        }
    }
}

/// A request head read and parsed here.
struct PlainRequest {
    parts: http::request::Parts,
    keep_alive: bool,
}

// Boxing the request would cost an allocation per request; `Next` only lives on the stack.
#[allow(clippy::large_enum_variant)]
enum Next {
    Request(PlainRequest),
    /// The caller closed, timed out, or the proxy is stopping.
    Close,
    /// The bytes at hand are not a request read here: hyper takes the connection.
    HandOff,
}

struct Connection<S> {
    stream: S,
    /// Bytes read and not yet used: a partial head, or requests sent ahead.
    read: BytesMut,
    /// The response head being written, with the start of its body.
    write: Vec<u8>,
    /// Where each field of the head being parsed is, reused across requests.
    fields: Vec<(Range<usize>, Range<usize>)>,
    settings: Settings,
}

/// What parsing the bytes at hand found.
enum Parsed {
    /// A whole head, `len` bytes, to read here.
    Plain {
        len: usize,
        keep_alive: bool,
    },
    Incomplete,
    /// Anything hyper should answer.
    Other,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Reads until a whole request head is at hand, or the connection should close.
    async fn read_head(
        &mut self,
        head_deadline: &mut LazyDeadline,
        mut stopping: Pin<&mut impl Future<Output = ()>>,
    ) -> Next {
        loop {
            if !self.read.is_empty() {
                match self.parse() {
                    Parsed::Plain { len, keep_alive } => {
                        return match self.take_request(len, keep_alive) {
                            Some(request) => Next::Request(request),
                            None => Next::HandOff,
                        };
                    }
                    Parsed::Incomplete if self.read.len() < self.settings.max_head_bytes => {}
                    Parsed::Incomplete | Parsed::Other => return Next::HandOff,
                }
            }
            let event = poll_fn(|cx| {
                match self.poll_read_more(cx) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(false),
                    Poll::Ready(Ok(_)) => return Poll::Ready(true),
                    Poll::Pending => {}
                }
                if stopping.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(false);
                }
                head_deadline.poll_passed(cx).map(|()| false)
            })
            .await;
            if !event {
                return Next::Close;
            }
        }
    }

    /// Whether the bytes at hand start with a whole head of a request read here.
    fn parse(&mut self) -> Parsed {
        let mut fields = [httparse::EMPTY_HEADER; MOST_FIELDS];
        let mut request = httparse::Request::new(&mut fields);
        let len = match request.parse(&self.read) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Parsed::Incomplete,
            Err(_) => return Parsed::Other,
        };
        if len > self.settings.max_head_bytes
            || request.version != Some(1)
            || !request.path.is_some_and(|p| p.starts_with('/'))
        {
            return Parsed::Other;
        }
        let base = self.read.as_ptr() as usize;
        let at = |s: &[u8]| {
            let start = s.as_ptr() as usize - base;
            start..start + s.len()
        };
        let mut keep_alive = true;
        self.fields.clear();
        for field in request.headers.iter() {
            let name = field.name.as_bytes();
            if name.eq_ignore_ascii_case(b"content-length")
                || name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"expect")
                || name.eq_ignore_ascii_case(b"upgrade")
            {
                return Parsed::Other;
            }
            if name.eq_ignore_ascii_case(b"connection") {
                keep_alive &= !field
                    .value
                    .split(|&b| b == b',')
                    .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"));
            }
            self.fields.push((at(name), at(field.value)));
        }
        self.fields.push((
            at(request.method.unwrap_or_default().as_bytes()),
            at(request.path.unwrap_or_default().as_bytes()),
        ));
        Parsed::Plain { len, keep_alive }
    }

    /// Takes the head `parse` found off the bytes at hand; `None` (the bytes left as they
    /// were) when a part of it is not valid as `http` sees it.
    fn take_request(&mut self, len: usize, keep_alive: bool) -> Option<PlainRequest> {
        let (method, target) = self.fields.pop()?;
        let method = Method::from_bytes(&self.read[method]).ok()?;
        let head = self.read.split_to(len).freeze();
        let built = (|| {
            let uri = Uri::from_maybe_shared(head.slice(target)).ok()?;
            let mut headers = HeaderMap::with_capacity(self.fields.len());
            for (name, value) in &self.fields {
                let name = HeaderName::from_bytes(&head[name.clone()]).ok()?;
                let value = HeaderValue::from_maybe_shared(head.slice(value.clone())).ok()?;
                headers.append(name, value);
            }
            Some((uri, headers))
        })();
        let Some((uri, headers)) = built else {
            // Put the head back in front of what followed it, for hyper to answer.
            let mut whole = BytesMut::with_capacity(head.len() + self.read.len());
            whole.extend_from_slice(&head);
            whole.extend_from_slice(&self.read);
            self.read = whole;
            return None;
        };
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = method;
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        parts.headers = headers;
        Some(PlainRequest { parts, keep_alive })
    }

    /// Reads what the caller sent into the bytes at hand; `Ok(0)` when it closed.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        // Room for a whole head as a rule: the buffer takes back the space of the requests
        // already read once nothing refers to them any more.
        if self.read.capacity() - self.read.len() < READ_BUFFER / 4 {
            self.read.reserve(READ_BUFFER);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.stream), cx, &mut self.read)
    }

    /// Ready when the caller closed the connection while its request is being forwarded.
    /// Once it has sent more (a request sent ahead), it is not read again until that is
    /// answered: a caller that sends requests ahead and then closes its side still gets the
    /// answers, as with hyper.
    fn poll_caller_gone(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.read.is_empty() {
            return Poll::Pending;
        }
        match self.poll_read_more(cx) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(()),
            Poll::Ready(Ok(_)) | Poll::Pending => Poll::Pending,
        }
    }

    /// Writes a response: its head, then its body as it comes, framed by its
    /// `Content-Length`, by its known size, or else chunked.
    async fn write_response(
        &mut self,
        response: Response<ResponseBody>,
        is_head: bool,
        keep_alive: bool,
    ) -> io::Result<()> {
        let (parts, mut body) = response.into_parts();
        let status = parts.status;
        let bodiless = is_head
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let out = &mut self.write;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut has_length = false;
        let mut has_date = false;
        for (name, value) in &parts.headers {
            if *name == header::CONTENT_LENGTH {
                if has_length {
                    continue; // the upstream repeated it (same value): once is enough
                }
                has_length = true;
            } else if *name == header::DATE {
                has_date = true;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let mut chunked = false;
        if !bodiless && !has_length {
            match body.size_hint().exact() {
                Some(length) => {
                    out.extend_from_slice(b"content-length: ");
                    out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                None => {
                    out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    chunked = true;
                }
            }
        }
        if !has_date {
            out.extend_from_slice(b"date: ");
            out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if bodiless {
            drop(body);
            self.stream.write_all(&self.write).await?;
            return self.stream.flush().await;
        }

        loop {
            if body.is_end_stream() {
                break;
            }
            // The start of the body goes with the head when it is already at hand; the head
            // goes alone when the body keeps it waiting.
            let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    if !self.write.is_empty() {
                        self.stream.write_all(&self.write).await?;
                        self.write.clear();
                    }
                    // A caller that goes away while the body is awaited lets the upstream
                    // connection (and its place) go.
                    let next = poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                        Poll::Ready(frame) => Poll::Ready(Some(frame)),
                        Poll::Pending => self.poll_caller_gone(cx).map(|()| None),
                    })
                    .await;
                    match next {
                        Some(frame) => frame,
                        None => return Err(io::ErrorKind::ConnectionAborted.into()),
                    }
                }
            };
            let data = match frame {
                None => break,
                Some(Err(e)) => return Err(io::Error::other(e)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => data,
                    _ => continue, // trailers are not passed on
                },
            };
            let out = &mut self.write;
            if chunked {
                let _ = write!(out, "{:x}\r\n", data.len()); // writing to a Vec cannot fail
            }
            if out.len() + data.len() <= WITH_HEAD {
                out.extend_from_slice(&data);
            } else {
                self.stream.write_all(out).await?;
                out.clear();
                self.stream.write_all(&data).await?;
            }
            if chunked {
                self.write.extend_from_slice(b"\r\n");
            }
        }
        if chunked {
            self.write.extend_from_slice(b"0\r\n\r\n");
        }
        if !self.write.is_empty() {
            self.stream.write_all(&self.write).await?;
        }
        self.stream.flush().await
    }
}

/// Lets hyper serve the rest of the connection, starting with the bytes already read; a stop
/// lets the request in flight finish, then closes.
async fn hand_to_hyper<S>(
    stream: Rewind<S>,
    forwarder: Forwarder,
    hyper: http1::Builder,
    stopping: Pin<&mut impl Future<Output = ()>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let forwarder = forwarder.clone();
        async move { Ok::<_, Infallible>(forwarder.handle(request).await) }
    });
    let mut connection = pin!(hyper.serve_connection(TokioIo::new(stream), service));
    // The connection first: once hyper has read the request at hand, a stop that has already
    // fired lets it answer that request before closing, instead of closing unread.
    tokio::select! {
        biased;
        _ = connection.as_mut() => return,
        _ = stopping => {}
    }
    connection.as_mut().graceful_shutdown();
    let _ = connection.await;
}

/// A stream read from `prefix` first: the bytes read before hyper took the connection.
struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Either, Full};
    use tokio::io::AsyncReadExt;

    fn connection(bytes: &[u8]) -> Connection<tokio::io::DuplexStream> {
        let (stream, _) = tokio::io::duplex(64);
        Connection {
            stream,
            read: BytesMut::from(bytes),
            write: Vec::new(),
            fields: Vec::new(),
            settings: Settings {
                head_timeout: Duration::from_secs(1),
                max_head_bytes: 8192,
            },
        }
    }

    fn plain(bytes: &[u8]) -> (PlainRequest, Connection<tokio::io::DuplexStream>) {
        let mut c = connection(bytes);
        let Parsed::Plain { len, keep_alive } = c.parse() else {
            panic!("not read here: {}", String::from_utf8_lossy(bytes));
        };
        let request = c.take_request(len, keep_alive).expect("valid");
        (request, c)
    }

    #[test]
    fn a_plain_get_is_read_here_and_what_follows_it_is_kept() {
        let (request, c) = plain(
            b"GET /seldon-deploy/api/v1alpha1/x?y=1 HTTP/1.1\r\nHost: a\r\nX-Two: 1\r\nx-two: 2\r\n\r\nGET /next",
        );
        assert_eq!(request.parts.method, Method::GET);
        assert_eq!(request.parts.uri, "/seldon-deploy/api/v1alpha1/x?y=1");
        assert_eq!(request.parts.version, Version::HTTP_11);
        assert_eq!(request.parts.headers["host"], "a");
        let twos: Vec<_> = request.parts.headers.get_all("x-two").iter().collect();
        assert_eq!(twos, ["1", "2"]);
        assert!(request.keep_alive);
        assert_eq!(&c.read[..], b"GET /next");
    }

    #[test]
    fn connection_close_ends_the_connection_after_the_response() {
        let (request, _) = plain(b"DELETE /x HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(!request.keep_alive);
    }

    #[test]
    fn bodies_and_unusual_requests_go_to_hyper() {
        for head in [
            &b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"[..],
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            b"GET /x HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            b"GET /x HTTP/1.0\r\n\r\n",
            b"GET http://a/x HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"GET /x HTTP/1.1\r\nBad Name: 1\r\n\r\n",
        ] {
            let mut c = connection(head);
            assert!(
                matches!(c.parse(), Parsed::Other),
                "{}",
                String::from_utf8_lossy(head)
            );
        }
        assert!(matches!(
            connection(b"GET /x HTTP/1.1\r\nHost:").parse(),
            Parsed::Incomplete
        ));
        // A whole head over the limit, read at once, is hyper's to answer (431).
        let mut big = b"GET /x HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 8192));
        big.extend_from_slice(b"\r\n\r\n");
        assert!(matches!(connection(&big).parse(), Parsed::Other));
    }

    #[test]
    fn a_head_http_refuses_is_put_back_whole_for_hyper() {
        let mut refused = 0;
        for byte in (0x21..=0x7e).chain(0x80..=0xff) {
            let mut head = b"GET /a".to_vec();
            head.push(byte);
            head.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\nnext");
            let mut c = connection(&head);
            let Parsed::Plain { len, keep_alive } = c.parse() else {
                continue;
            };
            if c.take_request(len, keep_alive).is_none() {
                refused += 1;
                assert_eq!(&c.read[..], &head[..], "byte {byte:#x}");
            }
        }
        assert!(
            refused > 0,
            "no path byte that httparse takes and http refuses"
        );
    }

    /// What `write_response` sends the caller for `response`.
    async fn written(response: Response<ResponseBody>, is_head: bool, keep_alive: bool) -> String {
        let (ours, mut caller) = tokio::io::duplex(4096);
        let mut c = connection(b"");
        c.stream = ours;
        c.write_response(response, is_head, keep_alive)
            .await
            .unwrap();
        drop(c);
        let mut text = String::new();
        caller.read_to_string(&mut text).await.unwrap();
        text
    }

    #[tokio::test]
    async fn a_response_is_framed_by_its_size_and_says_when_the_connection_closes() {
        let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(b"{}"))));
        *response.status_mut() = StatusCode::NOT_FOUND;
        response
            .headers_mut()
            .insert("x-request-id", HeaderValue::from_static("r1"));
        let text = written(response, false, false).await;
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let lines: Vec<&str> = head.split("\r\n").collect();
        assert_eq!(lines[0], "HTTP/1.1 404 Not Found");
        assert!(lines.contains(&"x-request-id: r1"), "{head}");
        assert!(lines.contains(&"content-length: 2"), "{head}");
        assert!(lines.contains(&"connection: close"), "{head}");
        assert!(lines.iter().any(|l| l.starts_with("date: ")), "{head}");
        assert_eq!(body, "{}");
    }

    #[tokio::test]
    async fn a_head_response_has_no_body_and_keeps_its_length() {
        let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("1234"));
        let text = written(response, true, true).await;
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        assert!(text.contains("content-length: 1234\r\n"), "{text}");
        assert!(!text.contains("connection: close"), "{text}");
    }

    #[tokio::test]
    async fn a_content_length_the_upstream_repeated_is_written_once() {
        let mut response = Response::new(Either::Right(Full::new(Bytes::from_static(b"{}"))));
        for _ in 0..2 {
            response
                .headers_mut()
                .append(header::CONTENT_LENGTH, HeaderValue::from_static("2"));
        }
        let text = written(response, false, true).await;
        assert_eq!(text.matches("content-length: 2\r\n").count(), 1, "{text}");
        assert!(text.ends_with("\r\n\r\n{}"), "{text}");
    }

    #[tokio::test]
    async fn hyper_reads_the_bytes_already_read_first() {
        let (inner, mut other) = tokio::io::duplex(64);
        let mut rewind = Rewind {
            prefix: Bytes::from_static(b"first "),
            inner,
        };
        other.write_all(b"then the stream").await.unwrap();
        drop(other);
        let mut text = String::new();
        rewind.read_to_string(&mut text).await.unwrap();
        assert_eq!(text, "first then the stream");
    }
}
