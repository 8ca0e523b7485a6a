//! Issues 2 and 6, the command line of the real binary: settings precedence (flag > env > file > default), refusals
//! of unknown keys and variables, bad durations and non-loopback listeners (exit 2, naming the setting), list
//! settings replacing defaults, JSON logs with one access line per request and never the token, request ids,
//! the SIGTERM drain sequence, and every example in config/ passing `check` against the test IdP.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::dex::{DexFixture, DexOptions};
use common::echo::EchoUpstream;
use common::http::{client, send_json};
use common::idp::{jwt_claims, IdpOptions, IdpUser, TestIdp};
use common::proxy::{
    free_port, idp_options, secret_file, settings, Proxy, CLIENT_ID, CLIENT_SECRET, ERROR_HEADER,
};
use common::proxy_child::{command, run, run_command, Outcome, ProxyChild};

const SECRET_ENV: (&str, &str) = ("SELDON_AUTH_PROXY_CLIENT_SECRET", CLIENT_SECRET);

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// The `scope` claim of the token `token` prints.
fn scope_of(outcome: &Outcome) -> String {
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    let claims =
        jwt_claims(outcome.stdout.trim_end()).unwrap_or_else(|| panic!("not a JWT: {outcome:?}"));
    claims["scope"].as_str().expect("a scope claim").to_owned()
}

/// The `upstream:` line of `check`'s summary.
fn upstream_of(outcome: &Outcome) -> String {
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    outcome
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("upstream:"))
        .unwrap_or_else(|| panic!("no upstream line: {}", outcome.stdout))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_precedence_is_flag_over_env_over_file_over_default() {
    let idp = TestIdp::start(idp_options(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "layers.toml",
        &format!(
            "upstream = \"http://127.0.0.1:1/from-file\"\noidc_server = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nscope = \"openid file-layer\"\n",
            idp.issuer
        ),
    );
    let no_scope = write(
        dir.path(),
        "no-scope.toml",
        &format!("upstream = \"http://127.0.0.1:1/from-file\"\noidc_server = \"{}\"\nclient_id = \"{CLIENT_ID}\"\n", idp.issuer),
    );
    let env_scope = ("SELDON_AUTH_PROXY_SCOPE", "openid env-layer");
    let env_upstream = ("SELDON_AUTH_PROXY_UPSTREAM", "http://127.0.0.1:2/from-env");

    // scope, seen in the token the IdP issued: default, file, env, flag.
    let default = scope_of(&run(&["token", "--config", &no_scope], &[SECRET_ENV]).await);
    assert!(
        default.split(' ').any(|s| s == "groups"),
        "default scope `openid profile email groups`: {default}"
    );
    let from_file = scope_of(&run(&["token", "--config", &file], &[SECRET_ENV]).await);
    assert!(
        from_file.contains("file-layer") && !from_file.contains("groups"),
        "{from_file}"
    );
    let from_env = scope_of(&run(&["token", "--config", &file], &[SECRET_ENV, env_scope]).await);
    assert!(
        from_env.contains("env-layer") && !from_env.contains("file-layer"),
        "{from_env}"
    );
    let from_flag = scope_of(
        &run(
            &["token", "--config", &file, "--scope", "openid flag-layer"],
            &[SECRET_ENV, env_scope],
        )
        .await,
    );
    assert!(
        from_flag.contains("flag-layer") && !from_flag.contains("env-layer"),
        "{from_flag}"
    );

    // upstream, seen in check's summary: file, env, flag.
    assert_eq!(
        upstream_of(&run(&["check", "--config", &file], &[SECRET_ENV]).await),
        "http://127.0.0.1:1/from-file"
    );
    assert_eq!(
        upstream_of(&run(&["check", "--config", &file], &[SECRET_ENV, env_upstream]).await),
        "http://127.0.0.1:2/from-env"
    );
    assert_eq!(
        upstream_of(
            &run(
                &[
                    "check",
                    "--config",
                    &file,
                    "--upstream",
                    "http://127.0.0.1:3/from-flag"
                ],
                &[SECRET_ENV, env_upstream]
            )
            .await
        ),
        "http://127.0.0.1:3/from-flag"
    );
    // The config file can be named by its variable too.
    assert_eq!(
        upstream_of(
            &run(
                &["check"],
                &[SECRET_ENV, ("SELDON_AUTH_PROXY_CONFIG", file.as_str())]
            )
            .await
        ),
        "http://127.0.0.1:1/from-file"
    );

    // A value the proxy refuses, in a lower layer, is overridden by a higher one.
    let bad_listen = write(
        dir.path(),
        "bad-listen.toml",
        &format!(
            "upstream = \"http://127.0.0.1:1\"\noidc_server = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nlisten = \"0.0.0.0:1\"\n",
            idp.issuer
        ),
    );
    let refused = run(&["check", "--config", &bad_listen], &[SECRET_ENV]).await;
    assert_eq!(refused.code, Some(2), "{refused:?}");
    assert!(
        refused.stderr.contains("listen") && refused.stderr.contains("loopback"),
        "{}",
        refused.stderr
    );
    let flag_wins = run(
        &["check", "--config", &bad_listen, "--listen", "127.0.0.1:0"],
        &[SECRET_ENV],
    )
    .await;
    assert_eq!(
        flag_wins.code,
        Some(0),
        "the flag overrides the file: {flag_wins:?}"
    );
    let env_wins = run(
        &["check", "--config", &bad_listen],
        &[SECRET_ENV, ("SELDON_AUTH_PROXY_LISTEN", "127.0.0.1:0")],
    )
    .await;
    assert_eq!(
        env_wins.code,
        Some(0),
        "the variable overrides the file: {env_wins:?}"
    );
    let env_bad = ("SELDON_AUTH_PROXY_LISTEN", "0.0.0.0:2");
    let flag_over_env = run(
        &["check", "--config", &bad_listen, "--listen", "127.0.0.1:0"],
        &[SECRET_ENV, env_bad],
    )
    .await;
    assert_eq!(
        flag_over_env.code,
        Some(0),
        "the flag overrides the variable: {flag_over_env:?}"
    );
    let env_over_good_file = run(&["check", "--config", &no_scope], &[SECRET_ENV, env_bad]).await;
    assert_eq!(
        env_over_good_file.code,
        Some(2),
        "the variable overrides the file: {env_over_good_file:?}"
    );
    assert!(
        env_over_good_file.stderr.contains("0.0.0.0:2"),
        "{}",
        env_over_good_file.stderr
    );

    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_settings_and_bad_durations_exit_2_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let base = [
        "--upstream",
        "http://127.0.0.1:9",
        "--oidc-server",
        "http://127.0.0.1:9/realms/x",
        "--client-id",
        "x",
    ];
    let expect_2 = |outcome: &Outcome, names: &[&str], what: &str| {
        assert_eq!(outcome.code, Some(2), "{what}: {outcome:?}");
        assert!(
            outcome.stdout.is_empty(),
            "{what}: stdout {:?}",
            outcome.stdout
        );
        for name in names {
            assert!(
                outcome.stderr.contains(name),
                "{what}: stderr does not name {name}: {}",
                outcome.stderr
            );
        }
    };

    let unknown_key = write(
        dir.path(),
        "unknown.toml",
        "upstream = \"http://127.0.0.1:9\"\nlisten_port = 8080\n",
    );
    let outcome = run(&["check", "--config", &unknown_key], &[]).await;
    expect_2(
        &outcome,
        &["listen_port", "unknown.toml"],
        "unknown TOML key",
    );
    let outcome = run(&["serve", "--config", &unknown_key], &[]).await;
    expect_2(&outcome, &["listen_port"], "unknown TOML key, serve");

    for var in ["SELDON_AUTH_PROXY_FOO", "SELDON_AUTH_PROXY_CLIENTSECRET"] {
        let mut c = command(&["check"]);
        c.args(base)
            .env(var, "1")
            .env("SELDON_AUTH_PROXY_CLIENT_SECRET", "x");
        expect_2(&run_command(c).await, &[var], "unknown variable");
    }

    let bad_file = write(
        dir.path(),
        "bad-duration.toml",
        "idp_timeout = \"ten seconds\"\n",
    );
    let mut c = command(&["check", "--config", &bad_file]);
    c.args(base);
    expect_2(
        &run_command(c).await,
        &["idp_timeout", "ten seconds"],
        "bad duration in the file",
    );
    let mut c = command(&["check", "--idp-timeout", "5parsecs"]);
    c.args(base);
    expect_2(
        &run_command(c).await,
        &["--idp-timeout", "5parsecs"],
        "bad duration flag",
    );
    let mut c = command(&["check"]);
    c.args(base).env("SELDON_AUTH_PROXY_SHUTDOWN_DELAY", "soon");
    // The message names the variable the user set, not the flag it feeds.
    expect_2(
        &run_command(c).await,
        &["SELDON_AUTH_PROXY_SHUTDOWN_DELAY", "soon"],
        "bad duration variable",
    );
    let mut c = command(&["check", "--upstream-timeout", "0s"]);
    c.args(base).env("SELDON_AUTH_PROXY_CLIENT_SECRET", "x");
    expect_2(
        &run_command(c).await,
        &["upstream_timeout", "greater than zero"],
        "zero duration",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_exits_1_without_a_credential_and_2_for_a_bad_configuration() {
    // Nothing listens on port 9 of loopback: the IdP is unreachable.
    let unreachable = run(
        &[
            "check",
            "--upstream",
            "http://127.0.0.1:9",
            "--oidc-server",
            "http://127.0.0.1:9/auth/realms/x",
            "--client-id",
            CLIENT_ID,
        ],
        &[SECRET_ENV],
    )
    .await;
    assert_eq!(unreachable.code, Some(1), "{unreachable:?}");
    assert!(
        unreachable.stderr.contains("127.0.0.1:9"),
        "names what it could not reach: {}",
        unreachable.stderr
    );
    assert!(unreachable.stdout.is_empty());
    let incomplete = run(
        &[
            "check",
            "--upstream",
            "http://127.0.0.1:9",
            "--oidc-server",
            "http://127.0.0.1:9/auth/realms/x",
            "--client-id",
            CLIENT_ID,
        ],
        &[],
    )
    .await;
    assert_eq!(incomplete.code, Some(2), "{incomplete:?}");
    assert!(
        incomplete.stderr.contains("client_secret"),
        "{}",
        incomplete.stderr
    );
    let no_upstream = run(&["check"], &[]).await;
    assert_eq!(no_upstream.code, Some(2), "{no_upstream:?}");
    assert!(
        no_upstream.stderr.contains("upstream"),
        "{}",
        no_upstream.stderr
    );
}

/// JSON logs, two workers, and a quick exit: for the tests that read the access lines.
const JSON_ON_TWO_WORKERS: &[&str] = &[
    "--log-format",
    "json",
    "--workers",
    "2",
    "--shutdown-delay",
    "10ms",
];

/// An IdP, an echo upstream and `serve` on ephemeral ports with the test client, `extra` flags and the client
/// secret (then `env`) in its environment; ready.
async fn serve_echo(extra: &[&str], env: &[(&str, &str)]) -> (TestIdp, EchoUpstream, ProxyChild) {
    let idp = TestIdp::start(idp_options(60)).await;
    let echo = EchoUpstream::start().await;
    let mut args = vec![
        "serve",
        "--upstream",
        &echo.url,
        "--oidc-server",
        &idp.issuer,
        "--client-id",
        CLIENT_ID,
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
    ];
    args.extend(extra);
    let mut env_all = vec![SECRET_ENV];
    env_all.extend(env);
    let served = ProxyChild::spawn(&args, &env_all).await;
    served
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("the proxy is ready within 10 s");
    (idp, echo, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_path_prefix_from_env_replaces_the_default_list() {
    let (idp, echo, served) = serve_echo(
        &["--shutdown-delay", "10ms"],
        &[(
            "SELDON_AUTH_PROXY_ALLOWED_PATH_PREFIX",
            "/other/api,/second/api",
        )],
    )
    .await;
    let http = client();
    let default = http
        .get(served.api("/namespaces/seldon/seldondeployments"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        default.status(),
        404,
        "the default prefix is replaced, not extended"
    );
    assert_eq!(default.headers()[ERROR_HEADER], "path_not_allowed");
    for path in ["/other/api/x", "/second/api/y?z=1"] {
        let forwarded = http
            .get(format!("{}{path}", served.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(forwarded.status(), 200, "{path}");
    }
    let seen: Vec<String> = echo.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(seen, ["/other/api/x", "/second/api/y?z=1"]);

    served.sigterm();
    let mut served = served;
    assert_eq!(
        served.wait_exit(Duration::from_secs(15)).await.code(),
        Some(0)
    );
    echo.stop().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_one_access_line_per_request_and_no_token() {
    let (idp, echo, mut served) =
        serve_echo(&["--log-format", "json", "--shutdown-delay", "10ms"], &[]).await;
    let http = client();
    let given = http
        .get(served.api("/namespaces/seldon/seldondeployments?limit=1"))
        .header("x-request-id", "caller-chosen-id-42")
        .send()
        .await
        .unwrap();
    assert_eq!(given.status(), 200);
    let created = http
        .post(served.api("/namespaces/seldon/seldondeployments"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let created_id = created.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let refused = http
        .get(format!("{}/not/forwarded", served.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    let refused_id = refused.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();

    served.sigterm();
    assert_eq!(
        served.wait_exit(Duration::from_secs(15)).await.code(),
        Some(0)
    );
    let lines = served.stderr_lines();
    let token = echo.requests()[0]
        .header("authorization")
        .expect("the upstream got a token");
    let token = token.strip_prefix("Bearer ").unwrap();

    let mut access = Vec::new();
    for line in &lines {
        let object: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a stderr line is not JSON ({e}): {line}"));
        assert!(object.is_object(), "{line}");
        assert!(!line.contains(token), "the token is in the log: {line}");
        assert!(
            !line.contains(CLIENT_SECRET),
            "the client secret is in the log: {line}"
        );
        if object.get("status").is_some() && object.get("method").is_some() {
            access.push(object);
        }
    }
    assert!(
        lines.len() > access.len(),
        "start-up and shutdown lines too: {lines:#?}"
    );
    assert_eq!(access.len(), 3, "one access line per request: {access:#?}");
    let (a, b, c) = (&access[0], &access[1], &access[2]);
    assert_eq!(
        (
            a["method"].as_str(),
            a["path"].as_str(),
            a["status"].as_u64()
        ),
        (
            Some("GET"),
            Some("/seldon-deploy/api/v1alpha1/namespaces/seldon/seldondeployments"),
            Some(200)
        ),
        "{a}"
    );
    assert_eq!(a["request_id"], "caller-chosen-id-42");
    assert_eq!(
        (b["method"].as_str(), b["status"].as_u64()),
        (Some("POST"), Some(200)),
        "{b}"
    );
    assert_eq!(b["request_id"], created_id.as_str());
    assert_eq!(
        (c["path"].as_str(), c["status"].as_u64()),
        (Some("/not/forwarded"), Some(404)),
        "{c}"
    );
    assert_eq!(c["request_id"], refused_id.as_str());
    for forwarded in [a, b] {
        let upstream_ms = forwarded["upstream_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("upstream latency: {forwarded}"));
        let total_ms = forwarded["total_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("total latency: {forwarded}"));
        assert!(upstream_ms >= 0.0 && total_ms >= upstream_ms, "{forwarded}");
    }
    assert!(c["total_ms"].as_f64().is_some(), "{c}");
    assert!(
        c.get("upstream_ms").is_none(),
        "no upstream latency for a refused request: {c}"
    );

    echo.stop().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_keep_the_order_of_one_callers_sequential_requests_across_workers() {
    let (idp, echo, mut served) = serve_echo(JSON_ON_TWO_WORKERS, &[]).await;
    // A fresh connection per request, so that successive requests land on different workers.
    let mut sent = Vec::new();
    for i in 0..30 {
        let id = format!("sequential-{i:02}");
        let answered = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap()
            .get(served.api("/namespaces/seldon/seldondeployments"))
            .header("x-request-id", &id)
            .send()
            .await
            .unwrap();
        assert_eq!(answered.status(), 200);
        sent.push(id);
    }
    served.sigterm();
    assert_eq!(
        served.wait_exit(Duration::from_secs(15)).await.code(),
        Some(0)
    );
    let logged: Vec<String> = served
        .stderr_lines()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|object| object["request_id"].as_str().map(str::to_owned))
        .filter(|id| id.starts_with("sequential-"))
        .collect();
    assert_eq!(
        logged, sent,
        "access lines in the order requests were answered"
    );
    echo.stop().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_of_many_concurrent_requests_are_whole_and_none_is_lost() {
    let (idp, echo, mut served) = serve_echo(JSON_ON_TWO_WORKERS, &[]).await;
    // About 200 KB of access lines: several batches, written while requests keep coming.
    let http = client();
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..16 {
        let http = http.clone();
        let url = served.api("/namespaces/seldon/seldondeployments");
        callers.spawn(async move {
            for i in 0..50 {
                let answered = http
                    .get(&url)
                    .header("x-request-id", format!("many-{caller:02}-{i:02}"))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(answered.status(), 200);
            }
        });
    }
    while let Some(done) = callers.join_next().await {
        done.unwrap();
    }
    served.sigterm();
    assert_eq!(
        served.wait_exit(Duration::from_secs(15)).await.code(),
        Some(0)
    );
    let mut logged = Vec::new();
    for line in served.stderr_lines() {
        let object: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("a stderr line is not whole JSON ({e}): {line}"));
        if let Some(id) = object["request_id"]
            .as_str()
            .filter(|id| id.starts_with("many-"))
        {
            logged.push(id.to_owned());
        }
    }
    assert_eq!(logged.len(), 800, "one access line per request");
    logged.sort();
    logged.dedup();
    assert_eq!(logged.len(), 800, "no line twice");
    echo.stop().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_request_id_is_propagated_when_sent_and_created_when_not() {
    let idp = TestIdp::start(idp_options(60)).await;
    let echo = EchoUpstream::start().await;
    let proxy = Proxy::start(settings(&echo.url, &idp)).await;
    let http = client();
    let sent = http
        .get(proxy.api("/a"))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(sent.headers()["x-request-id"], "abc-123");
    let mut created = Vec::new();
    for _ in 0..3 {
        let response = http.get(proxy.api("/b")).send().await.unwrap();
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(!id.is_empty());
        created.push(id);
    }
    let refused = http
        .get(format!("{}/elsewhere", proxy.url()))
        .send()
        .await
        .unwrap();
    assert!(
        refused.headers().contains_key("x-request-id"),
        "the proxy's own answers carry one too"
    );
    let seen = echo.requests();
    assert_eq!(seen[0].headers_named("x-request-id"), ["abc-123"]);
    for (request, id) in seen[1..].iter().zip(&created) {
        assert_eq!(
            request.headers_named("x-request-id"),
            std::slice::from_ref(id),
            "the upstream sees the id the caller gets"
        );
    }
    created.sort();
    created.dedup();
    assert_eq!(created.len(), 3, "created ids are unique: {created:?}");

    proxy.stop().await;
    echo.stop().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readyz_off_drains_the_in_flight_request_then_refuses_and_exits_0() {
    const DELAY: Duration = Duration::from_secs(2);
    const GRACE: Duration = Duration::from_secs(20);
    let (delay, grace) = (
        format!("{}s", DELAY.as_secs()),
        format!("{}s", GRACE.as_secs()),
    );
    let (idp, echo, mut served) = serve_echo(
        &["--shutdown-delay", &delay, "--shutdown-grace", &grace],
        &[],
    )
    .await;
    let proxy_addr = served.proxy;

    // A slow request (the upstream answers after 8 s) is in flight when SIGTERM arrives.
    let slow = {
        let url = served.api("/slow");
        tokio::spawn(async move {
            let response = client()
                .get(url)
                .header("x-echo-delay-ms", "8000")
                .send()
                .await?;
            let status = response.status().as_u16();
            Ok::<_, reqwest::Error>((status, response.text().await?, Instant::now()))
        })
    };
    echo.wait_for_requests(1, Duration::from_secs(10)).await;
    let before_signal = Instant::now();
    served.sigterm();
    let signalled = Instant::now();

    // Readiness turns off first, while the listener still accepts.
    let http = client();
    loop {
        let status = http
            .get(format!("{}/readyz", served.admin_url()))
            .send()
            .await
            .unwrap()
            .status();
        if status == 503 {
            break;
        }
        assert!(
            signalled.elapsed() < DELAY,
            "/readyz still {status} after {:?}",
            signalled.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let readyz_off = signalled.elapsed();
    let during_delay = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let accepted = during_delay
        .get(served.api("/during-delay"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        accepted.status(),
        200,
        "new requests are still served during the shutdown delay"
    );
    assert!(
        signalled.elapsed() < DELAY,
        "the check ran within the delay ({:?})",
        signalled.elapsed()
    );

    // After the delay (counted from when the proxy handled SIGTERM, a little after it was sent), new connections
    // are refused while the slow request is still in flight.
    let refused_at = loop {
        match tokio::net::TcpStream::connect(&proxy_addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break Instant::now(),
            connected => assert!(
                signalled.elapsed() < DELAY + Duration::from_secs(3),
                "a new connection {:?} after SIGTERM is still not refused: {connected:?}",
                signalled.elapsed()
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!slow.is_finished(), "the slow request is still in flight");
    assert!(served.is_running(), "the process is still draining");
    let refused_after = refused_at - signalled;
    assert!(
        refused_at - before_signal >= DELAY,
        "connections were refused {refused_after:?} after SIGTERM, within the shutdown delay"
    );

    let (status, body, finished) = slow
        .await
        .unwrap()
        .expect("the in-flight request completes");
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"echo":true}"#);
    let exit = served
        .wait_exit(DELAY + GRACE + Duration::from_secs(5))
        .await;
    let exited = signalled.elapsed();
    println!(
        "SIGTERM: /readyz 503 after {readyz_off:?}, connections refused after {refused_after:?}, in-flight request done after {:?}, exit {:?} after {exited:?}",
        finished - signalled,
        exit.code()
    );
    assert_eq!(
        exit.code(),
        Some(0),
        "stderr:\n{}",
        served.stderr_lines().join("\n")
    );
    // The request ends less than 8 s after SIGTERM; the grace would end 22 s after it.
    assert!(
        exited < Duration::from_secs(13),
        "the drain ends when the in-flight request does: {exited:?}"
    );

    echo.stop().await;
    idp.stop().await;
}

/// An example file and the auth method it configures.
struct Example {
    name: String,
    method: String,
}

/// Runs `login --config FILE` and plays the browser: follows the authorization URL it prints to the test IdP,
/// whose authorize endpoint logs the first user in and redirects to the loopback redirect URI `login` listens on.
async fn login_through_the_browser(config: &str, env: &[(&str, &str)], cwd: &Path) -> Outcome {
    use tokio::io::AsyncBufReadExt;
    let mut login = command(&["login", "--config", config]);
    login
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = login.spawn().expect("login runs");
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = stdout.next_line().await {
            if line.starts_with("http") {
                return Some(line);
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    if let Some(url) = url {
        let browser = client();
        let authorize = browser.get(url.trim()).send().await.unwrap();
        assert!(
            authorize.status().is_redirection(),
            "authorize: {}",
            authorize.status()
        );
        let callback = authorize.headers()["location"].to_str().unwrap().to_owned();
        let answered = browser.get(&callback).send().await.unwrap();
        assert!(
            answered.status().is_success(),
            "callback {callback}: {}",
            answered.status()
        );
    }
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("login finishes")
        .unwrap();
    Outcome {
        code: output.status.code(),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_config_passes_check_against_the_test_idp() {
    const SD_SECRET: &str = "sd-api-s3cret";
    const USER_PASSWORD: &str = "pipeline-pw";
    let idp = TestIdp::start(
        IdpOptions::default()
            .client("sd-api", SD_SECRET)
            .add_user(IdpUser::new("pipeline-user", USER_PASSWORD))
            .add_user(
                IdpUser::new("developer@example.com", USER_PASSWORD).email("developer@example.com"),
            )
            .token_lifetime(300),
    )
    .await;
    // session.toml logs in at the platform, behind Dex (as Kubeflow deploys it).
    let dex = DexFixture::start(DexOptions::new("pipeline-user@example.com", USER_PASSWORD)).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_path = secret_file(
        dir.path(),
        "client-secret",
        &format!("{SD_SECRET}\n"),
        0o600,
    );
    let secret_path = secret_path.to_str().unwrap();
    let password_path = secret_file(dir.path(), "password", &format!("{USER_PASSWORD}\n"), 0o600);
    let password_path = password_path.to_str().unwrap();
    // A token for the static method, from the IdP.
    let answer = send_json(
        client()
            .post(&idp.token_endpoint)
            .basic_auth("sd-api", Some(SD_SECRET))
            .form(&[("grant_type", "client_credentials"), ("scope", "openid")]),
    )
    .await;
    let static_token = answer["access_token"]
        .as_str()
        .expect("an access token")
        .to_owned();
    let token_path = secret_file(dir.path(), "token", &format!("{static_token}\n"), 0o600);
    let token_path = token_path.to_str().unwrap();
    let redirect_uri = format!("http://127.0.0.1:{}/callback", free_port());

    let config_dir = common::deps::repo_root().join("config");
    let mut examples: Vec<Example> = std::fs::read_dir(&config_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|path| {
            let table: toml::Table = std::fs::read_to_string(&path).unwrap().parse().unwrap();
            Example {
                name: path.file_name().unwrap().to_string_lossy().into_owned(),
                method: table
                    .get("auth_method")
                    .and_then(|v| v.as_str())
                    .unwrap_or("client_credentials")
                    .to_owned(),
            }
        })
        .collect();
    examples.sort_by(|a, b| a.name.cmp(&b.name));
    assert!(examples.len() >= 6, "{} examples", examples.len());

    let mut checked = Vec::new();
    for example in &examples {
        let path = config_dir.join(&example.name);
        let path = path.to_str().unwrap();
        // Where the IdP and the platform are, and the secrets, come from the environment, as the examples
        // advise; everything else is the file's own.
        let mut env: Vec<(&str, &str)> = vec![
            ("SELDON_AUTH_PROXY_UPSTREAM", "http://127.0.0.1:9"),
            ("SELDON_AUTH_PROXY_OIDC_SERVER", idp.issuer.as_str()),
        ];
        match example.method.as_str() {
            "client_credentials" => env.push(("SELDON_AUTH_PROXY_CLIENT_SECRET_FILE", secret_path)),
            "password_grant" => {
                env.push(("SELDON_AUTH_PROXY_CLIENT_SECRET", SD_SECRET));
                env.push(("SELDON_AUTH_PROXY_PASSWORD_FILE", password_path));
            }
            "static" => env.push(("SELDON_AUTH_PROXY_STATIC_TOKEN_FILE", token_path)),
            "auth_code" => {
                // The example's redirect port (8085) may be taken here; the token file stays the example's
                // relative path, under the temp dir.
                env.push(("SELDON_AUTH_PROXY_CLIENT_SECRET", SD_SECRET));
                env.push(("SELDON_AUTH_PROXY_REDIRECT_URI", &redirect_uri));
                let login = login_through_the_browser(path, &env, dir.path()).await;
                assert_eq!(
                    login.code,
                    Some(0),
                    "config/{}: login: {login:?}",
                    example.name
                );
            }
            "session" => {
                env[0] = ("SELDON_AUTH_PROXY_UPSTREAM", dex.url.as_str());
                env.push(("SELDON_AUTH_PROXY_PASSWORD_FILE", password_path));
            }
            other => panic!(
                "config/{}: no test environment for auth_method {other}",
                example.name
            ),
        }
        // Relative paths in an example (auth_code's token cache) land in the temp dir, not the checkout.
        let mut check = command(&["check", "--config", path]);
        check.envs(env).current_dir(dir.path());
        let outcome = run_command(check).await;
        assert_eq!(
            outcome.code,
            Some(0),
            "config/{}: {outcome:?}",
            example.name
        );
        assert!(
            outcome.stdout.starts_with("ok: obtained a credential"),
            "config/{}: {}",
            example.name,
            outcome.stdout
        );
        for secret in [SD_SECRET, USER_PASSWORD, static_token.as_str()] {
            assert!(
                !outcome.stdout.contains(secret) && !outcome.stderr.contains(secret),
                "config/{} prints a secret: {outcome:?}",
                example.name
            );
        }
        checked.push(format!("{} ({})", example.name, example.method));
    }
    println!("checked against the test IdP: {checked:?}");
    assert_eq!(checked.len(), examples.len());
    assert!(
        dex.logins() >= 1,
        "session.toml logged in at the Dex stand-in"
    );
    dex.stop().await;
    idp.stop().await;
}
