//! The OAuth token endpoint: discovery, the grants (client credentials, password, refresh
//! token, authorization code), client authentication and the IdP's error answers.

use base64::Engine;
use http::header::AUTHORIZATION;
use serde::Deserialize;
use tokio::sync::OnceCell;
use url::Url;

use super::{bearer, lifetime, Acquired, FailureClass, FetchError, Schedule};
use crate::config::{AuthConfig, TokenField};
use crate::outbound::{describe, is_stale_connection};
use crate::secret::{Secret, SecretSource};

/// A client of one IdP, for one OAuth client.
pub struct OidcClient {
    http: reqwest::Client,
    issuer: Option<Url>,
    token_endpoint_override: Option<Url>,
    discovered: OnceCell<Discovery>,
    pub client_id: String,
    pub client_secret: Option<SecretSource>,
    pub scope: String,
    audience: Option<String>,
    resource: Option<String>,
    token_field: TokenField,
}

/// The parts of the discovery document the proxy uses.
#[derive(Clone, Debug, Deserialize)]
pub struct Discovery {
    pub token_endpoint: Url,
    pub authorization_endpoint: Option<Url>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    id_token: Option<String>,
    refresh_token: Option<String>,
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: String,
    error_description: Option<String>,
}

/// A grant's form parameters (without client authentication).
pub type Form = Vec<(&'static str, String)>;

impl OidcClient {
    pub fn new(auth: &AuthConfig, http: reqwest::Client) -> OidcClient {
        OidcClient {
            http,
            issuer: auth.oidc_server.clone(),
            token_endpoint_override: auth.token_endpoint.clone(),
            discovered: OnceCell::new(),
            client_id: auth.client_id.clone().unwrap_or_default(),
            client_secret: auth.client_secret.clone(),
            scope: auth.scope.clone(),
            audience: auth.audience.clone(),
            resource: auth.resource.clone(),
            token_field: auth.token_field,
        }
    }

    /// The issuer's discovery document, fetched once.
    pub async fn discovery(&self) -> Result<&Discovery, FetchError> {
        let issuer = self
            .issuer
            .as_ref()
            .ok_or_else(|| FetchError::configuration("no oidc_server is configured"))?;
        self.discovered
            .get_or_try_init(|| async {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    issuer.as_str().trim_end_matches('/')
                );
                let response = self.http.get(&url).send().await.map_err(|e| {
                    FetchError::transient(format!("OIDC discovery at {url}: {}", describe(&e)))
                })?;
                let status = response.status();
                if !status.is_success() {
                    let class = if status.is_server_error() {
                        FailureClass::Transient
                    } else {
                        FailureClass::Configuration
                    };
                    return Err(FetchError {
                        class,
                        message: format!("OIDC discovery at {url} answered HTTP {status}; check oidc_server"),
                        oauth_error: None,
                    });
                }
                let discovery: Discovery = response.json().await.map_err(|e| {
                    FetchError::configuration(format!(
                        "OIDC discovery at {url} is not a discovery document: {}",
                        describe(&e)
                    ))
                })?;
                if self.token_endpoint_override.is_none() {
                    let te = &discovery.token_endpoint;
                    if te.scheme() != issuer.scheme() || te.host() != issuer.host() {
                        return Err(FetchError::configuration(format!(
                            "the discovered token endpoint {te} is not on the issuer's scheme and host ({}://{}); set token_endpoint explicitly if that is intended",
                            issuer.scheme(),
                            issuer.host_str().unwrap_or_default()
                        )));
                    }
                }
                Ok(discovery)
            })
            .await
    }

    async fn token_endpoint(&self) -> Result<Url, FetchError> {
        match &self.token_endpoint_override {
            Some(url) => Ok(url.clone()),
            None => Ok(self.discovery().await?.token_endpoint.clone()),
        }
    }

    /// Parameters every grant carries.
    fn common_params(&self, form: &mut Form) {
        if let Some(audience) = &self.audience {
            form.push(("audience", audience.clone()));
        }
        if let Some(resource) = &self.resource {
            form.push(("resource", resource.clone()));
        }
    }

    pub fn client_credentials_form(&self) -> Form {
        let mut form = vec![
            ("grant_type", "client_credentials".to_owned()),
            ("scope", self.scope.clone()),
        ];
        self.common_params(&mut form);
        form
    }

    pub fn password_form(&self, username: &str, password: &Secret) -> Form {
        let mut form = vec![
            ("grant_type", "password".to_owned()),
            ("username", username.to_owned()),
            ("password", password.expose().to_owned()),
            ("scope", self.scope.clone()),
        ];
        self.common_params(&mut form);
        form
    }

    /// Refresh requests ask for the configured scope again, so the answer carries an
    /// id_token when `openid` is in it.
    pub fn refresh_form(&self, refresh_token: &Secret) -> Form {
        let mut form = vec![
            ("grant_type", "refresh_token".to_owned()),
            ("refresh_token", refresh_token.expose().to_owned()),
            ("scope", self.scope.clone()),
        ];
        self.common_params(&mut form);
        form
    }

    pub fn authorization_code_form(&self, code: &str, redirect_uri: &str, verifier: &str) -> Form {
        let mut form = vec![
            ("grant_type", "authorization_code".to_owned()),
            ("code", code.to_owned()),
            ("redirect_uri", redirect_uri.to_owned()),
            ("code_verifier", verifier.to_owned()),
        ];
        self.common_params(&mut form);
        form
    }

    /// Posts one grant and turns the answer into a credential.
    pub async fn grant(&self, grant: &'static str, form: Form) -> Result<Acquired, FetchError> {
        Ok(self.grant_with_id_token(grant, form).await?.0)
    }

    /// Posts one grant and returns the credential with the answer's id_token, whatever
    /// token_field says (`login` checks the id_token's nonce).
    pub async fn grant_with_id_token(
        &self,
        grant: &'static str,
        form: Form,
    ) -> Result<(Acquired, Option<Secret>), FetchError> {
        let answer = self.post_grant(form).await?;
        let id_token = answer
            .id_token
            .clone()
            .filter(|t| !t.is_empty())
            .map(Secret::new);
        Ok((self.acquired(grant, answer)?, id_token))
    }

    async fn post_grant(&self, mut form: Form) -> Result<TokenAnswer, FetchError> {
        let endpoint = self.token_endpoint().await?;
        let mut request = self.http.post(endpoint.clone());
        match &self.client_secret {
            Some(source) => {
                let secret = source.read().map_err(|e| {
                    FetchError::configuration(format!(
                        "cannot read client_secret_file {}: {e}",
                        source
                            .file()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    ))
                })?;
                let encode = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let pair = format!("{}:{}", encode(&self.client_id), encode(secret.expose()));
                let mut value = http::HeaderValue::try_from(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ))
                .map_err(|_| {
                    FetchError::configuration("client credentials are not valid in a header")
                })?;
                value.set_sensitive(true);
                request = request.header(AUTHORIZATION, value);
            }
            None => form.push(("client_id", self.client_id.clone())),
        }
        let request = request.form(&form);
        let retry = request.try_clone();
        let response = match (request.send().await, retry) {
            // The IdP closed a pooled connection we tried to reuse: once more, on a new one.
            (Err(e), Some(retry))
                if !e.is_timeout() && !e.is_connect() && is_stale_connection(&e) =>
            {
                retry.send().await
            }
            (first, _) => first,
        };
        let response = response.map_err(|e| {
            FetchError::transient(format!("token request to {endpoint}: {}", describe(&e)))
        })?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| {
            FetchError::transient(format!("token request to {endpoint}: {}", describe(&e)))
        })?;
        if !status.is_success() {
            return Err(refusal(&endpoint, status, &body));
        }
        serde_json::from_slice(&body).map_err(|_| {
            FetchError::transient(format!(
                "token request to {endpoint}: the answer is not a token response (HTTP {status})"
            ))
        })
    }

    fn acquired(&self, grant: &'static str, answer: TokenAnswer) -> Result<Acquired, FetchError> {
        let token = match self.token_field {
            TokenField::IdToken => answer.id_token.or(answer.access_token),
            TokenField::AccessToken => answer.access_token,
        }
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            FetchError::configuration(
                "the token response holds no token of the configured token_field",
            )
        })?;
        let expires_in = answer.expires_in.and_then(|v| match v {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        });
        let (life, warning) = lifetime::lifetime(&token, expires_in);
        Ok(Acquired {
            header_name: AUTHORIZATION,
            header_value: bearer(&token)?,
            schedule: Schedule::new(life),
            refresh_token: answer
                .refresh_token
                .filter(|t| !t.is_empty())
                .map(Secret::new),
            grant,
            token: Some(Secret::new(token)),
            warning,
        })
    }
}

/// Turns an IdP's error answer into a classified error quoting its OAuth code.
fn refusal(endpoint: &Url, status: http::StatusCode, body: &[u8]) -> FetchError {
    let parsed: Option<ErrorAnswer> = serde_json::from_slice(body).ok();
    let class = if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS {
        FailureClass::Transient
    } else {
        FailureClass::Configuration
    };
    match parsed {
        Some(e) => {
            let description = e
                .error_description
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            FetchError {
                class,
                message: format!(
                    "the IdP refused the token request: {}{description} (HTTP {}, {endpoint})",
                    e.error,
                    status.as_u16()
                ),
                oauth_error: Some(e.error),
            }
        }
        None => FetchError {
            class,
            message: format!(
                "the IdP answered HTTP {} to the token request ({endpoint})",
                status.as_u16()
            ),
            oauth_error: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_quote_the_oauth_error_and_classify() {
        let url = Url::parse("http://idp/token").unwrap();
        let e = refusal(
            &url,
            http::StatusCode::UNAUTHORIZED,
            br#"{"error":"invalid_grant","error_description":"Invalid user credentials"}"#,
        );
        assert!(
            e.message
                .contains("invalid_grant: Invalid user credentials"),
            "{}",
            e.message
        );
        assert_eq!(e.class, FailureClass::Configuration);
        assert_eq!(e.oauth_error.as_deref(), Some("invalid_grant"));
        let e = refusal(&url, http::StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!(e.class, FailureClass::Transient);
        assert!(e.message.contains("502"));
    }
}
