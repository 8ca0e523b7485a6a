//! The `login` subcommand (auth_code): prints a PKCE authorization URL, takes the code a
//! person pastes (or receives it once on a loopback redirect URI), exchanges it, checks the
//! id_token's nonce and stores the tokens in the token file for `serve`, `token` and `check`.

use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::Html;
use axum::Router;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};
use url::Url;

use crate::cli::{EXIT_CONFIG, EXIT_NO_CREDENTIAL};
use crate::config::{AuthMethod, Config};
use crate::credential::auth_code::{
    authorization_request, check_id_token, default_redirect_uri, AuthCode, AuthorizationParams,
};
use crate::credential::oidc::OidcClient;
use crate::credential::{token_file, FailureClass};
use crate::secret::Secret;

/// How long `login` waits for the code.
const WAIT_FOR_CODE: Duration = Duration::from_secs(600);

/// Why a login ended without stored tokens: the settings (exit 2) or the login itself (exit 1).
#[derive(Debug)]
enum LoginError {
    Config(String),
    Failed(String),
}

/// Runs `login` and maps the outcome to the exit code.
pub async fn run(config: Config) -> ExitCode {
    match login(&config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(LoginError::Config(message)) => {
            eprintln!("seldon-auth-proxy login: {message}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(LoginError::Failed(message)) => {
            eprintln!("seldon-auth-proxy login: {message}");
            ExitCode::from(EXIT_NO_CREDENTIAL)
        }
    }
}

async fn login(config: &Config) -> Result<(), LoginError> {
    if config.auth.method != AuthMethod::AuthCode {
        return Err(LoginError::Config(format!(
            "login is for --auth-method auth_code (the configured method is {:?})",
            config.auth.method
        )));
    }
    let http = crate::outbound::idp_client(&config.tls, config.auth.idp_timeout)
        .map_err(|e| LoginError::Config(format!("{e:#}")))?;
    let source = AuthCode::new(&config.auth, OidcClient::new(&config.auth, http))
        .map_err(LoginError::Config)?;
    token_file::ensure_parent(&source.path).map_err(|e| {
        LoginError::Config(format!(
            "token_cache_file: cannot create the folder of {}: {e}",
            source.path.display()
        ))
    })?;
    let oidc = &source.oidc;
    let discovery = oidc.discovery().await.map_err(|e| match e.class {
        FailureClass::Transient => LoginError::Failed(e.message),
        _ => LoginError::Config(e.message),
    })?;
    let endpoint = discovery.authorization_endpoint.clone().ok_or_else(|| {
        LoginError::Config(
            "the IdP's discovery document names no authorization_endpoint".to_owned(),
        )
    })?;
    let redirect_uri = match &config.auth.redirect_uri {
        Some(url) => url.to_string(),
        None => default_redirect_uri(&config.upstream),
    };
    let redirect_url = Url::parse(&redirect_uri)
        .map_err(|e| LoginError::Config(format!("redirect_uri: `{redirect_uri}`: {e}")))?;
    let request = authorization_request(
        &endpoint,
        &AuthorizationParams {
            client_id: &oidc.client_id,
            redirect_uri: &redirect_uri,
            scope: &oidc.scope,
            audience: config.auth.audience.as_deref(),
            resource: config.auth.resource.as_deref(),
        },
    );

    // An explicit loopback redirect URI is served here (the default one is the platform's
    // page, which shows the code). Bind before printing, so no redirect finds it closed.
    let listen_on = match config.auth.redirect_uri {
        Some(_) => loopback_address(&redirect_url)?,
        None => None,
    };
    let listener = match listen_on {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            LoginError::Config(format!(
                "redirect_uri: cannot listen on {addr} for the redirect: {e}"
            ))
        })?),
        None => None,
    };
    if listener.is_some() {
        eprintln!(
            "Open this URL in a browser and log in; this waits up to {} minutes for the IdP to redirect to {}:",
            WAIT_FOR_CODE.as_secs() / 60,
            Url::parse(&redirect_uri).map(|u| crate::credential::session::redact(&u)).unwrap_or_default()
        );
    } else {
        eprintln!("Open this URL in a browser and log in:");
    }
    print_url(&request.url)
        .map_err(|e| LoginError::Failed(format!("cannot write the URL to stdout: {e}")))?;

    let code = match listener {
        Some(listener) => receive_code(listener, &redirect_url, &request.state).await?,
        None => {
            eprintln!(
                "Then paste the code the page shows (or the whole address it redirected to) and press Enter:"
            );
            paste_code(&request.state).await?
        }
    };

    let (acquired, id_token) = oidc
        .grant_with_id_token(
            "authorization_code",
            oidc.authorization_code_form(code.expose(), &redirect_uri, request.verifier.expose()),
        )
        .await
        .map_err(|e| LoginError::Failed(format!("exchanging the code failed: {}", e.message)))?;
    let claims = match id_token {
        Some(id_token) => Some(
            check_id_token(id_token.expose(), &request.nonce, &oidc.client_id)
                .map_err(|e| LoginError::Failed(format!("{e}; the tokens were not stored")))?,
        ),
        None if oidc.scope.split(' ').any(|s| s == "openid") => {
            return Err(LoginError::Failed(
                "the IdP answered without an id_token although the scope asks for openid, so the nonce cannot be checked; the tokens were not stored".into(),
            ));
        }
        None => None,
    };
    if acquired.refresh_token.is_none() {
        eprintln!(
            "warning: the IdP issued no refresh token, so the proxy can use this login only until its token expires; allow refresh tokens (offline_access) for client `{}`",
            oidc.client_id
        );
    }
    token_file::save(&source.path, &source.stored(&acquired))
        .map_err(|e| LoginError::Failed(format!("cannot write {}: {e}", source.path.display())))?;
    let who = claims
        .as_ref()
        .and_then(|c| {
            ["preferred_username", "email", "sub"]
                .iter()
                .find_map(|k| c.get(*k).and_then(|v| v.as_str()).map(str::to_owned))
        })
        .map(|name| format!(" as {name}"))
        .unwrap_or_default();
    eprintln!(
        "Logged in{who}. The tokens are stored in {} (mode 0600); `seldon-auth-proxy serve --auth-method auth_code` uses them.",
        display(&source.path)
    );
    Ok(())
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

fn print_url(url: &Url) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{url}")?;
    out.flush()
}

/// The address to listen on when the redirect URI is plain http to this machine.
fn loopback_address(redirect: &Url) -> Result<Option<SocketAddr>, LoginError> {
    if redirect.scheme() != "http" {
        return Ok(None);
    }
    let ip = match redirect.host() {
        Some(url::Host::Ipv4(ip)) if ip.is_loopback() => IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) if ip.is_loopback() => IpAddr::V6(ip),
        Some(url::Host::Domain(d)) if d.eq_ignore_ascii_case("localhost") => {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        }
        _ => return Ok(None),
    };
    match redirect.port_or_known_default() {
        Some(0) | None => Err(LoginError::Config(
            "redirect_uri: a loopback redirect URI needs the port to listen on, e.g. http://127.0.0.1:8250/callback".into(),
        )),
        Some(port) => Ok(Some(SocketAddr::new(ip, port))),
    }
}

/// The parameters of a redirect to the callback.
#[derive(Default)]
struct CallbackParams {
    code: Option<Secret>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

fn callback_params(query: &str) -> CallbackParams {
    let mut params = CallbackParams::default();
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "code" if params.code.is_none() => params.code = Some(Secret::new(value)),
            "state" if params.state.is_none() => params.state = Some(value.into_owned()),
            "error" if params.error.is_none() => params.error = Some(value.into_owned()),
            "error_description" if params.error_description.is_none() => {
                params.error_description = Some(value.into_owned())
            }
            _ => {}
        }
    }
    params
}

fn same_state(got: &str, expected: &str) -> bool {
    bool::from(got.as_bytes().ct_eq(expected.as_bytes()))
}

/// The IdP's error answer, quoted for a person (never a code or token).
fn idp_error(params: &CallbackParams) -> Option<String> {
    let error = params.error.as_ref()?;
    let description = params
        .error_description
        .as_ref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default();
    Some(format!("the IdP refused the login: {error}{description}"))
}

/// Reads the code from a pasted line: the bare code, or the whole redirect address (whose
/// `state` is then checked).
fn parse_pasted(text: &str, expected_state: &str) -> Result<Secret, LoginError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(LoginError::Failed("no code was entered".into()));
    }
    let query = match Url::parse(text) {
        Ok(url) => Some(url.query().unwrap_or_default().to_owned()),
        Err(_) if text.contains("code=") || text.contains("error=") => {
            Some(text.trim_start_matches('?').to_owned())
        }
        Err(_) => None,
    };
    let Some(query) = query else {
        return Ok(Secret::new(text));
    };
    let params = callback_params(&query);
    if let Some(state) = &params.state {
        if !same_state(state, expected_state) {
            return Err(LoginError::Failed(
                "the pasted address answers another login (its state differs); start `seldon-auth-proxy login` again".into(),
            ));
        }
    }
    if let Some(error) = idp_error(&params) {
        return Err(LoginError::Failed(error));
    }
    params
        .code
        .filter(|c| !c.expose().is_empty())
        .ok_or_else(|| LoginError::Failed("the pasted address carries no code".into()))
}

/// Reads one line from standard input on a thread of its own (a blocked read must not keep
/// the process alive after a timeout).
async fn paste_code(expected_state: &str) -> Result<Secret, LoginError> {
    let (tx, rx) = oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = std::io::stdin().lock().read_line(&mut line).map(|_| line);
        let _ = tx.send(read);
    });
    let line = match tokio::time::timeout(WAIT_FOR_CODE, rx).await {
        Ok(Ok(Ok(line))) => line,
        Ok(Ok(Err(e))) => {
            return Err(LoginError::Failed(format!(
                "cannot read the code from standard input: {e}"
            )))
        }
        Ok(Err(_)) => return Err(LoginError::Failed("cannot read standard input".into())),
        Err(_) => {
            return Err(LoginError::Failed(format!(
                "no code was entered within {} minutes",
                WAIT_FOR_CODE.as_secs() / 60
            )))
        }
    };
    if line.is_empty() {
        return Err(LoginError::Failed(
            "standard input ended before a code was entered".into(),
        ));
    }
    parse_pasted(&line, expected_state)
}

struct Callback {
    path: String,
    state: String,
    tx: mpsc::Sender<Result<Secret, String>>,
}

fn page(status: StatusCode, title: &str, text: &str) -> (StatusCode, Html<String>) {
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    (
        status,
        Html(format!(
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>seldon-auth-proxy login</title></head><body><h1>{}</h1><p>{}</p></body></html>",
            escape(title),
            escape(text)
        )),
    )
}

async fn on_callback(
    State(callback): State<Arc<Callback>>,
    uri: Uri,
) -> (StatusCode, Html<String>) {
    if uri.path() != callback.path {
        return page(
            StatusCode::NOT_FOUND,
            "Not found",
            "This is not the login callback.",
        );
    }
    let params = callback_params(uri.query().unwrap_or_default());
    let state_ok = params
        .state
        .as_deref()
        .is_some_and(|s| same_state(s, &callback.state));
    if !state_ok {
        eprintln!("seldon-auth-proxy login: ignored a redirect that does not answer this login (state mismatch)");
        return page(
            StatusCode::BAD_REQUEST,
            "Not this login",
            "This answer does not belong to the login in progress (its state differs) and was ignored.",
        );
    }
    if let Some(error) = idp_error(&params) {
        let _ = callback.tx.send(Err(error.clone())).await;
        return page(
            StatusCode::OK,
            "Login failed",
            &format!("{error}. Return to the terminal."),
        );
    }
    match params.code.filter(|c| !c.expose().is_empty()) {
        Some(code) => {
            let _ = callback.tx.send(Ok(code)).await;
            page(
                StatusCode::OK,
                "Logged in",
                "seldon-auth-proxy received the login. You can close this tab and return to the terminal.",
            )
        }
        None => page(
            StatusCode::BAD_REQUEST,
            "No code",
            "The redirect carries no code.",
        ),
    }
}

/// Serves the redirect URI once: waits for the IdP's redirect with the code and this
/// login's `state`, answers the browser with a small page, and stops listening.
async fn receive_code(
    listener: tokio::net::TcpListener,
    redirect: &Url,
    state: &str,
) -> Result<Secret, LoginError> {
    let (tx, mut rx) = mpsc::channel(1);
    let callback = Arc::new(Callback {
        path: redirect.path().to_owned(),
        state: state.to_owned(),
        tx,
    });
    let app = Router::new().fallback(on_callback).with_state(callback);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await;
    });
    let outcome = tokio::time::timeout(WAIT_FOR_CODE, rx.recv()).await;
    let _ = stop_tx.send(());
    // Let the page reach the browser, but do not wait on a browser that keeps the connection.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    match outcome {
        Ok(Some(Ok(code))) => Ok(code),
        Ok(Some(Err(error))) => Err(LoginError::Failed(error)),
        Ok(None) => Err(LoginError::Failed("the callback listener stopped".into())),
        Err(_) => Err(LoginError::Failed(format!(
            "no redirect arrived within {} minutes",
            WAIT_FOR_CODE.as_secs() / 60
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pasted_codes_and_addresses_are_read() {
        assert_eq!(
            parse_pasted("  abc.def \n", "s1").unwrap().expose(),
            "abc.def"
        );
        let url = "https://ml.example.com/seldon-deploy/auth/callback?code=c1&state=s1";
        assert_eq!(parse_pasted(url, "s1").unwrap().expose(), "c1");
        assert_eq!(
            parse_pasted("?state=s1&code=c2", "s1").unwrap().expose(),
            "c2"
        );
        let err = parse_pasted(url, "s2").unwrap_err();
        assert!(matches!(err, LoginError::Failed(m) if m.contains("state")));
        let err = parse_pasted("https://x/cb?error=access_denied&state=s1", "s1").unwrap_err();
        assert!(matches!(err, LoginError::Failed(m) if m.contains("access_denied")));
        assert!(parse_pasted("   ", "s1").is_err());
    }

    #[test]
    fn only_loopback_http_redirects_are_listened_on() {
        let addr = |s: &str| loopback_address(&Url::parse(s).unwrap());
        assert_eq!(
            addr("http://127.0.0.1:8250/callback").unwrap(),
            Some("127.0.0.1:8250".parse().unwrap())
        );
        assert_eq!(
            addr("http://localhost:8250/cb").unwrap(),
            Some("127.0.0.1:8250".parse().unwrap())
        );
        assert_eq!(
            addr("http://[::1]:9/cb").unwrap(),
            Some("[::1]:9".parse().unwrap())
        );
        assert_eq!(addr("https://127.0.0.1:8250/cb").unwrap(), None);
        assert_eq!(addr("http://ml.example.com/cb").unwrap(), None);
        assert!(addr("http://127.0.0.1:0/cb").is_err());
    }
}
