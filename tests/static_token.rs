//! The static method: a token file rewritten in place (as a rotated secret) is used within a
//! few seconds, against a platform that verifies the tokens with the test IdP's keys.

/// Only the shared helpers this test uses (tests/common/mod.rs also lists the others').
mod common {
    pub mod deps;
    pub mod idp;
}

use std::time::Duration;

use common::idp::{IdpOptions, TestIdp};
use seldon_auth_proxy::config::{AuthMethod, Config, Settings};
use seldon_auth_proxy::dev::platform::{self, PlatformOptions};

const API: &str = "/seldon-deploy/api/v1alpha1";

/// An access token for `client` from the IdP's client_credentials grant.
async fn token_for(idp: &TestIdp, client: &str, secret: &str) -> String {
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let platform = platform::start(
        listener,
        PlatformOptions {
            jwks_url: idp.jwks_uri.clone(),
            issuer: Some(idp.issuer.clone()),
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(
        &file,
        format!("{}\n", token_for(&idp, "svc-a", "secret-a").await),
    )
    .unwrap();

    let config = Config::from_settings(Settings {
        upstream: Some(platform.url.clone()),
        auth_method: Some(AuthMethod::Static),
        static_token_file: Some(file.clone()),
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        workers: Some(1),
        shutdown_delay: Some(Duration::from_millis(50)),
        ..Settings::default()
    })
    .unwrap();
    let running = seldon_auth_proxy::start(config).await.unwrap();
    let url = format!("{}{API}/version", running.proxy_url().unwrap());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
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

    running.shutdown();
    running.wait().await;
    platform.shutdown().await;
    idp.stop().await;
}
