//! Outbound HTTP: the IdP client and the upstream connector, with the same TLS trust (extra CA
//! bundle, or none), the same proxy policy from `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (loopback
//! always direct), no redirects.

use std::time::Duration;

use crate::config::TlsConfig;

/// Builds the client used for discovery, token and login calls.
pub fn idp_client(tls: &TlsConfig, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("seldon-auth-proxy/", env!("CARGO_PKG_VERSION")))
        .use_rustls_tls()
        .no_proxy();
    let policy = ProxyPolicy::from_env();
    if policy.is_configured() {
        // The same proxy credentials for every IdP call (http proxies take Basic auth).
        let auth = policy.probe("https").and_then(|i| i.basic_auth().cloned());
        let mut proxy = reqwest::Proxy::custom(move |url| {
            let intercept = policy.proxy_for(&url.as_str().parse().ok()?)?;
            url::Url::parse(&intercept.uri().to_string()).ok()
        });
        if let Some(auth) = auth {
            proxy = proxy.custom_http_auth(auth);
        }
        builder = builder.proxy(proxy);
    }
    if let Some(path) = &tls.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("ca_file: cannot read {}: {e}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| anyhow::anyhow!("ca_file: {} is not a PEM bundle: {e}", path.display()))?;
        if certs.is_empty() {
            anyhow::bail!("ca_file: {} holds no certificate", path.display());
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if tls.insecure_skip_verify {
        builder = builder.danger_accept_invalid_certs(true);
    }
    Ok(builder.build()?)
}

/// Whether an error means a pooled connection turned out to be closed (reset, or closed
/// before any answer): a fresh connection may well succeed.
pub fn is_stale_connection(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if let Some(hyper_error) = e.downcast_ref::<hyper::Error>() {
            if hyper_error.is_incomplete_message() || hyper_error.is_canceled() {
                return true;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            ) {
                return true;
            }
        }
        cause = e.source();
    }
    false
}

/// Describes a client error without its URL (which may carry a query worth hiding) and
/// with the causes that say what actually went wrong.
pub fn describe(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_decode() {
        "unreadable response"
    } else {
        "request failed"
    };
    let mut text = kind.to_owned();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Which outbound proxy, if any, a destination goes through: the environment's proxy
/// variables, read the way curl reads them, except that loopback is always reached directly.
#[derive(Clone)]
pub struct ProxyPolicy(std::sync::Arc<hyper_util::client::proxy::matcher::Matcher>);

impl ProxyPolicy {
    pub fn from_env() -> ProxyPolicy {
        ProxyPolicy(std::sync::Arc::new(
            hyper_util::client::proxy::matcher::Matcher::from_env(),
        ))
    }

    /// The proxy a remote destination of this scheme would use.
    fn probe(&self, scheme: &str) -> Option<hyper_util::client::proxy::matcher::Intercept> {
        let uri = format!("{scheme}://seldon-auth-proxy.invalid/")
            .parse()
            .ok()?;
        self.0.intercept(&uri)
    }

    fn is_configured(&self) -> bool {
        self.probe("http").is_some() || self.probe("https").is_some()
    }

    /// The proxy for `uri` (its address and credentials), or `None` to connect directly.
    pub fn proxy_for(
        &self,
        uri: &http::Uri,
    ) -> Option<hyper_util::client::proxy::matcher::Intercept> {
        let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback {
            return None;
        }
        self.0.intercept(uri)
    }
}

type HttpConnector = hyper_util::client::legacy::connect::HttpConnector;
type Tunnel = hyper_util::client::legacy::connect::proxy::Tunnel<HttpConnector>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;
type TcpIo = hyper_util::rt::TokioIo<tokio::net::TcpStream>;

/// TCP to the upstream: direct, or through an HTTP CONNECT tunnel when a proxy applies.
#[derive(Clone)]
pub enum UpstreamTcp {
    Direct(HttpConnector),
    Tunnel(Tunnel),
}

impl tower::Service<http::Uri> for UpstreamTcp {
    type Response = TcpIo;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<TcpIo, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        match self {
            UpstreamTcp::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            UpstreamTcp::Tunnel(c) => c.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: http::Uri) -> Self::Future {
        match self {
            UpstreamTcp::Direct(c) => {
                let connecting = c.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
            UpstreamTcp::Tunnel(c) => {
                let connecting = c.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
        }
    }
}

/// The connector for the upstream: TLS with the system roots, the bundled web roots and the
/// configured CA bundle (or no verification when asked), an optional client certificate,
/// plain http, a connect timeout, no Nagle delay, and the proxy policy (a CONNECT tunnel).
pub fn upstream_connector(
    tls: &TlsConfig,
    connect_timeout: Duration,
    upstream: &url::Url,
) -> anyhow::Result<hyper_rustls::HttpsConnector<UpstreamTcp>> {
    let config = upstream_tls_config(tls)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let upstream_uri: http::Uri = upstream.as_str().parse()?;
    let tcp = match ProxyPolicy::from_env().proxy_for(&upstream_uri) {
        Some(intercept) => {
            tracing::info!(
                proxy = %intercept.uri(),
                "the upstream is reached through an HTTP proxy (CONNECT)"
            );
            let mut tunnel = Tunnel::new(intercept.uri().clone(), http);
            if let Some(auth) = intercept.basic_auth() {
                tunnel = tunnel.with_auth(auth.clone());
            }
            UpstreamTcp::Tunnel(tunnel)
        }
        None => UpstreamTcp::Direct(http),
    };
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(tcp))
}

fn upstream_tls_config(tls: &TlsConfig) -> anyhow::Result<rustls::ClientConfig> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(insecure::AcceptAnything(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = &tls.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("ca_file: cannot read {}: {e}", path.display()))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| anyhow::anyhow!("ca_file: {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| anyhow::anyhow!("ca_file: {}: {e}", path.display()))?;
            }
        }
        builder.with_root_certificates(roots)
    };
    let config = match (&tls.client_cert, &tls.client_key) {
        (Some(cert_path), Some(key_path)) => {
            let cert_pem = std::fs::read(cert_path).map_err(|e| {
                anyhow::anyhow!("client_cert: cannot read {}: {e}", cert_path.display())
            })?;
            let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("client_cert: {}: {e}", cert_path.display()))?;
            let key_pem = std::fs::read(key_path).map_err(|e| {
                anyhow::anyhow!("client_key: cannot read {}: {e}", key_path.display())
            })?;
            let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
                .map_err(|e| anyhow::anyhow!("client_key: {}: {e}", key_path.display()))?
                .ok_or_else(|| {
                    anyhow::anyhow!("client_key: {} holds no private key", key_path.display())
                })?;
            builder.with_client_auth_cert(certs, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// The verifier behind `insecure_skip_verify`: accepts any certificate, still checks the
/// handshake signatures.
mod insecure {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};
    use std::sync::Arc;

    #[derive(Debug)]
    pub struct AcceptAnything(pub Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AcceptAnything {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_always_direct_and_others_use_the_proxy() {
        let matcher = hyper_util::client::proxy::matcher::Matcher::builder()
            .all("http://user:pw@proxy.corp:3128")
            .no("internal.example.com")
            .build();
        let policy = ProxyPolicy(std::sync::Arc::new(matcher));
        let proxy_for = |u: &str| policy.proxy_for(&u.parse().unwrap());
        assert!(proxy_for("http://127.0.0.1:9000/x").is_none());
        assert!(proxy_for("http://localhost:9000/x").is_none());
        assert!(proxy_for("https://[::1]:8443/").is_none());
        assert!(proxy_for("https://internal.example.com/").is_none());
        let proxy = proxy_for("https://ml.example.com/").unwrap();
        assert_eq!(proxy.uri().host(), Some("proxy.corp"));
        assert!(proxy.basic_auth().is_some_and(|a| a.is_sensitive()));
        assert!(
            !proxy.uri().to_string().contains("pw"),
            "credentials stay out of the URI"
        );
        assert!(policy.is_configured());
    }
}
