//! The session method against a Dex-like login (tests/common/dex.rs): the fixture's fidelity
//! checked with the real SDK's SessionAuthenticator, then the proxy logging in, lending the
//! cookie in place of the caller's, logging in again once when sessions expire, and naming the
//! failing step when the password is wrong.

/// Only the shared helpers these tests use (tests/common/mod.rs also lists the others').
mod common {
    pub mod deps;
    pub mod dex;
    pub mod http;
    pub mod idp;
    pub mod proxy;
    pub mod proxy_child;
}

use std::time::Duration;

use common::deps::python;
use common::dex::{DexFixture, DexOptions, API};
use common::http::client;
use common::proxy::{free_port, loopback, Proxy};
use common::proxy_child::{output_within, run};
use seldon_auth_proxy::config::{AuthMethod, Settings};

const USER: &str = "admin@kubeflow.org";
const PASSWORD: &str = "12341234-pass";
const WRONG: &str = "not-the-password";

fn settings(upstream: &str, password: &str) -> Settings {
    Settings {
        auth_method: Some(AuthMethod::Session),
        username: Some(USER.into()),
        password: Some(password.into()),
        ..loopback(upstream)
    }
}

/// Runs the SDK's SessionAuthenticator against `url`, then reads /user with the cookie.
/// Prints `COOKIE <set-cookie or None>` and, when logged in, `USER <name>`.
const SDK_SCRIPT: &str = r#"
import os
from seldon_deploy_sdk import Configuration, ApiClient, EnvironmentApi
from seldon_deploy_sdk.auth import SessionAuthenticator

config = Configuration()
config.host = os.environ["DEX_URL"] + "/seldon-deploy/api/v1alpha1"
config.username = os.environ["DEX_USER"]
config.password = os.environ["DEX_PASSWORD"]
# SessionAuthenticator logs in only under this method (it raises for any other).
config.auth_method = "password_grant"
cookie = SessionAuthenticator(config).authenticate()
print("COOKIE", cookie, flush=True)
if cookie:
    user = EnvironmentApi(ApiClient(config, cookie=cookie)).read_user()
    print("USER", user.name, flush=True)
"#;

async fn run_sdk(url: &str, password: &str) -> String {
    let mut sdk = tokio::process::Command::new(python().await);
    sdk.arg("-c")
        .arg(SDK_SCRIPT)
        .env("DEX_URL", url)
        .env("DEX_USER", USER)
        .env("DEX_PASSWORD", password);
    let sdk = output_within(sdk, Duration::from_secs(120)).await;
    assert!(
        sdk.code == Some(0),
        "the SDK script failed: {}\n{}",
        sdk.stdout,
        sdk.stderr
    );
    sdk.stdout
}

#[tokio::test]
async fn the_real_sdk_logs_in_through_the_fixture() {
    let dex = DexFixture::start(DexOptions::new(USER, PASSWORD)).await;
    let out = run_sdk(&dex.url, PASSWORD).await;
    assert!(out.contains("COOKIE authservice_session="), "{out}");
    assert!(out.contains(&format!("USER {USER}")), "{out}");
    assert_eq!(dex.logins(), 1);
    // The SDK posts multipart to the page it landed on, not to the form's action.
    assert_eq!(dex.post_types(), vec!["multipart/form-data".to_owned()]);
    let api = dex.api_requests();
    assert!(
        api.iter()
            .any(|r| r.path == format!("{API}/user") && r.status == 200),
        "{api:?}"
    );

    let out = run_sdk(&dex.url, WRONG).await;
    assert!(out.contains("COOKIE None"), "{out}");
    assert_eq!(dex.logins(), 1);
    assert_eq!(dex.rejected(), 1);
    dex.stop().await;
}

#[tokio::test]
async fn the_proxy_lends_the_session_cookie_instead_of_the_callers() {
    let dex = DexFixture::start(DexOptions::new(USER, PASSWORD)).await;
    let proxy = Proxy::start(settings(&dex.url, PASSWORD)).await;
    let http = client();
    for i in 0..5 {
        let response = http
            .get(proxy.api(&format!("/namespaces/ns{i}/seldondeployments")))
            .header("accept", "application/json")
            .header("cookie", "authservice_session=forged-by-caller; theme=dark")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "call {i}");
        assert!(
            response.headers().get("set-cookie").is_none(),
            "no session cookie reaches the caller"
        );
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["user"], USER);
    }
    assert_eq!(dex.logins(), 1, "one login serves every call");
    assert_eq!(
        dex.post_types(),
        vec!["application/x-www-form-urlencoded".to_owned()]
    );
    let sessions = dex.sessions();
    let seen = dex.api_requests();
    let from_proxy: Vec<_> = seen.iter().filter(|r| r.status == 200).collect();
    assert_eq!(from_proxy.len(), 5, "{seen:?}");
    for request in from_proxy {
        let cookie = request.cookie.as_deref().unwrap_or_default();
        assert_eq!(cookie, format!("authservice_session={}", sessions[0]));
        assert!(
            !cookie.contains("forged") && !cookie.contains("theme"),
            "{cookie}"
        );
    }
    proxy.stop().await;
    dex.stop().await;
}

#[tokio::test]
async fn expired_sessions_are_replaced_by_one_new_login() {
    let dex = DexFixture::start(DexOptions::new(USER, PASSWORD)).await;
    let proxy = Proxy::start(settings(&dex.url, PASSWORD)).await;
    let http = client();
    let call = |path: String| {
        let http = http.clone();
        async move {
            http.get(path)
                .header("accept", "application/json")
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(call(proxy.api("/version")).await, 200);
    assert_eq!(dex.logins(), 1);

    dex.expire_sessions();
    // Needs the proxy's replay after an upstream 401: every caller still gets 200.
    let calls: Vec<_> = (0..8)
        .map(|i| call(proxy.api(&format!("/ns/{i}"))))
        .collect();
    let statuses = futures_util::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        dex.logins(),
        2,
        "the expired session is replaced once, single-flight"
    );
    assert_eq!(call(proxy.api("/version")).await, 200);
    assert_eq!(dex.logins(), 2);
    proxy.stop().await;
    dex.stop().await;
}

#[tokio::test]
async fn check_names_the_failing_step_and_never_the_password() {
    let dex = DexFixture::start(DexOptions::new(USER, PASSWORD)).await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, format!("{WRONG}\n")).unwrap();
    let password_path = password_file.to_str().unwrap();
    let args = |command: &'static str| {
        vec![
            command,
            "--upstream",
            dex.url.as_str(),
            "--auth-method",
            "session",
            "--username",
            USER,
            "--password-file",
            password_path,
        ]
    };

    let out = run(&args("check"), &[]).await;
    assert_eq!(out.code, Some(1), "{out:?}");
    let expected = format!(
        "session login: Dex rejected the username or password at {}/dex/auth/local/login",
        dex.url
    );
    assert!(out.stderr.contains(&expected), "{}", out.stderr);
    assert!(
        !out.stderr.contains(WRONG) && !out.stdout.contains(WRONG),
        "{out:?}"
    );
    assert_eq!(dex.rejected(), 1);

    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let out = run(&args("check"), &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains("cookie (value redacted)"),
        "{}",
        out.stdout
    );
    let session = dex.sessions().pop().unwrap();
    assert!(
        !out.stdout.contains(&session) && !out.stderr.contains(&session),
        "{out:?}"
    );

    // `token` prints bearer tokens only and says why there is none.
    let out = run(&args("token"), &[]).await;
    assert_ne!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(out.stderr.contains("cookie"), "{}", out.stderr);
    dex.stop().await;
}

#[tokio::test]
async fn the_password_goes_only_to_a_host_of_the_redirect_chain() {
    // The login form posts to `localhost`, which the redirects (all to 127.0.0.1) never visited.
    let mut options = DexOptions::new(USER, PASSWORD);
    let dex_port = free_port();
    options.form_action = Some(format!("http://localhost:{dex_port}/steal"));
    let dex = DexFixture::start(options).await;
    let out = run(
        &[
            "check",
            "--upstream",
            &dex.url,
            "--auth-method",
            "session",
            "--username",
            USER,
        ],
        &[("SELDON_AUTH_PROXY_PASSWORD", PASSWORD)],
    )
    .await;
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(
        out.stderr.contains("refusing to send the password")
            && out.stderr.contains("did not appear in the redirects"),
        "{}",
        out.stderr
    );
    assert!(dex.post_types().is_empty());
    dex.stop().await;
}

#[tokio::test]
async fn an_expired_session_answered_with_a_login_redirect_is_replaced_too() {
    let dex = DexFixture::start(DexOptions::new(USER, PASSWORD)).await;
    let proxy = Proxy::start(settings(&dex.url, PASSWORD)).await;
    let http = client();
    // No `Accept: application/json`: authservice answers a stale session with a redirect to Dex.
    let status = http
        .get(proxy.api("/version"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 200);
    dex.expire_sessions();
    let response = http.get(proxy.api("/version")).send().await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "{:?}",
        response.headers().get("location")
    );
    assert_eq!(dex.logins(), 2);
    proxy.stop().await;
    dex.stop().await;
}
