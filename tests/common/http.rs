//! The reqwest clients the tests call with (no proxy from the environment, no redirects followed, a time limit per
//! request) and one-call requests that read a body as text or JSON.
#![allow(dead_code)]

use std::time::Duration;

/// A client with a 30 s limit per request.
pub fn client() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(30))
}

/// A client with `limit` per request.
pub fn client_with_timeout(limit: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(limit)
        .build()
        .expect("reqwest client")
}

/// Sends `request`; the response, whatever its status, and what was asked (for messages).
async fn send(request: reqwest::RequestBuilder) -> (reqwest::Response, String) {
    let (http, request) = request.build_split();
    let request = request.expect("a well-formed request");
    let what = format!("{} {}", request.method(), request.url());
    let response = http
        .execute(request)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    (response, what)
}

/// Sends `request`: the body as text, whatever the status.
pub async fn send_text(request: reqwest::RequestBuilder) -> String {
    let (response, what) = send(request).await;
    response
        .text()
        .await
        .unwrap_or_else(|e| panic!("{what}: reading the body: {e}"))
}

/// Sends `request`: the body as JSON, whatever the status.
pub async fn send_json(request: reqwest::RequestBuilder) -> serde_json::Value {
    let (response, what) = send(request).await;
    response
        .json()
        .await
        .unwrap_or_else(|e| panic!("{what}: not a JSON body: {e}"))
}

/// GET `url`: the body as text, whatever the status.
pub async fn get_text(http: &reqwest::Client, url: &str) -> String {
    send_text(http.get(url)).await
}

/// GET `url`: the body as JSON, whatever the status.
pub async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    send_json(http.get(url)).await
}
