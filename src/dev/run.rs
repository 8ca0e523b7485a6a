//! `seldon-auth-proxy dev` (a development aid): starts the embedded IdP and platform
//! stand-in on loopback and the real proxy against them, configured exactly as a user would
//! configure it against Keycloak and the platform, then prints a banner with examples.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::config::{AuthMethod, Config, DevArgs, ListenAddr, Settings};
use crate::dev::{idp, platform};

async fn loopback_listener(
    addr: Option<SocketAddr>,
    what: &str,
) -> anyhow::Result<tokio::net::TcpListener> {
    let addr = addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    if !addr.ip().is_loopback() {
        anyhow::bail!(
            "{what}: {addr} is not a loopback address; the dev servers only listen on loopback"
        );
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("{what}: cannot bind {addr}: {e}"))
}

/// Runs `dev` until SIGTERM or Ctrl-C.
pub async fn run(args: DevArgs, settings: Settings) -> ExitCode {
    match run_inner(args, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("seldon-auth-proxy dev: {e:#}");
            ExitCode::from(crate::cli::EXIT_CONFIG)
        }
    }
}

async fn run_inner(args: DevArgs, settings: Settings) -> anyhow::Result<()> {
    let started = Instant::now();
    let signals = crate::cli::Signals::install()?;
    let method = settings
        .auth_method
        .unwrap_or(AuthMethod::ClientCredentials);
    if !matches!(
        method,
        AuthMethod::ClientCredentials | AuthMethod::PasswordGrant
    ) {
        anyhow::bail!("auth_method: dev supports client_credentials and password_grant");
    }
    let options = idp::DevIdpOptions {
        token_lifetime: args.token_lifetime,
        ..idp::DevIdpOptions::default()
    };
    let idp = idp::start(
        loopback_listener(args.idp_listen, "idp_listen").await?,
        options,
    )
    .await?;
    let platform = platform::start(
        loopback_listener(args.platform_listen, "platform_listen").await?,
        platform::PlatformOptions {
            jwks_url: idp.jwks_uri(),
            issuer: Some(idp.issuer.clone()),
        },
    )
    .await?;

    let opts = idp.options();
    let embedded = Settings {
        upstream: Some(platform.url.clone()),
        oidc_server: Some(idp.issuer.clone()),
        client_id: Some(opts.client_id.clone()),
        client_secret: Some(opts.client_secret.clone()),
        username: (method == AuthMethod::PasswordGrant).then(|| opts.username.clone()),
        password: (method == AuthMethod::PasswordGrant).then(|| opts.password.clone()),
        auth_method: Some(method),
        ..Settings::default()
    };
    // The embedded pieces decide where the proxy goes and how it logs in; the user's
    // settings decide everything else (listeners, limits, logging).
    let settings = Settings {
        upstream: None,
        oidc_server: None,
        token_endpoint: None,
        client_id: None,
        client_secret: None,
        client_secret_file: None,
        username: None,
        password: None,
        password_file: None,
        ..settings
    };
    let config = Config::from_settings(settings.over(embedded))?;
    let running = crate::start(config).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !running.manager.is_ready().await {
        if Instant::now() > deadline {
            anyhow::bail!("the proxy obtained no credential from the embedded IdP within 10s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready_ms = started.elapsed().as_millis();
    println!(
        "{}",
        banner(
            &running,
            &idp,
            &platform,
            method,
            args.token_lifetime,
            ready_ms
        )
    );
    signals.wait().await;
    running.shutdown();
    running.wait().await;
    platform.shutdown().await;
    idp.shutdown().await;
    Ok(())
}

fn banner(
    running: &crate::Running,
    idp: &idp::DevIdp,
    platform: &platform::DevPlatform,
    method: AuthMethod,
    lifetime: Duration,
    ready_ms: u128,
) -> String {
    let proxy = match &running.proxy_addr {
        ListenAddr::Tcp(addr) => format!("http://{addr}"),
        ListenAddr::Unix(path) => format!("unix:{}", path.display()),
    };
    let opts = idp.options();
    let api = crate::config::DEFAULT_PATH_PREFIX;
    let curl_proxy = match &running.proxy_addr {
        ListenAddr::Tcp(_) => format!("curl -s {proxy}{api}/namespaces/seldon/seldondeployments"),
        ListenAddr::Unix(path) => format!(
            "curl -s --unix-socket {} http://localhost{api}/namespaces/seldon/seldondeployments",
            path.display()
        ),
    };
    let method_name = match method {
        AuthMethod::PasswordGrant => "password_grant",
        _ => "client_credentials",
    };
    format!(
        r#"seldon-auth-proxy dev: a development aid. An embedded OpenID provider and a stand-in
for the platform API run on loopback; the proxy in front of them is the real one.
Ready in {ready_ms} ms. Stop with Ctrl-C.

  proxy        {proxy}{api}
  admin        http://{admin}/readyz  /metrics  /healthz
  issuer       {issuer}
  platform     {platform_url}   (refuses calls without a valid token)
  client       {client_id} / {client_secret}
  user         {username} / {password}
  auth_method  {method_name}, tokens live {lifetime}

Call the platform through the proxy, with no token:
  {curl_proxy}

The same call straight to the platform, with a token from `seldon-auth-proxy token`:
  curl -s -H "Authorization: Bearer $(SELDON_AUTH_PROXY_CLIENT_SECRET='{client_secret}' {exe} token --upstream {platform_url} --oidc-server {issuer} --client-id {client_id})" {platform_url}{api}/namespaces/seldon/seldondeployments

The Python SDK (pip install seldon-deploy-sdk), with no token at all:
  python3 -c 'import seldon_deploy_sdk as s; c = s.Configuration(); c.host = "{proxy}{api}"; print(s.EnvironmentApi(s.ApiClient(c)).read_user())'
"#,
        admin = running.admin_addr,
        issuer = idp.issuer,
        platform_url = platform.url,
        client_id = opts.client_id,
        client_secret = opts.client_secret,
        username = opts.username,
        password = opts.password,
        lifetime = humantime::format_duration(lifetime),
        exe = std::env::current_exe()
            .ok()
            .and_then(|p| p.to_str().map(str::to_owned))
            .filter(|p| !p.contains(char::is_whitespace))
            .unwrap_or_else(|| "seldon-auth-proxy".into()),
    )
}
