//! Where credentials come from: one variant per auth method, each obtaining or refreshing
//! a credential on request.

use std::path::PathBuf;

use super::auth_code::AuthCode;
use super::oidc::OidcClient;
use super::session::Session;
use super::static_file::StaticFile;
use super::{Acquired, Credential, FetchError};
use crate::config::{AuthMethod, Config};
use crate::secret::SecretSource;

pub enum Source {
    ClientCredentials(OidcClient),
    Password {
        oidc: OidcClient,
        username: String,
        password: SecretSource,
    },
    /// The tokens `login` stored, refreshed with the refresh-token grant.
    AuthCode(AuthCode),
    /// A Dex login through the platform's front door; the credential is a cookie.
    Session(Session),
    Static(StaticFile),
}

impl Source {
    pub fn from_config(config: &Config, http: reqwest::Client) -> anyhow::Result<Source> {
        let auth = &config.auth;
        Ok(match auth.method {
            AuthMethod::ClientCredentials => Source::ClientCredentials(OidcClient::new(auth, http)),
            AuthMethod::PasswordGrant => Source::Password {
                oidc: OidcClient::new(auth, http),
                username: auth.username.clone().unwrap_or_default(),
                password: auth
                    .password
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("password_grant needs a password"))?,
            },
            AuthMethod::Static => Source::Static(StaticFile {
                path: auth
                    .static_token_file
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("static needs static_token_file"))?,
            }),
            AuthMethod::AuthCode => Source::AuthCode(
                AuthCode::new(auth, OidcClient::new(auth, http)).map_err(anyhow::Error::msg)?,
            ),
            AuthMethod::Session => Source::Session(Session::new(
                &config.upstream,
                auth.username.clone().unwrap_or_default(),
                auth.password
                    .clone()
                    .ok_or_else(|| anyhow::anyhow!("session needs a password"))?,
                auth.session_cookie_name.clone(),
                config.allow_plain_http,
                http,
            )?),
        })
    }

    /// A name for the identity this source lends, used as the cache key.
    pub fn identity(&self) -> String {
        match self {
            Source::ClientCredentials(oidc) => format!("client_credentials:{}", oidc.client_id),
            Source::Password { oidc, username, .. } => {
                format!("password:{}:{username}", oidc.client_id)
            }
            Source::AuthCode(a) => format!("auth_code:{}:{}", a.oidc.client_id, a.path.display()),
            Source::Session(s) => format!("session:{}", s.username()),
            Source::Static(s) => format!("static:{}", s.path.display()),
        }
    }

    /// The grant a failure is counted under in metrics.
    pub fn primary_grant(&self) -> &'static str {
        match self {
            Source::ClientCredentials(_) => "client_credentials",
            Source::Password { .. } => "password",
            Source::AuthCode(_) => "refresh_token",
            Source::Session(_) => "session_login",
            Source::Static(_) => "static_file",
        }
    }

    /// Files whose change should trigger an immediate retry (rotated Kubernetes secrets, and
    /// the auth_code token file, so a new `login` heals a proxy that needs one).
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let secret_file =
            |s: &Option<SecretSource>| s.as_ref().and_then(|s| s.file()).map(PathBuf::from);
        match self {
            Source::ClientCredentials(oidc) => {
                secret_file(&oidc.client_secret).into_iter().collect()
            }
            Source::Password { oidc, password, .. } => secret_file(&oidc.client_secret)
                .into_iter()
                .chain(password.file().map(PathBuf::from))
                .collect(),
            Source::AuthCode(a) => std::iter::once(a.path.clone())
                .chain(secret_file(&a.oidc.client_secret))
                .collect(),
            Source::Session(s) => s.password_file().map(PathBuf::from).into_iter().collect(),
            Source::Static(s) => vec![s.path.clone()],
        }
    }

    /// Whether the credential should be replaced when a watched file changes, even if it is
    /// still valid (a rotated static token must be used at once).
    pub fn replace_on_file_change(&self) -> bool {
        matches!(self, Source::Static(_))
    }

    /// Obtains a credential: a refresh-token grant when the previous credential carries a
    /// refresh token (falling back to the full grant when it is refused), else the full grant.
    pub async fn acquire(&self, previous: Option<&Credential>) -> Result<Acquired, FetchError> {
        let (oidc, user) = match self {
            Source::ClientCredentials(oidc) => (oidc, None),
            Source::Password {
                oidc,
                username,
                password,
            } => (oidc, Some((username, password))),
            Source::AuthCode(a) => return a.acquire(previous).await,
            Source::Session(s) => return s.acquire().await,
            Source::Static(s) => return s.acquire(),
        };
        if let Some(refresh_token) = previous.and_then(|c| c.refresh_token.as_ref()) {
            match oidc
                .grant("refresh_token", oidc.refresh_form(refresh_token))
                .await
            {
                Ok(acquired) => return Ok(acquired),
                Err(e) if e.oauth_error.is_some() => {
                    tracing::info!(error = %e, "refresh token refused; falling back to the full grant");
                }
                Err(e) => return Err(e),
            }
        }
        match user {
            None => {
                oidc.grant("client_credentials", oidc.client_credentials_form())
                    .await
            }
            Some((username, password)) => {
                let password = password.read().map_err(|e| {
                    FetchError::configuration(format!("cannot read password_file: {e}"))
                })?;
                oidc.grant("password", oidc.password_form(username, &password))
                    .await
            }
        }
    }
}
