//! Issue 2, end to end with the real Python `seldon-deploy-sdk==2.4.0` given no token: through the proxy to the
//! JWT-checking platform stand-in (list, create, read, delete SeldonDeployments, read_user, read_version), with
//! credentials from the real test IdP; and what the SDK sends on its own (an empty bearer) is replaced.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::echo::EchoUpstream;
use common::idp::TestIdp;
use common::proxy::{idp_options, jwt_claims, settings, Proxy, SERVICE_ACCOUNT};
use seldon_auth_proxy::dev::platform::{self, PlatformOptions};

const FINAL_LINE: &str = "SDK through proxy: all checks passed";

async fn python() -> PathBuf {
    tokio::task::spawn_blocking(common::deps::python_with_sdk)
        .await
        .expect("a Python with seldon-deploy-sdk")
}

/// Runs Python with `args`, no proxy variables, and `env`; returns (exit code, stdout, stderr).
async fn run_python(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = tokio::process::Command::new(python().await);
    command
        .args(args)
        .envs(env.iter().copied())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for var in [
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ] {
        command.env_remove(var);
    }
    let child = command.spawn().expect("python runs");
    let output = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("python finishes within 120s")
        .expect("python's output");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn script() -> String {
    common::deps::repo_root()
        .join("tests/python/sdk_through_proxy.py")
        .to_string_lossy()
        .into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_without_a_token_manages_seldon_deployments_through_the_proxy() {
    let python = python().await;
    println!("python: {}", python.display());
    let idp = TestIdp::start(idp_options(60)).await;
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
    let proxy = Proxy::start(settings(&platform.url, &idp)).await;

    let started = std::time::Instant::now();
    let (code, stdout, stderr) = run_python(
        &[&script()],
        &[
            ("SELDON_URL", proxy.url.as_str()),
            ("EXPECT_USER", SERVICE_ACCOUNT),
        ],
    )
    .await;
    println!("SDK script took {:?}:\n{stdout}", started.elapsed());
    assert_eq!(code, Some(0), "the SDK script failed:\n{stdout}\n{stderr}");
    assert_eq!(
        stdout.lines().last(),
        Some(FINAL_LINE),
        "{stdout}\n{stderr}"
    );

    let seen = platform.requests_seen();
    let calls: Vec<(String, String, u16)> = seen
        .iter()
        .map(|r| {
            let path = r.path_and_query.split('?').next().unwrap_or_default();
            (r.method.clone(), path.to_owned(), r.status)
        })
        .collect();
    let sdeps = "/seldon-deploy/api/v1alpha1/namespaces/seldon/seldondeployments";
    let name = calls
        .iter()
        .find(|(m, _, _)| m == "DELETE")
        .and_then(|(_, p, _)| p.rsplit('/').next())
        .expect("a DELETE")
        .to_owned();
    let one = format!("{sdeps}/{name}");
    let expected: Vec<(String, String, u16)> = [
        ("GET", "/seldon-deploy/api/v1alpha1/user", 200),
        ("GET", "/seldon-deploy/api/v1alpha1/version", 200),
        ("GET", sdeps, 200),
        ("POST", sdeps, 200),
        ("GET", sdeps, 200),
        ("GET", one.as_str(), 200),
        ("DELETE", one.as_str(), 200),
        ("GET", one.as_str(), 404),
    ]
    .iter()
    .map(|(m, p, s)| (m.to_string(), p.to_string(), *s))
    .collect();
    assert_eq!(calls, expected, "the calls the platform saw");
    for request in &seen {
        assert!(request.has_authorization, "{request:?}");
        assert_eq!(
            request.subject.as_deref(),
            Some(SERVICE_ACCOUNT),
            "every call carried a token the platform verified: {request:?}"
        );
    }
    assert_eq!(platform.rejected_count(), 0);
    let create = seen.iter().find(|r| r.method == "POST").unwrap();
    assert!(
        create.path_and_query.contains("action=create")
            && create.path_and_query.contains("message=smoke"),
        "query parameters reach the platform: {}",
        create.path_and_query
    );

    proxy.stop().await;
    platform.shutdown().await;
    idp.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_empty_bearer_is_replaced_by_the_idps_token() {
    let idp = TestIdp::start(idp_options(60)).await;
    let echo = EchoUpstream::start().await;
    let proxy = Proxy::start(settings(&echo.url, &idp)).await;
    let read_version = "import os, seldon_deploy_sdk as s\n\
        c = s.Configuration(); c.host = os.environ['SELDON_URL'] + '/seldon-deploy/api/v1alpha1'\n\
        s.EnvironmentApi(s.ApiClient(c)).read_version()\nprint('called')";

    // Straight to the echo upstream: what the SDK itself sends without a token.
    let (code, stdout, stderr) =
        run_python(&["-c", read_version], &[("SELDON_URL", echo.url.as_str())]).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    // Through the proxy.
    let (code, stdout, stderr) =
        run_python(&["-c", read_version], &[("SELDON_URL", proxy.url.as_str())]).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");

    let seen = echo.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].headers_named("authorization"),
        vec!["Bearer".to_owned()],
        "the SDK without a token sends an empty bearer (hyper trims the trailing space)"
    );
    let through_proxy = seen[1].headers_named("authorization");
    assert_eq!(through_proxy.len(), 1, "{through_proxy:?}");
    let token = through_proxy[0]
        .strip_prefix("Bearer ")
        .expect("a bearer token");
    let claims = jwt_claims(token).expect("a JWT");
    assert_eq!(claims["iss"], idp.issuer.as_str());
    assert_eq!(claims["sub"], SERVICE_ACCOUNT);
    assert!(
        seen[1]
            .header("user-agent")
            .is_some_and(|ua| ua.contains("Swagger") || ua.contains("python")),
        "the SDK's own headers pass through: {:#?}",
        seen[1].header_lines()
    );

    proxy.stop().await;
    echo.stop().await;
    idp.stop().await;
}
