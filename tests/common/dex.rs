//! A Dex-like login in front of a stand-in platform, as Kubeflow deploys it (Dex behind
//! authservice), on an ephemeral loopback port: the redirect chain, the password form, the
//! approval step, the callback that sets the session cookie, and an API that wants it.
//!
//! The chain (Dex's own redirects are path-only, as Dex sends them; the real SDK relies on it):
//! platform path without a session → 302 `BASE/dex/auth?client_id=authservice&...&state=S`
//! → 302 `/dex/auth/local?...` → 302 `/dex/auth/local/login?back=&state=REQ` → 200 form posting
//! to that same URL (`login`, `password`; urlencoded or multipart) → 303 `/dex/approval?req=REQ`
//! → 303 `BASE/authservice/oidc/callback?code=C&state=S` → `Set-Cookie: authservice_session=..`
//! and 302 back to the original URL. A wrong password shows the form again (200) with an error.
//! API paths answer 200 JSON with a valid session, else 401 for XHR-ish requests
//! (`Accept: application/json` without text/html, or `X-Requested-With`) and the redirect otherwise.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use rand::RngCore;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const API: &str = "/seldon-deploy/api/v1alpha1";
const CLIENT_ID: &str = "authservice";

#[derive(Clone, Debug)]
pub struct DexOptions {
    pub username: String,
    pub password: String,
    pub cookie_name: String,
    /// `Max-Age` of the session cookie; none by default, like authservice.
    pub max_age: Option<u64>,
    /// Replaces the login form's action (to test where the password may go).
    pub form_action: Option<String>,
}

impl DexOptions {
    pub fn new(username: &str, password: &str) -> DexOptions {
        DexOptions {
            username: username.into(),
            password: password.into(),
            cookie_name: "authservice_session".into(),
            max_age: None,
            form_action: None,
        }
    }
}

/// One API request as the platform saw it.
#[derive(Clone, Debug)]
pub struct ApiSeen {
    pub path: String,
    pub cookie: Option<String>,
    pub status: u16,
}

struct AuthRequest {
    authservice_state: String,
    redirect_uri: String,
    user: Option<String>,
}

#[derive(Default)]
struct Maps {
    /// authservice state → the URL the caller wanted.
    pending: HashMap<String, String>,
    /// Dex auth request id → the request.
    requests: HashMap<String, AuthRequest>,
    /// code → (authservice state, user).
    codes: HashMap<String, (String, String)>,
    /// session cookie value → user.
    sessions: HashMap<String, String>,
    api: Vec<ApiSeen>,
    /// Content types of the password posts.
    post_types: Vec<String>,
}

struct DexState {
    options: Mutex<DexOptions>,
    base: String,
    maps: Mutex<Maps>,
    logins: AtomicU64,
    rejected: AtomicU64,
}

/// A running fixture; stopped on `stop()` or drop.
pub struct DexFixture {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    state: Arc<DexState>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn random() -> String {
    let mut bytes = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl DexFixture {
    pub async fn start(options: DexOptions) -> DexFixture {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Dex fixture");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let state = Arc::new(DexState {
            options: Mutex::new(options),
            base: url.clone(),
            maps: Mutex::new(Maps::default()),
            logins: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        });
        let app = Router::new().fallback(handle).with_state(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        DexFixture {
            url,
            state,
            stop: Some(stop),
            task,
        }
    }

    /// Forgets every session (as authservice does when its store is cleared).
    pub fn expire_sessions(&self) {
        lock(&self.state.maps).sessions.clear();
    }

    /// Sessions handed out so far.
    pub fn logins(&self) -> u64 {
        self.state.logins.load(Ordering::SeqCst)
    }

    /// Password posts refused so far.
    pub fn rejected(&self) -> u64 {
        self.state.rejected.load(Ordering::SeqCst)
    }

    pub fn api_requests(&self) -> Vec<ApiSeen> {
        lock(&self.state.maps).api.clone()
    }

    /// The content types the password form was posted with.
    pub fn post_types(&self) -> Vec<String> {
        lock(&self.state.maps).post_types.clone()
    }

    /// The session cookie values currently valid.
    pub fn sessions(&self) -> Vec<String> {
        lock(&self.state.maps).sessions.keys().cloned().collect()
    }

    pub fn set_password(&self, password: &str) {
        lock(&self.state.options).password = password.into();
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for DexFixture {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn redirect(status: StatusCode, location: &str) -> Response {
    let mut response = status.into_response();
    response.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(location).expect("a header-safe location"),
    );
    response
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

fn query(uri: &Uri) -> HashMap<String, String> {
    url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The cookie named `name` in the request's Cookie headers (lenient: the SDK sends a whole
/// Set-Cookie line back, attributes included).
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Form fields from an urlencoded or multipart body (Dex's FormValue accepts both).
fn form_fields(headers: &HeaderMap, body: &[u8]) -> HashMap<String, String> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if let Some(boundary) = content_type
        .split(';')
        .filter_map(|p| p.trim().strip_prefix("boundary="))
        .next()
    {
        let boundary = format!("--{}", boundary.trim_matches('"'));
        let text = String::from_utf8_lossy(body);
        let mut fields = HashMap::new();
        for part in text.split(boundary.as_str()) {
            let Some((head, value)) = part.split_once("\r\n\r\n") else {
                continue;
            };
            let name = head
                .split("name=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next());
            if let Some(name) = name {
                let value = value.strip_suffix("\r\n").unwrap_or(value);
                fields.insert(name.to_owned(), value.to_owned());
            }
        }
        return fields;
    }
    url::form_urlencoded::parse(body).into_owned().collect()
}

fn login_page(action: &str, invalid: bool) -> String {
    let error = if invalid {
        r#"<div id="login-error" class="dex-error-box">Invalid Email Address and password.</div>"#
    } else {
        ""
    };
    format!(
        r#"<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>dex</title><link href="/dex/theme/styles.css" rel="stylesheet"></head>
<body class="theme-body"><div class="theme-panel">
  <h2 class="theme-heading">Log in to Your Account</h2>
  <form method="post" action="{}">
    <div class="theme-form-row"><div class="theme-form-label"><label for="userid">Email Address</label></div>
      <input tabindex="1" required id="login" name="login" type="text" class="theme-form-input" placeholder="email address" autofocus />
    </div>
    <div class="theme-form-row"><div class="theme-form-label"><label for="password">Password</label></div>
      <input tabindex="2" required id="password" name="password" type="password" class="theme-form-input" placeholder="password" />
    </div>
    {error}
    <button tabindex="3" id="submit-login" type="submit" class="dex-btn theme-btn--primary">Login</button>
  </form>
</div></body></html>"#,
        escape(action)
    )
}

fn api_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "code": status.as_u16(), "message": message })),
    )
        .into_response()
}

async fn handle(
    State(state): State<Arc<DexState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let q = query(&uri);
    let options = lock(&state.options).clone();
    match (method.as_str(), path.as_str()) {
        ("GET", "/dex/auth") => {
            // One connector: straight on to it with the same query.
            redirect(
                StatusCode::FOUND,
                &format!("/dex/auth/local?{}", uri.query().unwrap_or_default()),
            )
        }
        ("GET", "/dex/auth/local") => {
            let redirect_uri = q.get("redirect_uri").cloned().unwrap_or_default();
            if q.get("client_id").map(String::as_str) != Some(CLIENT_ID)
                || redirect_uri != format!("{}/authservice/oidc/callback", state.base)
                || q.get("response_type").map(String::as_str) != Some("code")
            {
                return html(StatusCode::BAD_REQUEST, "Bad authorization request".into());
            }
            let id = random();
            lock(&state.maps).requests.insert(
                id.clone(),
                AuthRequest {
                    authservice_state: q.get("state").cloned().unwrap_or_default(),
                    redirect_uri,
                    user: None,
                },
            );
            redirect(
                StatusCode::FOUND,
                &format!("/dex/auth/local/login?back=&state={id}"),
            )
        }
        ("GET", "/dex/auth/local/login") | ("POST", "/dex/auth/local/login") => {
            let id = q.get("state").cloned().unwrap_or_default();
            if !lock(&state.maps).requests.contains_key(&id) {
                return html(
                    StatusCode::BAD_REQUEST,
                    "Requested resource does not exist.".into(),
                );
            }
            let action = options
                .form_action
                .clone()
                .unwrap_or_else(|| format!("/dex/auth/local/login?back=&state={id}"));
            if method == Method::GET {
                return html(StatusCode::OK, login_page(&action, false));
            }
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .split(';')
                .next()
                .unwrap_or_default()
                .to_owned();
            lock(&state.maps).post_types.push(content_type);
            let fields = form_fields(&headers, &body);
            let ok = fields.get("login") == Some(&options.username)
                && fields.get("password") == Some(&options.password);
            if !ok {
                state.rejected.fetch_add(1, Ordering::SeqCst);
                return html(StatusCode::OK, login_page(&action, true));
            }
            if let Some(request) = lock(&state.maps).requests.get_mut(&id) {
                request.user = Some(options.username.clone());
            }
            redirect(StatusCode::SEE_OTHER, &format!("/dex/approval?req={id}"))
        }
        ("GET", "/dex/approval") => {
            let id = q.get("req").cloned().unwrap_or_default();
            let mut maps = lock(&state.maps);
            let Some(request) = maps.requests.remove(&id) else {
                return html(
                    StatusCode::BAD_REQUEST,
                    "Requested resource does not exist.".into(),
                );
            };
            let Some(user) = request.user else {
                return html(
                    StatusCode::BAD_REQUEST,
                    "Login process not yet finalized.".into(),
                );
            };
            let code = random();
            maps.codes
                .insert(code.clone(), (request.authservice_state.clone(), user));
            let location = format!(
                "{}?code={code}&state={}",
                request.redirect_uri,
                url::form_urlencoded::byte_serialize(request.authservice_state.as_bytes())
                    .collect::<String>()
            );
            redirect(StatusCode::SEE_OTHER, &location)
        }
        ("GET", "/authservice/oidc/callback") => {
            let mut maps = lock(&state.maps);
            let code = q.get("code").cloned().unwrap_or_default();
            let Some((expected_state, user)) = maps.codes.remove(&code) else {
                return html(StatusCode::UNAUTHORIZED, "invalid code".into());
            };
            if q.get("state") != Some(&expected_state) {
                return html(StatusCode::BAD_REQUEST, "state mismatch".into());
            }
            let Some(original) = maps.pending.remove(&expected_state) else {
                return html(StatusCode::BAD_REQUEST, "unknown state".into());
            };
            let session = random();
            maps.sessions.insert(session.clone(), user);
            state.logins.fetch_add(1, Ordering::SeqCst);
            let mut set_cookie = format!("{}={session}; Path=/; HttpOnly", options.cookie_name);
            if let Some(max_age) = options.max_age {
                set_cookie.push_str(&format!("; Max-Age={max_age}"));
            }
            let mut response = redirect(StatusCode::FOUND, &original);
            response.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_str(&set_cookie).expect("a header-safe cookie"),
            );
            response
        }
        _ => platform(&state, &options, &method, &uri, &headers),
    }
}

/// The platform behind authservice.
fn platform(
    state: &DexState,
    options: &DexOptions,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Response {
    let path = uri.path().to_owned();
    let session = cookie(headers, &options.cookie_name);
    let user = session
        .as_ref()
        .and_then(|s| lock(&state.maps).sessions.get(s).cloned());
    let in_api = path == API || path.starts_with(&format!("{API}/"));
    let cookie_header = headers
        .get(header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let response = match user {
        Some(user) if in_api => {
            if path == format!("{API}/user") {
                (
                    StatusCode::OK,
                    axum::Json(
                        json!({"Name": user, "Email": format!("{user}"), "Groups": [], "ID": "1"}),
                    ),
                )
                    .into_response()
            } else {
                (
                    StatusCode::OK,
                    axum::Json(json!({"user": user, "method": method.as_str(), "path": path})),
                )
                    .into_response()
            }
        }
        Some(_) => html(
            StatusCode::OK,
            "<html><body>Seldon Deploy</body></html>".into(),
        ),
        None => {
            let accept = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let xhr = headers.contains_key("x-requested-with")
                || (accept.contains("application/json") && !accept.contains("text/html"));
            if xhr {
                api_error(StatusCode::UNAUTHORIZED, "no valid session")
            } else {
                let authservice_state = random();
                let original = uri
                    .path_and_query()
                    .map(|p| p.as_str().to_owned())
                    .unwrap_or_else(|| path.clone());
                lock(&state.maps)
                    .pending
                    .insert(authservice_state.clone(), original);
                let callback = format!("{}/authservice/oidc/callback", state.base);
                let location = format!(
                    "{}/dex/auth?client_id={CLIENT_ID}&redirect_uri={}&response_type=code&scope=openid+profile+email+groups&state={authservice_state}",
                    state.base,
                    url::form_urlencoded::byte_serialize(callback.as_bytes()).collect::<String>()
                );
                redirect(StatusCode::FOUND, &location)
            }
        }
    };
    if in_api {
        lock(&state.maps).api.push(ApiSeen {
            path,
            cookie: cookie_header,
            status: response.status().as_u16(),
        });
    }
    response
}
