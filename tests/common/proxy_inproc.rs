//! Runs the proxy in-process with `seldon_auth_proxy::start` (port-0 listeners) for resilience and security tests,
//! with a reqwest client that talks to it and to its admin listener.
#![allow(dead_code)]

use std::time::Duration;

use seldon_auth_proxy::config::{Config, ListenAddr, Settings};
use seldon_auth_proxy::Running;

use super::idp::TestIdp;

/// The API prefix the proxy forwards.
pub const API: &str = "/seldon-deploy/api/v1alpha1";

/// Settings for a client_credentials proxy on ephemeral loopback ports, one worker, quick shutdown.
pub fn client_credentials(upstream: &str, issuer: &str, client_id: &str, secret: &str) -> Settings {
    Settings {
        upstream: Some(upstream.to_owned()),
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        oidc_server: Some(issuer.to_owned()),
        client_id: Some(client_id.to_owned()),
        client_secret: Some(secret.to_owned()),
        workers: Some(1),
        shutdown_delay: Some(Duration::ZERO),
        shutdown_grace: Some(Duration::from_secs(2)),
        idp_timeout: Some(Duration::from_secs(5)),
        ..Settings::default()
    }
}

/// Settings for the default client `sdk` / `s3cret` of a [`TestIdp`].
pub fn for_idp(upstream: &str, idp: &TestIdp) -> Settings {
    client_credentials(upstream, &idp.issuer, "sdk", "s3cret")
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

/// A proxy running in this process. Shut down by [`TestProxy::stop`], or (without waiting) when dropped.
pub struct TestProxy {
    running: Option<Running>,
    /// `http://127.0.0.1:PORT` (None for a Unix socket listener).
    pub url: Option<String>,
    pub admin: String,
    pub http: reqwest::Client,
}

impl TestProxy {
    pub async fn start(settings: Settings) -> TestProxy {
        init_test_logging();
        let config = Config::from_settings(settings).expect("valid settings");
        Self::start_config(config).await
    }

    pub async fn start_config(config: Config) -> TestProxy {
        let running = seldon_auth_proxy::start(config)
            .await
            .expect("the proxy starts");
        let url = running.proxy_url();
        let admin = format!("http://{}", running.admin_addr);
        TestProxy {
            running: Some(running),
            url,
            admin,
            http: client(),
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    pub fn proxy_addr(&self) -> std::net::SocketAddr {
        match &self.running().proxy_addr {
            ListenAddr::Tcp(addr) => *addr,
            ListenAddr::Unix(path) => panic!("the proxy listens on {}", path.display()),
        }
    }

    /// `url` + API prefix + `path`.
    pub fn api(&self, path: &str) -> String {
        format!(
            "{}{API}{path}",
            self.url.as_deref().expect("a TCP listener")
        )
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(self.api(path))
            .send()
            .await
            .expect("the proxy answers")
    }

    /// GET /readyz: (status, body).
    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        let response = self
            .http
            .get(format!("{}/readyz", self.admin))
            .send()
            .await
            .expect("admin answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
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
    pub async fn wait_ready(&self, limit: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if self.readyz().await.0 == 200 {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), running.wait()).await;
        }
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            running.shutdown();
        }
    }
}

/// A client for tests: no proxy from the environment, no redirects followed, a 30 s cap per request.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// Reads `name` from a Prometheus text exposition (the first sample whose name and labels match exactly).
pub fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (key, value) = l.rsplit_once(' ')?;
        (key == name_and_labels).then(|| value.parse().ok())?
    })
}

/// The value of the proxy's `x-seldon-auth-proxy-error` header, if any.
pub fn error_kind(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("x-seldon-auth-proxy-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A port nothing listens on right now (bound and released).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
