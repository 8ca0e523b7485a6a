//! Development aid only: an in-memory stand-in for the Seldon platform API that demands verified bearer JWTs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use rand::RngCore;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

use super::idp::ServerTask;
use super::jwks::{JwksVerifier, VerifyError};

/// Every API path lives under this prefix; requests there need `Authorization: Bearer <jwt>`.
pub const API_PREFIX: &str = "/seldon-deploy/api/v1alpha1";
const SDEP_API_VERSION: &str = "machinelearning.seldon.io/v1";

/// Where the stand-in gets the keys (and, optionally, the issuer) that tokens must match.
#[derive(Debug, Clone)]
pub struct PlatformOptions {
    pub jwks_url: String,
    pub issuer: Option<String>,
}

/// One request as it reached the stand-in, recorded whatever its outcome.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    /// Raw path and query exactly as received (percent-encoding untouched).
    pub path_and_query: String,
    pub has_authorization: bool,
    /// `sub` of the verified token; `None` when no token was verified.
    pub subject: Option<String>,
    pub status: u16,
    /// Request headers with `Authorization` removed.
    pub headers: HeaderMap,
}

/// A running stand-in; dropping it stops accepting connections.
pub struct DevPlatform {
    /// `http://127.0.0.1:PORT`; the API is at `url` + [`API_PREFIX`].
    pub url: String,
    state: Arc<PlatformState>,
    server: ServerTask,
}

impl DevPlatform {
    pub fn requests_seen(&self) -> Vec<SeenRequest> {
        lock(&self.state.seen).clone()
    }

    /// Requests turned away with 401 for a missing or invalid token.
    pub fn rejected_count(&self) -> u64 {
        self.state.rejected.load(Ordering::Relaxed)
    }

    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }
}

/// Serves the stand-in on `listener` until the returned handle is shut down or dropped.
pub async fn start(listener: TcpListener, opts: PlatformOptions) -> anyhow::Result<DevPlatform> {
    let addr = listener
        .local_addr()
        .context("dev platform listener address")?;
    let state = Arc::new(PlatformState {
        verifier: JwksVerifier::new(opts.jwks_url, opts.issuer),
        deployments: Mutex::new(BTreeMap::new()),
        seen: Mutex::new(Vec::new()),
        rejected: AtomicU64::new(0),
    });
    let sdeps = format!("{API_PREFIX}/namespaces/{{namespace}}/seldondeployments");
    let router = Router::new()
        .route(&sdeps, get(list).post(create))
        .route(
            &format!("{sdeps}/{{name}}"),
            get(read).put(update).delete(remove),
        )
        .route(&format!("{API_PREFIX}/user"), get(user))
        .route(&format!("{API_PREFIX}/version"), get(version))
        .fallback(|| async { api_error(StatusCode::NOT_FOUND, "no such API path") })
        .method_not_allowed_fallback(|| async {
            api_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        })
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state.clone());
    Ok(DevPlatform {
        url: format!("http://{addr}"),
        state,
        server: ServerTask::spawn(listener, router),
    })
}

type Deployments = BTreeMap<String, BTreeMap<String, Value>>;

struct PlatformState {
    verifier: JwksVerifier,
    /// namespace -> name -> SeldonDeployment
    deployments: Mutex<Deployments>,
    seen: Mutex<Vec<SeenRequest>>,
    rejected: AtomicU64,
}

/// Claims of the verified caller, for handlers that report on the user.
#[derive(Clone)]
struct Caller(Value);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Records every request, 404s paths outside the API, and checks the bearer token on API paths.
async fn guard(State(state): State<Arc<PlatformState>>, mut req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let uri = req.uri();
    let path_and_query = uri
        .path_and_query()
        .map_or_else(|| uri.path().to_string(), |pq| pq.as_str().to_string());
    let in_api = uri.path() == API_PREFIX || uri.path().starts_with(&format!("{API_PREFIX}/"));
    let mut headers = req.headers().clone();
    let has_authorization = headers.remove(header::AUTHORIZATION).is_some();

    let mut subject = None;
    let response = if !in_api {
        api_error(StatusCode::NOT_FOUND, "no such path")
    } else {
        match bearer_token(req.headers()) {
            None => unauthorized(&state, "missing bearer token".to_string(), true),
            Some(token) => match state.verifier.verify(token).await {
                Ok(claims) => {
                    subject = claims.get("sub").and_then(Value::as_str).map(String::from);
                    req.extensions_mut().insert(Caller(claims));
                    next.run(req).await
                }
                Err(VerifyError::KeysUnavailable(reason)) => {
                    tracing::warn!(%reason, "dev platform cannot verify tokens");
                    api_error(StatusCode::SERVICE_UNAVAILABLE, "cannot verify tokens now")
                }
                Err(error) => unauthorized(&state, error.to_string(), false),
            },
        }
    };
    lock(&state.seen).push(SeenRequest {
        method,
        path_and_query,
        has_authorization,
        subject,
        status: response.status().as_u16(),
        headers,
    });
    response
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn unauthorized(state: &PlatformState, reason: String, missing: bool) -> Response {
    state.rejected.fetch_add(1, Ordering::Relaxed);
    let mut response = api_error(StatusCode::UNAUTHORIZED, &format!("unauthorized: {reason}"));
    // RFC 6750 §3: no error code when no credentials were sent at all.
    let challenge = if missing {
        "Bearer"
    } else {
        "Bearer error=\"invalid_token\""
    };
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(challenge),
    );
    response
}

/// The API's `Error` model.
fn api_error(status: StatusCode, message: &str) -> Response {
    let body = json!({ "code": status.as_u16(), "message": message });
    (status, Json(body)).into_response()
}

fn not_found(name: &str) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        &format!("seldondeployments.machinelearning.seldon.io \"{name}\" not found"),
    )
}

async fn list(State(state): State<Arc<PlatformState>>, Path(namespace): Path<String>) -> Response {
    let items: Vec<Value> = lock(&state.deployments)
        .get(&namespace)
        .map(|by_name| by_name.values().cloned().collect())
        .unwrap_or_default();
    Json(json!({
        "apiVersion": SDEP_API_VERSION,
        "kind": "SeldonDeploymentList",
        "metadata": { "resourceVersion": "1" },
        "items": items,
    }))
    .into_response()
}

async fn read(
    State(state): State<Arc<PlatformState>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    match lock(&state.deployments)
        .get(&namespace)
        .and_then(|by_name| by_name.get(&name))
    {
        Some(sdep) => Json(sdep.clone()).into_response(),
        None => not_found(&name),
    }
}

async fn create(
    State(state): State<Arc<PlatformState>>,
    Path(namespace): Path<String>,
    body: Bytes,
) -> Response {
    let mut sdep = match parse_deployment(&body) {
        Ok(sdep) => sdep,
        Err(message) => return api_error(StatusCode::BAD_REQUEST, &message),
    };
    let Some(name) = metadata(&sdep)
        .and_then(|meta| meta.get("name"))
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .map(String::from)
    else {
        return api_error(StatusCode::BAD_REQUEST, "metadata.name is required");
    };
    let mut deployments = lock(&state.deployments);
    let by_name = deployments.entry(namespace.clone()).or_default();
    if by_name.contains_key(&name) {
        return api_error(
            StatusCode::CONFLICT,
            &format!("seldondeployments.machinelearning.seldon.io \"{name}\" already exists"),
        );
    }
    stamp(&mut sdep, &namespace, &name, None);
    by_name.insert(name, sdep.clone());
    Json(sdep).into_response()
}

async fn update(
    State(state): State<Arc<PlatformState>>,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let mut sdep = match parse_deployment(&body) {
        Ok(sdep) => sdep,
        Err(message) => return api_error(StatusCode::BAD_REQUEST, &message),
    };
    let mut deployments = lock(&state.deployments);
    let Some(stored) = deployments
        .get_mut(&namespace)
        .and_then(|by_name| by_name.get_mut(&name))
    else {
        return not_found(&name);
    };
    stamp(&mut sdep, &namespace, &name, metadata(stored));
    *stored = sdep.clone();
    Json(sdep).into_response()
}

async fn remove(
    State(state): State<Arc<PlatformState>>,
    Path((namespace, name)): Path<(String, String)>,
) -> Response {
    let removed = lock(&state.deployments)
        .get_mut(&namespace)
        .and_then(|by_name| by_name.remove(&name));
    match removed {
        // The API answers a generic (schema-less) object.
        Some(_) => Json(json!({})).into_response(),
        None => not_found(&name),
    }
}

/// `UserInfo` from the verified token's claims.
async fn user(Extension(Caller(claims)): Extension<Caller>) -> Json<Value> {
    let text = |key: &str| claims.get(key).and_then(Value::as_str).map(String::from);
    let id = text("preferred_username").or_else(|| text("sub"));
    let groups: Vec<&str> = claims
        .get("groups")
        .and_then(Value::as_array)
        .map(|groups| groups.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    Json(json!({
        "Id": id.clone().unwrap_or_default(),
        "Name": text("name").or(id).unwrap_or_default(),
        "Email": text("email").unwrap_or_default(),
        "Groups": groups,
    }))
}

/// `VersionInfo`, marked as the stand-in.
async fn version() -> Json<Value> {
    Json(json!({
        "BuildTime": "",
        "BuildVersion": "dev-stand-in",
        "GitBranch": "",
        "GitCommit": "",
        "GitStatus": "",
        "ReleaseType": "development",
    }))
}

/// A JSON object with an object `metadata`, or why not.
fn parse_deployment(body: &[u8]) -> Result<Value, String> {
    let sdep: Value =
        serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    match metadata(&sdep) {
        Some(_) => Ok(sdep),
        None => Err("body must be a SeldonDeployment object with metadata".to_string()),
    }
}

fn metadata(sdep: &Value) -> Option<&Map<String, Value>> {
    sdep.get("metadata").and_then(Value::as_object)
}

/// Fills in what the server owns: kind, metadata (keeping uid and creation time of `previous`) and status.
fn stamp(sdep: &mut Value, namespace: &str, name: &str, previous: Option<&Map<String, Value>>) {
    let Some(object) = sdep.as_object_mut() else {
        return;
    };
    object
        .entry("apiVersion")
        .or_insert_with(|| Value::from(SDEP_API_VERSION));
    object
        .entry("kind")
        .or_insert_with(|| Value::from("SeldonDeployment"));
    let kept = |key: &str| previous.and_then(|meta| meta.get(key)).cloned();
    let generation = kept("generation").and_then(|g| g.as_i64()).unwrap_or(0) + 1;
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("name".into(), Value::from(name));
        meta.insert("namespace".into(), Value::from(namespace));
        meta.insert("uid".into(), kept("uid").unwrap_or_else(random_uid));
        let created = kept("creationTimestamp").unwrap_or_else(|| Value::from(now_rfc3339()));
        meta.insert("creationTimestamp".into(), created);
        meta.insert("generation".into(), Value::from(generation));
        meta.insert(
            "resourceVersion".into(),
            Value::from(generation.to_string()),
        );
    }
    object.insert(
        "status".into(),
        json!({
            "state": "Available",
            "description": "development stand-in: nothing is actually deployed",
            "replicas": 1,
            "address": {
                "url": format!("http://{name}-default.{namespace}.svc.cluster.local:8000/api/v1.0/predictions")
            },
        }),
    );
}

fn random_uid() -> Value {
    let mut b = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Value::from(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
