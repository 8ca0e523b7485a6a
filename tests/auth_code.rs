//! auth_code end to end through the test IdP's real authorize endpoint: `login` by pasting
//! the code and by its loopback listener, the token file it writes, then `serve` keeping the
//! refresh token rotated across short token lifetimes, answering 503 "run login" once the
//! refresh token is revoked, and healing when `login` runs again.

/// Only the shared helpers these tests use (tests/common/mod.rs also lists the others').
mod common {
    pub mod deps;
    pub mod http;
    pub mod idp;
    pub mod platform;
    pub mod proxy;
    pub mod proxy_child;
}

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::http::client_with_timeout;
use common::idp::{IdpOptions, TestIdp};
use common::platform::platform_for;
use common::proxy::{free_port, loopback, Proxy};
use common::proxy_child::command;
use seldon_auth_proxy::config::{AuthMethod, Settings};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use url::Url;

const CLIENT: &str = "sd-cli";

fn http() -> reqwest::Client {
    client_with_timeout(Duration::from_secs(10))
}

async fn idp(lifetime: u64) -> TestIdp {
    TestIdp::start(
        IdpOptions::default()
            .public_client(CLIENT)
            .user("alice", "wonderland")
            .token_lifetime(lifetime)
            .rotate_refresh_tokens(true),
    )
    .await
}

/// The binary (common::proxy_child::command) with the auth_code settings.
fn binary(
    subcommand: &str,
    upstream: &str,
    idp: &TestIdp,
    tokens: &Path,
    extra: &[&str],
) -> Command {
    let mut cmd = command(&[subcommand]);
    cmd.args(["--upstream", upstream, "--auth-method", "auth_code"])
        .args(["--oidc-server", &idp.issuer, "--client-id", CLIENT])
        .arg("--token-cache-file")
        .arg(tokens)
        .args(extra);
    cmd
}

/// A running `login`: the URL it printed, its stdin, and its stderr collected.
struct Login {
    child: Child,
    url: Url,
    stdin: tokio::process::ChildStdin,
    stderr: tokio::task::JoinHandle<String>,
    rest: tokio::task::JoinHandle<Vec<String>>,
}

async fn start_login(mut cmd: Command) -> Login {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("login runs");
    let stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr_pipe, &mut text).await;
        text
    });
    let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
        .await
        .expect("login prints the URL")
        .unwrap();
    let Some(line) = line else {
        let _ = child.wait().await;
        panic!("login printed no URL: {}", stderr.await.unwrap());
    };
    // Nothing but the URL goes to stdout.
    let rest = tokio::spawn(async move {
        let mut extra = Vec::new();
        while let Ok(Some(line)) = stdout.next_line().await {
            extra.push(line);
        }
        extra
    });
    Login {
        child,
        url: Url::parse(line.trim()).expect("login prints a URL"),
        stdin,
        stderr,
        rest,
    }
}

impl Login {
    async fn finish(mut self) -> (i32, String) {
        drop(self.stdin);
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("login finishes")
            .unwrap();
        let extra = self.rest.await.unwrap();
        assert!(
            extra.is_empty(),
            "login printed more than the URL on stdout: {extra:?}"
        );
        (status.code().unwrap_or(-1), self.stderr.await.unwrap())
    }
}

fn param(url: &Url, key: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// Opens the authorization URL as a browser would and returns where the IdP redirects.
async fn authorize(url: &Url) -> Url {
    let response = http().get(url.clone()).send().await.unwrap();
    assert!(response.status().is_redirection(), "{}", response.status());
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    Url::parse(&location).unwrap()
}

/// Logs in by pasting the code, as a person at the platform's callback page does.
async fn login_by_pasting(upstream: &str, idp: &TestIdp, tokens: &Path) -> String {
    let mut login = start_login(binary("login", upstream, idp, tokens, &[])).await;
    let url = login.url.clone();
    assert_eq!(
        param(&url, "code_challenge_method").as_deref(),
        Some("S256")
    );
    assert_eq!(param(&url, "client_id").as_deref(), Some(CLIENT));
    for key in ["state", "nonce", "code_challenge"] {
        assert!(
            param(&url, key).is_some_and(|v| v.len() >= 22),
            "{key} in {url}"
        );
    }
    let redirect_uri = format!("{upstream}/seldon-deploy/auth/callback");
    assert_eq!(
        param(&url, "redirect_uri").as_deref(),
        Some(redirect_uri.as_str())
    );
    let back = authorize(&url).await;
    assert!(back.as_str().starts_with(&redirect_uri), "{back}");
    assert_eq!(param(&back, "state"), param(&url, "state"));
    let code = param(&back, "code").expect("a code");
    login
        .stdin
        .write_all(format!("{code}\n").as_bytes())
        .await
        .unwrap();
    let (status, stderr) = login.finish().await;
    assert_eq!(status, 0, "{stderr}");
    assert!(
        !stderr.contains(&code),
        "the code is never printed: {stderr}"
    );
    assert!(stderr.contains("Logged in as alice"), "{stderr}");
    stored_refresh_token(tokens)
}

fn stored(tokens: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(tokens).expect("the token file")).unwrap()
}

fn stored_refresh_token(tokens: &Path) -> String {
    stored(tokens)["refresh_token"]
        .as_str()
        .expect("a refresh token in the token file")
        .to_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn login_by_pasting_the_code_stores_a_private_token_file() {
    let idp = idp(60).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("cache").join("tokens.json");
    let upstream = "https://ml.example.com";

    let refresh_token = login_by_pasting(upstream, &idp, &tokens).await;
    assert_eq!(mode(&tokens), 0o600);
    assert!(!refresh_token.is_empty());
    assert_eq!(stored(&tokens)["client_id"], CLIENT);
    assert_eq!(idp.stats().await.ok("authorization_code"), 1);

    // `token` prints the stored id_token without a round trip; `check` summarises.
    let out = binary("token", upstream, &idp, &tokens, &[])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(token.trim(), stored(&tokens)["token"].as_str().unwrap());
    assert_eq!(token.trim().split('.').count(), 3);
    let out = binary("check", upstream, &idp, &tokens, &[])
        .output()
        .await
        .unwrap();
    let summary = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        summary.contains("refresh token held") && summary.contains("alice"),
        "{summary}"
    );
    assert!(!summary.contains(token.trim()), "{summary}");

    // A pasted code that is not this login's is refused and nothing is stored.
    let other = dir.path().join("other.json");
    let mut login = start_login(binary("login", upstream, &idp, &other, &[])).await;
    login.stdin.write_all(b"not-a-code\n").await.unwrap();
    let (status, stderr) = login.finish().await;
    assert_eq!(status, 1, "{stderr}");
    assert!(stderr.contains("invalid_grant"), "{stderr}");
    assert!(!other.exists());
}

#[tokio::test]
async fn login_receives_the_code_on_a_loopback_redirect_uri() {
    let idp = idp(60).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.json");
    let port = free_port();
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    let login = start_login(binary(
        "login",
        "https://ml.example.com",
        &idp,
        &tokens,
        &["--redirect-uri", &redirect_uri],
    ))
    .await;
    assert_eq!(
        param(&login.url, "redirect_uri").as_deref(),
        Some(redirect_uri.as_str())
    );

    // A redirect that answers another login is turned away; the listener keeps waiting.
    let forged = http()
        .get(format!("{redirect_uri}?code=forged&state=not-this-login"))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 400);

    let back = authorize(&login.url).await;
    assert!(back.as_str().starts_with(&redirect_uri), "{back}");
    let page = http().get(back).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("Logged in"));
    let (status, stderr) = login.finish().await;
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(mode(&tokens), 0o600);
    assert!(!stored_refresh_token(&tokens).is_empty());
    // It listened once: the port is closed again.
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
}

/// Calls the proxy; returns the status and the body.
async fn call(client: &reqwest::Client, url: &str) -> (u16, String) {
    match client.get(url).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test]
async fn serve_keeps_the_refresh_token_rotated_and_asks_for_login_when_it_is_refused() {
    let idp = idp(4).await;
    let platform = platform_for(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.json");
    let first_refresh_token = login_by_pasting(&platform.url, &idp, &tokens).await;

    let proxy = Proxy::start(Settings {
        auth_method: Some(AuthMethod::AuthCode),
        oidc_server: Some(idp.issuer.clone()),
        client_id: Some(CLIENT.into()),
        token_cache_file: Some(tokens.clone()),
        ..loopback(&platform.url)
    })
    .await;
    let url = proxy.api("/version");
    let client = http();

    // Across several 4 s token lifetimes, every call succeeds.
    idp.reset_stats().await;
    let until = tokio::time::Instant::now() + Duration::from_secs(14);
    let mut calls = 0;
    while tokio::time::Instant::now() < until {
        let (status, body) = call(&client, &url).await;
        assert_eq!(status, 200, "call {calls}: {body}");
        calls += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refreshes = idp.stats().await.ok("refresh_token");
    assert!(
        refreshes >= 3,
        "{refreshes} refreshes in 14 s of 4 s tokens"
    );
    let seen = platform.requests_seen();
    assert!(
        seen.len() >= calls && seen.iter().all(|r| r.status == 200),
        "{}",
        seen.len()
    );
    let rotated = stored_refresh_token(&tokens);
    assert_ne!(
        rotated, first_refresh_token,
        "the rotated refresh token is written back"
    );
    assert_eq!(mode(&tokens), 0o600);

    // Once the IdP refuses the refresh token, calls get 503 telling a person to log in.
    idp.revoke_refresh_tokens().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let (status, body) = loop {
        let (status, body) = call(&client, &url).await;
        if status != 200 || tokio::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status, 503, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let message = json["message"].as_str().unwrap();
    assert!(message.contains("seldon-auth-proxy login"), "{message}");
    assert!(message.contains("invalid_grant"), "{message}");
    assert!(!message.contains(&rotated), "{message}");

    // Running `login` again heals the running proxy, without a restart.
    login_by_pasting(&platform.url, &idp, &tokens).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = call(&client, &url).await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    proxy.stop().await;
    platform.shutdown().await;
    idp.stop().await;
}
