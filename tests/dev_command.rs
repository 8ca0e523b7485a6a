//! Issue 8, the `dev` subcommand as a user runs it: the real binary on port 0 prints a banner (proxy URL, issuer,
//! platform URL, client and user credentials, three examples); the examples work as printed (curl, the `token`
//! subcommand, the Python SDK with no token); SeldonDeployments can be listed, created, read and deleted through
//! the proxy; the embedded platform refuses calls with no, garbage and expired tokens; calls through the proxy
//! keep succeeding across several short token lifetimes; SIGTERM ends it with exit code 0.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::deps::python;
use common::fault_upstream::unix_now_f;
use common::http::{client, get_json, get_text};
use common::idp::jwt_claims;
use common::proxy::{metric, API, ERROR_HEADER};
use common::proxy_child::{collect, command, output_within, scrub_env, send_sigterm};
use common::sdk::{run_python, sdk_script, SDK_FINAL_LINE};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

const TOKEN_LIFETIME_S: u64 = 4;

/// What the banner says.
#[derive(Debug)]
struct Banner {
    text: String,
    /// `http://127.0.0.1:PORT` (the banner prints it with the API root).
    proxy: String,
    admin: String,
    issuer: String,
    platform: String,
    client_id: String,
    client_secret: String,
    username: String,
    password: String,
    ready_ms: u64,
    /// The three example command lines, in order: curl through the proxy, curl with `token` straight to the
    /// platform, the Python SDK.
    examples: Vec<String>,
}

/// The value after a banner label such as `  proxy        VALUE`.
fn field<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find_map(|line| {
            let rest = line.trim_start().strip_prefix(label)?;
            rest.starts_with(' ').then(|| rest.trim())
        })
        .unwrap_or_else(|| panic!("no `{label}` line in the banner:\n{text}"))
}

fn parse_banner(text: &str) -> Banner {
    let proxy_api = field(text, "proxy");
    let proxy = proxy_api
        .strip_suffix(API)
        .unwrap_or_else(|| panic!("the proxy line ends with the API root: {proxy_api}"))
        .to_owned();
    let admin = field(text, "admin")
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches("/readyz")
        .to_owned();
    let platform = field(text, "platform")
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    let (client_id, client_secret) = field(text, "client")
        .split_once(" / ")
        .expect("client ID / SECRET");
    let (username, password) = field(text, "user")
        .split_once(" / ")
        .expect("user NAME / PASSWORD");
    let ready_ms = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Ready in "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `Ready in N ms` in the banner:\n{text}"));
    let examples: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl ") || l.starts_with("python3 "))
        .map(str::to_owned)
        .collect();
    Banner {
        text: text.to_owned(),
        proxy,
        admin,
        issuer: field(text, "issuer").to_owned(),
        platform,
        client_id: client_id.trim().to_owned(),
        client_secret: client_secret.trim().to_owned(),
        username: username.trim().to_owned(),
        password: password.trim().to_owned(),
        ready_ms,
        examples,
    }
}

/// `seldon-auth-proxy dev` running as a child process.
struct Dev {
    child: Child,
    pid: u32,
    banner: Banner,
    stderr: Arc<Mutex<Vec<String>>>,
    started: Instant,
}

impl Dev {
    async fn start(extra: &[&str]) -> Dev {
        let started = Instant::now();
        let mut command = command(&[
            "dev",
            "--token-lifetime",
            &format!("{TOKEN_LIFETIME_S}s"),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ]);
        command.args(extra);
        let mut child = command.spawn().expect("the binary runs");
        let pid = child.id().expect("a pid");
        let (stderr, _) = collect(child.stderr.take().unwrap());
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut text = String::new();
        // The banner ends with the SDK example.
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = stdout.next_line().await {
                text.push_str(&line);
                text.push('\n');
                if line.trim_start().starts_with("python3 ") {
                    return true;
                }
            }
            false
        })
        .await;
        if read != Ok(true) {
            let _ = child.kill().await;
            panic!(
                "dev printed no complete banner ({read:?}):\n{text}\nstderr:\n{}",
                stderr.lock().unwrap().join("\n")
            );
        }
        // Anything printed later (nothing is expected) is drained so dev never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        let banner = parse_banner(&text);
        Dev {
            child,
            pid,
            banner,
            stderr,
            started,
        }
    }

    fn api(&self, path: &str) -> String {
        format!("{}{API}{path}", self.banner.proxy)
    }

    /// SIGTERM, then the exit code (within 15 s).
    async fn terminate(mut self) -> (Option<i32>, Duration) {
        let rc = send_sigterm(self.pid);
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        let sent = Instant::now();
        let status = match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => {
                let _ = self.child.kill().await;
                panic!(
                    "dev did not exit within 15s of SIGTERM; stderr:\n{}",
                    self.stderr.lock().unwrap().join("\n")
                );
            }
        };
        (status.code(), sent.elapsed())
    }
}

/// Runs a banner example with `sh -c`, with no `SELDON_AUTH_PROXY_*` or proxy variables from the test's
/// environment and `python3` meaning the Python that has the SDK.
async fn run_example(line: &str) -> (Option<i32>, String, String) {
    let python = python().await;
    let line = match line.strip_prefix("python3 ") {
        Some(rest) => format!("'{}' {rest}", python.display()),
        None => line.to_owned(),
    };
    let mut command = tokio::process::Command::new("sh");
    command.arg("-c").arg(&line);
    scrub_env(&mut command);
    let outcome = output_within(command, Duration::from_secs(60)).await;
    (outcome.code, outcome.stdout, outcome.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_on_port_zero_prints_a_banner_whose_examples_work_and_serves_seldon_deployments() {
    let dev = Dev::start(&[]).await;
    let b = &dev.banner;
    println!(
        "dev banner ({:?} after spawn):\n{}",
        dev.started.elapsed(),
        b.text
    );
    println!("dev start-to-ready as printed: {} ms", b.ready_ms);
    for url in [&b.proxy, &b.admin, &b.platform] {
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        assert!(
            !url.ends_with(":0"),
            "an ephemeral port was resolved: {url}"
        );
    }
    assert!(
        b.issuer.starts_with("http://127.0.0.1:") && b.issuer.contains("/auth/realms/"),
        "{}",
        b.issuer
    );
    assert!(
        !b.client_id.is_empty() && b.client_secret.len() >= 8,
        "{b:?}"
    );
    assert!(!b.username.is_empty() && b.password.len() >= 8, "{b:?}");
    assert_eq!(b.examples.len(), 3, "three examples: {:?}", b.examples);
    assert!(b.ready_ms < 10_000, "ready in {} ms", b.ready_ms);

    let http = client();
    let ready = http
        .get(format!("{}/readyz", b.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // The first example, run as printed: curl through the proxy with no token.
    assert!(b.examples[0].contains(&b.proxy), "{}", b.examples[0]);
    let (code, stdout, stderr) = run_example(&b.examples[0]).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("curl printed JSON");
    assert_eq!(listed["kind"], "SeldonDeploymentList", "{listed}");

    // curl-equivalent calls through the proxy: the SeldonDeployment lifecycle, /user and /version.
    let user = get_json(&http, &dev.api("/user")).await;
    assert_eq!(
        user["Id"],
        format!("service-account-{}", b.client_id),
        "{user}"
    );
    let version = http.get(dev.api("/version")).send().await.unwrap();
    assert_eq!(version.status(), 200);
    assert!(version.json::<serde_json::Value>().await.unwrap()["BuildVersion"].is_string());
    let sdeps = dev.api("/namespaces/seldon/seldondeployments");
    let sdep = json!({
        "apiVersion": "machinelearning.seldon.io/v1",
        "kind": "SeldonDeployment",
        "metadata": {"name": "iris-dev", "namespace": "seldon"},
        "spec": {"predictors": [{"name": "default", "replicas": 1,
            "graph": {"name": "classifier", "implementation": "SKLEARN_SERVER",
                      "modelUri": "gs://seldon-models/v1.19.0-dev/sklearn/iris", "children": []}}]}
    });
    let created = http.post(&sdeps).json(&sdep).send().await.unwrap();
    assert_eq!(created.status(), 200);
    let listed = get_json(&http, &sdeps).await;
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    let read = get_json(&http, &format!("{sdeps}/iris-dev")).await;
    assert_eq!(read["metadata"]["name"], "iris-dev");
    assert_eq!(read["spec"], sdep["spec"]);
    let deleted = http
        .delete(format!("{sdeps}/iris-dev"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let gone = http.get(format!("{sdeps}/iris-dev")).send().await.unwrap();
    assert_eq!(gone.status(), 404);
    assert!(
        gone.headers().get(ERROR_HEADER).is_none(),
        "the platform's 404, not the proxy's"
    );

    // The SDK example as printed (python3 = a Python with the SDK), with no token.
    let (code, stdout, stderr) = run_example(&b.examples[2]).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("service-account-{}", b.client_id)),
        "{stdout}"
    );

    // The full SDK script, with no token.
    let user = format!("service-account-{}", b.client_id);
    let (code, stdout, stderr) = run_python(
        &[&sdk_script()],
        &[("SELDON_URL", &b.proxy), ("EXPECT_USER", &user)],
    )
    .await;
    assert!(code == Some(0), "{stdout}\n{stderr}");
    assert_eq!(stdout.lines().last(), Some(SDK_FINAL_LINE));

    let (code, took) = dev.terminate().await;
    println!("dev exited with {code:?} {took:?} after SIGTERM");
    assert_eq!(code, Some(0), "dev exits 0 on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_platform_refuses_bad_tokens_while_the_proxy_keeps_working_across_lifetimes() {
    let dev = Dev::start(&[]).await;
    let b = &dev.banner;
    println!("dev start-to-ready as printed: {} ms", b.ready_ms);
    let http = client();
    let direct = format!("{}{API}/namespaces/seldon/seldondeployments", b.platform);

    // Calls through the proxy for 3.5 token lifetimes, alongside everything below.
    let load = {
        let (http, url) = (
            http.clone(),
            dev.api("/namespaces/seldon/seldondeployments"),
        );
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_millis(TOKEN_LIFETIME_S * 3500);
            let (mut calls, mut failures) = (0u64, Vec::new());
            while Instant::now() < deadline {
                calls += 1;
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failures.push(format!("{} {:?}", r.status(), r.text().await)),
                    Err(e) => failures.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (calls, failures)
        })
    };

    // No token, a garbage token.
    let none = http.get(&direct).send().await.unwrap();
    assert_eq!(none.status(), 401, "no token");
    assert!(none.headers().contains_key("www-authenticate"));
    for garbage in ["garbage", "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln"] {
        let refused = http.get(&direct).bearer_auth(garbage).send().await.unwrap();
        assert_eq!(refused.status(), 401, "token {garbage:?}");
    }

    // The banner's second example: a token from `seldon-auth-proxy token`, straight to the platform.
    let example = &b.examples[1];
    let (code, stdout, stderr) = run_example(example).await;
    assert_eq!(code, Some(0), "{example}\n{stdout}\n{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).expect("the example prints JSON");
    assert_eq!(listed["kind"], "SeldonDeploymentList", "{listed}");
    // Its inner `token` command, for a token of our own.
    let inner = example
        .split_once("$(")
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(inner, _)| inner)
        .unwrap_or_else(|| panic!("no $(...) in {example}"));
    assert!(inner.contains(" token "), "{inner}");
    let (code, token, stderr) = run_example(inner).await;
    assert_eq!(code, Some(0), "{inner}\n{stderr}");
    assert_eq!(token.lines().count(), 1, "{token:?}");
    let token = token.trim_end().to_owned();
    let claims = jwt_claims(&token).expect("a JWT");
    let exp = claims["exp"].as_f64().expect("exp");
    assert_eq!(claims["iss"], b.issuer.as_str());
    let fresh = http.get(&direct).bearer_auth(&token).send().await.unwrap();
    assert_eq!(fresh.status(), 200, "a fresh token is accepted");

    // The same token once expired (exp is whole seconds; zero leeway means refused from exp + 1).
    let wait = (exp + 1.2 - unix_now_f()).max(0.0);
    assert!(
        wait <= TOKEN_LIFETIME_S as f64 + 1.5,
        "the token lives {TOKEN_LIFETIME_S}s: wait {wait}s"
    );
    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    let expired = http.get(&direct).bearer_auth(&token).send().await.unwrap();
    assert_eq!(expired.status(), 401, "an expired token is refused");
    let challenge = expired.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(challenge.contains("invalid_token"), "{challenge}");
    assert!(expired.text().await.unwrap().contains("expired"));

    let (calls, failures) = load.await.unwrap();
    let metrics = get_text(&http, &format!("{}/metrics", b.admin)).await;
    let token_requests = metric(
        &metrics,
        "seldon_auth_proxy_token_requests_total{grant=\"client_credentials\",outcome=\"success\"}",
    )
    .expect("the token request counter") as u64;
    println!(
        "dev, {}s tokens, {:.1}s of calls through the proxy: {calls} calls, {} failed, {token_requests} token requests",
        TOKEN_LIFETIME_S,
        TOKEN_LIFETIME_S as f64 * 3.5,
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {calls} calls failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(calls > 100, "{calls} calls");
    assert!(
        token_requests >= 4,
        "the proxy refreshed across 3+ lifetimes: {token_requests} token requests"
    );
    assert!(
        metrics.contains("seldon_auth_proxy_upstream_unauthorized_total 0\n"),
        "the proxy never sent a token the platform refused:\n{metrics}"
    );

    let (code, took) = dev.terminate().await;
    println!("dev exited with {code:?} {took:?} after SIGTERM");
    assert_eq!(code, Some(0), "dev exits 0 on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_with_the_password_grant_lends_the_printed_user() {
    let dev = Dev::start(&["--auth-method", "password_grant"]).await;
    let b = &dev.banner;
    assert!(b.text.contains("auth_method  password_grant"), "{}", b.text);
    let user = get_json(&client(), &dev.api("/user")).await;
    assert_eq!(user["Id"], b.username.as_str(), "the banner's user: {user}");
    let (code, _) = dev.terminate().await;
    assert_eq!(code, Some(0));
}
