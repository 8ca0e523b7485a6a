//! Development aid only: an embedded OpenID provider with Keycloak-shaped paths, for `seldon-auth-proxy dev` and tests.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Path of the realm below the listener's address; the issuer is `http://ADDR` + this.
pub const REALM_PATH: &str = "/auth/realms/seldon";
const TOKEN_PATH: &str = "/protocol/openid-connect/token";
const CERTS_PATH: &str = "/protocol/openid-connect/certs";
const DEFAULT_SCOPE: &str = "openid profile email";
/// Refresh tokens (password grant only) stay usable this long unless rotated first.
const REFRESH_TOKEN_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// Who may obtain tokens from the embedded provider, and for how long they live.
#[derive(Clone)]
pub struct DevIdpOptions {
    pub client_id: String,
    pub client_secret: String,
    pub username: String,
    pub password: String,
    /// Lifetime of access and id tokens (`expires_in`), counted in whole seconds.
    pub token_lifetime: Duration,
}

impl Default for DevIdpOptions {
    /// Client `seldon-dev` and user `dev@example.com`, each with a fresh random secret; 60 s tokens.
    fn default() -> Self {
        DevIdpOptions {
            client_id: "seldon-dev".to_string(),
            client_secret: random_string(18),
            username: "dev@example.com".to_string(),
            password: random_string(18),
            token_lifetime: Duration::from_secs(60),
        }
    }
}

impl fmt::Debug for DevIdpOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevIdpOptions")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("token_lifetime", &self.token_lifetime)
            .finish()
    }
}

/// A running embedded provider; dropping it stops accepting connections.
pub struct DevIdp {
    /// `http://127.0.0.1:PORT/auth/realms/seldon`
    pub issuer: String,
    state: Arc<IdpState>,
    server: ServerTask,
}

impl DevIdp {
    /// Number of requests that reached the token endpoint, successful or not.
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::Relaxed)
    }

    pub fn options(&self) -> &DevIdpOptions {
        &self.state.opts
    }

    pub fn token_endpoint(&self) -> String {
        format!("{}{TOKEN_PATH}", self.issuer)
    }

    pub fn jwks_uri(&self) -> String {
        format!("{}{CERTS_PATH}", self.issuer)
    }

    /// Stops accepting, lets open connections finish (up to a few seconds), then returns.
    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// Serves the provider on `listener` until the returned handle is shut down or dropped.
pub async fn start(listener: TcpListener, opts: DevIdpOptions) -> anyhow::Result<DevIdp> {
    let addr = listener.local_addr().context("dev IdP listener address")?;
    let issuer = format!("http://{addr}{REALM_PATH}");
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("cannot generate the dev IdP signing key"))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow::anyhow!("cannot load the dev IdP signing key"))?;
    // Uncompressed SEC1 point: 0x04 || x (32 bytes) || y (32 bytes).
    let point = pair.public_key().as_ref();
    anyhow::ensure!(
        point.len() == 65 && point[0] == 4,
        "unexpected EC public key encoding"
    );
    let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
    let y = URL_SAFE_NO_PAD.encode(&point[33..]);
    // RFC 7638 thumbprint as the key id.
    let thumbprint = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(thumbprint.as_bytes()));
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "use": "sig", "alg": "ES256"});

    let state = Arc::new(IdpState {
        issuer: issuer.clone(),
        opts,
        kid,
        encoding_key: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk,
        token_requests: AtomicU64::new(0),
        refresh_tokens: Mutex::new(HashMap::new()),
    });
    let router = Router::new()
        .route(
            &format!("{REALM_PATH}/.well-known/openid-configuration"),
            get(discovery),
        )
        .route(&format!("{REALM_PATH}{TOKEN_PATH}"), post(token))
        .route(&format!("{REALM_PATH}{CERTS_PATH}"), get(certs))
        .fallback(|| async { oauth_error(StatusCode::NOT_FOUND, "not_found", "Unknown path") })
        .with_state(state.clone());
    let server = ServerTask::spawn(listener, router);
    Ok(DevIdp {
        issuer,
        state,
        server,
    })
}

/// An axum server task shared by the dev servers: graceful stop on `shutdown`, abort on drop.
pub(super) struct ServerTask {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl ServerTask {
    pub(super) fn spawn(listener: TcpListener, router: Router) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                // Resolves on an explicit stop and also when the sender is dropped.
                let _ = stopped.await;
            });
            if let Err(error) = serve.await {
                tracing::warn!(%error, "dev server stopped with an error");
            }
        });
        ServerTask {
            stop: Some(stop),
            task,
        }
    }

    pub(super) async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct IdpState {
    issuer: String,
    opts: DevIdpOptions,
    kid: String,
    encoding_key: EncodingKey,
    jwk: Value,
    token_requests: AtomicU64,
    refresh_tokens: Mutex<HashMap<String, RefreshGrant>>,
}

impl IdpState {
    fn refresh_tokens(&self) -> MutexGuard<'_, HashMap<String, RefreshGrant>> {
        self.refresh_tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

struct RefreshGrant {
    client_id: String,
    scope: String,
    expires_at: Instant,
}

/// The identity a token is issued for.
struct Subject {
    username: String,
    email: String,
    name: String,
    groups: Vec<String>,
}

async fn discovery(State(state): State<Arc<IdpState>>) -> Json<Value> {
    let issuer = &state.issuer;
    Json(json!({
        "issuer": issuer,
        // Listed for discovery-document completeness; only the token and certs endpoints are served.
        "authorization_endpoint": format!("{issuer}/protocol/openid-connect/auth"),
        "token_endpoint": format!("{issuer}{TOKEN_PATH}"),
        "jwks_uri": format!("{issuer}{CERTS_PATH}"),
        "grant_types_supported": ["client_credentials", "password", "refresh_token"],
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "scopes_supported": ["openid", "profile", "email", "groups"],
        "claims_supported": ["iss", "sub", "aud", "azp", "exp", "iat", "preferred_username", "email", "groups", "name"],
    }))
}

async fn certs(State(state): State<Arc<IdpState>>) -> Json<Value> {
    Json(json!({ "keys": [state.jwk] }))
}

async fn token(State(state): State<Arc<IdpState>>, headers: HeaderMap, body: Bytes) -> Response {
    state.token_requests.fetch_add(1, Ordering::Relaxed);
    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let opts = &state.opts;
    let client_ok = client_credentials(&headers, &form).is_some_and(|(id, secret)| {
        same_secret(&id, &opts.client_id) & same_secret(&secret, &opts.client_secret)
    });
    if !client_ok {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "unauthorized_client",
            "Invalid client or Invalid client credentials",
        );
    }
    let requested_scope = form
        .get("scope")
        .map(String::as_str)
        .filter(|s| !s.trim().is_empty())
        .unwrap_or(DEFAULT_SCOPE);
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {
            let username = format!("service-account-{}", opts.client_id);
            let subject = Subject {
                email: format!("{username}@example.com"),
                name: format!("Service account of {}", opts.client_id),
                username,
                groups: vec!["service-accounts".to_string()],
            };
            issue(&state, &subject, requested_scope, false)
        }
        Some("password") => {
            let username = form.get("username").map(String::as_str).unwrap_or("");
            let password = form.get("password").map(String::as_str).unwrap_or("");
            // Keycloak matches usernames case-insensitively.
            if !(username.eq_ignore_ascii_case(&opts.username)
                & same_secret(password, &opts.password))
            {
                return oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_grant",
                    "Invalid user credentials",
                );
            }
            issue(&state, &dev_user(opts), requested_scope, true)
        }
        Some("refresh_token") => {
            let presented = form.get("refresh_token").map(String::as_str).unwrap_or("");
            // Rotation: a refresh token is removed on its first use, whatever the outcome.
            let grant = state.refresh_tokens().remove(presented);
            match grant {
                Some(grant)
                    if grant.client_id == opts.client_id && grant.expires_at > Instant::now() =>
                {
                    issue(&state, &dev_user(opts), &grant.scope, true)
                }
                _ => oauth_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_grant",
                    "Token is not active",
                ),
            }
        }
        Some(_) => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "Unsupported grant_type",
        ),
        None => oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Missing form parameter: grant_type",
        ),
    }
}

fn dev_user(opts: &DevIdpOptions) -> Subject {
    let email = if opts.username.contains('@') {
        opts.username.clone()
    } else {
        format!("{}@example.com", opts.username)
    };
    Subject {
        username: opts.username.clone(),
        email,
        name: "Dev User".to_string(),
        groups: vec!["dev".to_string()],
    }
}

/// Signs an access token and an id token for `subject`; adds a fresh refresh token if asked.
fn issue(state: &IdpState, subject: &Subject, scope: &str, with_refresh: bool) -> Response {
    let opts = &state.opts;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let lifetime = opts.token_lifetime.as_secs();
    let claims = |typ: &str| {
        json!({
            "iss": state.issuer,
            "sub": stable_uuid(&subject.username),
            "aud": opts.client_id,
            "azp": opts.client_id,
            "exp": now + lifetime,
            "iat": now,
            "jti": random_string(16),
            "typ": typ,
            "preferred_username": subject.username,
            "email": subject.email,
            "email_verified": true,
            "name": subject.name,
            "groups": subject.groups,
        })
    };
    let mut access_claims = claims("Bearer");
    access_claims["scope"] = Value::from(scope);
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(state.kid.clone());
    let signed =
        jsonwebtoken::encode(&header, &access_claims, &state.encoding_key).and_then(|access| {
            jsonwebtoken::encode(&header, &claims("ID"), &state.encoding_key).map(|id| (access, id))
        });
    let (access_token, id_token) = match signed {
        Ok(tokens) => tokens,
        Err(error) => {
            tracing::error!(%error, "dev IdP could not sign a token");
            return oauth_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "Token signing failed",
            );
        }
    };
    let mut body = json!({
        "access_token": access_token,
        "id_token": id_token,
        "expires_in": lifetime,
        "token_type": "Bearer",
        "not-before-policy": 0,
        "scope": scope,
    });
    if with_refresh {
        let refresh_token = random_string(32);
        let mut grants = state.refresh_tokens();
        let now = Instant::now();
        grants.retain(|_, grant| grant.expires_at > now);
        grants.insert(
            refresh_token.clone(),
            RefreshGrant {
                client_id: opts.client_id.clone(),
                scope: scope.to_string(),
                expires_at: now + REFRESH_TOKEN_LIFETIME,
            },
        );
        body["refresh_token"] = Value::from(refresh_token);
        body["refresh_expires_in"] = Value::from(REFRESH_TOKEN_LIFETIME.as_secs());
    }
    no_store(Json(body).into_response())
}

/// Client id and secret from HTTP Basic (form-urlencoded parts, RFC 6749 §2.3.1) or the form body.
fn client_credentials(
    headers: &HeaderMap,
    form: &HashMap<String, String>,
) -> Option<(String, String)> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, encoded) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
        let (id, secret) = decoded.split_once(':')?;
        let unescape = |part: &str| {
            percent_encoding::percent_decode_str(&part.replace('+', " "))
                .decode_utf8()
                .map(|s| s.into_owned())
                .ok()
        };
        return Some((unescape(id)?, unescape(secret)?));
    }
    Some((
        form.get("client_id")?.clone(),
        form.get("client_secret")?.clone(),
    ))
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let body = json!({ "error": error, "error_description": description });
    no_store((status, Json(body)).into_response())
}

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// Compares secrets without an early exit on the first differing byte.
fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (Sha256::digest(given), Sha256::digest(expected));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// URL-safe random text from `bytes` random bytes (18 bytes give 24 characters).
fn random_string(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// A UUID-shaped subject id that stays the same for a username across restarts.
fn stable_uuid(name: &str) -> String {
    let d = Sha256::digest(name.as_bytes());
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}
