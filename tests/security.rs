//! Security (issue 3): what the proxy refuses, what never leaves it, what it never prints, how it treats TLS,
//! and the limits that keep a hostile local caller from tying it up.
//!
//! Most tests run a real OpenID provider (tests/idp), a JWT-checking upstream (tests/common/fault_upstream.rs) and
//! the proxy in-process on ephemeral loopback ports; start-up refusals, warnings and log redaction run the binary.
//! Figures are printed; run with `--nocapture` to see them.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fault_stack::{stack, stop_stack};
use common::fault_upstream::{sha256_hex, Fault, FaultUpstream};
use common::http::{client, get_json, get_text};
use common::idp::{IdpOptions, TestIdp};
use common::proxy::{error_kind, for_idp, idp_options, secret_file, Proxy, API};
use common::proxy_child::{run_within, ProxyChild};
use common::raw_http::{self, RawResponse};
use common::tls_certs::TestPki;
use common::token_relay::TokenRelay;
use seldon_auth_proxy::config::Settings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------------------------
// Hostile requests
// ---------------------------------------------------------------------------------------------------------------

/// Sends `request` over raw TCP and returns the status (0 when the connection closed without an answer).
async fn raw_status(addr: SocketAddr, request: &[u8]) -> (u16, Option<RawResponse>) {
    let response = raw_http::tcp(addr, request).await;
    (response.as_ref().map_or(0, |r| r.status), response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_nothing_outside_the_prefix_reaches_the_upstream() {
    let (idp, upstream, proxy) = stack(60, |s| s).await;
    let addr = proxy.proxy_addr();
    let p = API;
    // (request target, expected status) for `GET <target> HTTP/1.1` with an allowed Host.
    let targets: Vec<(String, u16)> = vec![
        (format!("{p}/../../admin"), 400),
        (format!("{p}/.."), 400),
        (format!("{p}/%2e%2e/admin"), 400),
        (format!("{p}/%2E%2e/admin"), 400),
        (format!("{p}/%2E%2E/admin"), 400),
        (format!("{p}/.%2e/admin"), 400),
        (format!("{p}/%2e./admin"), 400),
        (format!("{p}/..;/admin"), 400),
        (format!("{p}/%2e%2e;jsessionid=1/admin"), 400),
        (format!("{p}/./x"), 400),
        (format!("{p}/%2e/x"), 400),
        (format!("{p}/x/.."), 400),
        (format!("{p}//x"), 400),
        (format!("/{p}/x"), 400),
        (format!("{p}/a\\..\\..\\admin"), 400),
        (format!("{p}/%5C..%5Cadmin"), 400),
        (format!("{p}/a%5cb"), 400),
        (format!("http://elsewhere{p}/x"), 400),
        (format!("http://127.0.0.1{p}/x"), 400),
        (format!("{p}x"), 404),
        (format!("{p}x/y"), 404),
        ("/seldon-deploy/api/v1alpha".to_owned(), 404),
        ("/seldon-deploy/api".to_owned(), 404),
        ("/seldon-deploy/api/v1alpha2/x".to_owned(), 404),
        ("/SELDON-DEPLOY/api/v1alpha1/x".to_owned(), 404),
        ("/".to_owned(), 404),
        ("/admin".to_owned(), 404),
        ("/metrics".to_owned(), 404),
        (format!("{p}/a%00b"), 400),
        (format!("{p}/%00"), 400),
    ];
    let mut tried = 0;
    let mut refused = 0;
    let mut wrong = Vec::new();
    for (target, expected) in &targets {
        tried += 1;
        let (status, response) = raw_status(addr, &raw_http::get(target, "127.0.0.1", &[])).await;
        if status == *expected {
            refused += 1;
            if let Some(kind) = response
                .as_ref()
                .and_then(|r| r.header("x-seldon-auth-proxy-error"))
            {
                assert!(
                    ["bad_request", "path_not_allowed"].contains(&kind.as_str()),
                    "{target}: {kind}"
                );
            }
        } else {
            wrong.push(format!("{target}: expected {expected}, got {status}"));
        }
    }
    // Methods a forward proxy would take.
    for (request, expected) in [
        ("CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example:443\r\nConnection: close\r\n\r\n".to_owned(), vec![400, 403, 405]),
        (format!("TRACE {p}/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"), vec![405]),
        // Another method to the letter, but one a lenient server behind might take for TRACE,
        // echoing the injected token back.
        (format!("trace {p}/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"), vec![405]),
        (format!("Connect {p}/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"), vec![405]),
        // Two Host fields: which one a server behind would take is anybody's guess (RFC 9112 3.2).
        (format!("GET {p}/x HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"), vec![400]),
        ("OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".to_owned(), vec![400, 404]),
    ] {
        tried += 1;
        let (status, _) = raw_status(addr, request.as_bytes()).await;
        if expected.contains(&status) {
            refused += 1;
        } else {
            wrong.push(format!("{}: expected {expected:?}, got {status}", request.lines().next().unwrap()));
        }
    }
    // Hosts a DNS-rebinding page would present, Origins and Sec-Fetch-Site of cross-site pages.
    let ok_target = format!("{p}/namespaces");
    for (host, extra) in [
        ("evil.example", None),
        ("evil.example:80", None),
        ("127.0.0.1.nip.io", None),
        ("localhost.evil.example", None),
        ("localhost.", None),
        ("127.0.0.2", None),
        ("0.0.0.0", None),
        ("[::ffff:127.0.0.1]", None),
        ("127.0.0.1", Some("Origin: http://localhost:3000")),
        ("127.0.0.1", Some("Origin: null")),
        ("127.0.0.1", Some("Origin: http://evil.example")),
        ("localhost", Some("Sec-Fetch-Site: cross-site")),
        ("localhost", Some("Sec-Fetch-Site: same-site")),
    ] {
        tried += 1;
        let extra: Vec<&str> = extra.into_iter().collect();
        let (status, response) = raw_status(addr, &raw_http::get(&ok_target, host, &extra)).await;
        let kind = response
            .as_ref()
            .and_then(|r| r.header("x-seldon-auth-proxy-error"));
        if status == 403 && matches!(kind.as_deref(), Some("forbidden_host" | "forbidden_origin")) {
            refused += 1;
        } else {
            wrong.push(format!(
                "Host: {host} {extra:?}: expected 403, got {status} {kind:?}"
            ));
        }
    }
    println!("hostile requests: {tried} tried, {refused} refused as expected");
    for line in &wrong {
        println!("  NOT REFUSED AS EXPECTED: {line}");
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(tried, refused);
    assert!(
        upstream.requests().is_empty(),
        "hostile requests reached the upstream: {:?}",
        upstream
            .requests()
            .iter()
            .map(|s| &s.path)
            .collect::<Vec<_>>()
    );

    // What passes: untouched, including an encoded slash inside a segment.
    let passing = [
        format!("{p}/models/a%2Fb"),
        format!("{p}/models/a%2fb/versions"),
        format!("{p}/x?next=/../../admin"),
        format!("{p}/...hidden"),
        format!("{p}/%252e%252e/x"),
        p.to_owned(),
        format!("{p}/"),
    ];
    for target in &passing {
        let (status, response) = raw_status(addr, &raw_http::get(target, "127.0.0.1", &[])).await;
        assert_eq!(status, 200, "{target}: {response:?}");
    }
    let mut allowed_hosts = 0;
    for (host, extra) in [
        ("localhost", None),
        ("LOCALHOST", None),
        ("localhost:8080", None),
        ("127.0.0.1:1", None),
        ("[::1]:9", None),
        ("[::1]", None),
        ("localhost", Some("Sec-Fetch-Site: same-origin")),
        ("localhost", Some("Sec-Fetch-Site: none")),
    ] {
        let extra: Vec<&str> = extra.into_iter().collect();
        let (status, response) = raw_status(addr, &raw_http::get(&ok_target, host, &extra)).await;
        assert_eq!(status, 200, "Host: {host} {extra:?}: {response:?}");
        allowed_hosts += 1;
    }
    let seen: Vec<String> = upstream.requests().into_iter().map(|s| s.path).collect();
    assert_eq!(seen.len(), passing.len() + allowed_hosts, "{seen:#?}");
    for (target, path) in passing.iter().zip(&seen) {
        assert_eq!(target, path, "forwarded as received");
    }
    for path in &seen {
        let path_only = path.split('?').next().unwrap();
        assert!(
            path_only == p || path_only.starts_with(&format!("{p}/")),
            "outside the prefix: {path}"
        );
    }
    assert!(upstream
        .requests()
        .iter()
        .all(|s| s.status == 200 && s.headers.get("host").unwrap() == &upstream.addr.to_string()));
    proxy.stop().await;

    // Origins listed in --allowed-origin pass; others (and `null`) still do not.
    let proxy = Proxy::start(Settings {
        allowed_origin: Some(vec!["http://localhost:3000".into()]),
        ..for_idp(&upstream.url(), &idp)
    })
    .await;
    let addr = proxy.proxy_addr();
    for (origin, expected) in [
        ("http://localhost:3000", 200),
        ("null", 403),
        ("http://localhost:3001", 403),
        ("https://localhost:3000", 403),
        ("http://evil.example", 403),
    ] {
        let line = format!("Origin: {origin}");
        let (status, _) = raw_status(addr, &raw_http::get(&ok_target, "localhost", &[&line])).await;
        assert_eq!(status, expected, "Origin: {origin}");
    }
    stop_stack(idp, upstream, proxy).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Listeners: loopback only, Unix socket, inbound token
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_listener_beyond_loopback_is_refused_without_allow_non_loopback() {
    for listen in ["0.0.0.0:0", "[::]:0", "192.0.2.10:8080"] {
        let finished = run_within(
            &[
                "--upstream",
                "http://127.0.0.1:9",
                "--oidc-server",
                "http://127.0.0.1:9/auth/realms/x",
                "--client-id",
                "sdk",
                "--client-secret-file",
                "/dev/null",
                "--listen",
                listen,
                "--admin-listen",
                "127.0.0.1:0",
            ],
            &[],
            Duration::from_secs(20),
        )
        .await;
        println!(
            "--listen {listen}: exit {:?}: {}",
            finished.code,
            finished.stderr.trim()
        );
        assert_eq!(finished.code, Some(2), "{}", finished.output());
        assert!(
            finished.stderr.contains("loopback") && finished.stderr.contains("listen"),
            "{}",
            finished.stderr
        );
        assert!(
            finished.stderr.contains("--allow-non-loopback"),
            "{}",
            finished.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_listener_is_created_0600_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("p.sock");
    let (idp, upstream, proxy) = stack(60, |s| Settings {
        listen: Some(format!("unix:{}", socket.display())),
        ..s
    })
    .await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    println!("unix socket {} mode {:o}", socket.display(), mode & 0o777);
    assert_eq!(mode & 0o777, 0o600);
    let stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let response = raw_http::exchange(
        stream,
        &raw_http::get(&format!("{API}/x"), "localhost", &[]),
        Duration::from_secs(10),
    )
    .await
    .expect("an answer over the socket");
    assert_eq!(response.status, 200, "{}", response.head);
    assert_eq!(upstream.requests().len(), 1);
    assert!(upstream.requests()[0].subject.is_some());
    stop_stack(idp, upstream, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_token_is_required_and_never_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let local_secret = "local-inbound-secret-0123456789";
    let file = secret_file(dir.path(), "inbound", &format!("{local_secret}\n"), 0o600);
    let (idp, upstream, proxy) = stack(60, |s| Settings {
        inbound_token_file: Some(file.clone()),
        ..s
    })
    .await;
    let url = proxy.api("/x");
    for authorization in [
        None,
        Some("Bearer wrong-secret-0123456789ab"),
        Some(&*format!("Basic {local_secret}")),
        Some(&*format!("Bearer {local_secret}x")),
    ] {
        let mut request = proxy.http.get(&url);
        if let Some(value) = authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401, "{authorization:?}");
        assert_eq!(error_kind(&response).as_deref(), Some("unauthorized"));
        assert!(response
            .headers()
            .get("www-authenticate")
            .is_some_and(|v| v.to_str().unwrap().starts_with("Bearer")));
    }
    assert!(upstream.requests().is_empty());
    let response = proxy
        .http
        .get(&url)
        .bearer_auth(local_secret)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].subject.as_deref(),
        Some("service-account-sdk"),
        "the upstream sees the proxy's token"
    );
    assert!(seen[0].token.as_deref().is_some_and(|t| t != local_secret));
    for (name, value) in seen[0].headers.iter() {
        assert!(
            !value.to_str().unwrap_or_default().contains(local_secret),
            "{name} carries the local secret"
        );
    }
    stop_stack(idp, upstream, proxy).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Credentials out
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_credentials_never_reach_the_upstream_and_redirects_are_passed_back() {
    let (idp, upstream, proxy) = stack(60, |s| s).await;
    let response = proxy
        .http
        .get(proxy.api("/x"))
        .header("authorization", "Bearer caller-own-token")
        .header("proxy-authorization", "Basic Y2FsbGVyOnByb3h5LXNlY3JldA==")
        .header("cookie", "authservice_session=caller-session; other=1")
        .header("connection", "x-private-hop")
        .header("x-private-hop", "hop-secret")
        .header("x-kept", "yes")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = &upstream.requests()[0];
    for name in ["proxy-authorization", "cookie", "x-private-hop"] {
        assert!(
            seen.headers.get(name).is_none(),
            "{name} reached the upstream: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.headers.get("x-kept").unwrap(), "yes");
    assert_ne!(seen.token.as_deref(), Some("caller-own-token"));
    assert_eq!(seen.subject.as_deref(), Some("service-account-sdk"));
    let everything = format!("{:?}", seen.headers);
    for secret in [
        "caller-own-token",
        "Y2FsbGVyOnByb3h5LXNlY3JldA",
        "caller-session",
        "hop-secret",
    ] {
        assert!(
            !everything.contains(secret),
            "{secret} reached the upstream"
        );
    }

    // Redirects go back to the caller, never followed by the proxy (which would carry the token elsewhere).
    upstream.clear_requests();
    upstream.add_fault(
        "/moved-away",
        Fault::Redirect("http://elsewhere.example/steal?x=1".into()),
    );
    upstream.add_fault(
        "/moved-here",
        Fault::Redirect(format!("{}{API}/new-home", upstream.url())),
    );
    let response = proxy.get("/moved-away").await;
    assert_eq!(response.status(), 302);
    assert_eq!(
        response.headers()["location"],
        "http://elsewhere.example/steal?x=1"
    );
    let response = proxy.get("/moved-here").await;
    assert_eq!(response.status(), 302);
    assert_eq!(
        response.headers()["location"],
        format!("{API}/new-home"),
        "same-origin locations stay behind the proxy"
    );
    let paths: Vec<String> = upstream.requests().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        vec![format!("{API}/moved-away"), format!("{API}/moved-here")],
        "the proxy followed a redirect"
    );
    stop_stack(idp, upstream, proxy).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Redaction
// ---------------------------------------------------------------------------------------------------------------

/// Every secret a log line must never hold, with how the search treats it.
struct Secrets {
    named: Vec<(String, String)>,
}

impl Secrets {
    fn add(&mut self, what: impl Into<String>, value: impl Into<String>) {
        let value = value.into();
        if !value.is_empty() && !self.named.iter().any(|(_, v)| *v == value) {
            self.named.push((what.into(), value));
        }
    }

    /// Adds a token and its signature alone (a log could print a part of it).
    fn add_token(&mut self, what: &str, token: &str) {
        self.add(what, token);
        if let Some(signature) = token.rsplit('.').next().filter(|s| s.len() >= 16) {
            self.add(format!("{what} signature"), signature);
        }
    }

    fn found_in(&self, text: &str) -> Vec<String> {
        self.named
            .iter()
            .filter(|(_, value)| text.contains(value.as_str()))
            .map(|(what, _)| what.clone())
            .collect()
    }
}

fn random_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Runs the binary at `--log-level trace` through a full cycle and searches everything it printed (and the
/// `check` output, and the proxy's JSON error bodies) for every secret and token involved.
async fn redaction_cycle(log_format: &str, log_level: &str) {
    let client_secret = format!("Sdk-Cl1ent-S3cret-{}", random_suffix());
    let password = format!("Al1ce-Pa55word-{}", random_suffix());
    let wrong_secret = format!("Wr0ng-Cl1ent-S3cret-{}", random_suffix());
    let idp = TestIdp::start(
        IdpOptions::default()
            .client("sdk", &client_secret)
            .user("alice", &password)
            .token_lifetime(4),
    )
    .await;
    let relay = TokenRelay::start(&idp.token_endpoint).await;
    let upstream = FaultUpstream::start(&idp).await;
    upstream.add_fault("/always-401", Fault::Unauthorized);
    let dir = tempfile::tempdir().unwrap();
    let client_secret_file = secret_file(
        dir.path(),
        "client-secret",
        &format!("{client_secret}\n"),
        0o600,
    );
    let wrong_file = secret_file(
        dir.path(),
        "wrong-secret",
        &format!("{wrong_secret}\n"),
        0o600,
    );
    let password_file = secret_file(dir.path(), "password", &format!("{password}\n"), 0o600);
    let relay_url = relay.url();
    let upstream_url = upstream.url();
    let args = |secret: &Path| -> Vec<String> {
        [
            "--upstream",
            &upstream_url,
            "--token-endpoint",
            &relay_url,
            "--auth-method",
            "password_grant",
            "--client-id",
            "sdk",
            "--client-secret-file",
            secret.to_str().unwrap(),
            "--username",
            "alice",
            "--password-file",
            password_file.to_str().unwrap(),
            "--log-level",
            log_level,
            "--log-format",
            log_format,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    // `serve` on ephemeral ports, and `check`, with a client secret file.
    let serve = |secret: &Path| {
        let mut a = args(secret);
        a.extend(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"].map(String::from));
        async move {
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            ProxyChild::spawn(&refs, &[]).await
        }
    };
    let check = |secret: &Path| {
        let mut a = vec!["check".to_owned()];
        a.extend(args(secret));
        async move {
            let refs: Vec<&str> = a.iter().map(String::as_str).collect();
            run_within(&refs, &[], Duration::from_secs(30)).await
        }
    };
    let proxy = serve(&client_secret_file).await;
    let http = client();
    let mut bodies = String::new();
    let started = Instant::now();
    let mut calls = 0;
    let mut replayed_401 = false;
    // Token requests, refresh-token refreshes (lifetime 4 s), forwarding, a 401 replay, errors the proxy makes.
    while started.elapsed() < Duration::from_secs(7) {
        let response = http
            .get(format!(
                "{}{API}/namespaces/seldon/seldondeployments",
                proxy.url()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        calls += 1;
        if !replayed_401 && started.elapsed() > Duration::from_secs(3) {
            let response = http
                .get(format!("{}{API}/always-401", proxy.url()))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 401);
            replayed_401 = true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (path, host) in [
        (format!("{API}/../x"), "localhost"),
        ("/elsewhere".to_owned(), "localhost"),
        (format!("{API}/x"), "evil.example"),
    ] {
        let response = raw_http::tcp(proxy.proxy, &raw_http::get(&path, host, &[]))
            .await
            .unwrap();
        assert!(response.status >= 400);
        bodies.push_str(&response.body_text());
    }
    bodies.push_str(&get_text(&http, &format!("{}/readyz", proxy.admin_url())).await);
    bodies.push_str(&get_text(&http, &format!("{}/metrics", proxy.admin_url())).await);
    let served = proxy.terminate().await;
    assert_eq!(served.code, Some(0), "{}", served.stderr);

    // A proxy with the wrong client secret: its 503 bodies and logs.
    let wrong_proxy = serve(&wrong_file).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let response = http
        .get(format!("{}{API}/x", wrong_proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let wrong_body = response.text().await.unwrap();
    assert!(wrong_body.contains("unauthorized_client"), "{wrong_body}");
    bodies.push_str(&wrong_body);
    bodies.push_str(&get_text(&http, &format!("{}/readyz", wrong_proxy.admin_url())).await);
    let wrong_served = wrong_proxy.terminate().await;

    // `check` with the wrong secret (fails) and with the right one (prints a summary).
    let wrong_check = check(&wrong_file).await;
    assert_eq!(wrong_check.code, Some(1), "{}", wrong_check.output());
    assert!(
        wrong_check.output().contains("unauthorized_client"),
        "{}",
        wrong_check.output()
    );
    let right_check = check(&client_secret_file).await;
    assert_eq!(right_check.code, Some(0), "{}", right_check.output());
    assert!(
        right_check.stdout.contains("ok: obtained a credential"),
        "{}",
        right_check.stdout
    );

    let mut secrets = Secrets { named: Vec::new() };
    secrets.add("client secret", client_secret.clone());
    secrets.add("wrong client secret", wrong_secret.clone());
    secrets.add("password", password.clone());
    {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        for secret in [&client_secret, &wrong_secret] {
            secrets.add(
                "HTTP Basic credentials",
                b64.encode(format!("sdk:{secret}")),
            );
        }
    }
    let issued = relay.issued();
    for token in &issued {
        secrets.add_token("an issued token", token);
    }
    let forwarded = upstream.tokens_seen();
    for token in &forwarded {
        secrets.add_token("a forwarded token", token);
    }
    let refresh_grants = idp.stats().await.ok("refresh_token");
    let logs = [
        ("serve", served.output()),
        ("serve with the wrong secret", wrong_served.output()),
        ("check with the wrong secret", wrong_check.output()),
        ("check", right_check.output()),
        ("JSON error bodies, /readyz, /metrics", bodies.clone()),
    ];
    let total_bytes: usize = logs.iter().map(|(_, t)| t.len()).sum();
    let mut found = Vec::new();
    for (source, text) in &logs {
        for what in secrets.found_in(text) {
            found.push(format!("{what} in the output of {source}"));
        }
    }
    println!(
        "redaction ({log_format} logs, level {log_level}): {} calls, {} refresh_token grants, 401 replayed: {replayed_401}; searched {} bytes of output for {} strings ({} tokens issued, {} forwarded, secrets, password, Basic credentials) -> {} found",
        calls,
        refresh_grants,
        total_bytes,
        secrets.named.len(),
        issued.len(),
        forwarded.len(),
        found.len()
    );
    for line in &found {
        println!("  LEAK: {line}");
    }
    assert!(
        refresh_grants >= 1,
        "the cycle should include refresh_token grants"
    );
    assert!(issued.iter().any(|t| t.contains('.')) && issued.len() >= 4);
    assert!(
        served.stderr.lines().count() > 20,
        "trace logging printed little:\n{}",
        served.stderr
    );
    if std::env::var_os("SELDON_AUTH_PROXY_TEST_SHOW_LOGS").is_some() {
        println!("----- serve output -----\n{}", served.output());
    }
    assert!(found.is_empty(), "{found:#?}");
    upstream.stop().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_text_hold_no_secret_and_no_token() {
    redaction_cycle("text", "trace").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_json_hold_no_secret_and_no_token() {
    redaction_cycle("json", "trace").await;
}

/// A filter that names the HTTP and TLS libraries turns on their own trace output, which the proxy cannot vet line
/// by line: sensitive header values must still not appear.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_of_the_http_and_tls_libraries_hold_no_secret_and_no_token() {
    redaction_cycle(
        "text",
        "trace,hyper=trace,hyper_util=trace,reqwest=trace,rustls=trace,h2=trace,tower_http=trace",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_on_the_command_line_and_loose_secret_files_are_warned_about() {
    let idp = TestIdp::start(
        IdpOptions::default()
            .client("sdk", "Flag-S3cret-xyz")
            .user("alice", "Flag-Pa55-xyz"),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let loose = secret_file(dir.path(), "loose-secret", "Flag-S3cret-xyz\n", 0o644);
    let tight = secret_file(dir.path(), "tight-secret", "Flag-S3cret-xyz\n", 0o600);
    let base = [
        "check",
        "--upstream",
        "http://127.0.0.1:9",
        "--oidc-server",
        &idp.issuer,
        "--client-id",
        "sdk",
    ];
    let run = |extra: Vec<String>| {
        let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        args.extend(extra);
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            run_within(&refs, &[], Duration::from_secs(30)).await
        }
    };
    let flag = run(vec!["--client-secret".into(), "Flag-S3cret-xyz".into()]).await;
    let flag_eq = run(vec!["--client-secret=Flag-S3cret-xyz".into()]).await;
    let password_flag = run(vec![
        "--auth-method".into(),
        "password_grant".into(),
        "--client-secret-file".into(),
        tight.to_str().unwrap().into(),
        "--username".into(),
        "alice".into(),
        "--password".into(),
        "Flag-Pa55-xyz".into(),
    ])
    .await;
    let loose_file = run(vec![
        "--client-secret-file".into(),
        loose.to_str().unwrap().into(),
    ])
    .await;
    let tight_file = run(vec![
        "--client-secret-file".into(),
        tight.to_str().unwrap().into(),
    ])
    .await;
    for (what, finished) in [
        ("--client-secret V", &flag),
        ("--client-secret=V", &flag_eq),
        ("--password V", &password_flag),
        ("0644 file", &loose_file),
        ("0600 file", &tight_file),
    ] {
        println!(
            "{what}: exit {:?}; warnings: {:?}",
            finished.code,
            finished
                .stderr
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("warn"))
                .collect::<Vec<_>>()
        );
        assert_eq!(finished.code, Some(0), "{what}: {}", finished.output());
        assert!(
            !finished.stderr.contains("Flag-S3cret-xyz")
                && !finished.stderr.contains("Flag-Pa55-xyz"),
            "{what}: the warning repeats the secret"
        );
    }
    for finished in [&flag, &flag_eq] {
        assert!(
            finished.stderr.contains("SELDON_AUTH_PROXY_CLIENT_SECRET")
                && finished.stderr.contains("--client-secret-file"),
            "{}",
            finished.stderr
        );
    }
    assert!(
        password_flag.stderr.contains("SELDON_AUTH_PROXY_PASSWORD")
            && password_flag.stderr.contains("--password-file"),
        "{}",
        password_flag.stderr
    );
    assert!(
        !password_flag.stderr.contains("CLIENT_SECRET"),
        "no warning about a secret given in a file: {}",
        password_flag.stderr
    );
    assert!(
        loose_file.stderr.contains("loose-secret") && loose_file.stderr.contains("chmod 600"),
        "{}",
        loose_file.stderr
    );
    assert!(
        !tight_file.stderr.contains("chmod") && !tight_file.stderr.contains("command line"),
        "{}",
        tight_file.stderr
    );
    idp.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------------------------

async fn tls_upstream(idp: &TestIdp, pki: &TestPki) -> FaultUpstream {
    FaultUpstream::start_with(&idp.jwks_uri, &idp.issuer, Some(pki.server_config())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_certificate_from_an_unknown_ca_is_refused_and_trusted_with_ca_file() {
    let pki = TestPki::generate();
    let idp = TestIdp::start(idp_options(60)).await;
    let upstream = tls_upstream(&idp, &pki).await;
    let port = upstream.addr.port();
    let proxy = Proxy::start(for_idp(&upstream.url(), &idp)).await;
    proxy.wait_ready(Duration::from_secs(10)).await.unwrap();
    let response = proxy.get("/x").await;
    assert_eq!(response.status(), 502);
    assert_eq!(error_kind(&response).as_deref(), Some("upstream_tls"));
    let body: serde_json::Value = response.json().await.unwrap();
    println!("untrusted upstream certificate: {body}");
    assert!(
        body["message"].as_str().unwrap().contains("not trusted"),
        "{body}"
    );
    assert!(upstream.requests().is_empty());
    proxy.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    for upstream_url in [
        format!("https://127.0.0.1:{port}"),
        format!("https://localhost:{port}"),
    ] {
        let proxy = Proxy::start(Settings {
            ca_file: Some(ca.clone()),
            ..for_idp(&upstream_url, &idp)
        })
        .await;
        let response = proxy.get("/x").await;
        assert_eq!(response.status(), 200, "{upstream_url}");
        proxy.stop().await;
    }
    assert_eq!(upstream.requests().len(), 2);

    // Over TLS too, a large body goes whole and the connection carries the next call.
    let proxy = Proxy::start(Settings {
        ca_file: Some(ca.clone()),
        ..for_idp(&format!("https://localhost:{port}"), &idp)
    })
    .await;
    let connections_before = upstream.connections();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let response = proxy
        .http
        .post(proxy.api("/upload"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _ = response.bytes().await.unwrap();
    let response = proxy.get("/x").await;
    assert_eq!(response.status(), 200);
    let _ = response.bytes().await.unwrap();
    let seen = upstream.requests();
    let upload = seen.iter().find(|s| s.path.ends_with("/upload")).unwrap();
    assert_eq!(
        (upload.body_len, upload.body_sha256.as_str()),
        (body.len(), sha256_hex(&body).as_str())
    );
    assert_eq!(
        upstream.connections() - connections_before,
        1,
        "both calls on one TLS connection"
    );
    proxy.stop().await;
    upstream.stop().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_skip_verify_works_and_says_so_loudly() {
    let pki = TestPki::generate();
    let idp = TestIdp::start(idp_options(60)).await;
    let upstream = tls_upstream(&idp, &pki).await;
    let proxy = ProxyChild::spawn(
        &[
            "--upstream",
            &upstream.url(),
            "--oidc-server",
            &idp.issuer,
            "--client-id",
            "sdk",
            "--insecure-skip-verify",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        &[("SELDON_AUTH_PROXY_CLIENT_SECRET", "s3cret")],
    )
    .await;
    let http = client();
    let mut status = 0;
    for _ in 0..50 {
        status = http
            .get(format!("{}{API}/x", proxy.url()))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200);
    let readyz = get_json(&http, &format!("{}/readyz", proxy.admin_url())).await;
    let finished = proxy.terminate().await;
    let warning = finished
        .stderr
        .lines()
        .find(|l| l.contains("insecure_skip_verify"))
        .unwrap_or_default()
        .to_owned();
    println!("insecure_skip_verify: start-up warning {warning:?}; /readyz {readyz}");
    assert!(
        warning.contains("WARN") && warning.contains("NOT verified"),
        "{}",
        finished.stderr
    );
    assert!(
        readyz["warning"]
            .as_str()
            .is_some_and(|w| w.contains("insecure_skip_verify")),
        "{readyz}"
    );
    upstream.stop().await;
    idp.stop().await;
}

#[tokio::test]
async fn plain_http_to_another_machine_is_refused_at_start_up_unless_allowed() {
    let common_args = [
        "--oidc-server",
        "http://127.0.0.1:9/auth/realms/x",
        "--client-id",
        "sdk",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    let env = [("SELDON_AUTH_PROXY_CLIENT_SECRET", "s3cret")];
    let mut args = vec!["--upstream", "http://ml.example.com"];
    args.extend(common_args);
    let refused = run_within(&args, &env, Duration::from_secs(20)).await;
    println!(
        "plain http upstream: exit {:?}: {}",
        refused.code,
        refused.stderr.trim()
    );
    assert_eq!(refused.code, Some(2));
    assert!(
        refused.stderr.contains("upstream") && refused.stderr.contains("--allow-plain-http"),
        "{}",
        refused.stderr
    );
    let mut args = vec![
        "--upstream",
        "https://ml.example.com",
        "--oidc-server",
        "http://idp.example.com/auth/realms/x",
    ];
    args.extend(&common_args[2..]);
    let refused = run_within(&args, &env, Duration::from_secs(20)).await;
    assert_eq!(refused.code, Some(2), "{}", refused.output());
    assert!(refused.stderr.contains("oidc_server"), "{}", refused.stderr);
    // Allowed: it starts (and is stopped before anything is sent anywhere).
    let mut args = vec!["--upstream", "http://ml.example.com", "--allow-plain-http"];
    args.extend(common_args);
    let started = ProxyChild::spawn(&args, &env).await;
    let finished = started.terminate().await;
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
}

// ---------------------------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_over_max_header_bytes_gets_431() {
    let (idp, upstream, proxy) = stack(60, |s| Settings {
        max_header_bytes: Some(8192),
        ..s
    })
    .await;
    let addr = proxy.proxy_addr();
    let small = format!("X-Fill: {}", "a".repeat(6000));
    let (status, _) = raw_status(
        addr,
        &raw_http::get(&format!("{API}/x"), "localhost", &[&small]),
    )
    .await;
    assert_eq!(status, 200, "a 6 KB head is within 8 KiB");
    let big = format!("X-Fill: {}", "a".repeat(20_000));
    let (status, response) = raw_status(
        addr,
        &raw_http::get(&format!("{API}/x"), "localhost", &[&big]),
    )
    .await;
    println!(
        "20 KB head with max_header_bytes 8192: {status} {:?}",
        response.map(|r| r.head)
    );
    assert_eq!(status, 431);
    let many: Vec<String> = (0..400)
        .map(|i| format!("X-H{i}: {}", "b".repeat(40)))
        .collect();
    let many_ref: Vec<&str> = many.iter().map(String::as_str).collect();
    let (status, _) = raw_status(
        addr,
        &raw_http::get(&format!("{API}/x"), "localhost", &many_ref),
    )
    .await;
    assert_eq!(status, 431, "many small headers over the limit");
    assert_eq!(upstream.requests().len(), 1);
    stop_stack(idp, upstream, proxy).await;
}

/// Seconds until the server closes `stream` (reads until EOF or an error), at most `limit`.
async fn seconds_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<f64> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(
            limit.saturating_sub(started.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed().as_secs_f64()),
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_head_is_cut_after_the_header_read_timeout() {
    let (idp, upstream, proxy) = stack(60, |s| Settings {
        header_read_timeout: Some(Duration::from_secs(1)),
        ..s
    })
    .await;
    let addr = proxy.proxy_addr();
    // Part of a head, then nothing.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(format!("GET {API}/x HTTP/1.1\r\nHost: local").as_bytes())
        .await
        .unwrap();
    let closed = seconds_until_closed(&mut stalled, Duration::from_secs(5)).await;
    println!("stalled head closed after {closed:?} s (header_read_timeout 1s)");
    let closed = closed.expect("a stalled head must be cut");
    // Not before the 1 s timeout (less a timer's slack); the upper bound leaves a loaded machine room.
    assert!((0.8..4.0).contains(&closed), "{closed:.2} s");
    // A head trickled one byte every 200 ms is cut as well, progress or not.
    let mut trickle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "GET {API}/x HTTP/1.1\r\nHost: localhost\r\nX-Slow: {}\r\n\r\n",
        "z".repeat(100)
    );
    let trickle_started = Instant::now();
    let (mut reader, mut writer) = trickle.split();
    let writing = async {
        for byte in head.as_bytes() {
            if writer.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let reading = async {
        let mut buf = [0u8; 1024];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => return trickle_started.elapsed().as_secs_f64(),
                Ok(_) => continue,
            }
        }
    };
    let cut = tokio::select! {
        closed = reading => Some(closed),
        _ = writing => None,
    };
    println!("head trickled at 5 bytes/s: connection closed after {cut:?} s (the whole head would take {:.0} s)", head.len() as f64 * 0.2);
    let cut = cut.expect("the trickling connection was not cut");
    assert!((0.8..4.0).contains(&cut), "{cut:.2} s");
    assert!(upstream.requests().is_empty());
    assert_eq!(proxy.get("/x").await.status(), 200);
    stop_stack(idp, upstream, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_wait_in_the_backlog() {
    let (idp, upstream, proxy) = stack(60, |s| Settings {
        max_connections: Some(2),
        workers: Some(1),
        ..s
    })
    .await;
    let addr = proxy.proxy_addr();
    let request = format!("GET {API}/x HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        assert_eq!(
            raw_http::read_one_response(&mut stream, Duration::from_secs(5)).await,
            Some(200)
        );
        held.push(stream);
    }
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut stream =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
                .expect("the connection is accepted by the kernel's backlog")
                .expect("not refused");
        stream.write_all(request.as_bytes()).await.unwrap();
        waiting.push(stream);
    }
    for stream in &mut waiting {
        assert_eq!(
            raw_http::read_one_response(stream, Duration::from_millis(700)).await,
            None,
            "served beyond max_connections"
        );
    }
    let released = Instant::now();
    drop(held);
    for stream in &mut waiting {
        assert_eq!(
            raw_http::read_one_response(stream, Duration::from_secs(5)).await,
            Some(200),
            "a waiting connection was not served after the first ones closed"
        );
    }
    println!("max_connections 2: the 3rd and 4th connections waited, then were served {:.0} ms after the first two closed", released.elapsed().as_secs_f64() * 1e3);
    assert_eq!(upstream.requests().len(), 4);
    stop_stack(idp, upstream, proxy).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Property: path confinement
// ---------------------------------------------------------------------------------------------------------------

mod confinement {
    use proptest::prelude::*;
    use seldon_auth_proxy::guard::confine_path;

    const PREFIX: &str = "/seldon-deploy/api/v1alpha1";

    /// The path as a lenient server could read it: `%2e` decoded to `.`, backslashes (also `%5c`) read as `/`,
    /// `;params` ignored when deciding what a dot segment is; dot segments resolved. `%2F` stays as it is.
    pub fn normalized(path: &str) -> String {
        let lenient = path
            .replace("%2e", ".")
            .replace("%2E", ".")
            .replace("%5c", "/")
            .replace("%5C", "/")
            .replace('\\', "/");
        let mut stack: Vec<&str> = Vec::new();
        for segment in lenient.split('/').skip(1) {
            match segment.split(';').next().unwrap_or_default() {
                "." => {}
                ".." => {
                    stack.pop();
                }
                _ => stack.push(segment),
            }
        }
        format!("/{}", stack.join("/"))
    }

    pub fn under_prefix(path: &str) -> bool {
        path == PREFIX || path.starts_with(&format!("{PREFIX}/"))
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("..".to_owned()),
            Just(".".to_owned()),
            Just("%2e".to_owned()),
            Just("%2E".to_owned()),
            Just("%2e%2e".to_owned()),
            Just("%2E%2e".to_owned()),
            Just(".%2e".to_owned()),
            Just("%2e.".to_owned()),
            Just("..;".to_owned()),
            Just("..;x=1".to_owned()),
            Just("%2e%2e;".to_owned()),
            Just(";".to_owned()),
            Just("%2F".to_owned()),
            Just("..%2F..".to_owned()),
            Just("%5C".to_owned()),
            Just("%5c..".to_owned()),
            Just("\\".to_owned()),
            Just("..\\..".to_owned()),
            Just("%00".to_owned()),
            Just(String::new()),
            Just("seldon-deploy".to_owned()),
            Just("api".to_owned()),
            Just("v1alpha1".to_owned()),
            "[a-zA-Z0-9._~;%-]{0,6}",
        ]
    }

    fn target() -> impl Strategy<Value = String> {
        (
            prop_oneof![
                6 => Just(PREFIX.to_owned()),
                1 => Just(format!("{PREFIX}x")),
                1 => Just("/seldon-deploy/api".to_owned()),
                1 => Just(String::new()),
                1 => Just("/".to_owned()),
            ],
            proptest::collection::vec(segment(), 0..7),
            proptest::option::of("[a-z=&./%]{0,8}"),
        )
            .prop_map(|(base, segments, query)| {
                let mut target = base;
                for s in segments {
                    target.push('/');
                    target.push_str(&s);
                }
                if target.is_empty() {
                    target.push('/');
                }
                if let Some(q) = query {
                    target.push('?');
                    target.push_str(&q);
                }
                target
            })
    }

    /// Checks one target; returns whether it parsed and whether it was admitted.
    fn check(target: &str) -> Result<(bool, bool), TestCaseError> {
        let Ok(uri) = target.parse::<http::Uri>() else {
            return Ok((false, false));
        };
        let Ok(forwarded) = confine_path(&uri, &[PREFIX.to_owned()]) else {
            return Ok((true, false));
        };
        let path = uri.path();
        prop_assert_eq!(
            forwarded,
            uri.path_and_query().unwrap().as_str(),
            "forwarded as received"
        );
        prop_assert!(under_prefix(path), "admitted {} outside the prefix", target);
        prop_assert!(
            under_prefix(&normalized(path)),
            "admitted {} which normalizes to {}",
            target,
            normalized(path)
        );
        Ok((true, true))
    }

    /// Runs `strategy` through [`check`] for PROPTEST_CASES cases (default 256) and prints what it saw.
    fn run(name: &str, strategy: impl Strategy<Value = String>) {
        use std::cell::Cell;
        let config = ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        let cases = config.cases;
        let (parsed, admitted, hostile_refused) =
            (Cell::new(0u64), Cell::new(0u64), Cell::new(0u64));
        let started = std::time::Instant::now();
        let mut runner = proptest::test_runner::TestRunner::new(config);
        let outcome = runner.run(&strategy, |target| {
            let (was_parsed, was_admitted) = check(&target)?;
            parsed.set(parsed.get() + u64::from(was_parsed));
            admitted.set(admitted.get() + u64::from(was_admitted));
            if was_parsed && !was_admitted {
                let path = target.split('?').next().unwrap_or_default();
                if !under_prefix(&normalized(path)) {
                    hostile_refused.set(hostile_refused.get() + 1);
                }
            }
            Ok(())
        });
        println!(
            "{name}: {cases} cases in {:.2} s: {} parsed as request targets, {} admitted, {} refused of which {} escape the prefix when normalized",
            started.elapsed().as_secs_f64(),
            parsed.get(),
            admitted.get(),
            parsed.get() - admitted.get(),
            hostile_refused.get()
        );
        if let Err(e) = outcome {
            panic!("{name}: {e}");
        }
    }

    #[test]
    fn confine_path_never_admits_a_path_that_escapes_the_prefix() {
        run("segment-built targets", target());
    }

    #[test]
    fn confine_path_on_arbitrary_printable_targets() {
        run(
            "printable targets",
            prop_oneof![
                "/[!-~]{0,40}".prop_map(|s| s),
                "[!-~]{0,40}".prop_map(|s| format!("{PREFIX}/{s}")),
            ],
        );
    }

    #[test]
    fn the_oracle_itself_recognises_escapes() {
        for escaping in [
            "/seldon-deploy/api/v1alpha1/../x",
            "/seldon-deploy/api/v1alpha1/%2e%2e/x",
            "/seldon-deploy/api/v1alpha1/..;/x",
            "/seldon-deploy/api/v1alpha1/a%5c..%5c..%5cx",
            "/seldon-deploy/api/v1alpha1x",
        ] {
            assert!(!under_prefix(&normalized(escaping)), "{escaping}");
        }
        for staying in [
            "/seldon-deploy/api/v1alpha1/a/../b",
            "/seldon-deploy/api/v1alpha1/a%2F..%2F..",
            "/seldon-deploy/api/v1alpha1",
        ] {
            assert!(under_prefix(&normalized(staying)), "{staying}");
        }
    }
}
