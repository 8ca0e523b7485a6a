//! Settings: one tree read from flags, `SELDON_AUTH_PROXY_*` variables and a TOML file
//! (flag > env > file > default), validated into a [`Config`] with precise messages.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use url::Url;

use crate::secret::{Secret, SecretSource};

/// Prefix of every environment variable the proxy reads.
pub const ENV_PREFIX: &str = "SELDON_AUTH_PROXY_";
/// The platform's API root, forwarded by default.
pub const DEFAULT_PATH_PREFIX: &str = "/seldon-deploy/api/v1alpha1";

#[derive(Parser)]
#[command(
    name = "seldon-auth-proxy",
    version,
    about = "Obtains, caches and refreshes OIDC credentials and injects them into calls to the Seldon Enterprise Platform API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the proxy (the default).
    Serve,
    /// Load the configuration, obtain one credential and print a redacted summary.
    Check,
    /// Print one usable bearer token and a newline to stdout.
    Token,
    /// Log in with the authorization-code flow and store the tokens (auth_code method).
    Login,
    /// Start an embedded identity provider, a stand-in platform and the proxy: a development aid.
    Dev(DevArgs),
}

/// Options of `dev` alone (the proxy's own settings still apply).
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct DevArgs {
    /// Lifetime of the tokens the embedded IdP issues.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub token_lifetime: Duration,
    /// Address of the embedded IdP [default: an ephemeral port on 127.0.0.1].
    #[arg(long, value_name = "ADDR")]
    pub idp_listen: Option<SocketAddr>,
    /// Address of the embedded platform stand-in [default: an ephemeral port on 127.0.0.1].
    #[arg(long, value_name = "ADDR")]
    pub platform_listen: Option<SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum AuthMethod {
    ClientCredentials,
    PasswordGrant,
    AuthCode,
    Session,
    Static,
}

impl std::fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthMethod::ClientCredentials => "client_credentials",
            AuthMethod::PasswordGrant => "password_grant",
            AuthMethod::AuthCode => "auth_code",
            AuthMethod::Session => "session",
            AuthMethod::Static => "static",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum TokenField {
    IdToken,
    AccessToken,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e} (write durations like 10s, 500ms, 2m)"))
}

/// Every setting, each optional so the layers can be merged. The same struct is read from
/// the command line (with its environment variable) and from the TOML file.
#[derive(Args, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// TOML file with settings (keys as the flags, with `_` for `-`).
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_CONFIG",
        value_name = "FILE"
    )]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// The platform's base URL, e.g. https://ml.example.com.
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_UPSTREAM",
        value_name = "URL"
    )]
    pub upstream: Option<String>,
    /// Proxy listener: HOST:PORT on loopback, or unix:/path/to.sock [default: 127.0.0.1:8080].
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_LISTEN",
        value_name = "ADDR"
    )]
    pub listen: Option<String>,
    /// Admin listener for /healthz, /readyz, /metrics [default: 127.0.0.1:9090].
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_ADMIN_LISTEN",
        value_name = "ADDR"
    )]
    pub admin_listen: Option<String>,
    /// How the credential is obtained [default: client_credentials].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_AUTH_METHOD")]
    pub auth_method: Option<AuthMethod>,
    /// The OIDC issuer; discovery at URL/.well-known/openid-configuration.
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_OIDC_SERVER",
        value_name = "URL"
    )]
    pub oidc_server: Option<String>,
    /// Token endpoint, skipping discovery.
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_TOKEN_ENDPOINT",
        value_name = "URL"
    )]
    pub token_endpoint: Option<String>,
    /// OAuth client id.
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_CLIENT_ID")]
    pub client_id: Option<String>,
    /// OAuth client secret (prefer the environment variable or --client-secret-file).
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub client_secret: Option<String>,
    /// File holding the client secret (one trailing newline is trimmed).
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_CLIENT_SECRET_FILE",
        value_name = "FILE"
    )]
    pub client_secret_file: Option<PathBuf>,
    /// User name for password_grant and session.
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_USERNAME")]
    pub username: Option<String>,
    /// Password (prefer the environment variable or --password-file).
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// File holding the password (one trailing newline is trimmed).
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_PASSWORD_FILE",
        value_name = "FILE"
    )]
    pub password_file: Option<PathBuf>,
    /// Scopes requested [default: openid profile email groups].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_SCOPE")]
    pub scope: Option<String>,
    /// Which token is sent: id_token (falling back to access_token) or access_token [default: id_token].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_TOKEN_FIELD")]
    pub token_field: Option<TokenField>,
    /// `audience` parameter sent with every grant.
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_AUDIENCE")]
    pub audience: Option<String>,
    /// `resource` parameter sent with every grant.
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_RESOURCE")]
    pub resource: Option<String>,
    /// Token file for the static method, re-read when it changes.
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_STATIC_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub static_token_file: Option<PathBuf>,
    /// Session cookie name for the session method [default: authservice_session].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_SESSION_COOKIE_NAME")]
    pub session_cookie_name: Option<String>,
    /// Redirect URI for auth_code [default: UPSTREAM/seldon-deploy/auth/callback].
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_REDIRECT_URI",
        value_name = "URL"
    )]
    pub redirect_uri: Option<String>,
    /// Where `login` stores tokens for auth_code [default: the user's cache directory].
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_TOKEN_CACHE_FILE",
        value_name = "FILE"
    )]
    pub token_cache_file: Option<PathBuf>,
    /// Path prefixes forwarded (repeatable) [default: /seldon-deploy/api/v1alpha1].
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_ALLOWED_PATH_PREFIX",
        value_delimiter = ','
    )]
    pub allowed_path_prefix: Option<Vec<String>>,
    /// Host header values accepted (repeatable; port ignored) [default: localhost, 127.0.0.1, [::1]].
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_ALLOWED_HOST",
        value_delimiter = ','
    )]
    pub allowed_host: Option<Vec<String>>,
    /// Browser origins allowed to call the proxy (repeatable) [default: none].
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_ALLOWED_ORIGIN",
        value_delimiter = ','
    )]
    pub allowed_origin: Option<Vec<String>>,
    /// Permit a proxy listener that is not on loopback.
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_ALLOW_NON_LOOPBACK", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_non_loopback: Option<bool>,
    /// File holding a local secret every caller must present as `Authorization: Bearer <secret>`.
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_INBOUND_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub inbound_token_file: Option<PathBuf>,
    /// PEM bundle of extra trust roots for the IdP and the upstream.
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_CA_FILE",
        value_name = "FILE"
    )]
    pub ca_file: Option<PathBuf>,
    /// Disable TLS verification for the IdP and the upstream (dangerous).
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_INSECURE_SKIP_VERIFY", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure_skip_verify: Option<bool>,
    /// Client certificate (PEM) for mTLS to the upstream.
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_CLIENT_CERT",
        value_name = "FILE"
    )]
    pub client_cert: Option<PathBuf>,
    /// Client key (PEM) for mTLS to the upstream.
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_CLIENT_KEY",
        value_name = "FILE"
    )]
    pub client_key: Option<PathBuf>,
    /// Permit plain http:// to a non-loopback IdP or upstream.
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_ALLOW_PLAIN_HTTP", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub allow_plain_http: Option<bool>,
    /// Largest request head accepted, in bytes; larger gets 431 [default: 65536].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Time allowed to receive a request head, counted from when the connection waits for one [default: 10s].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_HEADER_READ_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub header_read_timeout: Option<Duration>,
    /// Idle client keep-alive connections are closed after this, or after header_read_timeout if shorter; an answer the caller takes none of, or the upstream sends none of, for this long is cut short [default: 30s].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_IDLE_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Time allowed to connect to the upstream [default: 5s].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_UPSTREAM_CONNECT_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub upstream_connect_timeout: Option<Duration>,
    /// Time allowed for the upstream's response head; the body may stream on, with no gap longer than idle_timeout [default: 60s].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_UPSTREAM_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub upstream_timeout: Option<Duration>,
    /// Time allowed for each call to the IdP [default: 10s].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_IDP_TIMEOUT", value_parser = parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub idp_timeout: Option<Duration>,
    /// Most client connections served at once; more wait in the backlog [default: 4096].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// After SIGTERM, time /readyz reports 503 before the listener stops accepting [default: 1s].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_SHUTDOWN_DELAY", value_parser = parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub shutdown_delay: Option<Duration>,
    /// Time in-flight requests get to finish at shutdown [default: 20s].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_SHUTDOWN_GRACE", value_parser = parse_duration)]
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
    /// Log format on stderr [default: text].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log level or filter, e.g. info, debug, seldon_auth_proxy=trace [default: info].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// One line per proxied request at info level [default: true].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_ACCESS_LOG", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub access_log: Option<bool>,
    /// Proxy worker threads, each with its own listener and connection pool [default: CPUs available].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_WORKERS")]
    pub workers: Option<usize>,
    /// Idle upstream connections kept per worker [default: 128].
    #[arg(long, global = true, env = "SELDON_AUTH_PROXY_UPSTREAM_MAX_IDLE")]
    pub upstream_max_idle: Option<usize>,
    /// Most requests in flight to the platform at once, shared out among the workers (at least
    /// one each); more wait for one to finish, up to upstream_timeout (then 503 upstream_busy)
    /// [default: 256].
    #[arg(
        long,
        global = true,
        env = "SELDON_AUTH_PROXY_UPSTREAM_MAX_CONNECTIONS"
    )]
    pub upstream_max_connections: Option<usize>,
}

/// Debug output names what was given and never prints a secret.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "[redacted]");
        f.debug_struct("Settings")
            .field("config", &self.config)
            .field("upstream", &self.upstream)
            .field("auth_method", &self.auth_method)
            .field("oidc_server", &self.oidc_server)
            .field("client_id", &self.client_id)
            .field("client_secret", &redacted(&self.client_secret))
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .finish_non_exhaustive()
    }
}

macro_rules! overlay {
    ($high:expr, $low:expr; $($field:ident),* $(,)?) => {
        Settings { config: $high.config.or($low.config), $($field: $high.$field.or($low.$field)),* }
    };
}

impl Settings {
    /// Settings from `self` where given, else from `lower`. Lists replace, never merge.
    pub fn over(self, lower: Settings) -> Settings {
        overlay!(self, lower;
            upstream, listen, admin_listen, auth_method, oidc_server, token_endpoint, client_id,
            client_secret, client_secret_file, username, password, password_file, scope,
            token_field, audience, resource, static_token_file, session_cookie_name, redirect_uri,
            token_cache_file, allowed_path_prefix, allowed_host, allowed_origin,
            allow_non_loopback, inbound_token_file, ca_file, insecure_skip_verify, client_cert,
            client_key, allow_plain_http, max_header_bytes, header_read_timeout, idle_timeout,
            upstream_connect_timeout, upstream_timeout, idp_timeout, max_connections,
            shutdown_delay, shutdown_grace, log_format, log_level, access_log, workers,
            upstream_max_idle, upstream_max_connections)
    }

    /// Reads a TOML settings file; unknown keys and bad values name the key.
    pub fn from_file(path: &std::path::Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| {
            ConfigError(format!(
                "config file {}: {}",
                path.display(),
                e.to_string().trim_end()
            ))
        })
    }

    /// The names of secrets given directly as flags (visible to `ps`).
    pub fn secrets_in_flags(args: &[String]) -> Vec<&'static str> {
        ["--client-secret", "--password"]
            .into_iter()
            .filter(|flag| {
                args.iter()
                    .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
            })
            .collect()
    }
}

/// A start-up error with a message that names the setting and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

/// Where the proxy listens for callers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Clone, Debug)]
pub struct AuthConfig {
    pub method: AuthMethod,
    pub oidc_server: Option<Url>,
    pub token_endpoint: Option<Url>,
    pub client_id: Option<String>,
    pub client_secret: Option<SecretSource>,
    pub username: Option<String>,
    pub password: Option<SecretSource>,
    pub scope: String,
    pub token_field: TokenField,
    pub audience: Option<String>,
    pub resource: Option<String>,
    pub static_token_file: Option<PathBuf>,
    pub session_cookie_name: String,
    pub redirect_uri: Option<Url>,
    pub token_cache_file: Option<PathBuf>,
    pub idp_timeout: Duration,
}

#[derive(Clone, Debug, Default)]
pub struct TlsConfig {
    pub ca_file: Option<PathBuf>,
    pub insecure_skip_verify: bool,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_timeout: Duration,
    pub max_connections: usize,
}

/// The validated configuration the proxy runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub upstream: Url,
    pub listen: ListenAddr,
    pub admin_listen: SocketAddr,
    pub auth: AuthConfig,
    pub allowed_path_prefixes: Vec<String>,
    pub allowed_hosts: Vec<String>,
    pub allowed_origins: Vec<String>,
    pub inbound_token_file: Option<PathBuf>,
    pub tls: TlsConfig,
    pub allow_plain_http: bool,
    pub limits: Limits,
    pub shutdown_delay: Duration,
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    pub log_level: String,
    pub access_log: bool,
    pub workers: usize,
    pub upstream_max_idle: usize,
    pub upstream_max_connections: usize,
}

fn parse_url(key: &str, text: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(text).map_err(|e| bad(format!("{key}: `{text}` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad(format!(
            "{key}: `{text}` must be an http:// or https:// URL"
        )));
    }
    if url.host().is_none() {
        return Err(bad(format!("{key}: `{text}` has no host")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(format!(
            "{key}: user-info in the URL is not supported; use the client and password settings"
        )));
    }
    Ok(url)
}

/// Whether a URL's host is on this machine (plain http to it exposes nothing).
pub fn is_loopback_url(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn parse_socket_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    let normalized = text
        .strip_prefix("localhost:")
        .map(|port| format!("127.0.0.1:{port}"));
    normalized.as_deref().unwrap_or(text).parse().map_err(|_| {
        bad(format!(
            "{key}: `{text}` is not an address like 127.0.0.1:8080 or [::1]:8080"
        ))
    })
}

fn secret_source(
    key: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<SecretSource>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(bad(format!(
            "{key} and {key}_file are both set; give only one"
        ))),
        (Some(value), None) => Ok(Some(SecretSource::Inline(Secret::new(value)))),
        (None, Some(path)) => {
            if !path.is_file() {
                return Err(bad(format!(
                    "{key}_file: {} is not a readable file",
                    path.display()
                )));
            }
            Ok(Some(SecretSource::File(path)))
        }
        (None, None) => Ok(None),
    }
}

/// The number of CPUs this process may use (cgroup quotas included).
pub fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

impl Config {
    /// Validates merged settings into a configuration. `needs_upstream` is false for `dev`,
    /// which supplies its own upstream and IdP.
    pub fn from_settings(s: Settings) -> Result<Config, ConfigError> {
        let upstream_text = s
            .upstream
            .ok_or_else(|| bad("upstream: required (--upstream URL or SELDON_AUTH_PROXY_UPSTREAM), e.g. https://ml.example.com"))?;
        let upstream = parse_url("upstream", &upstream_text)?;
        if upstream.query().is_some() || upstream.fragment().is_some() {
            return Err(bad("upstream: must not carry a query or fragment"));
        }
        let allow_plain_http = s.allow_plain_http.unwrap_or(false);
        let allow_non_loopback = s.allow_non_loopback.unwrap_or(false);

        let listen_text = s.listen.unwrap_or_else(|| "127.0.0.1:8080".into());
        let listen = match listen_text.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => ListenAddr::Unix(PathBuf::from(path)),
            Some(_) => {
                return Err(bad(
                    "listen: unix: needs a path, e.g. unix:/run/seldon/proxy.sock",
                ))
            }
            None => {
                let addr = parse_socket_addr("listen", &listen_text)?;
                if !addr.ip().is_loopback() && !allow_non_loopback {
                    return Err(bad(format!(
                        "listen: {addr} is not a loopback address. The proxy lends its identity to anyone who can reach it, so it listens on loopback (127.0.0.1 or [::1]) unless --allow-non-loopback is given; consider unix:/path.sock or --inbound-token-file instead"
                    )));
                }
                ListenAddr::Tcp(addr)
            }
        };
        let admin_listen = parse_socket_addr(
            "admin_listen",
            s.admin_listen.as_deref().unwrap_or("127.0.0.1:9090"),
        )?;

        let method = s.auth_method.unwrap_or(AuthMethod::ClientCredentials);
        let oidc_server = s
            .oidc_server
            .as_deref()
            .map(|t| parse_url("oidc_server", t.trim_end_matches('/')))
            .transpose()?;
        let token_endpoint = s
            .token_endpoint
            .as_deref()
            .map(|t| parse_url("token_endpoint", t))
            .transpose()?;
        let redirect_uri = s
            .redirect_uri
            .as_deref()
            .map(|t| parse_url("redirect_uri", t))
            .transpose()?;
        let client_secret = secret_source("client_secret", s.client_secret, s.client_secret_file)?;
        let password = secret_source("password", s.password, s.password_file)?;

        let needs = |ok: bool, what: &str| -> Result<(), ConfigError> {
            if ok {
                Ok(())
            } else {
                Err(bad(format!(
                    "auth_method {}: {what}",
                    method
                        .to_possible_value()
                        .map(|v| v.get_name().to_owned())
                        .unwrap_or_default()
                )))
            }
        };
        let has_idp = oidc_server.is_some() || token_endpoint.is_some();
        match method {
            AuthMethod::ClientCredentials => {
                needs(has_idp, "needs oidc_server (or token_endpoint)")?;
                needs(s.client_id.is_some(), "needs client_id")?;
                needs(
                    client_secret.is_some(),
                    "needs client_secret or client_secret_file",
                )?;
            }
            AuthMethod::PasswordGrant => {
                needs(has_idp, "needs oidc_server (or token_endpoint)")?;
                needs(s.client_id.is_some(), "needs client_id")?;
                needs(s.username.is_some(), "needs username")?;
                needs(password.is_some(), "needs password or password_file")?;
            }
            AuthMethod::AuthCode => {
                needs(oidc_server.is_some(), "needs oidc_server")?;
                needs(s.client_id.is_some(), "needs client_id")?;
            }
            AuthMethod::Session => {
                needs(s.username.is_some(), "needs username")?;
                needs(password.is_some(), "needs password or password_file")?;
            }
            AuthMethod::Static => {
                needs(s.static_token_file.is_some(), "needs static_token_file")?;
            }
        }
        if !allow_plain_http {
            for (key, url) in [
                ("upstream", Some(&upstream)),
                ("oidc_server", oidc_server.as_ref()),
                ("token_endpoint", token_endpoint.as_ref()),
            ] {
                if let Some(url) = url {
                    if url.scheme() == "http" && !is_loopback_url(url) {
                        return Err(bad(format!(
                            "{key}: {url} is plain http to another machine, so secrets and tokens would cross the network in clear; use https:// or pass --allow-plain-http when a mesh encrypts the traffic"
                        )));
                    }
                }
            }
        }

        let allowed_path_prefixes = s
            .allowed_path_prefix
            .unwrap_or_else(|| vec![DEFAULT_PATH_PREFIX.to_owned()]);
        for prefix in &allowed_path_prefixes {
            if !prefix.starts_with('/') || prefix.contains("..") || prefix.contains("//") {
                return Err(bad(format!(
                    "allowed_path_prefix: `{prefix}` must be an absolute path like {DEFAULT_PATH_PREFIX}"
                )));
            }
        }
        let allowed_hosts = s
            .allowed_host
            .unwrap_or_else(|| vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()])
            .into_iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        let allowed_origins = s.allowed_origin.unwrap_or_default();
        for origin in &allowed_origins {
            let parsed = Url::parse(origin).map_err(|_| {
                bad(format!(
                    "allowed_origin: `{origin}` must be scheme://host[:port], e.g. http://localhost:3000"
                ))
            })?;
            if parsed.origin().ascii_serialization() != *origin {
                return Err(bad(format!(
                    "allowed_origin: `{origin}` must be written as {}",
                    parsed.origin().ascii_serialization()
                )));
            }
        }

        let positive =
            |key: &str, d: Option<Duration>, default: Duration| -> Result<Duration, ConfigError> {
                let d = d.unwrap_or(default);
                if d.is_zero() {
                    Err(bad(format!("{key}: must be greater than zero")))
                } else {
                    Ok(d)
                }
            };
        let limits = Limits {
            max_header_bytes: s.max_header_bytes.unwrap_or(64 * 1024),
            header_read_timeout: positive(
                "header_read_timeout",
                s.header_read_timeout,
                Duration::from_secs(10),
            )?,
            idle_timeout: positive("idle_timeout", s.idle_timeout, Duration::from_secs(30))?,
            upstream_connect_timeout: positive(
                "upstream_connect_timeout",
                s.upstream_connect_timeout,
                Duration::from_secs(5),
            )?,
            upstream_timeout: positive(
                "upstream_timeout",
                s.upstream_timeout,
                Duration::from_secs(60),
            )?,
            max_connections: s.max_connections.unwrap_or(4096),
        };
        if limits.max_header_bytes < 8192 {
            return Err(bad("max_header_bytes: must be at least 8192"));
        }
        if limits.max_connections == 0 || limits.max_connections > 1_000_000 {
            return Err(bad("max_connections: must be between 1 and 1000000"));
        }
        let workers = s.workers.unwrap_or_else(available_cpus);
        if workers == 0 || workers > 256 {
            return Err(bad("workers: must be between 1 and 256"));
        }
        let upstream_max_connections = s.upstream_max_connections.unwrap_or(256);
        if upstream_max_connections == 0 {
            return Err(bad("upstream_max_connections: must be at least 1"));
        }
        let log_level = s.log_level.unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(bad(format!(
                "log_level: `{log_level}` is not a level (error, warn, info, debug, trace) or filter"
            )));
        }
        if s.client_cert.is_some() != s.client_key.is_some() {
            return Err(bad(
                "client_cert and client_key go together; give both or neither",
            ));
        }

        Ok(Config {
            upstream,
            listen,
            admin_listen,
            auth: AuthConfig {
                method,
                oidc_server,
                token_endpoint,
                client_id: s.client_id,
                client_secret,
                username: s.username,
                password,
                scope: s
                    .scope
                    .unwrap_or_else(|| "openid profile email groups".into()),
                token_field: s.token_field.unwrap_or(TokenField::IdToken),
                audience: s.audience,
                resource: s.resource,
                static_token_file: s.static_token_file,
                session_cookie_name: s
                    .session_cookie_name
                    .unwrap_or_else(|| "authservice_session".into()),
                redirect_uri,
                token_cache_file: s.token_cache_file,
                idp_timeout: positive("idp_timeout", s.idp_timeout, Duration::from_secs(10))?,
            },
            allowed_path_prefixes,
            allowed_hosts,
            allowed_origins,
            inbound_token_file: s.inbound_token_file,
            tls: TlsConfig {
                ca_file: s.ca_file,
                insecure_skip_verify: s.insecure_skip_verify.unwrap_or(false),
                client_cert: s.client_cert,
                client_key: s.client_key,
            },
            allow_plain_http,
            limits,
            shutdown_delay: s.shutdown_delay.unwrap_or(Duration::from_secs(1)),
            shutdown_grace: s.shutdown_grace.unwrap_or(Duration::from_secs(20)),
            log_format: s.log_format.unwrap_or(LogFormat::Text),
            log_level,
            access_log: s.access_log.unwrap_or(true),
            workers,
            upstream_max_idle: s.upstream_max_idle.unwrap_or(128),
            upstream_max_connections,
        })
    }
}

/// Every `SELDON_AUTH_PROXY_*` variable in the environment that names no setting.
pub fn unknown_env_vars(command: &clap::Command) -> Vec<String> {
    let known: Vec<String> = command
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with(ENV_PREFIX) && !known.contains(k))
        // Tests of this crate set their own variables under the same prefix.
        .filter(|k| !k.starts_with("SELDON_AUTH_PROXY_TEST_"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Settings {
        Settings {
            upstream: Some("https://ml.example.com".into()),
            oidc_server: Some("https://ml.example.com/auth/realms/deploy".into()),
            client_id: Some("sdk".into()),
            client_secret: Some("s3cret".into()),
            ..Settings::default()
        }
    }

    #[test]
    fn debug_never_prints_a_secret() {
        let s = Settings {
            password: Some("hunter2".into()),
            ..base()
        };
        let text = format!("{s:?}");
        assert!(
            !text.contains("s3cret") && !text.contains("hunter2"),
            "{text}"
        );
        assert!(text.contains("[redacted]"));
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::from_settings(base()).unwrap();
        assert_eq!(c.listen, ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(c.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.auth.scope, "openid profile email groups");
        assert_eq!(
            c.allowed_path_prefixes,
            vec![DEFAULT_PATH_PREFIX.to_owned()]
        );
        assert_eq!(c.auth.token_field, TokenField::IdToken);
        assert!(c.auth.idp_timeout <= Duration::from_secs(10));
        assert!(c.limits.max_connections >= 4096);
    }

    #[test]
    fn higher_layer_wins_and_lists_replace() {
        let file = Settings {
            allowed_path_prefix: Some(vec!["/a".into(), "/b".into()]),
            scope: Some("openid".into()),
            ..base()
        };
        let flags = Settings {
            allowed_path_prefix: Some(vec!["/c".into()]),
            ..Settings::default()
        };
        let c = Config::from_settings(flags.over(file)).unwrap();
        assert_eq!(c.allowed_path_prefixes, vec!["/c".to_owned()]);
        assert_eq!(c.auth.scope, "openid");
    }

    #[test]
    fn non_loopback_listen_is_refused_with_a_reason() {
        let s = Settings {
            listen: Some("0.0.0.0:8080".into()),
            ..base()
        };
        let err = Config::from_settings(s).unwrap_err().to_string();
        assert!(err.contains("listen") && err.contains("loopback"), "{err}");
        let s = Settings {
            listen: Some("0.0.0.0:8080".into()),
            allow_non_loopback: Some(true),
            ..base()
        };
        assert!(Config::from_settings(s).is_ok());
    }

    #[test]
    fn unknown_file_keys_and_bad_values_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "upstream = \"https://x\"\nlisten_port = 3\n").unwrap();
        let err = Settings::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("listen_port"), "{err}");
        std::fs::write(&path, "idp_timeout = \"ten seconds\"\n").unwrap();
        let err = Settings::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("idp_timeout"), "{err}");
        std::fs::write(
            &path,
            "idp_timeout = \"500ms\"\nallowed_host = [\"a\", \"b\"]\n",
        )
        .unwrap();
        let s = Settings::from_file(&path).unwrap();
        assert_eq!(s.idp_timeout, Some(Duration::from_millis(500)));
        assert_eq!(s.allowed_host.unwrap().len(), 2);
    }

    #[test]
    fn plain_http_to_another_machine_is_refused() {
        let s = Settings {
            upstream: Some("http://ml.example.com".into()),
            ..base()
        };
        let err = Config::from_settings(s).unwrap_err().to_string();
        assert!(
            err.contains("upstream") && err.contains("allow-plain-http"),
            "{err}"
        );
        let s = Settings {
            upstream: Some("http://127.0.0.1:9000".into()),
            oidc_server: Some("http://localhost:9001/auth/realms/x".into()),
            ..base()
        };
        assert!(Config::from_settings(s).is_ok());
    }

    #[test]
    fn missing_pieces_of_a_method_are_named() {
        let s = Settings {
            client_secret: None,
            ..base()
        };
        let err = Config::from_settings(s).unwrap_err().to_string();
        assert!(
            err.contains("client_credentials") && err.contains("client_secret"),
            "{err}"
        );
        let s = Settings {
            auth_method: Some(AuthMethod::PasswordGrant),
            ..base()
        };
        let err = Config::from_settings(s).unwrap_err().to_string();
        assert!(err.contains("username"), "{err}");
    }
}
