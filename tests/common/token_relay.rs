//! A recording relay in front of an IdP's token endpoint: forwards each POST and keeps every token the IdP issued
//! (access, id and refresh tokens), so a test can search logs for them. Point the proxy's `--token-endpoint` at
//! [`TokenRelay::url`]. Stopped when dropped.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub struct TokenRelay {
    pub addr: SocketAddr,
    target: String,
    issued: Arc<Mutex<Vec<String>>>,
    drop_reused: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl TokenRelay {
    /// Relays to `token_endpoint` (an http:// URL).
    pub async fn start(token_endpoint: &str) -> TokenRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let issued = Arc::new(Mutex::new(Vec::new()));
        let drop_reused = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let target = token_endpoint.to_owned();
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let task = {
            let issued = issued.clone();
            let target = target.clone();
            let drop_reused = drop_reused.clone();
            let dropped = dropped.clone();
            tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let issued = issued.clone();
                    let target = target.clone();
                    let http = http.clone();
                    let drop_reused = drop_reused.clone();
                    let dropped = dropped.clone();
                    connections.spawn(async move {
                        let hang_up = Arc::new(tokio::sync::Notify::new());
                        let served = Arc::new(AtomicU64::new(0));
                        let service = {
                            let hang_up = hang_up.clone();
                            service_fn(move |request: Request<Incoming>| {
                                let reused = served.fetch_add(1, Ordering::SeqCst) > 0;
                                let drop_it = reused && drop_reused.load(Ordering::SeqCst);
                                let (http, target, issued, hang_up, dropped) = (
                                    http.clone(),
                                    target.clone(),
                                    issued.clone(),
                                    hang_up.clone(),
                                    dropped.clone(),
                                );
                                async move {
                                    if drop_it {
                                        // As an IdP (or the load balancer before it) closing an idle
                                        // keep-alive connection just as the request arrives.
                                        dropped.fetch_add(1, Ordering::SeqCst);
                                        hang_up.notify_one();
                                        std::future::pending::<()>().await;
                                    }
                                    relay(request, http, target, issued).await
                                }
                            })
                        };
                        let connection =
                            http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                        tokio::select! {
                            _ = connection => {}
                            _ = hang_up.notified() => {}
                        }
                    });
                }
            })
        };
        TokenRelay {
            addr,
            target,
            issued,
            drop_reused,
            dropped,
            task,
        }
    }

    /// The URL to give as `--token-endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// Closes a connection, unanswered, when a second request arrives on it.
    pub fn drop_requests_on_reused_connections(&self, yes: bool) {
        self.drop_reused.store(yes, Ordering::SeqCst);
    }

    /// Requests dropped that way so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Every token in every answer so far (access, id, refresh), deduplicated.
    pub fn issued(&self) -> Vec<String> {
        let mut tokens = self.issued.lock().unwrap().clone();
        tokens.sort();
        tokens.dedup();
        tokens
    }
}

impl Drop for TokenRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    request: Request<Incoming>,
    http: reqwest::Client,
    target: String,
    issued: Arc<Mutex<Vec<String>>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut forward = http.post(&target).body(body);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(value) = parts.headers.get(&name) {
            forward = forward.header(name, value.clone());
        }
    }
    let (status, text) = match forward.send().await {
        Ok(answer) => (
            answer.status().as_u16(),
            answer.bytes().await.unwrap_or_default(),
        ),
        Err(_) => (502, Bytes::from_static(b"{\"error\":\"relay\"}")),
    };
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&text) {
        let mut issued = issued.lock().unwrap();
        for key in ["access_token", "id_token", "refresh_token"] {
            if let Some(token) = json[key].as_str() {
                issued.push(token.to_owned());
            }
        }
    }
    let mut response = Response::new(Full::new(text));
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    Ok(response)
}
