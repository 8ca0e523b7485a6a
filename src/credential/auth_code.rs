//! The auth_code method: the PKCE authorization request `login` sends a person to, and the
//! source that keeps the stored login fresh with the refresh-token grant while serving.

use std::path::PathBuf;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::header::AUTHORIZATION;
use rand::RngCore;
use sha2::{Digest, Sha256};
use url::Url;

use super::oidc::OidcClient;
use super::token_file::{self, StoredTokens};
use super::{bearer, lifetime, Acquired, Credential, FailureClass, FetchError, Schedule};
use crate::config::{AuthConfig, TokenField};
use crate::secret::Secret;

/// A stored token is used as it is (rather than refreshed) when it lives at least this long.
const REUSE_MIN_LIFETIME: Duration = Duration::from_secs(60);
/// What the platform shows the code on, below the upstream URL (the SDK's default too).
pub const PLATFORM_CALLBACK_PATH: &str = "/seldon-deploy/auth/callback";

/// `n` random bytes from the operating system, base64url without padding.
pub fn random_string(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The S256 code challenge of a PKCE verifier (RFC 7636 4.2).
pub fn code_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// One authorization request: the URL a person opens and what must be kept to finish it.
pub struct AuthorizationRequest {
    pub url: Url,
    pub redirect_uri: String,
    /// Echoed by the IdP with the code; a mismatch means the answer is not for this request.
    pub state: String,
    /// Must come back in the id_token.
    pub nonce: String,
    /// The PKCE verifier, sent with the code.
    pub verifier: Secret,
}

/// The parameters of an authorization request beyond the endpoint.
pub struct AuthorizationParams<'a> {
    pub client_id: &'a str,
    pub redirect_uri: &'a str,
    pub scope: &'a str,
    pub audience: Option<&'a str>,
    pub resource: Option<&'a str>,
}

/// Builds an authorization-code request with PKCE (S256), a random `state` and `nonce`.
pub fn authorization_request(
    endpoint: &Url,
    params: &AuthorizationParams<'_>,
) -> AuthorizationRequest {
    // 32 bytes give a 43-character verifier, the shortest RFC 7636 allows.
    let verifier = random_string(32);
    let state = random_string(24);
    let nonce = random_string(24);
    let mut url = endpoint.clone();
    {
        let mut query = url.query_pairs_mut();
        query
            .append_pair("response_type", "code")
            .append_pair("client_id", params.client_id)
            .append_pair("redirect_uri", params.redirect_uri)
            .append_pair("scope", params.scope)
            .append_pair("state", &state)
            .append_pair("nonce", &nonce)
            .append_pair("code_challenge", &code_challenge(&verifier))
            .append_pair("code_challenge_method", "S256");
        if let Some(audience) = params.audience {
            query.append_pair("audience", audience);
        }
        if let Some(resource) = params.resource {
            query.append_pair("resource", resource);
        }
    }
    AuthorizationRequest {
        url,
        redirect_uri: params.redirect_uri.to_owned(),
        state,
        nonce,
        verifier: Secret::new(verifier),
    }
}

/// The redirect URI `login` uses without `--redirect-uri`: the platform's callback page,
/// which shows the code to paste.
pub fn default_redirect_uri(upstream: &Url) -> String {
    format!(
        "{}{}{PLATFORM_CALLBACK_PATH}",
        upstream.origin().ascii_serialization(),
        upstream.path().trim_end_matches('/')
    )
}

// The id_token comes straight from the token endpoint over a verified connection (OIDC Core
// 3.1.3.7), so its claims are read without checking its signature.
use super::lifetime::{jwt_claims, unix_now};

/// Checks an id_token answers this login: its `nonce` is ours and its audience holds our
/// client. The message never quotes the token.
pub fn check_id_token(
    id_token: &str,
    nonce: &str,
    client_id: &str,
) -> Result<serde_json::Value, String> {
    let claims = jwt_claims(id_token).ok_or("the id_token is not a JWT")?;
    match claims.get("nonce").and_then(|n| n.as_str()) {
        Some(got) if bool::from(subtle::ConstantTimeEq::ct_eq(got.as_bytes(), nonce.as_bytes())) => {}
        Some(_) => return Err("the id_token's nonce is not the one this login sent; the answer belongs to another login".into()),
        None => return Err("the id_token carries no nonce although this login sent one".into()),
    }
    let audience_ok = match claims.get("aud") {
        Some(serde_json::Value::String(aud)) => aud == client_id,
        Some(serde_json::Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(client_id)),
        _ => false,
    };
    if !audience_ok {
        return Err(format!(
            "the id_token is not addressed to client `{client_id}` (aud)"
        ));
    }
    Ok(claims)
}

/// The auth_code source: the tokens `login` stored, kept fresh with the refresh-token grant,
/// the rotated refresh token written back to the token file.
pub struct AuthCode {
    pub oidc: OidcClient,
    pub path: PathBuf,
    issuer: String,
    token_field: TokenField,
    /// The last rotated refresh token could not be written: the one in memory is newer
    /// than the file's, and presenting the file's would look like reuse to the IdP.
    unsaved: std::sync::atomic::AtomicBool,
}

fn needs_login(message: String) -> FetchError {
    FetchError {
        class: FailureClass::NeedsLogin,
        message,
        oauth_error: None,
    }
}

impl AuthCode {
    pub fn new(auth: &AuthConfig, oidc: OidcClient) -> Result<AuthCode, String> {
        let issuer = auth
            .oidc_server
            .as_ref()
            .map(|u| u.as_str().trim_end_matches('/').to_owned())
            .ok_or("auth_code needs oidc_server")?;
        Ok(AuthCode {
            oidc,
            path: token_file::resolve(auth.token_cache_file.as_deref())?,
            issuer,
            token_field: auth.token_field,
            unsaved: false.into(),
        })
    }

    /// What `login` writes and the proxy re-writes after each refresh.
    pub fn stored(&self, acquired: &Acquired) -> StoredTokens {
        StoredTokens {
            issuer: self.issuer.clone(),
            client_id: self.oidc.client_id.clone(),
            refresh_token: acquired.refresh_token.clone(),
            token: acquired.token.clone(),
            token_field: self.token_field,
            expires_at: Some(acquired.schedule.expires_at_unix),
            saved_at: unix_now(),
        }
    }

    fn login_hint(&self) -> String {
        format!("run `seldon-auth-proxy login` (same --oidc-server, --client-id and --token-cache-file {}) to log in again", self.path.display())
    }

    /// The stored login, checked to belong to this issuer and client.
    fn load(&self) -> Result<Option<StoredTokens>, FetchError> {
        let stored = token_file::load(&self.path)
            .map_err(|e| needs_login(format!("token file: {e}; {}", self.login_hint())))?;
        if let Some(s) = &stored {
            if s.issuer != self.issuer || s.client_id != self.oidc.client_id {
                return Err(needs_login(format!(
                    "the token file {} holds a login for client `{}` at {}, not for client `{}` at {}; {}",
                    self.path.display(),
                    s.client_id,
                    s.issuer,
                    self.oidc.client_id,
                    self.issuer,
                    self.login_hint()
                )));
            }
        }
        Ok(stored)
    }

    /// The stored token as a credential, when it is of the configured kind and lives long enough.
    fn reuse(&self, stored: &StoredTokens) -> Option<Acquired> {
        let token = stored.token.as_ref()?;
        if stored.token_field != self.token_field {
            return None;
        }
        let remaining = stored.expires_at?.checked_sub(unix_now())?;
        let (life, warning) = lifetime::lifetime(token.expose(), Some(remaining));
        if life < REUSE_MIN_LIFETIME || warning.is_some() {
            return None;
        }
        Some(Acquired {
            header_name: AUTHORIZATION,
            header_value: bearer(token.expose()).ok()?,
            schedule: Schedule::new(life),
            refresh_token: stored.refresh_token.clone(),
            grant: "token_file",
            token: Some(token.clone()),
            warning: None,
        })
    }

    fn save(&self, acquired: &Acquired) {
        let saved = token_file::save(&self.path, &self.stored(acquired));
        self.unsaved
            .store(saved.is_err(), std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = saved {
            tracing::warn!(
                "cannot write the rotated refresh token to {}: {e}; the proxy keeps it in memory, but a restart will need `seldon-auth-proxy login`",
                self.path.display()
            );
        }
    }

    /// A credential from the stored login: the stored token when a fresh process finds it
    /// still good, else the refresh-token grant. A refused refresh token (another process may
    /// have rotated it) is retried once with the file's newer one; then a person must log in.
    pub async fn acquire(&self, previous: Option<&Credential>) -> Result<Acquired, FetchError> {
        let stored = self.load()?;
        if previous.is_none() {
            if let Some(acquired) = stored.as_ref().and_then(|s| self.reuse(s)) {
                return Ok(acquired);
            }
        }
        let held = previous.and_then(|c| c.refresh_token.clone());
        let mut tried: Vec<Secret> = Vec::new();
        let from_file = stored.and_then(|s| s.refresh_token);
        let mut candidate = if self.unsaved.load(std::sync::atomic::Ordering::SeqCst) {
            held.clone().or(from_file)
        } else {
            from_file.or_else(|| held.clone())
        };
        loop {
            let Some(refresh_token) = candidate.take() else {
                return Err(needs_login(format!(
                    "no stored login with a refresh token in {}; {}",
                    self.path.display(),
                    self.login_hint()
                )));
            };
            match self
                .oidc
                .grant("refresh_token", self.oidc.refresh_form(&refresh_token))
                .await
            {
                Ok(mut acquired) => {
                    if acquired.refresh_token.is_none() {
                        // The IdP does not rotate: the same refresh token stays good.
                        acquired.refresh_token = Some(refresh_token);
                    }
                    self.save(&acquired);
                    return Ok(acquired);
                }
                Err(e) if e.oauth_error.as_deref() == Some("invalid_grant") => {
                    tried.push(refresh_token);
                    let newer = self.load().ok().flatten().and_then(|s| s.refresh_token);
                    candidate = newer
                        .into_iter()
                        .chain(held.clone())
                        .find(|t| !tried.contains(t));
                    if candidate.is_none() {
                        return Err(FetchError {
                            class: FailureClass::NeedsLogin,
                            message: format!(
                                "{}; the stored login has expired or was revoked: {}",
                                e.message,
                                self.login_hint()
                            ),
                            oauth_error: e.oauth_error,
                        });
                    }
                    tracing::info!(
                        "the refresh token was refused; trying the newer one in the token file"
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::credential::lifetime::jwt_with as jwt;

    #[test]
    fn pkce_matches_the_rfc_7636_example() {
        assert_eq!(
            code_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn the_request_carries_pkce_state_and_nonce() {
        let endpoint = Url::parse("https://idp.example.com/auth?kc_idp_hint=x").unwrap();
        let request = authorization_request(
            &endpoint,
            &AuthorizationParams {
                client_id: "cli",
                redirect_uri: "https://ml.example.com/seldon-deploy/auth/callback",
                scope: "openid profile",
                audience: None,
                resource: None,
            },
        );
        let query: std::collections::HashMap<_, _> =
            request.url.query_pairs().into_owned().collect();
        assert_eq!(query["kc_idp_hint"], "x");
        assert_eq!(query["response_type"], "code");
        assert_eq!(query["code_challenge_method"], "S256");
        assert_eq!(
            query["code_challenge"],
            code_challenge(request.verifier.expose())
        );
        assert_eq!(query["state"], request.state);
        assert_eq!(query["nonce"], request.nonce);
        assert_eq!(request.verifier.expose().len(), 43);
        assert!(!request.url.as_str().contains(request.verifier.expose()));
        let other = authorization_request(
            &endpoint,
            &AuthorizationParams {
                client_id: "cli",
                redirect_uri: "x",
                scope: "openid",
                audience: None,
                resource: None,
            },
        );
        assert_ne!(other.state, request.state);
        assert_ne!(other.nonce, request.nonce);
    }

    #[test]
    fn default_redirect_uri_is_the_platform_callback() {
        let up = Url::parse("https://ml.example.com").unwrap();
        assert_eq!(
            default_redirect_uri(&up),
            "https://ml.example.com/seldon-deploy/auth/callback"
        );
        let up = Url::parse("https://ml.example.com/base/").unwrap();
        assert_eq!(
            default_redirect_uri(&up),
            "https://ml.example.com/base/seldon-deploy/auth/callback"
        );
    }

    #[test]
    fn id_token_nonce_and_audience_are_checked() {
        let good = jwt(serde_json::json!({"nonce": "n1", "aud": "cli"}));
        assert!(check_id_token(&good, "n1", "cli").is_ok());
        let err = check_id_token(&good, "n2", "cli").unwrap_err();
        assert!(err.contains("nonce"), "{err}");
        let none = jwt(serde_json::json!({"aud": ["cli", "x"]}));
        assert!(check_id_token(&none, "n1", "cli")
            .unwrap_err()
            .contains("no nonce"));
        let wrong_aud = jwt(serde_json::json!({"nonce": "n1", "aud": ["x"]}));
        assert!(check_id_token(&wrong_aud, "n1", "cli")
            .unwrap_err()
            .contains("aud"));
        assert!(check_id_token("opaque", "n1", "cli").is_err());
    }
}
