//! Issue 2, end to end with the real Python `seldon-deploy-sdk==2.4.0` given no token: through the proxy to the
//! JWT-checking platform stand-in (list, create, read, delete SeldonDeployments, read_user, read_version), with
//! credentials from the real test IdP; and what the SDK sends on its own (an empty bearer) is replaced.

mod common;

use common::deps::python;
use common::echo::EchoUpstream;
use common::idp::TestIdp;
use common::platform::platform_for;
use common::proxy::{idp_options, settings, Proxy, SERVICE_ACCOUNT};
use common::sdk::{run_python, sdk_script, SDK_FINAL_LINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_without_a_token_manages_seldon_deployments_through_the_proxy() {
    let python = python().await;
    println!("python: {}", python.display());
    let idp = TestIdp::start(idp_options(60)).await;
    let platform = platform_for(&idp).await;
    let proxy = Proxy::start(settings(&platform.url, &idp)).await;

    let started = std::time::Instant::now();
    let (code, stdout, stderr) = run_python(
        &[&sdk_script()],
        &[
            ("SELDON_URL", proxy.url()),
            ("EXPECT_USER", SERVICE_ACCOUNT),
        ],
    )
    .await;
    println!("SDK script took {:?}:\n{stdout}", started.elapsed());
    assert_eq!(code, Some(0), "the SDK script failed:\n{stdout}\n{stderr}");
    assert_eq!(
        stdout.lines().last(),
        Some(SDK_FINAL_LINE),
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
        run_python(&["-c", read_version], &[("SELDON_URL", proxy.url())]).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");

    let seen = echo.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].headers_named("authorization"),
        vec!["Bearer".to_owned()],
        "the SDK without a token sends an empty bearer (hyper trims the trailing space)"
    );
    let claims = seen[1].bearer_claims();
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
