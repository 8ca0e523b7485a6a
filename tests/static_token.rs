//! The static method: a token file rewritten in place (as a rotated secret) is used within a
//! few seconds, against a platform that verifies the tokens with the test IdP's keys.

/// Only the shared helpers this test uses (tests/common/mod.rs also lists the others').
mod common {
    pub mod deps;
    pub mod http;
    pub mod idp;
    pub mod platform;
    pub mod proxy;
}

use std::time::Duration;

use common::http::client;
use common::idp::{IdpOptions, TestIdp};
use common::platform::platform_for;
use common::proxy::{loopback, Proxy};
use seldon_auth_proxy::config::{AuthMethod, Settings};

/// An access token for `client` from the IdP's client_credentials grant.
async fn token_for(idp: &TestIdp, client: &str, secret: &str) -> String {
    let response = common::http::client()
        .post(&idp.token_endpoint)
        .basic_auth(client, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let body: serde_json::Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_rewritten_static_token_file_is_used_within_seconds() {
    let idp = TestIdp::start(
        IdpOptions::default()
            .client("svc-a", "secret-a")
            .client("svc-b", "secret-b")
            .token_lifetime(300),
    )
    .await;
    let platform = platform_for(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(
        &file,
        format!("{}\n", token_for(&idp, "svc-a", "secret-a").await),
    )
    .unwrap();

    let proxy = Proxy::start(Settings {
        auth_method: Some(AuthMethod::Static),
        static_token_file: Some(file.clone()),
        shutdown_grace: None,
        ..loopback(&platform.url)
    })
    .await;
    let url = proxy.api("/version");
    let http = client();
    let subject_of_last_call = || {
        platform
            .requests_seen()
            .last()
            .and_then(|r| r.subject.clone())
    };

    assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(
        subject_of_last_call().as_deref(),
        Some("service-account-svc-a")
    );

    std::fs::write(
        &file,
        format!("{}\n", token_for(&idp, "svc-b", "secret-b").await),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        assert_eq!(http.get(&url).send().await.unwrap().status(), 200);
        if subject_of_last_call().as_deref() == Some("service-account-svc-b") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rewritten token is not used after 8 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    proxy.stop().await;
    platform.shutdown().await;
    idp.stop().await;
}
