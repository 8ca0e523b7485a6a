//! Exact HTTP/1.1 bytes over a socket: for request targets and heads no client library would send.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A response as read off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// The head (status line and headers), as text.
    pub head: String,
    /// The body: de-chunked when it was chunked (and complete), cut to its Content-Length, else as received.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Every value of a header (names compared case-insensitively).
    pub fn headers_named(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }

    /// The first value of a header (case-insensitive name), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers_named(name).into_iter().next()
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body_text()))
    }
}

/// Writes `request` and reads until the server closes the connection, at most `limit`: Ok with every byte, or Err
/// with the bytes read when the write failed or the limit passed first.
async fn write_and_read<S>(
    mut stream: S,
    request: &[u8],
    limit: Duration,
) -> Result<Vec<u8>, Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if stream.write_all(request).await.is_err() {
        return Err(Vec::new());
    }
    let mut bytes = Vec::new();
    match tokio::time::timeout(limit, stream.read_to_end(&mut bytes)).await {
        Ok(Ok(_)) => Ok(bytes),
        _ => Err(bytes),
    }
}

/// Writes `request` as is and reads until the server closes the connection (send `Connection: close`), at most
/// `limit`. Returns None when the request could not be written or nothing parseable came back.
pub async fn exchange<S>(stream: S, request: &[u8], limit: Duration) -> Option<RawResponse>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let bytes = write_and_read(stream, request, limit)
        .await
        .unwrap_or_else(|partial| partial);
    parse(&bytes)
}

/// Reads one response from a keep-alive connection, leaving it open: its head and a body of
/// its Content-Length, or its chunks up to the last. Returns the status, or None when the
/// connection closes or `limit` passes first.
pub async fn read_one_response(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<u16> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + limit;
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = parse(&bytes)?;
            let chunked = head
                .header("transfer-encoding")
                .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
            let whole = if chunked {
                bytes.ends_with(b"\r\n0\r\n\r\n")
            } else {
                let length: usize = head
                    .header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                bytes.len() >= end + 4 + length
            };
            if whole {
                return Some(head.status);
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

/// Sends one request over a new TCP connection (at most 10 s).
pub async fn tcp(addr: std::net::SocketAddr, request: &[u8]) -> Option<RawResponse> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    exchange(stream, request, Duration::from_secs(10)).await
}

/// Sends `request` byte for byte to `url` (`http://HOST:PORT`) and reads until the server closes the connection
/// (so the request should say `Connection: close`); panics unless a complete response came within 30 s.
pub async fn send(url: &str, request: &str) -> RawResponse {
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let bytes = write_and_read(stream, request.as_bytes(), Duration::from_secs(30))
        .await
        .expect("a response within 30s, then the connection closed");
    parse_complete(&bytes)
}

/// `GET <target> HTTP/1.1` with `Host: <host>` and `Connection: close`, plus `extra` header lines.
pub fn get(target: &str, host: &str, extra: &[&str]) -> Vec<u8> {
    let mut text = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n");
    for line in extra {
        text.push_str(line);
        text.push_str("\r\n");
    }
    text.push_str("Connection: close\r\n\r\n");
    text.into_bytes()
}

/// Parses a response head and the body after it (see [`RawResponse::body`]); None without a complete head.
pub fn parse(bytes: &[u8]) -> Option<RawResponse> {
    parse_framed(bytes).map(|(response, _)| response)
}

/// Parses one complete HTTP/1.1 response; panics without a complete head or with a broken body framing.
pub fn parse_complete(bytes: &[u8]) -> RawResponse {
    let (response, framing) = parse_framed(bytes).unwrap_or_else(|| {
        panic!(
            "no complete response head in {:?}",
            String::from_utf8_lossy(bytes)
        )
    });
    if let Err(e) = framing {
        panic!("{e} in {:?}", String::from_utf8_lossy(bytes));
    }
    response
}

/// The response, and Err when its framing is broken: chunks broken or cut short, a Content-Length not a number.
fn parse_framed(bytes: &[u8]) -> Option<(RawResponse, Result<(), String>)> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let rest = &bytes[end + 4..];
    let mut response = RawResponse {
        status,
        head,
        body: Vec::new(),
    };
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
    let mut framing = Ok(());
    response.body = if chunked {
        match dechunk(rest) {
            Ok(body) => body,
            Err(e) => {
                framing = Err(e);
                rest.to_vec()
            }
        }
    } else if let Some(length) = response.header("content-length") {
        match length.parse::<usize>() {
            Ok(length) => rest[..length.min(rest.len())].to_vec(),
            Err(_) => {
                framing = Err(format!("a Content-Length that is not a number: {length:?}"));
                rest.to_vec()
            }
        }
    } else {
        rest.to_vec()
    };
    Some((response, framing))
}

/// The payload of a chunked body, up to its last (zero-size) chunk.
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("no chunk size line")?;
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap_or_default().trim(), 16)
                .map_err(|_| format!("a chunk size that is not hexadecimal: {size_text:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or("a chunk cut short")?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("a chunk without its CRLF")?;
    }
}
