//! Resilience (issue 4): what a caller of the proxy notices when the IdP or the platform misbehaves.
//!
//! Every test runs a real OpenID provider (tests/idp, npm oauth2-mock-server behind a Keycloak-shaped launcher),
//! a JWT-checking fault-injecting upstream (tests/common/fault_upstream.rs) and the proxy in-process on ephemeral
//! loopback ports (one binary-driven test). Figures are printed; run with `--nocapture` to see them.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fault_stack::{stack, stack_with, stop_stack};
use common::fault_upstream::{sha256_hex, unix_now, unix_now_f, Fault, FaultUpstream};
use common::http::{client, get_text};
use common::idp::{IdpClient, IdpMode, TestIdp};
use common::proxy::{
    client_credentials, error_kind, for_idp, free_port, idp_options, metric, restartable_port,
    Proxy, API,
};
use common::proxy_child::ProxyChild;
use common::raw_http;
use common::token_relay::TokenRelay;
use seldon_auth_proxy::config::{AuthMethod, Settings};

/// One call through the proxy as the caller saw it.
#[derive(Debug, Clone)]
struct Call {
    sent: f64,
    done: f64,
    status: u16,
    kind: Option<String>,
}

async fn call(proxy: &Proxy, path: &str) -> Call {
    let sent = unix_now_f();
    let (status, kind) = match proxy.http.get(proxy.api(path)).send().await {
        Ok(response) => {
            let kind = error_kind(&response);
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            (status, kind)
        }
        Err(e) => (0, Some(format!("client error: {e}"))),
    };
    Call {
        sent,
        done: unix_now_f(),
        status,
        kind,
    }
}

/// Runs `loops` concurrent call loops against `path` until `stop` is set, pausing `pause` between calls.
fn call_loops(
    proxy: Arc<Proxy>,
    path: &'static str,
    loops: usize,
    pause: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Call>> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..loops {
            let proxy = proxy.clone();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut calls = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    calls.push(call(&proxy, path).await);
                    tokio::time::sleep(pause).await;
                }
                calls
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all.sort_by(|a, b| a.sent.total_cmp(&b.sent));
        all
    })
}

fn summarize(calls: &[Call]) -> String {
    let mut by: std::collections::BTreeMap<String, usize> = Default::default();
    for c in calls {
        *by.entry(format!("{} {}", c.status, c.kind.as_deref().unwrap_or("-")))
            .or_default() += 1;
    }
    format!("{by:?}")
}

fn retry_after(response: &reqwest::Response) -> Option<u64> {
    response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Asserts a response is the proxy's own 503 token_unavailable with Retry-After and a JSON body; returns the body.
async fn assert_token_unavailable(response: reqwest::Response) -> serde_json::Value {
    assert_eq!(response.status(), 503);
    assert_eq!(error_kind(&response).as_deref(), Some("token_unavailable"));
    let after = retry_after(&response).expect("a Retry-After header");
    assert!(after >= 1, "Retry-After {after}");
    let body: serde_json::Value = response.json().await.expect("a JSON body");
    assert_eq!(body["error"], "token_unavailable", "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

/// Asserts a response is the proxy's own 502 upstream_unreachable with a JSON body; returns the body.
async fn assert_upstream_unreachable(response: reqwest::Response) -> serde_json::Value {
    assert_eq!(response.status(), 502);
    assert_eq!(
        error_kind(&response).as_deref(),
        Some("upstream_unreachable")
    );
    let body: serde_json::Value = response.json().await.expect("a JSON body");
    assert_eq!(body["error"], "upstream_unreachable", "{body}");
    body
}

// ---------------------------------------------------------------------------------------------------------------
// IdP down at start-up
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_down_at_startup_then_started_on_its_port_makes_the_proxy_ready_without_restart() {
    let port = restartable_port();
    let issuer = format!("http://127.0.0.1:{port}/auth/realms/test");
    let upstream = FaultUpstream::start_with(
        &format!("{issuer}/protocol/openid-connect/certs"),
        &issuer,
        None,
    )
    .await;
    let proxy = Proxy::start(client_credentials(
        &upstream.url(),
        &issuer,
        "sdk",
        "s3cret",
    ))
    .await;

    let (status, body) = proxy.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    for _ in 0..5 {
        let body =
            assert_token_unavailable(proxy.get("/namespaces/seldon/seldondeployments").await).await;
        assert!(
            body["message"].as_str().unwrap().contains("no credential"),
            "{body}"
        );
    }
    // Stay down through a few backoff rounds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(proxy.readyz().await.0, 503);
    assert_token_unavailable(proxy.get("/x").await).await;
    assert!(
        upstream.requests().is_empty(),
        "nothing may reach the upstream without a credential: {:?}",
        upstream.requests()
    );

    let idp = TestIdp::start(idp_options(60).port(port)).await;
    let waited = proxy
        .wait_ready(Duration::from_secs(15))
        .await
        .expect("the proxy becomes ready once the IdP is back");
    println!(
        "IdP back (started on its old port {port}) -> proxy ready after {:.2} s",
        waited.as_secs_f64()
    );
    assert!(
        waited <= Duration::from_millis(10_500),
        "ready only after {waited:?}"
    );
    let response = proxy.get("/x").await;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.requests().len(), 1);
    assert!(upstream.requests()[0].subject.is_some());
    stop_stack(idp, upstream, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idp_answering_503_at_startup_then_normal_makes_the_proxy_ready_without_restart() {
    let idp = TestIdp::start(idp_options(60)).await;
    idp.set_mode(IdpMode::Fail503).await;
    let upstream = FaultUpstream::start(&idp).await;
    let proxy = Proxy::start(for_idp(&upstream.url(), &idp)).await;

    // Wait for the first attempt's outcome (however slow a loaded machine makes it): /readyz then says why.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let (status, body) = proxy.readyz().await;
        if body["reason"] != "no credential obtained yet" {
            break (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "no token request failed within 10 s: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503);
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("temporarily_unavailable"),
        "{body}"
    );
    let window = Instant::now();
    let mut refused = 0;
    while window.elapsed() < Duration::from_secs(4) {
        let body = assert_token_unavailable(proxy.get("/x").await).await;
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains("temporarily_unavailable"),
            "{body}"
        );
        refused += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let attempts = idp.token_requests("client_credentials").await;
    println!("IdP answering 503 for ~4.3 s: {refused} calls refused with 503, {attempts} token requests reached the IdP");
    assert!(
        (2..=8).contains(&attempts),
        "{attempts} token requests in ~4.3 s of 503s"
    );
    assert!(upstream.requests().is_empty());

    idp.set_mode(IdpMode::Normal).await;
    let waited = proxy
        .wait_ready(Duration::from_secs(15))
        .await
        .expect("ready once the IdP answers again");
    println!(
        "IdP back to normal -> proxy ready after {:.2} s",
        waited.as_secs_f64()
    );
    assert!(
        waited <= Duration::from_millis(10_500),
        "ready only after {waited:?}"
    );
    assert_eq!(proxy.get("/x").await.status(), 200);
    stop_stack(idp, upstream, proxy).await;
}

// ---------------------------------------------------------------------------------------------------------------
// IdP down while a valid credential is held
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_credential_serves_until_its_expiry_while_the_idp_is_down_and_retries_back_off() {
    let lifetime = 8;
    let (idp, upstream, proxy) =
        stack_with(idp_options(lifetime).port(restartable_port()), |s| s).await;
    let port = idp.port;
    let proxy = Arc::new(proxy);
    assert_eq!(proxy.get("/x").await.status(), 200);
    let exp = upstream.requests()[0].exp.expect("a verified token") as f64;

    // Phase 1: the IdP process is gone (connection refused) right after the first token.
    idp.stop().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops = call_loops(
        proxy.clone(),
        "/x",
        2,
        Duration::from_millis(50),
        stop.clone(),
    );
    let errors_before = metric(
        &proxy.metrics().await,
        "seldon_auth_proxy_token_requests_total{grant=\"client_credentials\",outcome=\"error\"}",
    )
    .unwrap();
    while unix_now_f() < exp + 3.0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let calls = loops.await.unwrap();
    let errors_after = metric(
        &proxy.metrics().await,
        "seldon_auth_proxy_token_requests_total{grant=\"client_credentials\",outcome=\"error\"}",
    )
    .unwrap();
    let skew = lifetime as f64 / 10.0;
    let early: Vec<&Call> = calls.iter().filter(|c| c.done < exp - skew - 0.3).collect();
    let late: Vec<&Call> = calls.iter().filter(|c| c.sent > exp + 0.5).collect();
    println!(
        "IdP stopped after the first token (exp in {:.1} s): {} calls before exp-skew, {} failed; {} calls after exp, statuses {}; {} failed token requests in {:.1} s",
        exp - unix_now_f() + (unix_now_f() - calls[0].sent),
        early.len(),
        early.iter().filter(|c| c.status != 200).count(),
        late.len(),
        summarize(&late.iter().map(|c| (*c).clone()).collect::<Vec<_>>()),
        errors_after - errors_before,
        calls.last().unwrap().done - calls[0].sent,
    );
    assert!(early.len() > 20, "too few calls to judge: {}", early.len());
    assert!(
        early.iter().all(|c| c.status == 200),
        "a call failed while the held credential was still valid: {}",
        summarize(&early.iter().map(|c| (*c).clone()).collect::<Vec<_>>())
    );
    assert!(!late.is_empty());
    assert!(
        late.iter()
            .all(|c| c.status == 503 && c.kind.as_deref() == Some("token_unavailable")),
        "after the hard expiry every call must be refused by the proxy: {}",
        summarize(&late.iter().map(|c| (*c).clone()).collect::<Vec<_>>())
    );
    // Refreshes start at half the lifetime; 1,2,4 s backoff leaves a handful of attempts, not a busy loop.
    let attempts = errors_after - errors_before;
    assert!(
        (1.0..=10.0).contains(&attempts),
        "{attempts} failed token requests while the IdP was down"
    );

    // Phase 2: the IdP comes back (new keys), then answers 503: count what reaches it.
    let idp = TestIdp::start(idp_options(lifetime).port(port)).await;
    let waited = proxy
        .wait_ready(Duration::from_secs(15))
        .await
        .expect("ready again once the IdP is back");
    println!("IdP restarted -> ready after {:.2} s", waited.as_secs_f64());
    assert_eq!(proxy.get("/x").await.status(), 200);
    idp.set_mode(IdpMode::Fail503).await;
    idp.reset_stats().await;
    let started = Instant::now();
    let mut per_second = Vec::new();
    while started.elapsed() < Duration::from_secs(14) {
        let _ = proxy.get("/x").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if started.elapsed().as_secs() as usize > per_second.len() {
            per_second.push(idp.token_requests("client_credentials").await);
        }
    }
    let total = idp.token_requests("client_credentials").await;
    println!("IdP answering 503 for 14 s under ~10 calls/s: {total} token requests; cumulative per second {per_second:?}");
    assert!(
        (2..=10).contains(&total),
        "{total} token requests in 14 s of 503s"
    );
    idp.set_mode(IdpMode::Normal).await;
    assert!(proxy.wait_ready(Duration::from_secs(12)).await.is_some());
    assert_eq!(proxy.get("/x").await.status(), 200);
    stop_stack(idp, upstream, Arc::try_unwrap(proxy).ok().unwrap()).await;
}

/// Token `exp` is whole seconds: a proxy that measures the remaining life against a whole-second clock believes a
/// token lives up to a second longer than it does. Make the proxy fetch a token late in a wall-clock second (an
/// upstream 401 triggers the fetch at a chosen moment), take the IdP away, and check that no call reaches the
/// upstream with a token the upstream considers expired (zero leeway) and no caller gets the upstream's 401.
///
/// A 6 s token fetched 0.90-0.95 s into its `iat` second lives 5.05-5.1 s: the proxy stops using it ~0.5 s before
/// its exp (10% of its life), room enough for a loaded machine between the proxy's check and the upstream's. A
/// whole-second clock would take it for a 6 s token, usable for 5.4 s from 0.90-0.95 s into that second: until
/// 0.3 s or more past its exp, which the calls every ~10 ms would hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_never_sends_a_token_past_its_exp() {
    let idp = TestIdp::start(idp_options(6)).await;
    let upstream = FaultUpstream::start(&idp).await;
    let proxy = Arc::new(Proxy::start(for_idp(&upstream.url(), &idp)).await);
    proxy
        .wait_ready(Duration::from_secs(5))
        .await
        .expect("ready");
    assert_eq!(proxy.get("/warm-up").await.status(), 200);
    // 0.90-0.95 s into a second after the newest token's iat: refuse the tokens issued before this second, so the
    // next call's 401 fetches a new one within it. A stall on a loaded machine can push the fetch into the next
    // second (the token then starts a whole second, nothing to prove): try again in a later second, once the
    // proxy takes a 401 as a reason to replace its credential again (at most every 5 s).
    let mut attempts = 0;
    let mut not_before = 0.0;
    let (fetched, token) = loop {
        attempts += 1;
        let newest_iat = upstream
            .requests()
            .iter()
            .filter_map(|s| s.iat)
            .max()
            .expect("a verified token");
        loop {
            let now = unix_now_f();
            if now >= not_before
                && now.floor() as u64 > newest_iat
                && (0.90..0.95).contains(&now.fract())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let revoked_at = unix_now_f();
        let revoked = revoked_at.floor() as u64;
        upstream.revoke_issued_before(revoked);
        upstream.clear_requests();
        let fetched = call(&proxy, "/x").await;
        assert_eq!(fetched.status, 200);
        let seen = upstream.requests();
        let token = seen.last().expect("the call reached the upstream").clone();
        // Refused, replayed with a token issued in the revoke second and used before that second ended.
        let late_in_its_second = seen[0].status == 401
            && token.iat == Some(revoked)
            && token.unix.floor() as u64 == revoked;
        if late_in_its_second {
            break (fetched, token);
        }
        println!(
            "attempt {attempts}: revoked at {revoked_at:.3}, statuses {:?}, the token sent last (iat {:?}) first sent at {:.3}: again",
            seen.iter().map(|s| s.status).collect::<Vec<_>>(),
            token.iat,
            token.unix
        );
        assert!(
            attempts < 10,
            "no token fetched late in its iat second in {attempts} attempts"
        );
        not_before = revoked_at + 6.0;
    };
    idp.set_mode(IdpMode::Fail503).await;
    // The proxy refreshes it at half its life (2.4 s or more after the fetch): the IdP fails that from now on.
    let exp = token.exp.unwrap() as f64;
    println!(
        "new token (attempt {attempts}) first sent {:.3} s into second {} (iat {}), call done {:.3} s later, exp {exp}",
        token.unix.fract(),
        token.unix.floor(),
        token.iat.unwrap(),
        fetched.done - token.unix,
    );
    upstream.clear_requests();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops = call_loops(
        proxy.clone(),
        "/x",
        2,
        Duration::from_millis(20),
        stop.clone(),
    );
    while unix_now_f() < exp + 1.5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let calls = loops.await.unwrap();
    let expired: Vec<_> = upstream
        .requests()
        .into_iter()
        .filter(|s| s.verify_error.as_deref() == Some("token expired"))
        .collect();
    let passed_401: Vec<&Call> = calls.iter().filter(|c| c.status == 401).collect();
    println!(
        "{} calls until exp+1.5 s: {}; {} requests reached the upstream with an expired token (from {:+.3} s to {:+.3} s after exp); callers got 401 from {:+.3} s to {:+.3} s after exp",
        calls.len(),
        summarize(&calls),
        expired.len(),
        expired.first().map_or(f64::NAN, |s| s.unix - exp),
        expired.last().map_or(f64::NAN, |s| s.unix - exp),
        passed_401.first().map_or(f64::NAN, |c| c.sent - exp),
        passed_401.last().map_or(f64::NAN, |c| c.sent - exp),
    );
    assert!(
        calls.iter().any(|c| c.status == 503),
        "the credential should have run out: {}",
        summarize(&calls)
    );
    assert!(
        expired.is_empty() && passed_401.is_empty(),
        "the proxy forwarded {} requests with an expired token and {} callers got the upstream's 401",
        expired.len(),
        passed_401.len()
    );
    stop_stack(idp, upstream, Arc::try_unwrap(proxy).ok().unwrap()).await;
}

/// The IdP fails the scheduled refresh and two retries, then recovers while the held credential is still usable
/// for more than half a second: a caller should never notice. (With 1, 2, 4 s backoff regardless of the
/// credential's remaining life, the next retry lands after the credential ran out, and requests in between are
/// refused because of the "recent failure".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idp_back_before_the_held_credential_runs_out_causes_no_failed_call() {
    let lifetime = 12.0;
    let idp = TestIdp::start(idp_options(lifetime as u64)).await;
    let upstream = FaultUpstream::start(&idp).await;
    let proxy = Arc::new(Proxy::start(for_idp(&upstream.url(), &idp)).await);
    proxy
        .wait_ready(Duration::from_secs(5))
        .await
        .expect("ready");
    // The first token is held; the IdP fails from now on.
    idp.set_mode(IdpMode::Fail503).await;
    assert_eq!(proxy.get("/x").await.status(), 200);
    let exp = upstream.requests()[0].exp.unwrap() as f64;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops = call_loops(
        proxy.clone(),
        "/x",
        2,
        Duration::from_millis(20),
        stop.clone(),
    );
    // Refresh at half the lifetime, retries ~1 s and ~2 s later: recover right after the third failure.
    let outage = Instant::now();
    // (Counted by the proxy: an attempt can also fail on a pooled IdP connection the IdP just closed.)
    let failed_attempts = || async {
        metric(&proxy.metrics().await, "seldon_auth_proxy_token_requests_total{grant=\"client_credentials\",outcome=\"error\"}").unwrap_or(0.0)
    };
    while failed_attempts().await < 3.0 {
        assert!(
            outage.elapsed() < Duration::from_secs(11),
            "the proxy did not retry: {:?}",
            idp.stats().await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    idp.set_mode(IdpMode::Normal).await;
    let back = unix_now_f();
    // The proxy stops using a 12 s token 1.2 s before its exp.
    let usable_until = exp - lifetime / 10.0;
    while unix_now_f() < exp + 3.0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let calls = loops.await.unwrap();
    let failed: Vec<&Call> = calls.iter().filter(|c| c.status != 200).collect();
    println!(
        "IdP failed the refresh and two retries, back {:.2} s before the credential's last usable moment (exp {:.2} s later): {} calls, {}; failures from {:+.2} s to {:+.2} s after the IdP was back; {} token requests in all",
        usable_until - back,
        exp - back,
        calls.len(),
        summarize(&calls),
        failed.first().map_or(f64::NAN, |c| c.sent - back),
        failed.last().map_or(f64::NAN, |c| c.sent - back),
        idp.total_token_requests().await,
    );
    assert!(
        usable_until - back > 0.5,
        "the scenario needs the IdP back well before the credential runs out"
    );
    assert!(
        failed.is_empty(),
        "{} calls failed although the IdP was back {:.2} s before the credential ran out",
        failed.len(),
        usable_until - back
    );
    stop_stack(idp, upstream, Arc::try_unwrap(proxy).ok().unwrap()).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Configuration errors
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_is_retried_at_most_once_a_minute_and_a_rotated_secret_file_heals_it() {
    let idp = TestIdp::start(idp_options(60)).await;
    let upstream = FaultUpstream::start(&idp).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, "not-the-secret\n").unwrap();
    let settings = Settings {
        client_secret: None,
        client_secret_file: Some(secret_file.clone()),
        ..for_idp(&upstream.url(), &idp)
    };
    let proxy = Arc::new(Proxy::start(settings).await);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops = call_loops(
        proxy.clone(),
        "/x",
        4,
        Duration::from_millis(20),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    let calls = loops.await.unwrap();
    let attempts = idp.token_requests("client_credentials").await;
    println!(
        "wrong client secret, 4 call loops for 5 s: {} calls ({}), {attempts} token requests reached the IdP",
        calls.len(),
        summarize(&calls)
    );
    assert!(calls.len() > 50);
    assert!(calls
        .iter()
        .all(|c| c.status == 503 && c.kind.as_deref() == Some("token_unavailable")));
    assert!(
        (1..=2).contains(&attempts),
        "{attempts} token requests in 5 s for a refused client"
    );
    let response = proxy.get("/x").await;
    let after = retry_after(&response).unwrap();
    let body = assert_token_unavailable(response).await;
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("unauthorized_client"),
        "{body}"
    );
    assert!(
        after >= 30,
        "a configuration error should tell callers to come back much later, Retry-After {after}"
    );
    assert!(upstream.requests().is_empty());

    // Rotate: the IdP gets a new secret, then the file is rewritten (as a Kubernetes secret update does).
    idp.set_clients(&[IdpClient::confidential("sdk", "rotated-secret-2")])
        .await;
    std::fs::write(&secret_file, "rotated-secret-2\n").unwrap();
    let rotated = Instant::now();
    let mut status = 0;
    while rotated.elapsed() < Duration::from_secs(10) {
        status = proxy.get("/x").await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "secret file rotated -> first 200 after {:.2} s",
        rotated.elapsed().as_secs_f64()
    );
    assert_eq!(
        status, 200,
        "the proxy did not heal after the secret file changed"
    );
    assert!(
        rotated.elapsed() <= Duration::from_secs(6),
        "healed only after {:?}",
        rotated.elapsed()
    );
    assert_eq!(
        upstream.requests()[0].subject.as_deref(),
        Some("service-account-sdk")
    );
    stop_stack(idp, upstream, Arc::try_unwrap(proxy).ok().unwrap()).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Refresh token refused
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_token_falls_back_to_the_password_grant_without_failed_calls() {
    let (idp, upstream, proxy) = stack(4, |s| Settings {
        auth_method: Some(AuthMethod::PasswordGrant),
        username: Some("alice".into()),
        password: Some("pw".into()),
        ..s
    })
    .await;
    let proxy = Arc::new(proxy);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops = call_loops(
        proxy.clone(),
        "/x",
        2,
        Duration::from_millis(50),
        stop.clone(),
    );

    let deadline = Instant::now() + Duration::from_secs(8);
    while idp.stats().await.ok("refresh_token") < 1 {
        assert!(
            Instant::now() < deadline,
            "no refresh_token grant within 8 s: {:?}",
            idp.stats().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = idp.stats().await;
    idp.revoke_refresh_tokens().await;
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let now = idp.stats().await;
        if now.errors("refresh_token") > before.errors("refresh_token")
            && now.ok("password") > before.ok("password")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no fallback within 8 s: before {before:?}, now {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the chain goes on with refresh tokens from the new password grant: the next refresh is due at half the
    // new token's life (at most ~2.1 s), under the same load.
    let after_fallback = idp.stats().await;
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let now = idp.stats().await;
        if now.ok("refresh_token") > after_fallback.ok("refresh_token") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no refresh_token grant within 8 s of the fallback: after the fallback {after_fallback:?}, now {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let calls = loops.await.unwrap();
    let last = idp.stats().await;
    println!("stats before revocation {before:?}\nafter fallback {after_fallback:?}\nend {last:?}\ncalls {}", summarize(&calls));
    assert_eq!(before.errors("refresh_token"), 0);
    assert_eq!(
        after_fallback.ok("password"),
        before.ok("password") + 1,
        "exactly one password grant replaces the refused refresh token"
    );
    assert!(
        last.ok("refresh_token") > after_fallback.ok("refresh_token"),
        "refresh tokens are used again after the fallback"
    );
    assert!(calls.len() > 50);
    assert!(
        calls.iter().all(|c| c.status == 200),
        "calls failed: {}",
        summarize(&calls)
    );
    let subjects: std::collections::BTreeSet<_> =
        upstream.requests().into_iter().map(|s| s.subject).collect();
    assert_eq!(subjects.len(), 1, "one identity throughout: {subjects:?}");
    stop_stack(idp, upstream, Arc::try_unwrap(proxy).ok().unwrap()).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Upstream 401
// ---------------------------------------------------------------------------------------------------------------

/// A proxy with one token in use (iat at least a second ago), ready for `revoke_issued_before(unix_now())`.
async fn warmed_up(workers: usize) -> (TestIdp, FaultUpstream, Proxy) {
    let idp = TestIdp::start(idp_options(60)).await;
    let upstream = FaultUpstream::start(&idp).await;
    let proxy = Proxy::start(Settings {
        workers: Some(workers),
        ..for_idp(&upstream.url(), &idp)
    })
    .await;
    assert_eq!(proxy.get("/warm-up").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    idp.reset_stats().await;
    upstream.clear_requests();
    (idp, upstream, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_is_replayed_once_with_a_fresh_token() {
    let (idp, upstream, proxy) = warmed_up(1).await;
    let revoked_at = unix_now();
    upstream.revoke_issued_before(revoked_at);
    let response = proxy.get("/namespaces/seldon/seldondeployments").await;
    assert_eq!(response.status(), 200);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!((seen[0].status, seen[1].status), (401, 200));
    assert_ne!(seen[0].token, seen[1].token);
    assert!(seen[1].iat.unwrap() >= revoked_at);
    assert_eq!(seen[0].path, seen[1].path);
    assert_eq!(idp.total_token_requests().await, 1);
    let metrics = proxy.metrics().await;
    assert_eq!(
        metric(&metrics, "seldon_auth_proxy_upstream_unauthorized_total"),
        Some(1.0)
    );
    stop_stack(idp, upstream, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_replay_needs_no_second_place_among_the_upstream_requests_in_flight() {
    let idp = TestIdp::start(idp_options(60)).await;
    let upstream = FaultUpstream::start(&idp).await;
    let proxy = Proxy::start(Settings {
        workers: Some(1),
        upstream_max_connections: Some(1),
        upstream_timeout: Some(Duration::from_secs(5)),
        ..for_idp(&upstream.url(), &idp)
    })
    .await;
    assert_eq!(proxy.get("/warm-up").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    upstream.clear_requests();
    upstream.revoke_issued_before(unix_now());
    // The refused response's place is given up before the replay takes one.
    let started = Instant::now();
    let response = proxy.get("/x").await;
    assert_eq!(response.status(), 200, "{:?}", error_kind(&response));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let seen = upstream.requests();
    assert_eq!(
        seen.iter().map(|s| s.status).collect::<Vec<_>>(),
        vec![401, 200]
    );
    stop_stack(idp, upstream, proxy).await;
}

/// The refresh after an upstream 401 goes out on the pooled IdP connection, which the IdP (or a load balancer in
/// front of it) closes just then, as idle keep-alive connections are: the caller should still get its replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_is_replayed_even_when_the_pooled_idp_connection_went_stale() {
    let idp = TestIdp::start(idp_options(60)).await;
    let relay = TokenRelay::start(&idp.token_endpoint).await;
    let upstream = FaultUpstream::start(&idp).await;
    let proxy = Proxy::start(Settings {
        oidc_server: None,
        token_endpoint: Some(relay.url()),
        ..for_idp(&upstream.url(), &idp)
    })
    .await;
    assert_eq!(proxy.get("/warm-up").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    relay.drop_requests_on_reused_connections(true);
    upstream.revoke_issued_before(unix_now());
    let response = proxy.get("/x").await;
    let status = response.status().as_u16();
    println!(
        "upstream 401 while the pooled IdP connection is stale: caller got {status} {:?}; {} token request(s) dropped on the stale connection, {} reached the IdP",
        error_kind(&response),
        relay.dropped(),
        idp.total_token_requests().await
    );
    assert!(relay.dropped() >= 1, "the scenario did not happen");
    assert_eq!(
        status, 200,
        "the 401 was passed through because the refresh failed on a stale IdP connection"
    );
    stop_stack(idp, upstream, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_401s_on_one_credential_cost_one_token_request() {
    let (idp, upstream, proxy) = warmed_up(2).await;
    upstream.revoke_issued_before(unix_now());
    let proxy = Arc::new(proxy);
    let barrier = Arc::new(tokio::sync::Barrier::new(100));
    let mut tasks = Vec::new();
    for i in 0..100 {
        let proxy = proxy.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            call(&proxy, &format!("/models/{i}")).await
        }));
    }
    let mut calls = Vec::new();
    for task in tasks {
        calls.push(task.await.unwrap());
    }
    let token_requests = idp.total_token_requests().await;
    let seen = upstream.requests();
    let refused = seen.iter().filter(|s| s.status == 401).count();
    println!(
        "100 concurrent calls on a revoked credential: {} -> {refused} upstream 401s, {} upstream 200s, {token_requests} token request(s)",
        summarize(&calls),
        seen.iter().filter(|s| s.status == 200).count()
    );
    assert!(
        calls.iter().all(|c| c.status == 200),
        "{}",
        summarize(&calls)
    );
    assert!(refused >= 1);
    assert_eq!(
        token_requests, 1,
        "many 401s on one credential must cause exactly one token request"
    );
    stop_stack(idp, upstream, Arc::try_unwrap(proxy).ok().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_post_is_replayed_after_a_401_with_its_body_intact() {
    let idp = TestIdp::start(idp_options(60)).await;
    let upstream = FaultUpstream::start(&idp).await;
    let body: Vec<u8> = (0..10 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = sha256_hex(&body);
    let mut outcomes = Vec::new();
    // A body with Content-Length (what SDKs send), then a chunked one in several pieces; each on a fresh proxy
    // (a credential is invalidated at most once per 5 s).
    for framing in ["content-length", "chunked"] {
        let proxy = Proxy::start(for_idp(&upstream.url(), &idp)).await;
        assert_eq!(proxy.get("/warm-up").await.status(), 200);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        upstream.revoke_issued_before(unix_now());
        upstream.clear_requests();
        let mut request = format!("POST {API}/namespaces/seldon/seldondeployments HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n").into_bytes();
        if framing == "chunked" {
            request.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
            for chunk in body.chunks(3000) {
                request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                request.extend_from_slice(chunk);
                request.extend_from_slice(b"\r\n");
            }
            request.extend_from_slice(b"0\r\n\r\n");
        } else {
            request.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
            request.extend_from_slice(&body);
        }
        let response = raw_http::tcp(proxy.proxy_addr(), &request)
            .await
            .expect("a response");
        let seen = upstream.requests();
        let echoed: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
        println!(
            "10 KiB POST ({framing}) on a revoked credential: caller got {}; upstream saw {:?}",
            response.status,
            seen.iter()
                .map(|s| (s.status, s.body_len, s.body_sha256 == digest))
                .collect::<Vec<_>>()
        );
        let intact = seen.len() == 2
            && (seen[0].status, seen[1].status) == (401, 200)
            && seen
                .iter()
                .all(|s| s.method == "POST" && s.body_len == body.len() && s.body_sha256 == digest)
            && echoed["body_sha256"] == digest.as_str();
        outcomes.push((framing, response.status, intact));
        proxy.stop().await;
    }
    assert!(
        outcomes
            .iter()
            .all(|(_, status, intact)| *status == 200 && *intact),
        "replay outcomes (framing, status, replayed intact): {outcomes:?}"
    );
    upstream.stop().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_post_is_not_replayed_and_its_401_passes_through() {
    let (idp, upstream, proxy) = warmed_up(1).await;
    let body = vec![b'a'; 1024 * 1024];
    upstream.revoke_issued_before(unix_now());
    let response = proxy
        .http
        .post(proxy.api("/models/upload"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        error_kind(&response),
        None,
        "the upstream's own 401 passes through"
    );
    assert!(response.headers().contains_key("www-authenticate"));
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1, "a 1 MiB body must not be replayed: {seen:?}");
    assert_eq!(seen[0].body_len, body.len());
    // The credential was replaced in the background (the warm-up's token and this one: two token requests):
    // once it is, the next call goes through on the first try.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let obtained = metric(
            &proxy.metrics().await,
            "seldon_auth_proxy_token_requests_total{grant=\"client_credentials\",outcome=\"success\"}",
        );
        if obtained >= Some(2.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new credential within 10 s of the 401 ({obtained:?} obtained in all)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    upstream.clear_requests();
    assert_eq!(proxy.get("/x").await.status(), 200);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(idp.total_token_requests().await, 1);
    stop_stack(idp, upstream, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_always_answers_401_costs_at_most_one_token_request_per_5_s() {
    let (idp, upstream, proxy) = warmed_up(1).await;
    upstream.add_fault("/always-401", Fault::Unauthorized);
    let started = Instant::now();
    let mut calls = Vec::new();
    while started.elapsed() < Duration::from_millis(6500) {
        let c = call(&proxy, "/always-401").await;
        assert!(
            c.done - c.sent < 2.0,
            "a 401 call took {:.2} s",
            c.done - c.sent
        );
        calls.push(c);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let token_requests = idp.total_token_requests().await;
    let forwarded = upstream.requests().len();
    println!(
        "{} calls to an always-401 endpoint in 6.5 s: {} ; {forwarded} upstream requests, {token_requests} token requests",
        calls.len(),
        summarize(&calls)
    );
    assert!(
        calls.iter().all(|c| c.status == 401 && c.kind.is_none()),
        "{}",
        summarize(&calls)
    );
    assert!(
        (1..=2).contains(&token_requests),
        "{token_requests} token requests in 6.5 s"
    );
    assert!(
        forwarded <= calls.len() + token_requests as usize,
        "{forwarded} upstream requests for {} calls",
        calls.len()
    );
    assert_eq!(proxy.get("/fine").await.status(), 200);
    stop_stack(idp, upstream, proxy).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Stale pooled connections
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_calls_reuse_one_upstream_connection_whatever_their_bodies() {
    let (idp, upstream, proxy) = stack(60, |s| s).await;
    upstream.add_fault("/no-content", Fault::Status(204));
    upstream.add_fault("/not-modified", Fault::Status(304));
    for i in 0..30 {
        // Bodies read to their end, and answers without a body (HEAD, 204, 304), all hand the
        // connection back.
        let (response, status) = match i % 4 {
            1 => (proxy.http.head(proxy.api("/x")).send().await.unwrap(), 200),
            2 => (proxy.get("/no-content").await, 204),
            3 => (proxy.get("/not-modified").await, 304),
            _ => (proxy.get("/x").await, 200),
        };
        assert_eq!(response.status(), status);
        let body = tokio::time::timeout(Duration::from_secs(5), response.bytes())
            .await
            .expect("the body ends")
            .unwrap();
        if i % 4 != 0 {
            assert!(body.is_empty(), "{body:?}");
        }
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 30);
    assert_eq!(
        upstream.connections(),
        1,
        "one caller connection, one upstream connection: {:?}",
        seen.iter()
            .map(|s| (s.connection, s.nth_on_connection))
            .collect::<Vec<_>>()
    );
    stop_stack(idp, upstream, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_upstream_max_connections_wait_their_turn_within_the_upstream_timeout() {
    let (idp, upstream, proxy) = stack(60, |s| Settings {
        workers: Some(1),
        upstream_max_connections: Some(2),
        upstream_timeout: Some(Duration::from_secs(2)),
        ..s
    })
    .await;
    upstream.add_fault("/slow", Fault::Stall(Some(Duration::from_millis(300))));
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (http, url) = (proxy.http.clone(), proxy.api("/slow"));
        calls.spawn(async move {
            let response = http.get(url).send().await.unwrap();
            response.status().as_u16()
        });
    }
    let statuses = calls.join_all().await;
    let took = started.elapsed();
    assert_eq!(statuses, vec![200; 8]);
    assert!(
        upstream.connections() <= 2,
        "{} upstream connections for a limit of 2",
        upstream.connections()
    );
    // Eight 300 ms calls, two at a time: they queued rather than being refused or run at once.
    assert!(took >= Duration::from_millis(1100), "took {took:?}");

    // Two responses whose bodies never end hold both places; a call that never gets one is
    // answered 503 upstream_busy once upstream_timeout has passed, and was never sent.
    upstream.add_fault(
        "/endless",
        Fault::StallMidResponse {
            declared: 1000,
            sent: 10,
        },
    );
    let mut hogs = Vec::new();
    for _ in 0..2 {
        let response = proxy.get("/endless").await;
        assert_eq!(response.status(), 200);
        hogs.push(response);
    }
    let started = Instant::now();
    let waited = proxy.get("/x").await;
    assert_eq!(waited.status(), 503);
    assert_eq!(error_kind(&waited).as_deref(), Some("upstream_busy"));
    assert_eq!(waited.headers()["retry-after"], "1");
    assert!(!upstream.requests().iter().any(|s| s.path.ends_with("/x")));
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    // Once a caller gives up on its endless body, its place is free again.
    drop(hogs.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let freed = proxy.get("/x").await;
    assert_eq!(freed.status(), 200);
    drop(hogs);
    stop_stack(idp, upstream, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_still_sending_a_body_the_upstream_already_answered_is_not_given_to_the_next_call(
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let idp = TestIdp::start(idp_options(60)).await;
    // An upstream that answers 413 to /upload as soon as it has the head and then keeps reading
    // the body as it comes, and 200 to anything else.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicU64::new(0));
    let counted = accepted.clone();
    let upstream = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            connections.spawn(async move {
                let mut buffer = vec![0u8; 64 * 1024];
                let mut received = Vec::new();
                loop {
                    let n = match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    received.extend_from_slice(&buffer[..n]);
                    while let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&received[..end]).into_owned();
                        received.drain(..end + 4);
                        if head.contains("/upload") {
                            let answer =
                                b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n";
                            let _ = stream.write_all(answer).await;
                            while matches!(stream.read(&mut buffer).await, Ok(n) if n > 0) {}
                            return;
                        }
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await;
                    }
                }
            });
        }
    });
    let proxy = Proxy::start(Settings {
        workers: Some(1),
        upstream_timeout: Some(Duration::from_secs(5)),
        ..for_idp(&upstream_url, &idp)
    })
    .await;
    proxy.wait_ready(Duration::from_secs(10)).await.unwrap();
    assert_eq!(proxy.get("/x").await.status(), 200);

    // A caller starts a large upload and stops half-way; the upstream has answered already.
    let mut uploader = tokio::net::TcpStream::connect(proxy.proxy_addr())
        .await
        .unwrap();
    let head = format!(
        "POST /seldon-deploy/api/v1alpha1/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n{}",
        "x".repeat(1000)
    );
    uploader.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), uploader.read(&mut answer))
        .await
        .expect("the upstream's early answer is passed on")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );

    // The connection under that upload is busy for as long as the caller dawdles: the next
    // call must not wait for it.
    let started = Instant::now();
    let next = proxy.get("/x").await;
    assert_eq!(next.status(), 200, "{:?}", error_kind(&next));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the next call waited {:?}",
        started.elapsed()
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a second upstream connection for it"
    );

    drop(uploader);
    proxy.stop().await;
    upstream.abort();
    let _ = upstream.await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_idle_connections_after_each_response_is_invisible() {
    let (idp, upstream, proxy) = stack(60, |s| s).await;
    upstream.close_after_response(Some(Duration::ZERO));
    // The upstream closes ~20 ms after each response; pauses around that make some requests go out on a pooled
    // connection just as the upstream closes it.
    let mut calls = Vec::new();
    for i in 0..150u64 {
        calls.push(call(&proxy, "/x").await);
        tokio::time::sleep(Duration::from_micros(15_000 + (i * 397) % 10_000)).await;
    }
    let stale = calls.iter().filter(|c| c.status == 502).count();
    println!(
        "upstream closing every connection ~20 ms after its response: {} over {} upstream connections ({stale} stale-connection failures)",
        summarize(&calls),
        upstream.connections()
    );
    assert!(
        upstream.connections() >= 30,
        "the connections were not closed: {}",
        upstream.connections()
    );
    assert!(
        calls.iter().all(|c| c.status == 200),
        "{}",
        summarize(&calls)
    );
    stop_stack(idp, upstream, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_request_on_a_pooled_connection_closed_by_the_upstream_is_retried() {
    let (idp, upstream, proxy) = stack(60, |s| s).await;
    // Every request after the first on a connection is read and then the connection is closed unanswered: what
    // the proxy sees when the upstream's keep-alive timeout closes a pooled connection as the request goes out.
    upstream.drop_requests_on_reused_connections(true);
    let mut calls = Vec::new();
    for _ in 0..10 {
        calls.push(call(&proxy, "/x").await);
    }
    println!("GETs over stale pooled connections: {}", summarize(&calls));
    let dropped = upstream.requests().iter().filter(|s| s.status == 0).count();
    assert!(dropped >= 1, "the scenario did not happen");
    assert!(
        calls.iter().all(|c| c.status == 200),
        "{}",
        summarize(&calls)
    );
    stop_stack(idp, upstream, proxy).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Upstream unreachable, slow, closing mid-response
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_502_until_it_comes_back() {
    let (idp, mut upstream, proxy) = stack(60, |s| s).await;
    assert_eq!(proxy.get("/x").await.status(), 200);
    upstream.go_away().await;
    let started = Instant::now();
    let body = assert_upstream_unreachable(proxy.get("/x").await).await;
    println!("upstream gone: 502 in {:?}: {body}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(3));
    upstream.come_back().await;
    let mut status = 0;
    for _ in 0..20 {
        status = proxy.get("/x").await.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200);
    stop_stack(idp, upstream, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upstream_is_504_after_the_upstream_timeout() {
    let idp = TestIdp::start(idp_options(60)).await;
    let upstream = FaultUpstream::start(&idp).await;
    upstream.add_fault("/slow", Fault::Stall(Some(Duration::from_secs(6))));
    upstream.add_fault("/never", Fault::Stall(None));
    let proxy = Proxy::start(Settings {
        upstream_timeout: Some(Duration::from_secs(1)),
        workers: Some(1),
        ..for_idp(&upstream.url(), &idp)
    })
    .await;
    proxy.wait_ready(Duration::from_secs(10)).await.unwrap();
    for path in ["/slow", "/never"] {
        let c = call(&proxy, path).await;
        let took = c.done - c.sent;
        println!("{path}: {} {:?} after {took:.2} s", c.status, c.kind);
        assert_eq!(
            (c.status, c.kind.as_deref()),
            (504, Some("upstream_timeout"))
        );
        // Not before the 1 s timeout; the upper bound leaves a loaded machine room but stays well below /slow's
        // 6 s answer.
        assert!((0.9..4.0).contains(&took), "504 after {took:.2} s");
    }
    assert_eq!(proxy.get("/fast").await.status(), 200);
    // A slow answer on a connection reused 600 ms after a fast one: the timeout counts from
    // this request, not the one before (whose deadline would have passed 0.4 s in).
    let opened = upstream.connections();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let c = call(&proxy, "/slow").await;
    let took = c.done - c.sent;
    assert_eq!(
        upstream.connections(),
        opened,
        "the connection was not reused"
    );
    assert_eq!(
        (c.status, c.kind.as_deref()),
        (504, Some("upstream_timeout"))
    );
    assert!((0.9..4.0).contains(&took), "504 after {took:.2} s");
    stop_stack(idp, upstream, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answering_something_other_than_http_is_a_502_that_says_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let idp = TestIdp::start(idp_options(60)).await;
    // An upstream that reads a request head and answers with something that is not HTTP/1.1.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_url = format!("http://{}", listener.local_addr().unwrap());
    let upstream = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut received = Vec::new();
                let mut buffer = [0u8; 4096];
                while !received.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => received.extend_from_slice(&buffer[..n]),
                    }
                }
                let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
                while matches!(stream.read(&mut buffer).await, Ok(n) if n > 0) {}
            });
        }
    });
    let proxy = Proxy::start(Settings {
        upstream_timeout: Some(Duration::from_secs(5)),
        ..for_idp(&upstream_url, &idp)
    })
    .await;
    proxy.wait_ready(Duration::from_secs(10)).await.unwrap();
    let started = Instant::now();
    let body = assert_upstream_unreachable(proxy.get("/x").await).await;
    println!("non-HTTP upstream: {body} after {:?}", started.elapsed());
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("not valid HTTP/1.1")),
        "{body}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "not the timeout"
    );
    proxy.stop().await;
    upstream.abort();
    let _ = upstream.await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_closing_mid_response_gives_a_truncated_body_not_a_hang() {
    let idp = TestIdp::start(idp_options(60)).await;
    let upstream = FaultUpstream::start(&idp).await;
    upstream.add_fault(
        "/cut",
        Fault::CloseMidResponse {
            declared: 100_000,
            sent: 1000,
        },
    );
    let proxy = Proxy::start(for_idp(&upstream.url(), &idp)).await;
    proxy.wait_ready(Duration::from_secs(10)).await.unwrap();
    let started = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        let response = proxy.get("/cut").await;
        let status = response.status().as_u16();
        (status, response.bytes().await)
    })
    .await
    .expect("the caller must not hang when the upstream closes mid-response");
    println!(
        "upstream closed after 1000 of 100000 bytes: status {}, body {:?} after {:?}",
        outcome.0,
        outcome.1.as_ref().map(|b| b.len()),
        started.elapsed()
    );
    assert_eq!(outcome.0, 200, "the head was already forwarded");
    assert!(
        outcome.1.is_err(),
        "the caller must see the body cut short, not a complete body"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Also with a raw socket: the connection ends with fewer bytes than declared.
    let raw = raw_http::tcp(
        proxy.proxy_addr(),
        &raw_http::get(&format!("{API}/cut"), "127.0.0.1", &[]),
    )
    .await
    .expect("a head");
    assert_eq!(raw.header("content-length").as_deref(), Some("100000"));
    assert!(raw.body.len() < 100_000, "{} bytes", raw.body.len());
    assert_eq!(proxy.get("/fine").await.status(), 200);
    stop_stack(idp, upstream, proxy).await;
}

/// An upstream that sends part of a body and then nothing, with its connection left open,
/// would keep the caller waiting and the upstream place taken for as long as it stays open.
/// After idle_timeout with nothing received, the caller's body is cut short and the place is
/// free for the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_stalls_mid_response_is_cut_off_after_the_idle_timeout() {
    let (idp, upstream, proxy) = stack(60, |s| Settings {
        workers: Some(1),
        upstream_max_connections: Some(1),
        idle_timeout: Some(Duration::from_secs(1)),
        upstream_timeout: Some(Duration::from_secs(20)),
        ..s
    })
    .await;
    upstream.add_fault(
        "/stalls",
        Fault::StallMidResponse {
            declared: 100_000,
            sent: 1000,
        },
    );
    let started = Instant::now();
    let (status, body) = tokio::time::timeout(Duration::from_secs(15), async {
        let response = proxy.get("/stalls").await;
        (response.status().as_u16(), response.bytes().await)
    })
    .await
    .expect("the caller must not wait for ever on a stalled upstream");
    let took = started.elapsed();
    assert_eq!(status, 200, "the head was already forwarded");
    assert!(body.is_err(), "the body must end cut short, not complete");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "cut off after {took:?}"
    );
    // The only upstream place is free again at once.
    let started = Instant::now();
    assert_eq!(proxy.get("/fine").await.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(2));
    stop_stack(idp, upstream, proxy).await;
}

// ---------------------------------------------------------------------------------------------------------------
// IdP hanging
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_idp_costs_a_cold_request_at_most_the_idp_timeout() {
    let idp = TestIdp::start(idp_options(60)).await;
    idp.set_mode(IdpMode::Hang).await;
    let upstream = FaultUpstream::start(&idp).await;
    let proxy = Proxy::start(Settings {
        idp_timeout: Some(Duration::from_secs(2)),
        ..for_idp(&upstream.url(), &idp)
    })
    .await;
    let first = call(&proxy, "/x").await;
    let second = call(&proxy, "/x").await;
    println!(
        "IdP hanging, idp_timeout 2s: first call {} {:?} after {:.2} s, second {} after {:.2} s",
        first.status,
        first.kind,
        first.done - first.sent,
        second.status,
        second.done - second.sent
    );
    assert_eq!(
        (first.status, first.kind.as_deref()),
        (503, Some("token_unavailable"))
    );
    assert!(
        first.done - first.sent <= 3.0,
        "a cold request waited {:.2} s",
        first.done - first.sent
    );
    assert_eq!(second.status, 503);
    assert!(
        second.done - second.sent < 0.5,
        "after a failure requests are answered at once"
    );
    let (_, body) = proxy.readyz().await;
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("timed out"),
        "{body}"
    );
    idp.set_mode(IdpMode::Normal).await;
    assert!(proxy.wait_ready(Duration::from_secs(12)).await.is_some());
    assert_eq!(proxy.get("/x").await.status(), 200);
    stop_stack(idp, upstream, proxy).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Clock skew: a static token already expired by the local clock
// ---------------------------------------------------------------------------------------------------------------

fn unsigned_jwt(claims: serde_json::Value) -> String {
    use base64::Engine;
    let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        enc.encode(br#"{"alg":"RS256","typ":"JWT","kid":"none"}"#),
        enc.encode(claims.to_string()),
        enc.encode(b"not-a-signature")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_token_already_expired_is_reported_not_reread_in_a_loop_and_replaced_by_a_fresh_file(
) {
    use std::os::unix::fs::PermissionsExt;
    let port = free_port();
    let issuer = format!("http://127.0.0.1:{port}/auth/realms/none");
    let upstream = FaultUpstream::start_with(
        &format!("{issuer}/protocol/openid-connect/certs"),
        &issuer,
        None,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let now = unix_now();
    let written = Instant::now();
    std::fs::write(
        &token_file,
        unsigned_jwt(serde_json::json!({ "sub": "static", "iat": now - 7200, "exp": now - 3600 })),
    )
    .unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let proxy = ProxyChild::spawn(
        &[
            "--upstream",
            &upstream.url(),
            "--auth-method",
            "static",
            "--static-token-file",
            token_file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--workers",
            "1",
        ],
        &[],
    )
    .await;
    let http = client();
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    let mut message = String::new();
    while started.elapsed() < Duration::from_secs(3) {
        let r = http
            .get(format!("{}{API}/x", proxy.url()))
            .send()
            .await
            .unwrap();
        let key = format!(
            "{} {}",
            r.status().as_u16(),
            error_kind(&r).unwrap_or_default()
        );
        *statuses.entry(key).or_default() += 1;
        message = r.text().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = get_text(&http, &format!("{}/metrics", proxy.admin_url())).await;
    let grant = |outcome: &str| {
        metric(&metrics, &format!("seldon_auth_proxy_token_requests_total{{grant=\"static_file\",outcome=\"{outcome}\"}}")).unwrap_or(-1.0)
    };
    let (reads_ok, reads_failed) = (grant("success"), grant("error"));
    println!("static token 3600 s past exp, 3 s of calls: {statuses:?}; file reads: {reads_ok} accepted, {reads_failed} refused; body: {message}");
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert!(
        statuses.contains_key("503 token_unavailable"),
        "{statuses:?}"
    );
    assert!(
        message.contains("expired") && message.contains("static_token_file"),
        "{message}"
    );
    assert!(upstream.requests().is_empty(), "an expired token was sent");
    assert_eq!(reads_ok, 0.0);
    assert!(
        (1.0..=2.0).contains(&reads_failed),
        "{reads_failed} reads of the static token file in 3 s"
    );

    // A fresh token in the file is picked up without a restart.
    let fresh = unsigned_jwt(serde_json::json!({ "sub": "static", "iat": now, "exp": now + 3600 }));
    std::fs::write(&token_file, &fresh).unwrap();
    let replaced = Instant::now();
    while upstream.tokens_seen().is_empty() && replaced.elapsed() < Duration::from_secs(8) {
        let _ = http
            .get(format!("{}{API}/x", proxy.url()))
            .send()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "fresh token written -> forwarded after {:.2} s",
        replaced.elapsed().as_secs_f64()
    );
    assert_eq!(
        upstream.tokens_seen(),
        vec![fresh],
        "the fresh token is sent"
    );
    assert!(replaced.elapsed() < Duration::from_secs(5));
    let finished = proxy.terminate().await;
    // Reported by the local (whole-second) clock at each read: 3600 s, plus the whole seconds that passed between
    // writing the file and that read (at most those until now, rounded up, and one for `now`'s own truncation).
    let most = 3600 + written.elapsed().as_secs_f64().ceil() as u64 + 1;
    let reported: Vec<u64> = finished
        .stderr
        .split("expired ")
        .skip(1)
        .filter_map(|rest| rest.split_once("s ago")?.0.parse().ok())
        .collect();
    assert!(
        !reported.is_empty() && reported.iter().all(|n| (3600..=most).contains(n)),
        "expected \"expired Ns ago\" with 3600 <= N <= {most}, found {reported:?}:\n{}",
        finished.stderr
    );
    upstream.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// Soak: steady load across an IdP outage shorter than the token lifetime (keys change on restart)
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_steady_load_through_an_idp_outage_shorter_than_the_token_lifetime() {
    let lifetime = 12;
    let (idp, upstream, proxy) = stack_with(idp_options(lifetime).port(restartable_port()), |s| {
        Settings {
            workers: Some(2),
            ..s
        }
    })
    .await;
    let port = idp.port;
    let proxy = Arc::new(proxy);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops = call_loops(
        proxy.clone(),
        "/namespaces/seldon/seldondeployments",
        20,
        Duration::from_millis(20),
        stop.clone(),
    );
    let started = Instant::now();

    // Once the first refresh is seen, stop the IdP at once (connections refused), so that the next refresh (at
    // half the new token's life, ±5%: 5.2-6.3 s before its exp) falls in the outage. When that refresh has failed,
    // restart the IdP on the same port with new signing keys, answering 503 (the outage goes on however long
    // Node takes to start), and switch it to normal ~2.3 s before the token's exp. That is ~0.6 s before the
    // proxy's last-chance attempt (0.5 s before it stops using the token, 10% of its life before exp), and after
    // the second retry of a plain 1 s, 2 s backoff (no later than ~2.2 s before exp), whose third retry would
    // come after the token ran out: only a proxy that brings its retries forward while the credential is usable
    // gets through without failed calls.
    let newest = |u: &FaultUpstream| u.requests().iter().filter_map(|s| s.iat.zip(s.exp)).max();
    while newest(&upstream).is_none() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = newest(&upstream);
    while newest(&upstream) == first {
        assert!(started.elapsed() < Duration::from_secs(15), "no refresh");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, exp) = newest(&upstream).unwrap();
    let exp = exp as f64;
    let back_at_unix = exp - 2.3;
    let before = idp.total_token_requests().await;
    let outage_started = Instant::now();
    idp.stop().await;
    let failed_attempts = || async {
        metric(
            &proxy.metrics().await,
            "seldon_auth_proxy_token_requests_total{grant=\"client_credentials\",outcome=\"error\"}",
        )
        .unwrap_or(0.0)
    };
    while failed_attempts().await < 1.0 {
        assert!(
            unix_now_f() < back_at_unix,
            "the outage must hold up a refresh to prove anything (no failed token request by {:.2} s before exp)",
            exp - unix_now_f()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let restarting = unix_now_f();
    let restarted = TestIdp::start(idp_options(lifetime).port(port).mode(IdpMode::Fail503)).await;
    let restart_took = unix_now_f() - restarting;
    while unix_now_f() < back_at_unix {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Token requests answered 503 by the restarted IdP are part of the outage, not of "after".
    let answered_503 = restarted.total_token_requests().await;
    restarted.set_mode(IdpMode::Normal).await;
    let idp = restarted;
    let outage = outage_started.elapsed();
    let back_at = Instant::now();
    let back_before_exp = exp - unix_now_f();
    let failed_before_back = failed_attempts().await;
    let mut ready_after = None;
    while started.elapsed() < Duration::from_secs(32) {
        if ready_after.is_none() && idp.total_token_requests().await > answered_503 {
            ready_after = Some(back_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let calls = loops.await.unwrap();
    let after = idp.total_token_requests().await - answered_503;
    let failed: Vec<&Call> = calls.iter().filter(|c| c.status != 200).collect();
    let seen = upstream.requests();
    println!(
        "soak: 20 loops for {:.1} s, token lifetime {lifetime} s, IdP outage {:.2} s (restart took {restart_took:.2} s, keys changed, back {back_before_exp:.2} s before exp, {failed_before_back} token requests failed meanwhile, {answered_503} of them answered 503 after the restart), first token request after it was back {:?}\n  {} calls, {} failed ({}), {} token requests ({before} before the outage, {after} after); upstream saw {} requests, {} refused with 401 and replayed",
        started.elapsed().as_secs_f64(),
        outage.as_secs_f64(),
        ready_after,
        calls.len(),
        failed.len(),
        summarize(&failed.iter().map(|c| (*c).clone()).collect::<Vec<_>>()),
        before + after,
        seen.len(),
        seen.iter().filter(|s| s.status == 401).count(),
    );
    if let (Some(first), Some(last)) = (failed.first(), failed.last()) {
        println!(
            "  failures from {:.2} s to {:.2} s after the outage began",
            first.sent - (unix_now_f() - outage_started.elapsed().as_secs_f64()),
            last.sent - (unix_now_f() - outage_started.elapsed().as_secs_f64())
        );
    }
    assert!(calls.len() > 2000, "too little load: {}", calls.len());
    assert!(
        back_before_exp > 1.7,
        "the IdP must be back before the proxy's last-chance attempt (~1.65 s before exp): back {back_before_exp:.2} s before exp"
    );
    assert!(
        failed.is_empty(),
        "{} of {} calls failed during an IdP outage shorter than the token lifetime",
        failed.len(),
        calls.len()
    );
    assert!(
        before + after <= 8,
        "{} token requests for ~3 token lifetimes",
        before + after
    );
    let proxy = Arc::try_unwrap(proxy).ok().unwrap();
    stop_stack(idp, upstream, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_hangs_up_before_the_answer_frees_its_place_among_the_upstream_requests() {
    let (idp, upstream, proxy) = stack(60, |s| Settings {
        workers: Some(1),
        upstream_max_connections: Some(1),
        upstream_timeout: Some(Duration::from_secs(10)),
        ..s
    })
    .await;
    upstream.add_fault("/stalled", Fault::Stall(Some(Duration::from_secs(6))));
    // The caller gives up after 300 ms and closes its connection; the proxy stops waiting for
    // the upstream on its behalf, so the one place is free for the next call at once.
    let gave_up = proxy
        .http
        .get(proxy.api("/stalled"))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.is_err(), "the stalled call answered: {gave_up:?}");
    let started = Instant::now();
    let next = proxy.get("/x").await;
    assert_eq!(next.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the next call waited {:?} for the abandoned one",
        started.elapsed()
    );
    stop_stack(idp, upstream, proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_ahead_on_one_connection_are_answered_in_order() {
    let (idp, upstream, proxy) = stack(60, |s| s).await;
    // Three requests in one write: two plain GETs, then one with a body (which hyper answers),
    // then the connection closes.
    let api = "/seldon-deploy/api/v1alpha1";
    let requests = format!(
        "GET {api}/first HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\
         GET {api}/second HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n\
         POST {api}/third HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    let mut stream = tokio::net::TcpStream::connect(proxy.proxy_addr())
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(requests.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("the proxy closed the connection after the third answer")
        .unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{text}");
    let paths: Vec<String> = upstream
        .requests()
        .into_iter()
        .map(|seen| seen.path)
        .filter(|path| path.starts_with(api))
        .collect();
    assert_eq!(
        paths,
        [
            format!("{api}/first"),
            format!("{api}/second"),
            format!("{api}/third")
        ]
    );
    stop_stack(idp, upstream, proxy).await;
}
