//! seldon-auth-proxy: a local sidecar that obtains, caches and refreshes OIDC credentials and
//! forwards calls to the Seldon Enterprise Platform API with them. [`start`] runs the whole
//! proxy on the listeners a [`config::Config`] names (port 0 works), for `main` and tests.

pub mod access_log;
pub mod admin;
pub mod body;
pub mod caller_fields;
pub mod caller_http1;
pub mod caller_stall;
pub mod cli;
pub mod config;
pub mod credential;
pub mod dev;
pub mod error;
pub mod guard;
pub mod lazy_deadline;
pub mod logging;
pub mod login;
pub mod metrics;
pub mod outbound;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod spread;
pub mod upstream_http1;
pub mod upstream_pool;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::admin::AdminState;
use crate::config::{Config, ListenAddr};
use crate::credential::manager::Shutdown;
use crate::credential::source::Source;
use crate::credential::CredentialManager;
use crate::guard::Guard;
use crate::metrics::Metrics;
use crate::proxy::{Forwarder, Shared, Upstream};
use crate::secret::read_secret_file;

/// A running proxy: its bound addresses and the handles to stop it.
pub struct Running {
    pub proxy_addr: ListenAddr,
    pub admin_addr: SocketAddr,
    pub manager: Arc<CredentialManager>,
    pub metrics: Arc<Metrics>,
    stop: Shutdown,
    finished: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Starts the shutdown sequence: /readyz turns 503, the listener closes after
    /// `shutdown_delay`, in-flight requests get `shutdown_grace` to finish.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }

    /// Waits until the shutdown sequence has finished.
    pub async fn wait(self) {
        let _ = self.finished.await;
    }

    /// The proxy's base URL for a TCP listener.
    pub fn proxy_url(&self) -> Option<String> {
        match &self.proxy_addr {
            ListenAddr::Tcp(addr) => Some(format!("http://{addr}")),
            ListenAddr::Unix(_) => None,
        }
    }
}

/// Builds the credential manager for a configuration (also used by `check` and `token`).
pub fn credential_manager(
    config: &Config,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Arc<CredentialManager>> {
    let idp = outbound::idp_client(&config.tls, config.auth.idp_timeout)?;
    let source = Source::from_config(config, idp)?;
    Ok(CredentialManager::new(source, metrics))
}

/// Starts the proxy inside the current Tokio runtime (which runs the credential refresh and
/// the admin listener); the proxy listener runs on its own worker threads.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    let metrics = Arc::new(Metrics::default());
    let manager = credential_manager(&config, metrics.clone())?;
    let inbound_token = match &config.inbound_token_file {
        Some(path) => {
            let token = read_secret_file(path).map_err(|e| {
                anyhow::anyhow!("inbound_token_file: cannot read {}: {e}", path.display())
            })?;
            if token.expose().trim().len() < 16 {
                anyhow::bail!(
                    "inbound_token_file: {} must hold a secret of at least 16 characters",
                    path.display()
                );
            }
            Some(crate::secret::Secret::new(token.expose().trim()))
        }
        None => None,
    };
    let shared = Arc::new(Shared {
        manager: manager.clone(),
        metrics: metrics.clone(),
        guard: Guard {
            allowed_prefixes: config.allowed_path_prefixes.clone(),
            allowed_hosts: config.allowed_hosts.clone(),
            allowed_origins: config.allowed_origins.clone(),
            inbound_token,
        },
        upstream: Upstream::new(&config.upstream)?,
        upstream_timeout: config.limits.upstream_timeout,
        access_log: config.access_log && access_log::is_active(),
        session_cookie: (config.auth.method == config::AuthMethod::Session)
            .then(|| config.auth.session_cookie_name.clone()),
    });
    let connector = outbound::upstream_connector(
        &config.tls,
        config.limits.upstream_connect_timeout,
        &config.upstream,
    )?;
    let (listeners, proxy_addr) = server::bind(&config.listen, config.workers)?;
    let admin_listener = server::bind_admin(config.admin_listen)?;
    let admin_addr = admin_listener.local_addr()?;

    let background = Shutdown::new();
    manager.spawn_background(background.clone());
    spawn_memory_trim(background.clone());

    let stop_accepting = Shutdown::new();
    let pool_limits = upstream_pool::Limits {
        max_idle: config.upstream_max_idle,
        max_in_flight: config
            .upstream_max_connections
            .div_ceil(listeners.workers())
            .max(1),
        body_stall: config.limits.idle_timeout,
    };
    let workers = server::spawn_workers(
        listeners,
        || Forwarder::new(shared.clone(), connector.clone(), pool_limits),
        server::WorkerSettings {
            limits: config.limits.clone(),
            max_connections: config.limits.max_connections,
            grace: config.shutdown_grace,
        },
        stop_accepting.clone(),
    )?;

    let admin_state = Arc::new(AdminState {
        manager: manager.clone(),
        metrics: metrics.clone(),
        connections: workers.shares.clone(),
        draining: false.into(),
        insecure_skip_verify: config.tls.insecure_skip_verify,
    });
    let admin_stop = Shutdown::new();
    let admin_task = {
        let stop = admin_stop.clone();
        let app = admin::router(admin_state.clone());
        tokio::spawn(async move {
            let served = axum::serve(admin_listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!("admin listener failed: {e}");
            }
        })
    };

    let stop = Shutdown::new();
    let finished = {
        let stop = stop.clone();
        let delay = config.shutdown_delay;
        tokio::spawn(async move {
            stop.cancelled().await;
            admin_state.draining.store(true, Ordering::SeqCst);
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                "shutting down: readiness is off; closing the listener after the delay"
            );
            tokio::time::sleep(delay).await;
            stop_accepting.cancel();
            for done in workers.done {
                let _ = done.await;
            }
            // Every worker's last lines, also those of one that ended abnormally.
            access_log::flush();
            background.cancel();
            admin_stop.cancel();
            let _ = admin_task.await;
            tracing::info!("shutdown complete");
        })
    };
    tracing::info!(
        proxy = %describe_listen(&proxy_addr),
        admin = %admin_addr,
        upstream = %config.upstream,
        auth_method = %config.auth.method,
        workers = config.workers,
        "seldon-auth-proxy listening"
    );
    Ok(Running {
        proxy_addr,
        admin_addr,
        manager,
        metrics,
        stop,
        finished,
    })
}

/// After a burst of connections glibc keeps the freed heap; handing it back every few
/// seconds lets the sidecar shrink to its idle size again (its memory limit is sized on that).
fn spawn_memory_trim(shutdown: Shutdown) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // SAFETY: malloc_trim only returns free heap pages to the kernel.
                    unsafe { libc::malloc_trim(0) };
                }
                _ = shutdown.cancelled() => return,
            }
        }
    });
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = shutdown;
}

/// A listen address as a person would write it.
pub fn describe_listen(addr: &ListenAddr) -> String {
    match addr {
        ListenAddr::Tcp(addr) => addr.to_string(),
        ListenAddr::Unix(path) => format!("unix:{}", path.display()),
    }
}
