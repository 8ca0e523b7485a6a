//! Exact HTTP/1.1 bytes over a socket: for request targets and heads no client library would send.
#![allow(dead_code)]

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A response as read off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// The head (status line and headers), as text.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The value of a header (case-insensitive name), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Writes `request` as is and reads until the server closes the connection (send `Connection: close`), at most
/// `limit`. Returns None when nothing parseable came back.
pub async fn exchange<S>(mut stream: S, request: &[u8], limit: Duration) -> Option<RawResponse>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(request).await.ok()?;
    let mut bytes = Vec::new();
    let _ = tokio::time::timeout(limit, stream.read_to_end(&mut bytes)).await;
    parse(&bytes)
}

/// Sends one request over a new TCP connection.
pub async fn tcp(addr: std::net::SocketAddr, request: &[u8]) -> Option<RawResponse> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    exchange(stream, request, Duration::from_secs(10)).await
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

pub fn parse(bytes: &[u8]) -> Option<RawResponse> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(RawResponse {
        status,
        head,
        body: bytes[end + 4..].to_vec(),
    })
}
