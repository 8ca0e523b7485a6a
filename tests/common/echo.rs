//! An echo upstream for pass-through checks: a hyper HTTP/1.1 server on an ephemeral loopback port that
//! records every request (raw target, headers in order, body bytes) and answers as the request's
//! `x-echo-*` headers ask (the proxy forwards them like any other header).
//!
//! Controls (request headers):
//! - `x-echo-status: 302`                 answer with this status (default 200)
//! - `x-echo-header: name: value`         add a response header (repeatable)
//! - `x-echo-body-bytes: N`               answer N bytes of [`pattern`], streamed in 64 KiB chunks
//! - `x-echo-hold: 1`                     with `x-echo-body-bytes`: send the first chunk, then wait for
//!   [`EchoUpstream::release_response`] before sending the rest
//! - `x-echo-delay-ms: N`                 wait this long (after reading the body) before answering
//!
//! Without `x-echo-body-bytes` the body is `{"echo":true}` as application/json.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use super::idp::jwt_claims;

/// One request as it reached the echo upstream.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// The request target exactly as received (percent-encoding untouched).
    pub target: String,
    pub version: Version,
    /// Header names (lower case, as hyper parses them) and raw values, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
}

impl Seen {
    /// The first value of a header, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers_named(name).into_iter().next()
    }

    /// Every value of a header, as text.
    pub fn headers_named(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect()
    }

    /// The headers as `name: value` lines, for messages.
    pub fn header_lines(&self) -> Vec<String> {
        self.headers
            .iter()
            .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v)))
            .collect()
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// The claims of the bearer JWT of the one `Authorization` header (asserted: exactly one, a bearer, a JWT).
    pub fn bearer_claims(&self) -> serde_json::Value {
        let authorization = self.headers_named("authorization");
        assert_eq!(authorization.len(), 1, "{authorization:?}");
        let token = authorization[0]
            .strip_prefix("Bearer ")
            .expect("a bearer token");
        jwt_claims(token).expect("a JWT")
    }
}

/// The deterministic byte at offset `i` of large bodies (not a multiple of any power of two, so shifted or
/// repeated chunks are caught).
pub fn pattern(i: usize) -> u8 {
    ((i * 31 + 7) % 251) as u8
}

/// `len` bytes of [`pattern`].
pub fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len).map(pattern).collect()
}

#[derive(Default)]
struct State {
    seen: Mutex<Vec<Seen>>,
    /// Notified after each request's body has been read and recorded.
    arrived: Notify,
    /// Notified when the first body frame of a request arrives.
    body_started: Notify,
    /// Released by the test: lets a held response send the rest of its body.
    release: Notify,
}

/// A running echo upstream; `stop()` ends it, dropping it aborts it.
pub struct EchoUpstream {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl EchoUpstream {
    pub async fn start() -> EchoUpstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the echo upstream");
        let addr = listener.local_addr().expect("echo upstream address");
        let state = Arc::new(State::default());
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let stream = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((stream, _)) => stream,
                            Err(_) => continue,
                        },
                        _ = &mut stopped => break,
                    };
                    let state = state.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(answer(state, request).await) }
                        });
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                connections.abort_all();
            })
        };
        EchoUpstream {
            url: format!("http://{addr}"),
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Every request received so far (those whose body has been read).
    pub fn requests(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests have been recorded.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.state.arrived.notified();
            let seen = self.requests();
            if seen.len() >= n {
                return seen;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "the echo upstream saw {} requests, not {n}, within {timeout:?}",
                    seen.len()
                );
            }
        }
    }

    /// Resolves when a request body starts arriving (its first frame).
    pub async fn body_started(&self) {
        self.state.body_started.notified().await;
    }

    /// Lets a response held by `x-echo-hold` send the rest of its body.
    pub fn release_response(&self) {
        self.state.release.notify_one();
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn control<'a>(request: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn answer(state: Arc<State>, request: Request<Incoming>) -> Response<ChannelBody> {
    let status = control(&request, "x-echo-status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let extra: Vec<(String, String)> = request
        .headers()
        .get_all("x-echo-header")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let body_bytes = control(&request, "x-echo-body-bytes").and_then(|n| n.parse::<usize>().ok());
    let hold = control(&request, "x-echo-hold").is_some();
    let delay = control(&request, "x-echo-delay-ms")
        .and_then(|n| n.parse::<u64>().ok())
        .map(Duration::from_millis);

    let (parts, mut incoming) = request.into_parts();
    let mut body = BytesMut::new();
    let mut first = true;
    while let Some(frame) = incoming.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            if first && !data.is_empty() {
                first = false;
                state.body_started.notify_one();
            }
            body.extend_from_slice(data);
        }
    }
    let seen = Seen {
        method: parts.method.to_string(),
        target: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.to_string(), |pq| pq.as_str().to_owned()),
        version: parts.version,
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        body: body.freeze(),
    };
    state.seen.lock().unwrap().push(seen);
    state.arrived.notify_waiters();
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }

    let (tx, rx) = mpsc::channel(4);
    let mut response = Response::new(ChannelBody::new(rx));
    *response.status_mut() = status;
    for (name, value) in extra {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::try_from(name.as_str()),
            HeaderValue::try_from(value.as_str()),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    match body_bytes {
        None => {
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let _ = tx.try_send(Bytes::from_static(br#"{"echo":true}"#));
        }
        Some(len) => {
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            tokio::spawn(async move {
                const CHUNK: usize = 64 * 1024;
                let mut offset = 0;
                while offset < len {
                    let end = (offset + CHUNK).min(len);
                    let chunk: Vec<u8> = (offset..end).map(pattern).collect();
                    if tx.send(Bytes::from(chunk)).await.is_err() {
                        return;
                    }
                    if offset == 0 && hold {
                        state.release.notified().await;
                    }
                    offset = end;
                }
            });
        }
    }
    response
}

/// A body fed through a channel: each message is one data frame; the body ends when every sender is
/// dropped. Used for streamed responses here and streamed requests in tests.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
    length: Option<u64>,
}

impl ChannelBody {
    pub fn new(rx: mpsc::Receiver<Bytes>) -> ChannelBody {
        ChannelBody { rx, length: None }
    }

    /// A body that announces its exact length (sent as Content-Length).
    pub fn with_length(rx: mpsc::Receiver<Bytes>, length: u64) -> ChannelBody {
        ChannelBody {
            rx,
            length: Some(length),
        }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|c| Ok(Frame::data(c))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.length {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
        }
    }
}
