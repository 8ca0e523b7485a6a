//! Issue 2, forwarding: the proxy between callers and a JWT-checking platform stand-in (or an echo upstream),
//! with credentials from the real test IdP (oauth2-mock-server), all on ephemeral loopback ports: one token
//! request for a cold burst of 1000 calls, refresh under load across 10 token lifetimes, a refused client,
//! callers' credentials replaced, paths outside the prefix refused, byte-exact pass-through and streaming,
//! readiness and metrics, the password grant, and `check`/`token` output.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::echo::{pattern_bytes, ChannelBody, EchoUpstream};
use common::gate::TcpGate;
use common::http::{client, get_json};
use common::idp::{jwt_claims, TestIdp};
use common::platform::platform_for;
use common::proxy::{
    idp_options, metric, settings, Proxy, API, CLIENT_ID, CLIENT_SECRET, ERROR_HEADER, PASSWORD,
    SERVICE_ACCOUNT, USERNAME,
};
use common::proxy_child::{command, run, run_command};
use common::raw_http;
use seldon_auth_proxy::config::{AuthMethod, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIST: &str = "/namespaces/seldon/seldondeployments";

/// The IdP's token endpoint, reached through `gate` instead.
fn token_endpoint_via(idp: &TestIdp, gate: &TcpGate) -> String {
    idp.token_endpoint.replacen(
        &format!("127.0.0.1:{}/", idp.port),
        &format!("127.0.0.1:{}/", gate.addr.port()),
        1,
    )
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_1000_concurrent_requests_make_exactly_one_token_request() {
    cold_burst(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_start_1000_concurrent_requests_with_discovery_make_one_discovery_and_one_token_request(
) {
    cold_burst(true).await;
}

/// 1000 requests reach a proxy that has no credential yet and cannot get one until they all wait:
/// the gate holds the token endpoint (or, `via_discovery`, the discovery document) until then.
async fn cold_burst(via_discovery: bool) {
    let idp = TestIdp::start(idp_options(300)).await;
    let platform = platform_for(&idp).await;
    let gate = TcpGate::start(SocketAddr::from(([127, 0, 0, 1], idp.port))).await;
    let mut s = settings(&platform.url, &idp);
    // The token request waits at the gate while up to 60 s of connections are written, then 500 ms: the IdP
    // timeout (10 s by default) must not end it first.
    s.idp_timeout = Some(Duration::from_secs(90));
    if via_discovery {
        // Discovery goes through the gate; the token endpoint it names is the IdP's own.
        s.oidc_server = Some(idp.issuer.replacen(
            &format!("127.0.0.1:{}/", idp.port),
            &format!("127.0.0.1:{}/", gate.addr.port()),
            1,
        ));
    } else {
        s.oidc_server = None;
        s.token_endpoint = Some(token_endpoint_via(&idp, &gate));
    }
    let proxy = Proxy::start(s).await;
    let addr = proxy.proxy_addr();
    wait_until(
        "the proxy's first token request",
        Duration::from_secs(10),
        || gate.connections() >= 1,
    )
    .await;

    const CALLS: usize = 1000;
    let written = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let (written, answered) = (written.clone(), answered.clone());
        calls.spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let request = format!(
                "GET {API}{LIST}?call={i} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.expect("write");
            written.fetch_add(1, Ordering::SeqCst);
            let mut bytes = Vec::new();
            stream.read_to_end(&mut bytes).await.expect("read");
            answered.fetch_add(1, Ordering::SeqCst);
            raw_http::parse_complete(&bytes).status
        });
    }
    wait_until("1000 requests written", Duration::from_secs(60), || {
        written.load(Ordering::SeqCst) == CALLS
    })
    .await;
    // Give the proxy time to read every request; none can be answered without a credential.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        answered.load(Ordering::SeqCst),
        0,
        "requests were answered before the proxy had a credential"
    );
    assert_eq!(
        idp.total_token_requests().await,
        0,
        "the gate holds the first token request"
    );

    let released = Instant::now();
    gate.open();
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(status) = calls.join_next().await {
        *statuses
            .entry(status.expect("a call task"))
            .or_insert(0usize) += 1;
    }
    let burst = released.elapsed();
    let token_requests = idp.token_requests("client_credentials").await;
    println!(
        "1000 cold concurrent requests (discovery: {via_discovery}): statuses {statuses:?}, \
         {token_requests} token request(s), {} connection(s) through the gate, answered {burst:?} \
         after the IdP was reachable",
        gate.connections()
    );
    assert_eq!(
        statuses.get(&200),
        Some(&CALLS),
        "every call succeeds: {statuses:?}"
    );
    assert_eq!(token_requests, 1, "one token request for the whole burst");
    assert_eq!(idp.total_token_requests().await, 1);
    assert_eq!(
        gate.connections(),
        1,
        "one connection to the token endpoint"
    );
    assert_eq!(proxy.running().metrics.token_requests_total(), 1);
    let seen = platform.requests_seen();
    assert_eq!(seen.len(), CALLS, "the platform saw every call once");
    assert!(
        seen.iter()
            .all(|r| r.status == 200 && r.subject.as_deref() == Some(SERVICE_ACCOUNT)),
        "every call reached the platform with the service account's verified token"
    );

    proxy.stop().await;
    gate.stop();
    platform.shutdown().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_across_ten_lifetimes_under_steady_load_without_a_failed_call() {
    const LIFETIME_S: u64 = 4;
    // A 4 s token lives 3-4 s (exp is whole seconds): 10 lifetimes take about 35 s.
    const RUN: Duration = Duration::from_secs(35);
    // Short tokens are refreshed at half their life ±5%: every 1.425 s (a 3 s life, -5%) to 2.1 s (4 s, +5%).
    const FASTEST_REFRESH_S: f64 = (LIFETIME_S - 1) as f64 / 2.0 * 0.95;
    const SLOWEST_REFRESH_S: f64 = LIFETIME_S as f64 / 2.0 * 1.05;
    const WORKERS: usize = 8;
    let idp = TestIdp::start(idp_options(LIFETIME_S)).await;
    let platform = platform_for(&idp).await;
    let proxy = Proxy::start(settings(&platform.url, &idp)).await;
    proxy
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("the proxy is ready within 10 s");

    let http = client();
    let url = proxy.api(LIST);
    let deadline = Instant::now() + RUN;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..WORKERS {
        let (http, url) = (http.clone(), url.clone());
        workers.spawn(async move {
            let (mut calls, mut failures) = (0u64, Vec::new());
            while Instant::now() < deadline {
                calls += 1;
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                    }
                    Ok(r) => {
                        let status = r.status();
                        let kind = r.headers().get(ERROR_HEADER).cloned();
                        let body = r.text().await.unwrap_or_default();
                        failures.push(format!("{status} {kind:?} {body}"));
                    }
                    Err(e) => failures.push(format!("transport: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (calls, failures)
        });
    }
    let (mut calls, mut failures) = (0, Vec::new());
    while let Some(done) = workers.join_next().await {
        let (c, f) = done.expect("a load worker");
        calls += c;
        failures.extend(f);
    }
    let token_requests = idp.token_requests("client_credentials").await;
    let metrics = proxy.metrics().await;
    // The first token, then one per refresh during the run (give or take a second before and after it); the
    // fewest allows each refresh a second of IdP round trip and timer lag on a loaded machine.
    let most = 1 + ((RUN.as_secs_f64() + 1.0) / FASTEST_REFRESH_S).ceil() as u64;
    let fewest = (RUN.as_secs_f64() / (SLOWEST_REFRESH_S + 1.0)).floor() as u64;
    println!(
        "{RUN:?} of load with {LIFETIME_S}s tokens: {calls} calls, {} failed, {token_requests} token requests \
         ({fewest} to {most} expected), {} refused by the platform",
        failures.len(),
        platform.rejected_count()
    );
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(calls > 1000, "steady load: only {calls} calls");
    assert!(
        (fewest..=most).contains(&token_requests),
        "one token request per refresh at half the token's life: {fewest} to {most} in {RUN:?}, not {token_requests}"
    );
    // A 401 would have been replayed with a fresh token, hiding it from the callers: there must be none.
    assert_eq!(
        platform.rejected_count(),
        0,
        "the proxy sent an expired token"
    );
    assert!(
        metrics.contains("seldon_auth_proxy_upstream_unauthorized_total 0\n"),
        "upstream 401s were seen:\n{metrics}"
    );

    proxy.stop().await;
    platform.shutdown().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_client_secret_fails_check_with_the_idps_code_and_serve_answers_503() {
    const WRONG: &str = "not-the-s3cret-7d1f";
    let idp = TestIdp::start(idp_options(60)).await;
    let platform = platform_for(&idp).await;

    for subcommand in ["check", "token"] {
        let outcome = run(
            &[
                subcommand,
                "--upstream",
                &platform.url,
                "--oidc-server",
                &idp.issuer,
                "--client-id",
                CLIENT_ID,
            ],
            &[("SELDON_AUTH_PROXY_CLIENT_SECRET", WRONG)],
        )
        .await;
        assert_eq!(
            outcome.code,
            Some(1),
            "{subcommand} exits 1 without a credential: {outcome:?}"
        );
        assert!(
            outcome.stderr.contains("unauthorized_client"),
            "{subcommand}: stderr quotes the IdP's error: {}",
            outcome.stderr
        );
        assert!(
            !outcome.stderr.contains(WRONG) && !outcome.stdout.contains(WRONG),
            "{subcommand} prints the secret: {outcome:?}"
        );
        assert!(
            outcome.stdout.is_empty(),
            "{subcommand}: nothing on stdout: {}",
            outcome.stdout
        );
    }
    assert_eq!(idp.stats().await.errors("client_credentials"), 2);

    let mut s = settings(&platform.url, &idp);
    s.client_secret = Some(WRONG.into());
    let proxy = Proxy::start(s).await;
    let response = client().get(proxy.api(LIST)).send().await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()[ERROR_HEADER], "token_unavailable");
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is a number of seconds");
    assert!(retry_after >= 1, "Retry-After {retry_after}");
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{:?}",
        response.headers()
    );
    let text = response.text().await.unwrap();
    let body: serde_json::Value = serde_json::from_str(&text).expect("a JSON body");
    assert_eq!(body["error"], "token_unavailable");
    let message = body["message"].as_str().expect("a message");
    assert!(message.contains("unauthorized_client"), "{message}");
    assert!(!text.contains(WRONG), "the body shows the secret: {text}");
    assert_eq!(proxy.readyz().await.0, 503);
    assert!(
        platform.requests_seen().is_empty(),
        "the platform was called without a credential"
    );
    assert_eq!(platform.rejected_count(), 0);

    proxy.stop().await;
    platform.shutdown().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_authorization_and_cookies_are_replaced_by_the_idps_token() {
    let idp = TestIdp::start(idp_options(60)).await;
    let platform = platform_for(&idp).await;
    let proxy = Proxy::start(settings(&platform.url, &idp)).await;
    let callers = [
        // What seldon-deploy-sdk sends when it has no token.
        "Authorization: Bearer \r\n",
        "Authorization: Bearer wrong\r\nCookie: authservice_session=caller-cookie\r\n",
        "Authorization: Basic YWxpY2U6cHc=\r\nAuthorization: Bearer wrong-too\r\nCookie: a=1\r\nCookie: b=2\r\n",
    ];
    for (i, credentials) in callers.iter().enumerate() {
        let response = raw_http::send(
            proxy.url(),
            &format!(
                "GET {API}{LIST}?caller={i} HTTP/1.1\r\nHost: localhost\r\n{credentials}Connection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(response.status, 200, "{credentials:?}: {response:?}");
    }
    let seen = platform.requests_seen();
    assert_eq!(seen.len(), callers.len());
    for request in &seen {
        assert!(request.has_authorization, "{request:?}");
        assert_eq!(
            request.subject.as_deref(),
            Some(SERVICE_ACCOUNT),
            "{request:?}"
        );
        assert_eq!(request.status, 200);
        assert!(
            request.headers.get("cookie").is_none(),
            "the caller's cookie went upstream: {request:?}"
        );
    }

    // The echo upstream shows the exact header: one Authorization, the IdP's token.
    let echo = EchoUpstream::start().await;
    let to_echo = Proxy::start(settings(&echo.url, &idp)).await;
    let response = raw_http::send(
            to_echo.url(),
        &format!(
            "GET {API}/x HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \r\nAuthorization: Bearer wrong\r\nCookie: c=3\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(response.status, 200);
    let seen = echo.requests();
    let claims = seen[0].bearer_claims();
    assert_eq!(claims["iss"], idp.issuer.as_str());
    assert_eq!(claims["sub"], SERVICE_ACCOUNT);
    assert!(!seen[0].has_header("cookie"));

    to_echo.stop().await;
    echo.stop().await;
    proxy.stop().await;
    platform.shutdown().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_prefix_are_refused_and_never_reach_the_platform() {
    let idp = TestIdp::start(idp_options(60)).await;
    let platform = platform_for(&idp).await;
    let proxy = Proxy::start(settings(&platform.url, &idp)).await;
    for (target, status, kind) in [
        ("/", 404, "path_not_allowed"),
        ("/seldon-deploy/api/v1alpha1x", 404, "path_not_allowed"),
        (
            "/seldon-deploy/api/v1alpha1x/namespaces",
            404,
            "path_not_allowed",
        ),
        ("/seldon-deploy/api", 404, "path_not_allowed"),
        ("/metrics", 404, "path_not_allowed"),
        ("/readyz", 404, "path_not_allowed"),
        ("/seldon-deploy/api/v1alpha1/../x", 400, "bad_request"),
        (
            "/seldon-deploy/api/v1alpha1/namespaces/../../../x",
            400,
            "bad_request",
        ),
        ("/seldon-deploy/api/v1alpha1/%2e%2e/x", 400, "bad_request"),
        ("/seldon-deploy/api/v1alpha1//x", 400, "bad_request"),
        (
            "http://127.0.0.1:1/seldon-deploy/api/v1alpha1/x",
            400,
            "bad_request",
        ),
    ] {
        let response = raw_http::send(
            proxy.url(),
            &format!("GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(response.status, status, "{target}: {response:?}");
        assert_eq!(
            response.header(ERROR_HEADER).as_deref(),
            Some(kind),
            "{target}"
        );
        assert_eq!(response.json()["error"], kind, "{target}");
    }
    assert!(
        platform.requests_seen().is_empty(),
        "refused paths reached the platform: {:?}",
        platform.requests_seen()
    );
    // The same proxy does forward under the prefix.
    let ok = raw_http::send(
        proxy.url(),
        &format!("GET {API}/version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(platform.requests_seen().len(), 1);

    proxy.stop().await;
    platform.shutdown().await;
    idp.stop().await;
}

/// An IdP, an echo upstream and a proxy in front of it, ready.
async fn echo_setup() -> (TestIdp, EchoUpstream, Proxy) {
    let idp = TestIdp::start(idp_options(300)).await;
    let echo = EchoUpstream::start().await;
    let proxy = Proxy::start(settings(&echo.url, &idp)).await;
    proxy
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("the proxy is ready within 10 s");
    (idp, echo, proxy)
}

async fn echo_teardown(idp: TestIdp, echo: EchoUpstream, proxy: Proxy) {
    proxy.stop().await;
    echo.stop().await;
    idp.stop().await;
}

/// The open-connection gauges of every worker, from /metrics.
async fn open_connections(proxy: &Proxy) -> Vec<f64> {
    let text = proxy.metrics().await;
    (0..)
        .map_while(|w| {
            metric(
                &text,
                &format!("seldon_auth_proxy_open_connections{{worker=\"{w}\"}}"),
            )
        })
        .collect()
}

/// Sends a GET on a connection kept open and reads its answer; its status, or None when the
/// connection closed or no answer came within 10 s.
async fn call_kept_open(stream: &mut tokio::net::TcpStream) -> Option<u16> {
    let request = format!("GET {API}{LIST} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    raw_http::read_one_response(stream, Duration::from_secs(10)).await
}

/// The kernel deals connections to the two workers' sockets by a hash of their addresses; the
/// workers even it out, so two callers keep a worker each, and twelve split 6/6. (Left to the
/// hash, the split would stay within one of even after every caller only 1 time in 64.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_callers_are_spread_evenly_over_the_workers() {
    let (idp, echo, proxy) = echo_setup().await;
    assert_eq!(open_connections(&proxy).await, [0.0, 0.0]);
    let mut callers = Vec::new();
    for made in 1..=12 {
        let mut caller = tokio::net::TcpStream::connect(proxy.proxy_addr())
            .await
            .unwrap();
        assert_eq!(call_kept_open(&mut caller).await, Some(200));
        callers.push(caller);
        let open = open_connections(&proxy).await;
        let total: f64 = open.iter().sum();
        assert_eq!(total, made as f64, "{open:?}");
        assert!(
            (open[0] - open[1]).abs() <= 1.0,
            "after {made} callers: {open:?}"
        );
    }
    assert_eq!(open_connections(&proxy).await, [6.0, 6.0]);
    // Every caller is served again on its connection, wherever it went.
    for caller in &mut callers {
        assert_eq!(call_kept_open(caller).await, Some(200));
    }
    assert_eq!(open_connections(&proxy).await, [6.0, 6.0]);
    assert_eq!(echo.requests().len(), 24);
    drop(callers);
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_connections(&proxy).await != [0.0, 0.0] {
        assert!(
            Instant::now() < deadline,
            "closed connections still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    echo_teardown(idp, echo, proxy).await;
}

/// A caller that asks for a large answer and stops reading it holds the upstream connection
/// feeding it. After the idle timeout with nothing taken, the proxy closes that caller, so the
/// upstream place comes free for others instead of being held until the caller goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_stops_reading_its_answer_is_cut_off_and_frees_its_upstream_place() {
    const DECLARED: usize = 256 << 20;
    let idp = TestIdp::start(idp_options(300)).await;
    let echo = EchoUpstream::start().await;
    let proxy = Proxy::start(Settings {
        workers: Some(1),
        upstream_max_connections: Some(1),
        idle_timeout: Some(Duration::from_secs(1)),
        upstream_timeout: Some(Duration::from_secs(20)),
        ..settings(&echo.url, &idp)
    })
    .await;
    proxy
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("the proxy is ready within 10 s");

    // A plain GET (read by the proxy itself) and a POST with a body (read by hyper).
    let stuck_requests = [
        format!("GET {API}/namespaces/seldon/models/download HTTP/1.1\r\nHost: localhost\r\nx-echo-body-bytes: {DECLARED}\r\n\r\n"),
        format!("POST {API}/namespaces/seldon/models/download HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nx-echo-body-bytes: {DECLARED}\r\n\r\n{{}}"),
    ];
    for (sent, request) in stuck_requests.iter().enumerate() {
        let mut stuck = tokio::net::TcpStream::connect(proxy.proxy_addr())
            .await
            .unwrap();
        stuck.write_all(request.as_bytes()).await.unwrap();
        echo.wait_for_requests(2 * sent + 1, Duration::from_secs(10))
            .await;

        // The only upstream place is the stuck caller's; the next call gets it once that
        // caller is cut off, long before upstream_timeout would answer it 503 upstream_busy.
        let started = Instant::now();
        let next = client()
            .get(proxy.api(LIST))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .unwrap();
        let waited = started.elapsed();
        assert_eq!(next.status(), 200, "{request:?}: {:?}", next.text().await);
        assert!(
            waited < Duration::from_secs(15),
            "{request:?}: waited {waited:?}"
        );

        // The stuck caller finds its answer cut short: what was already in the sockets'
        // buffers, then the end of the connection.
        let mut taken = 0;
        let mut buf = vec![0; 1 << 16];
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match stuck.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => taken += n,
                }
            }
        })
        .await
        .expect("the proxy closed the stuck connection");
        assert!(
            taken < DECLARED,
            "{request:?}: the whole body arrived: {taken} bytes"
        );
    }
    echo_teardown(idp, echo, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_queries_and_small_bodies_pass_through_unchanged() {
    let (idp, echo, proxy) = echo_setup().await;
    let exchanges = [
        // raw path with an encoded slash, repeated and encoded query parameters
        format!("GET {API}/models/a%2Fb/c%20d?x=1&x=2&y=%2F%20&z HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        // {} body on DELETE
        format!("DELETE {API}{LIST}/iris HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"),
        // Content-Type on a GET without a body
        format!("GET {API}/user HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nAccept: application/json\r\nX-Custom: kept\r\nConnection: close\r\n\r\n"),
        // a chunked POST body
        format!("POST {API}{LIST} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\n{{\"a\":\r\n2\r\n1}}\r\n0\r\n\r\n"),
    ];
    for request in &exchanges {
        let response = raw_http::send(proxy.url(), request).await;
        assert_eq!(response.status, 200, "{request:?}: {response:?}");
    }
    let seen = echo.requests();
    assert_eq!(seen.len(), exchanges.len());
    let upstream_host = echo.url.trim_start_matches("http://");

    assert_eq!(seen[0].method, "GET");
    assert_eq!(
        seen[0].target,
        format!("{API}/models/a%2Fb/c%20d?x=1&x=2&y=%2F%20&z")
    );
    assert_eq!(seen[1].method, "DELETE");
    assert_eq!(seen[1].target, format!("{API}{LIST}/iris"));
    assert_eq!(&seen[1].body[..], b"{}");
    assert_eq!(seen[1].header("content-length").as_deref(), Some("2"));
    assert_eq!(
        seen[1].header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        seen[2].header("content-type").as_deref(),
        Some("application/json")
    );
    assert_eq!(
        seen[2].header("accept").as_deref(),
        Some("application/json")
    );
    assert_eq!(seen[2].header("x-custom").as_deref(), Some("kept"));
    assert!(seen[2].body.is_empty());
    assert_eq!(seen[3].method, "POST");
    assert_eq!(&seen[3].body[..], b"{\"a\":1}");
    for request in &seen {
        assert_eq!(
            request.headers_named("host"),
            vec![upstream_host.to_owned()],
            "Host is the upstream's authority"
        );
        assert_eq!(request.headers_named("authorization").len(), 1);
        assert!(request
            .header("x-request-id")
            .is_some_and(|id| !id.is_empty()));
    }

    echo_teardown(idp, echo, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multipart_upload_arrives_byte_for_byte() {
    let (idp, echo, proxy) = echo_setup().await;
    let boundary = "----seldon-boundary-7MA4YWxkTrZu0gW";
    let mut file: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    // Bytes that look like the structure of the body itself must survive too.
    file.extend_from_slice(format!("\r\n--{boundary}x\r\n\r\n\0\r\n").as_bytes());
    let mut body = Vec::new();
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"meta\"\r\n\r\n{{\"name\":\"iris\"}}\r\n").as_bytes(),
    );
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");

    let response = client()
        .post(proxy.api("/namespaces/seldon/models/upload"))
        .header("content-type", &content_type)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = echo.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("content-type"), Some(content_type));
    assert_eq!(
        seen[0].header("content-length"),
        Some(body.len().to_string())
    );
    assert!(
        seen[0].body[..] == body[..],
        "the multipart body changed on the way"
    );

    echo_teardown(idp, echo, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_megabyte_bodies_stream_both_ways_intact() {
    const SIZE: usize = 5 * 1024 * 1024;
    const FIRST: usize = 1024 * 1024;
    let (idp, echo, proxy) = echo_setup().await;
    let data = pattern_bytes(SIZE);

    // Request: the caller sends 1 MB and holds the rest until the upstream has seen body bytes; a proxy
    // that buffered the whole body would never forward them and this would time out.
    let stream = tokio::net::TcpStream::connect(proxy.proxy_addr())
        .await
        .unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(8);
    let request = http::Request::post(format!("{API}/namespaces/seldon/models/upload"))
        .header("host", "localhost")
        .header("content-type", "application/octet-stream")
        .header("content-length", SIZE.to_string())
        .body(ChannelBody::with_length(rx, SIZE as u64))
        .unwrap();
    let answer = tokio::spawn(async move { sender.send_request(request).await });
    for chunk in data[..FIRST].chunks(64 * 1024) {
        tx.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), echo.body_started())
        .await
        .expect("the upstream receives the request body while the caller is still sending it");
    for chunk in data[FIRST..].chunks(64 * 1024) {
        tx.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    drop(tx);
    let response = tokio::time::timeout(Duration::from_secs(30), answer)
        .await
        .expect("an answer")
        .unwrap()
        .expect("the upload succeeds");
    assert_eq!(response.status(), 200);
    drop(response);
    connection.abort();
    let seen = echo.requests();
    assert_eq!(seen[0].header("content-length"), Some(SIZE.to_string()));
    assert_eq!(seen[0].body.len(), SIZE);
    assert!(
        seen[0].body[..] == data[..],
        "the 5 MB request body changed on the way"
    );

    // Response: the upstream sends its first 64 KiB and holds the rest until the caller has received bytes.
    let mut response = client()
        .get(proxy.api("/namespaces/seldon/models/download"))
        .header("x-echo-body-bytes", SIZE.to_string())
        .header("x-echo-hold", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = tokio::time::timeout(Duration::from_secs(10), response.chunk())
        .await
        .expect("the caller receives the response body while the upstream is still sending it")
        .unwrap()
        .expect("a first chunk");
    echo.release_response();
    let mut received = first.to_vec();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), response.chunk())
        .await
        .expect("the rest of the body")
        .unwrap()
    {
        received.extend_from_slice(&chunk);
    }
    assert_eq!(received.len(), SIZE);
    assert!(
        received == data,
        "the 5 MB response body changed on the way"
    );

    echo_teardown(idp, echo, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_status_headers_and_locations_are_passed_back() {
    let (idp, echo, proxy) = echo_setup().await;
    let http = client();
    let response = http
        .post(proxy.api(LIST))
        .header("x-echo-status", "201")
        .header("x-echo-header", "x-platform-trace: abc123")
        .header("x-echo-header", "set-cookie: a=1; Path=/")
        .header("x-echo-header", "set-cookie: b=2; Path=/")
        .header("x-echo-header", "cache-control: no-store")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["x-platform-trace"], "abc123");
    assert_eq!(response.headers()["cache-control"], "no-store");
    let cookies: Vec<_> = response.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1; Path=/", "b=2; Path=/"]);
    assert!(response.headers().get(ERROR_HEADER).is_none());
    assert_eq!(response.text().await.unwrap(), r#"{"echo":true}"#);

    // The upstream's own errors pass through as they are, not as proxy errors.
    let response = http
        .get(proxy.api("/missing"))
        .header("x-echo-status", "404")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(response.headers().get(ERROR_HEADER).is_none());

    // A Location on the upstream's origin becomes relative, so the caller stays behind the proxy.
    let same_origin = format!(
        "{}{API}/namespaces/seldon/seldondeployments/iris?watch=1",
        echo.url
    );
    let response = http
        .get(proxy.api("/redirect"))
        .header("x-echo-status", "302")
        .header("x-echo-header", format!("location: {same_origin}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 302);
    assert_eq!(
        response.headers()["location"],
        format!("{API}/namespaces/seldon/seldondeployments/iris?watch=1").as_str()
    );
    // Another origin's Location is left alone.
    let response = http
        .get(proxy.api("/redirect"))
        .header("x-echo-status", "303")
        .header(
            "x-echo-header",
            "location: https://login.example.com/auth?x=1",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    assert_eq!(
        response.headers()["location"],
        "https://login.example.com/auth?x=1"
    );

    echo_teardown(idp, echo, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_dropped_both_ways() {
    let (idp, echo, proxy) = echo_setup().await;
    let response_hops = "X-Echo-Header: connection: x-resp-hop\r\nX-Echo-Header: x-resp-hop: 1\r\nX-Echo-Header: keep-alive: timeout=99\r\nX-Echo-Header: proxy-authenticate: Basic realm=\"x\"\r\nX-Echo-Header: x-end-to-end: kept\r\n";
    // Control: the echo upstream really sends those headers.
    let direct = raw_http::send(
        &echo.url,
        &format!("GET /x HTTP/1.1\r\nHost: localhost\r\n{response_hops}Connection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(
        direct.header("x-resp-hop").as_deref(),
        Some("1"),
        "{direct:?}"
    );
    assert!(direct.header("proxy-authenticate").is_some(), "{direct:?}");

    let response = raw_http::send(
            proxy.url(),
        &format!(
            "GET {API}/hops HTTP/1.1\r\nHost: localhost\r\n\
             Connection: close, x-hop-listed\r\nX-Hop-Listed: secret\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
             Trailer: x-trailer\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\n\
             X-End-To-End: kept\r\n{response_hops}\r\n"
        ),
    )
    .await;
    assert_eq!(response.status, 200, "{response:?}");
    let seen = echo.requests();
    let upstream = seen.last().unwrap();
    for hop in [
        "x-hop-listed",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
    ] {
        assert!(
            !upstream.has_header(hop),
            "{hop} was forwarded: {:?}",
            upstream.header_lines()
        );
    }
    assert!(
        upstream
            .headers_named("connection")
            .iter()
            .all(|v| !v.contains("x-hop-listed")),
        "{:#?}",
        upstream.header_lines()
    );
    assert_eq!(upstream.header("x-end-to-end").as_deref(), Some("kept"));
    assert!(response.header("x-resp-hop").is_none(), "{}", response.head);
    assert!(
        response.header("proxy-authenticate").is_none(),
        "{}",
        response.head
    );
    assert!(
        response
            .headers_named("keep-alive")
            .iter()
            .all(|v| !v.contains("99")),
        "{}",
        response.head
    );
    assert!(
        response
            .headers_named("connection")
            .iter()
            .all(|v| !v.contains("x-resp-hop")),
        "{}",
        response.head
    );
    assert_eq!(response.header("x-end-to-end").as_deref(), Some("kept"));

    echo_teardown(idp, echo, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_trace_get_405_and_are_not_forwarded() {
    let (idp, echo, proxy) = echo_setup().await;
    for request in [
        "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\nConnection: close\r\n\r\n"
            .to_owned(),
        format!("TRACE {API}/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    ] {
        let response = raw_http::send(proxy.url(), &request).await;
        assert_eq!(response.status, 405, "{request:?}: {response:?}");
        assert_eq!(
            response.header(ERROR_HEADER).as_deref(),
            Some("method_not_allowed")
        );
        assert!(
            response.header("allow").is_some(),
            "405 names the allowed methods"
        );
    }
    assert!(echo.requests().is_empty(), "{:?}", echo.requests());
    echo_teardown(idp, echo, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_first_credential_and_metrics_use_the_documented_names() {
    let idp = TestIdp::start(idp_options(60)).await;
    let platform = platform_for(&idp).await;
    let gate = TcpGate::start(SocketAddr::from(([127, 0, 0, 1], idp.port))).await;
    let mut s = settings(&platform.url, &idp);
    s.oidc_server = None;
    s.token_endpoint = Some(token_endpoint_via(&idp, &gate));
    let proxy = Proxy::start(s).await;
    let http = client();
    wait_until(
        "the proxy's first token request",
        Duration::from_secs(10),
        || gate.connections() >= 1,
    )
    .await;

    let readyz = http
        .get(format!("{}/readyz", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(
        readyz.status(),
        503,
        "not ready before the first credential"
    );
    let body: serde_json::Value = readyz.json().await.unwrap();
    assert_eq!(body["ready"], false, "{body}");
    let healthz = http
        .get(format!("{}/healthz", proxy.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200, "alive while not ready");
    let metrics = proxy.metrics().await;
    assert!(metrics.contains("seldon_auth_proxy_ready 0\n"), "{metrics}");
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("seldon_auth_proxy_token_expiry_seconds ")),
        "no expiry before the first credential:\n{metrics}"
    );

    gate.open();
    proxy
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("the proxy is ready within 10 s");
    let body = get_json(&http, &format!("{}/readyz", proxy.admin)).await;
    assert_eq!(body["ready"], true, "{body}");
    let expires_in = body["token_expires_in_seconds"]
        .as_f64()
        .expect("expiry in /readyz");
    assert!((0.0..=60.0).contains(&expires_in), "{body}");

    assert_eq!(
        http.get(proxy.api(LIST)).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        http.get(format!("{}/elsewhere", proxy.url()))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let response = http
        .get(format!("{}/metrics", proxy.admin))
        .send()
        .await
        .unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "{:?}",
        response.headers()
    );
    let metrics = response.text().await.unwrap();
    for line in [
        "seldon_auth_proxy_requests_total{code_class=\"2xx\"} 1",
        "seldon_auth_proxy_requests_total{code_class=\"4xx\"} 1",
        "seldon_auth_proxy_request_duration_seconds_bucket{le=\"+Inf\"} 2",
        "seldon_auth_proxy_request_duration_seconds_count 2",
        "seldon_auth_proxy_token_requests_total{grant=\"client_credentials\",outcome=\"success\"} 1",
        "seldon_auth_proxy_token_requests_total{grant=\"client_credentials\",outcome=\"error\"} 0",
        "seldon_auth_proxy_errors_total{kind=\"path_not_allowed\"} 1",
        "seldon_auth_proxy_ready 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing `{line}` in:\n{metrics}");
    }
    let expiry = metric(&metrics, "seldon_auth_proxy_token_expiry_seconds")
        .expect("seldon_auth_proxy_token_expiry_seconds");
    assert!(expiry > 0.0 && expiry <= 60.0, "token expiry {expiry}");
    for name in [
        "seldon_auth_proxy_requests_total",
        "seldon_auth_proxy_request_duration_seconds",
        "seldon_auth_proxy_token_requests_total",
        "seldon_auth_proxy_token_expiry_seconds",
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} ")),
            "no TYPE line for {name}"
        );
    }

    proxy.stop().await;
    gate.stop();
    platform.shutdown().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_grant_works_end_to_end_and_refreshes_with_refresh_tokens() {
    const LIFETIME_S: u64 = 4;
    let idp = TestIdp::start(idp_options(LIFETIME_S)).await;
    let platform = platform_for(&idp).await;
    let mut s = settings(&platform.url, &idp);
    s.auth_method = Some(AuthMethod::PasswordGrant);
    s.username = Some(USERNAME.into());
    s.password = Some(PASSWORD.into());
    let proxy = Proxy::start(s).await;
    let http = client();
    let user = get_json(&http, &proxy.api("/user")).await;
    assert_eq!(user["Id"], USERNAME, "{user}");
    assert_eq!(user["Email"], "alice@example.com", "{user}");
    assert_eq!(idp.token_requests("password").await, 1);

    // Across 2.5 lifetimes the credential is renewed with refresh tokens and stays alice's.
    let deadline = Instant::now() + Duration::from_millis(LIFETIME_S * 2500);
    let (mut calls, mut failures) = (0, Vec::new());
    while Instant::now() < deadline {
        calls += 1;
        let response = http.get(proxy.api("/user")).send().await.unwrap();
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if status != 200 || body["Id"] != USERNAME {
            failures.push(format!("{status} {body}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = idp.stats().await;
    println!(
        "password grant over {:.0}s: {calls} calls, {} failed, token requests {:?}",
        LIFETIME_S as f64 * 2.5,
        failures.len(),
        stats.token_requests
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        stats.token_requests("password"),
        1,
        "refreshes use the refresh token, not the password"
    );
    assert_eq!(stats.token_requests("client_credentials"), 0);
    assert!(
        stats.ok("refresh_token") >= 3 && stats.errors("refresh_token") == 0,
        "{stats:?}"
    );
    assert!(platform.requests_seen().iter().all(|r| r.status == 200
        && r.subject.is_some()
        && r.subject.as_deref() != Some(SERVICE_ACCOUNT)));
    assert_eq!(platform.rejected_count(), 0);
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains(
            "seldon_auth_proxy_token_requests_total{grant=\"password\",outcome=\"success\"} 1\n"
        ),
        "{metrics}"
    );

    proxy.stop().await;
    platform.shutdown().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_prints_one_line_with_a_jwt_and_check_prints_no_token() {
    let idp = TestIdp::start(idp_options(60)).await;
    let platform = platform_for(&idp).await;
    let base = [
        "--upstream",
        platform.url.as_str(),
        "--oidc-server",
        idp.issuer.as_str(),
        "--client-id",
        CLIENT_ID,
        "--log-level",
        "debug",
    ];
    let secret = [("SELDON_AUTH_PROXY_CLIENT_SECRET", CLIENT_SECRET)];

    for (grant, extra, subject_is_service_account) in [
        ("client_credentials", vec![], true),
        (
            "password",
            vec!["--auth-method", "password_grant", "--username", USERNAME],
            false,
        ),
    ] {
        let mut c = command(&["token"]);
        c.args(base)
            .args(&extra)
            .envs(secret)
            .env("SELDON_AUTH_PROXY_PASSWORD", PASSWORD);
        let token = run_command(c).await;
        assert_eq!(token.code, Some(0), "{grant}: {token:?}");
        let lines: Vec<&str> = token.stdout.split_inclusive('\n').collect();
        assert_eq!(
            lines.len(),
            1,
            "{grant}: exactly one line on stdout: {:?}",
            token.stdout
        );
        assert!(lines[0].ends_with('\n'));
        let jwt = lines[0].trim_end_matches('\n');
        assert!(!jwt.contains(char::is_whitespace), "{grant}: {jwt:?}");
        let claims = jwt_claims(jwt).unwrap_or_else(|| panic!("{grant}: not a JWT: {jwt:?}"));
        assert_eq!(claims["iss"], idp.issuer.as_str());
        assert_eq!(
            claims["sub"] == SERVICE_ACCOUNT,
            subject_is_service_account,
            "{claims}"
        );
        assert!(
            !token.stderr.contains(jwt),
            "{grant}: the token is in the logs"
        );
        // It is a token the platform accepts.
        let direct = client()
            .get(format!("{}{API}/user", platform.url))
            .bearer_auth(jwt)
            .send()
            .await
            .unwrap();
        assert_eq!(direct.status(), 200, "{grant}");
    }

    let mut c = command(&["check"]);
    c.args(base).envs(secret);
    let check = run_command(c).await;
    assert_eq!(check.code, Some(0), "{check:?}");
    assert!(
        check.stdout.starts_with("ok: obtained a credential"),
        "{}",
        check.stdout
    );
    assert!(check.stdout.contains(SERVICE_ACCOUNT), "{}", check.stdout);
    assert!(check.stdout.contains("redacted"), "{}", check.stdout);
    let looks_like_jwt = check
        .stdout
        .split_whitespace()
        .chain(check.stderr.split_whitespace())
        .any(|word| {
            jwt_claims(word.trim_matches(|c: char| {
                !c.is_ascii_alphanumeric() && c != '.' && c != '-' && c != '_'
            }))
            .is_some()
        });
    assert!(
        !looks_like_jwt,
        "check prints a token:\n{}\n{}",
        check.stdout, check.stderr
    );
    assert!(!check.stdout.contains(CLIENT_SECRET) && !check.stderr.contains(CLIENT_SECRET));

    platform.shutdown().await;
    idp.stop().await;
}
