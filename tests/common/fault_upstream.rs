//! A JWT-checking stand-in for the platform with fault injection, for resilience and security tests.
//!
//! Every request is recorded (method, raw path and query, the bearer token and its verified `sub`/`iat`/`exp`,
//! the status answered, the body's length and SHA-256, the headers) and its bearer token is verified with
//! [`JwksVerifier`] against the test IdP (signature, issuer, `exp` with zero leeway). On top of that it can be
//! told to refuse tokens issued before a moment, answer 401 (or a redirect, or any status) on some paths,
//! stall, close the connection in the middle of a response body, close keep-alive connections right after
//! a response, drop requests that arrive on a reused connection, and go away and come back on the same port.
//! It serves plain HTTP/1.1 or, with a rustls server configuration, HTTPS.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use seldon_auth_proxy::dev::jwks::JwksVerifier;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::idp::{jwt_claims, TestIdp};

type Body = BoxBody<Bytes, Infallible>;

/// One request as it reached the upstream.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    /// Unix time of arrival, sub-second.
    pub unix: f64,
    /// Numbers the TCP connections accepted, from 1.
    pub connection: u64,
    /// 0 for the first request on its connection, 1 for the second, ...
    pub nth_on_connection: u64,
    pub method: String,
    /// Path and query exactly as received.
    pub path: String,
    /// The bearer token presented, if any.
    pub token: Option<String>,
    /// From the verified token; `None` when it was missing or did not verify.
    pub subject: Option<String>,
    pub iat: Option<u64>,
    pub exp: Option<u64>,
    /// Why the token was not accepted (missing, expired, unknown key, ...).
    pub verify_error: Option<String>,
    /// The status answered; 0 when no answer was (or will be) sent.
    pub status: u16,
    pub body_len: usize,
    pub body_sha256: String,
    /// Request headers without `authorization`.
    pub headers: HeaderMap,
}

/// Something a path answers instead of a normal 200.
#[derive(Clone, Debug)]
pub enum Fault {
    /// 401, whatever the token.
    Unauthorized,
    /// Answer after this long; `None`: never answer.
    Stall(Option<Duration>),
    /// Send the head with `Content-Length: declared` and `sent` bytes of body, then close the connection.
    CloseMidResponse { declared: usize, sent: usize },
    /// The same, but the connection stays open and the rest of the body never comes.
    StallMidResponse { declared: usize, sent: usize },
    /// 302 with this `Location`.
    Redirect(String),
    /// This status with a small JSON body.
    Status(u16),
}

struct Rule {
    path_contains: String,
    fault: Fault,
}

/// Orders from a request handler to its connection.
enum ConnectionOrder {
    /// Close the connection this long after now (the response is written meanwhile).
    CloseAfter(Duration),
}

struct State {
    verifier: JwksVerifier,
    seen: Mutex<Vec<Seen>>,
    rules: Mutex<Vec<Rule>>,
    /// Tokens with `iat` below this are refused (0: none).
    revoked_before: AtomicU64,
    /// `Some(d)`: every connection is closed `d` after each response (no `Connection: close` is sent).
    close_after_response: Mutex<Option<Duration>>,
    /// Requests arriving on an already used connection are read and then the connection is closed unanswered.
    drop_reused: AtomicBool,
    connections: AtomicU64,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

struct Server {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// A running fault-injecting upstream. Stopped by [`FaultUpstream::stop`] or when dropped.
pub struct FaultUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    server: Option<Server>,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix time with sub-second precision.
pub fn unix_now_f() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl FaultUpstream {
    /// Starts on an ephemeral loopback port, verifying tokens against `idp`.
    pub async fn start(idp: &TestIdp) -> FaultUpstream {
        Self::start_with(&idp.jwks_uri, &idp.issuer, None).await
    }

    /// Starts with an explicit JWKS URL and issuer (the IdP may not be running yet), optionally over TLS.
    pub async fn start_with(
        jwks_uri: &str,
        issuer: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> FaultUpstream {
        let state = Arc::new(State {
            verifier: JwksVerifier::new(jwks_uri.to_owned(), Some(issuer.to_owned())),
            seen: Mutex::new(Vec::new()),
            rules: Mutex::new(Vec::new()),
            revoked_before: AtomicU64::new(0),
            close_after_response: Mutex::new(None),
            drop_reused: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
        });
        let listener = bind("127.0.0.1:0".parse().unwrap());
        let addr = listener.local_addr().unwrap();
        let mut upstream = FaultUpstream {
            addr,
            state,
            server: None,
        };
        upstream.server = Some(spawn_server(listener, upstream.state.clone()));
        upstream
    }

    /// `http://127.0.0.1:PORT` (or `https://`).
    pub fn url(&self) -> String {
        let scheme = if self.state.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Seen> {
        lock(&self.state.seen).clone()
    }

    pub fn clear_requests(&self) {
        lock(&self.state.seen).clear();
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Every distinct bearer token presented so far.
    pub fn tokens_seen(&self) -> Vec<String> {
        let mut tokens: Vec<String> = self
            .requests()
            .into_iter()
            .filter_map(|s| s.token)
            .collect();
        tokens.sort();
        tokens.dedup();
        tokens
    }

    /// Refuses (401) every token whose `iat` is before `unix_seconds`.
    pub fn revoke_issued_before(&self, unix_seconds: u64) {
        self.state
            .revoked_before
            .store(unix_seconds, Ordering::SeqCst);
    }

    /// Answers `fault` on every path containing `path_contains` ("" matches all paths).
    pub fn add_fault(&self, path_contains: &str, fault: Fault) {
        lock(&self.state.rules).push(Rule {
            path_contains: path_contains.to_owned(),
            fault,
        });
    }

    pub fn clear_faults(&self) {
        lock(&self.state.rules).clear();
        *lock(&self.state.close_after_response) = None;
        self.state.drop_reused.store(false, Ordering::SeqCst);
        self.state.revoked_before.store(0, Ordering::SeqCst);
    }

    /// Closes each connection `delay` after each response, without announcing it (`Connection: close`).
    pub fn close_after_response(&self, delay: Option<Duration>) {
        *lock(&self.state.close_after_response) = delay;
    }

    /// Closes a connection, unanswered, when a second request arrives on it: what a client sees when a
    /// pooled keep-alive connection was closed by the server just as the request was sent.
    pub fn drop_requests_on_reused_connections(&self, yes: bool) {
        self.state.drop_reused.store(yes, Ordering::SeqCst);
    }

    /// Stops listening and closes every connection; the port stays reserved for [`come_back`].
    pub async fn go_away(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop.cancel();
            let _ = server.task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn come_back(&mut self) {
        assert!(self.server.is_none(), "the upstream is still running");
        let listener = bind(self.addr);
        self.server = Some(spawn_server(listener, self.state.clone()));
    }

    pub async fn stop(mut self) {
        self.go_away().await;
    }
}

impl Drop for FaultUpstream {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop.cancel();
            server.task.abort();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn bind(addr: SocketAddr) -> TcpListener {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind(addr)
        .unwrap_or_else(|e| panic!("fault upstream cannot bind {addr}: {e}"));
    socket.listen(1024).expect("listen")
}

fn spawn_server(listener: TcpListener, state: Arc<State>) -> Server {
    let stop = CancellationToken::new();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            // Dropping the set when the loop ends aborts every connection task.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let _ = stream.set_nodelay(true);
                        let id = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
                        let state = state.clone();
                        connections.spawn(async move {
                            match state.tls.clone() {
                                Some(acceptor) => {
                                    if let Ok(tls) = acceptor.accept(stream).await {
                                        serve_connection(tls, state, id).await;
                                    }
                                }
                                None => serve_connection(stream, state, id).await,
                            }
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    _ = stop.cancelled() => break,
                }
            }
            drop(listener);
            connections.shutdown().await;
        })
    };
    Server { stop, task }
}

async fn serve_connection<IO>(io: IO, state: Arc<State>, id: u64)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (orders, mut order_rx) = mpsc::unbounded_channel::<ConnectionOrder>();
    let count = Arc::new(AtomicU64::new(0));
    let service = {
        let state = state.clone();
        service_fn(move |request: Request<Incoming>| {
            let state = state.clone();
            let orders = orders.clone();
            let nth = count.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, Infallible>(handle(request, state, id, nth, orders).await) }
        })
    };
    let connection = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut close_at: Option<tokio::time::Instant> = None;
    loop {
        let deadline = async {
            match close_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut connection => return,
            Some(ConnectionOrder::CloseAfter(delay)) = order_rx.recv() => {
                let at = tokio::time::Instant::now() + delay;
                close_at = Some(close_at.map_or(at, |c| c.min(at)));
            }
            _ = deadline => return, // dropping the connection closes the socket
        }
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn unauthorized(reason: &str) -> Response<Body> {
    let mut response = json_response(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({ "error": "invalid_token", "reason": reason }),
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    response
}

async fn handle(
    request: Request<Incoming>,
    state: Arc<State>,
    connection: u64,
    nth: u64,
    orders: mpsc::UnboundedSender<ConnectionOrder>,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| parts.uri.path().to_owned());
    let token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let mut headers = parts.headers.clone();
    headers.remove(header::AUTHORIZATION);
    let fault = lock(&state.rules)
        .iter()
        .find(|rule| path.contains(&rule.path_contains))
        .map(|rule| rule.fault.clone());
    let mut seen = Seen {
        at: Instant::now(),
        unix: unix_now_f(),
        connection,
        nth_on_connection: nth,
        method: parts.method.to_string(),
        path: path.clone(),
        token: token.clone(),
        subject: None,
        iat: None,
        exp: None,
        verify_error: None,
        status: 0,
        body_len: 0,
        body_sha256: String::new(),
        headers,
    };

    if nth > 0 && state.drop_reused.load(Ordering::SeqCst) {
        lock(&state.seen).push(seen);
        let _ = orders.send(ConnectionOrder::CloseAfter(Duration::ZERO));
        return std::future::pending().await;
    }

    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    seen.body_len = bytes.len();
    seen.body_sha256 = hex(&Sha256::digest(&bytes));

    // Verify the token; a verified token's iat/exp are recorded.
    let verdict = match &token {
        None => Err("missing bearer token".to_owned()),
        Some(token) => match state.verifier.verify(token).await {
            Ok(claims) => Ok(claims),
            Err(e) => {
                let claims = jwt_claims(token);
                seen.iat = claims.as_ref().and_then(|c| c["iat"].as_u64());
                seen.exp = claims.as_ref().and_then(|c| c["exp"].as_u64());
                Err(e.to_string())
            }
        },
    };
    let refusal = match verdict {
        Err(reason) => Some(reason),
        Ok(claims) => {
            seen.subject = claims["sub"].as_str().map(str::to_owned);
            seen.iat = claims["iat"].as_u64();
            seen.exp = claims["exp"].as_u64();
            let revoked_before = state.revoked_before.load(Ordering::SeqCst);
            // jsonwebtoken compares `exp` with a whole-second clock, which accepts a token for up to a second
            // past its `exp`; RFC 7519 wants the current time before `exp`, so check with sub-second precision.
            if seen.exp.is_some_and(|exp| exp as f64 <= unix_now_f()) {
                Some("token expired".to_owned())
            } else if seen.iat.is_some_and(|iat| iat < revoked_before) {
                Some("token revoked".to_owned())
            } else {
                None
            }
        }
    };
    if let Some(reason) = refusal {
        seen.status = 401;
        seen.verify_error = Some(reason.clone());
        lock(&state.seen).push(seen);
        return unauthorized(&reason);
    }

    let ok_body = serde_json::json!({
        "method": seen.method,
        "path": seen.path,
        "sub": seen.subject,
        "iat": seen.iat,
        "body_len": seen.body_len,
        "body_sha256": seen.body_sha256,
    });
    let close_after = *lock(&state.close_after_response);
    let response = match fault {
        Some(Fault::Unauthorized) => {
            seen.status = 401;
            lock(&state.seen).push(seen);
            unauthorized("this endpoint always answers 401")
        }
        Some(Fault::Stall(None)) => {
            lock(&state.seen).push(seen);
            return std::future::pending().await;
        }
        Some(Fault::Stall(Some(delay))) => {
            seen.status = 200;
            lock(&state.seen).push(seen);
            tokio::time::sleep(delay).await;
            json_response(StatusCode::OK, ok_body)
        }
        Some(
            ref fault @ (Fault::CloseMidResponse { declared, sent }
            | Fault::StallMidResponse { declared, sent }),
        ) => {
            seen.status = 200;
            lock(&state.seen).push(seen);
            let part = Bytes::from(vec![b'x'; sent.min(declared)]);
            let stream = futures_util::stream::iter(vec![Ok::<_, Infallible>(Frame::data(part))])
                .chain(futures_util::stream::pending());
            let mut response = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(declared));
            if matches!(fault, Fault::CloseMidResponse { .. }) {
                let _ = orders.send(ConnectionOrder::CloseAfter(Duration::from_millis(200)));
            }
            return response;
        }
        Some(Fault::Redirect(location)) => {
            seen.status = 302;
            lock(&state.seen).push(seen);
            let mut response =
                json_response(StatusCode::FOUND, serde_json::json!({ "moved": location }));
            response
                .headers_mut()
                .insert(header::LOCATION, HeaderValue::try_from(location).unwrap());
            response
        }
        Some(Fault::Status(status)) => {
            seen.status = status;
            lock(&state.seen).push(seen);
            json_response(StatusCode::from_u16(status).unwrap(), ok_body)
        }
        None => {
            seen.status = 200;
            lock(&state.seen).push(seen);
            json_response(StatusCode::OK, ok_body)
        }
    };
    if let Some(delay) = close_after {
        // Give hyper a moment to write the response, then close without `Connection: close`.
        let _ = orders.send(ConnectionOrder::CloseAfter(
            delay.max(Duration::from_millis(20)),
        ));
    }
    response
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `bytes` as the upstream records it.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}
