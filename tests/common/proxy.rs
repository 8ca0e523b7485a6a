//! The proxy under test in-process (`seldon_auth_proxy::start` on port-0 listeners): the test client's names, the
//! settings and secret files the tests start it with, a handle that calls it, waits for /readyz and stops it (also
//! on drop), and readers of what it answers (metrics, error kind).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use seldon_auth_proxy::config::{Config, ListenAddr, Settings};
use seldon_auth_proxy::Running;

use super::http::client;
use super::idp::{IdpOptions, TestIdp};

/// The confidential client every test IdP knows.
pub const CLIENT_ID: &str = "sdk";
pub const CLIENT_SECRET: &str = "s3cret";
/// The user for password_grant.
pub const USERNAME: &str = "alice";
pub const PASSWORD: &str = "pw";
/// The platform API root the proxy forwards by default.
pub const API: &str = "/seldon-deploy/api/v1alpha1";
/// The subject of client_credentials tokens for [`CLIENT_ID`].
pub const SERVICE_ACCOUNT: &str = "service-account-sdk";
/// The header that marks answers the proxy made itself.
pub const ERROR_HEADER: &str = "x-seldon-auth-proxy-error";

/// An IdP with the test client and user, issuing tokens that live `lifetime` seconds.
pub fn idp_options(lifetime: u64) -> IdpOptions {
    IdpOptions::default()
        .client(CLIENT_ID, CLIENT_SECRET)
        .user(USERNAME, PASSWORD)
        .token_lifetime(lifetime)
}

/// Forwarding to `upstream` on ephemeral loopback ports, one worker, a 50 ms shutdown delay and a 5 s grace; the
/// credential settings are the caller's.
pub fn loopback(upstream: &str) -> Settings {
    Settings {
        upstream: Some(upstream.to_owned()),
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        workers: Some(1),
        shutdown_delay: Some(Duration::from_millis(50)),
        shutdown_grace: Some(Duration::from_secs(5)),
        ..Settings::default()
    }
}

/// client_credentials of the test client against `idp`, forwarding to `upstream`, on two workers with
/// [`loopback`]'s shutdown timings.
pub fn settings(upstream: &str, idp: &TestIdp) -> Settings {
    Settings {
        oidc_server: Some(idp.issuer.clone()),
        client_id: Some(CLIENT_ID.into()),
        client_secret: Some(CLIENT_SECRET.into()),
        workers: Some(2),
        ..loopback(upstream)
    }
}

/// client_credentials of `client_id`/`secret` against `issuer` on [`loopback`] ports, one worker, no shutdown
/// delay, a 2 s grace and a 5 s IdP timeout (the resilience and security figures assume these).
pub fn client_credentials(upstream: &str, issuer: &str, client_id: &str, secret: &str) -> Settings {
    Settings {
        oidc_server: Some(issuer.to_owned()),
        client_id: Some(client_id.to_owned()),
        client_secret: Some(secret.to_owned()),
        shutdown_delay: Some(Duration::ZERO),
        shutdown_grace: Some(Duration::from_secs(2)),
        idp_timeout: Some(Duration::from_secs(5)),
        ..loopback(upstream)
    }
}

/// [`client_credentials`] of the test client against `idp`.
pub fn for_idp(upstream: &str, idp: &TestIdp) -> Settings {
    client_credentials(upstream, &idp.issuer, CLIENT_ID, CLIENT_SECRET)
}

/// Logs of in-process proxies go to the test's stderr when SELDON_AUTH_PROXY_TEST_LOG names a filter.
pub fn init_test_logging() {
    if let Ok(filter) = std::env::var("SELDON_AUTH_PROXY_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// A proxy running in this process. Shut down by [`Proxy::stop`], or (without waiting) when dropped.
pub struct Proxy {
    running: Option<Running>,
    /// `http://127.0.0.1:PORT` (None for a Unix socket listener).
    url: Option<String>,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin: String,
    /// A [`client`] for calling it.
    pub http: reqwest::Client,
}

impl Proxy {
    pub async fn start(settings: Settings) -> Proxy {
        init_test_logging();
        let config = Config::from_settings(settings).expect("a valid test configuration");
        Self::start_config(config).await
    }

    async fn start_config(config: Config) -> Proxy {
        let running = seldon_auth_proxy::start(config)
            .await
            .expect("the proxy starts");
        Proxy {
            url: running.proxy_url(),
            admin: format!("http://{}", running.admin_addr),
            running: Some(running),
            http: client(),
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> &str {
        self.url.as_deref().expect("a TCP listener")
    }

    pub fn proxy_addr(&self) -> std::net::SocketAddr {
        match &self.running().proxy_addr {
            ListenAddr::Tcp(addr) => *addr,
            ListenAddr::Unix(path) => panic!("the proxy listens on {}", path.display()),
        }
    }

    /// `url` + the API root + `path`.
    pub fn api(&self, path: &str) -> String {
        format!("{}{API}{path}", self.url())
    }

    /// GET the API root + `path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.api(path))
            .send()
            .await
            .expect("the proxy answers")
    }

    /// GET /readyz: (status, body).
    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        readyz(&self.http, &self.admin).await
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .expect("admin answers")
            .text()
            .await
            .unwrap()
    }

    /// Waits until /readyz answers 200; returns how long that took, or None after `limit`.
    #[must_use]
    pub async fn wait_ready(&self, limit: Duration) -> Option<Duration> {
        ready_within(&self.http, &self.admin, limit).await
    }

    /// Runs the shutdown sequence to its end (at most 30 s).
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown();
            tokio::time::timeout(Duration::from_secs(30), running.wait())
                .await
                .expect("the proxy shuts down within 30s");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            running.shutdown();
        }
    }
}

/// GET `admin`/readyz: (status, body).
pub async fn readyz(http: &reqwest::Client, admin: &str) -> (u16, serde_json::Value) {
    let response = http
        .get(format!("{admin}/readyz"))
        .send()
        .await
        .expect("admin answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// Polls `admin`/readyz every 50 ms until it answers 200; returns how long that took, or None after `limit`.
#[must_use]
pub async fn ready_within(
    http: &reqwest::Client,
    admin: &str,
    limit: Duration,
) -> Option<Duration> {
    let started = std::time::Instant::now();
    let url = format!("{admin}/readyz");
    while started.elapsed() < limit {
        if http.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Reads `name` from a Prometheus text exposition (the first sample whose name and labels match exactly).
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name_and_labels).then(|| value.parse().ok())?
    })
}

/// The value of the proxy's [`ERROR_HEADER`], if any.
pub fn error_kind(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get(ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Writes `contents` to `dir/name` with permissions `mode` (0o600 for a secret file the proxy takes without a
/// warning) and returns its path.
pub fn secret_file(dir: &Path, name: &str, contents: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write a secret file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .expect("chmod a secret file");
    path
}

/// A loopback port nothing listens on right now (bound and released).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    listener.local_addr().expect("its address").port()
}

/// A free loopback port for a server a test stops and starts again on the same port. It is
/// picked at random below the kernel's ephemeral range, which is never handed to a `bind(0)` or
/// to the local end of an outgoing connection, so no other test takes it while the server is
/// down (an ephemeral port can be, by any of the connections the other tests open meanwhile).
pub fn restartable_port() -> u16 {
    use rand::Rng;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_low <= 12_000 {
        return free_port();
    }
    let mut random = rand::thread_rng();
    for _ in 0..200 {
        let port = random.gen_range(10_000..ephemeral_low);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port()
}
