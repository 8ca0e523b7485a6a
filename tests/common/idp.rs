//! Test harness for the Keycloak-like OpenID provider in tests/idp (keycloak-mock.js on npm's oauth2-mock-server):
//! options mirroring the launcher's JSON config, start, the /__control/ endpoints, stop, and the claims of its tokens.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use super::deps;
use super::http::client_with_timeout;

/// An OAuth client of the realm; `secret: None` makes it a public client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdpClient {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl IdpClient {
    pub fn confidential(id: &str, secret: &str) -> IdpClient {
        IdpClient {
            id: id.into(),
            secret: Some(secret.into()),
        }
    }

    pub fn public(id: &str) -> IdpClient {
        IdpClient {
            id: id.into(),
            secret: None,
        }
    }
}

/// A user of the realm. Without an email the tokens carry `<username>@example.com`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdpUser {
    pub username: String,
    pub password: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub groups: Vec<String>,
}

impl IdpUser {
    pub fn new(username: &str, password: &str) -> IdpUser {
        IdpUser {
            username: username.into(),
            password: password.into(),
            email: None,
            groups: Vec::new(),
        }
    }

    pub fn email(mut self, email: &str) -> IdpUser {
        self.email = Some(email.into());
        self
    }

    pub fn groups(mut self, groups: &[&str]) -> IdpUser {
        self.groups = groups.iter().map(|g| g.to_string()).collect();
        self
    }
}

/// The launcher's configuration (serialised as its JSON argument).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct IdpOptions {
    /// 0 = an ephemeral port.
    pub port: u16,
    pub realm: String,
    pub clients: Vec<IdpClient>,
    /// The first user is the one the authorize endpoint logs in (unless `login_hint` names another).
    pub users: Vec<IdpUser>,
    pub token_lifetime_seconds: u64,
    pub refresh_token_lifetime_seconds: u64,
    pub id_token_for_client_credentials: bool,
    pub rotate_refresh_tokens: bool,
    /// How the token endpoint behaves from the start (a restart in [`IdpMode::Fail503`] is back exactly when
    /// switched to normal, however long the start took).
    pub mode: IdpMode,
}

impl Default for IdpOptions {
    fn default() -> IdpOptions {
        IdpOptions {
            port: 0,
            realm: "test".into(),
            clients: Vec::new(),
            users: Vec::new(),
            token_lifetime_seconds: 60,
            refresh_token_lifetime_seconds: 1800,
            id_token_for_client_credentials: false,
            rotate_refresh_tokens: true,
            mode: IdpMode::Normal,
        }
    }
}

impl IdpOptions {
    pub fn port(mut self, port: u16) -> IdpOptions {
        self.port = port;
        self
    }

    pub fn realm(mut self, realm: &str) -> IdpOptions {
        self.realm = realm.into();
        self
    }

    pub fn client(mut self, id: &str, secret: &str) -> IdpOptions {
        self.clients.push(IdpClient::confidential(id, secret));
        self
    }

    pub fn public_client(mut self, id: &str) -> IdpOptions {
        self.clients.push(IdpClient::public(id));
        self
    }

    pub fn user(self, username: &str, password: &str) -> IdpOptions {
        self.add_user(IdpUser::new(username, password))
    }

    pub fn add_user(mut self, user: IdpUser) -> IdpOptions {
        self.users.push(user);
        self
    }

    pub fn token_lifetime(mut self, seconds: u64) -> IdpOptions {
        self.token_lifetime_seconds = seconds;
        self
    }

    pub fn refresh_token_lifetime(mut self, seconds: u64) -> IdpOptions {
        self.refresh_token_lifetime_seconds = seconds;
        self
    }

    pub fn id_token_for_client_credentials(mut self, yes: bool) -> IdpOptions {
        self.id_token_for_client_credentials = yes;
        self
    }

    pub fn rotate_refresh_tokens(mut self, yes: bool) -> IdpOptions {
        self.rotate_refresh_tokens = yes;
        self
    }

    pub fn mode(mut self, mode: IdpMode) -> IdpOptions {
        self.mode = mode;
        self
    }
}

/// How the token endpoint behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IdpMode {
    Normal,
    /// Answers 503 `{"error":"temporarily_unavailable",...}`.
    Fail503,
    /// Reads the request and never answers.
    Hang,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct GrantCounts {
    pub ok: u64,
    pub error: u64,
}

/// Token endpoint requests counted since start or the last reset; hung and 503 answers count as errors.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct IdpStats {
    /// By `grant_type` as sent (`(missing)` when absent).
    pub token_requests: BTreeMap<String, GrantCounts>,
    pub total: u64,
}

impl IdpStats {
    pub fn token_requests(&self, grant: &str) -> u64 {
        self.ok(grant) + self.errors(grant)
    }

    pub fn ok(&self, grant: &str) -> u64 {
        self.token_requests.get(grant).map_or(0, |c| c.ok)
    }

    pub fn errors(&self, grant: &str) -> u64 {
        self.token_requests.get(grant).map_or(0, |c| c.error)
    }
}

/// The claims of a JWT (unverified), or None when it is not one.
pub fn jwt_claims(token: &str) -> Option<Value> {
    use base64::Engine;
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 || parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[1])
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The line the launcher prints once it listens.
#[derive(Deserialize)]
struct Announcement {
    issuer: String,
    port: u16,
    jwks_uri: String,
    token_endpoint: String,
}

/// A running keycloak-mock.js. Killed by `stop()`, on drop, and (through its stdin) when the test process dies.
pub struct TestIdp {
    /// `http://127.0.0.1:PORT/auth/realms/REALM`
    pub issuer: String,
    pub port: u16,
    pub token_endpoint: String,
    pub jwks_uri: String,
    options: IdpOptions,
    child: Child,
    /// Held open: the IdP exits when its stdin closes.
    _stdin: ChildStdin,
    http: reqwest::Client,
}

impl TestIdp {
    /// Installs the npm packages if needed, starts the IdP and waits until it listens.
    pub async fn start(options: IdpOptions) -> TestIdp {
        tokio::task::spawn_blocking(deps::node_modules_ready)
            .await
            .expect("installing the test IdP's npm packages");
        let dir = deps::idp_dir();
        let config = serde_json::to_string(&options).expect("IdP options serialise");
        let mut child = Command::new("node")
            .arg(dir.join("keycloak-mock.js"))
            .arg(&config)
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run node (install Node.js >= 20): {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let mut stderr = child.stderr.take().expect("piped stderr");

        let first = tokio::time::timeout(Duration::from_secs(30), stdout.next_line()).await;
        let Ok(Ok(Some(line))) = first else {
            let _ = child.kill().await;
            let mut log = String::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(5), stderr.read_to_string(&mut log)).await;
            panic!("the test IdP did not start ({first:?}); its stderr:\n{log}");
        };
        let announced: Announcement = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("unexpected first line from the test IdP ({e}): {line}"));

        // Its logs go to the test's (captured) stderr; stdout should stay quiet but is drained all the same.
        let port = announced.port;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[idp :{port}] {line}");
            }
        });
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                eprintln!("[idp :{port} stdout] {line}");
            }
        });

        TestIdp {
            issuer: announced.issuer,
            port,
            token_endpoint: announced.token_endpoint,
            jwks_uri: announced.jwks_uri,
            options,
            child,
            _stdin: stdin,
            http: client_with_timeout(Duration::from_secs(10)),
        }
    }

    /// The options it was started with (`port` as given, possibly 0).
    pub fn options(&self) -> &IdpOptions {
        &self.options
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer)
    }

    pub fn authorization_endpoint(&self) -> String {
        format!("{}/protocol/openid-connect/auth", self.issuer)
    }

    pub fn userinfo_endpoint(&self) -> String {
        format!("{}/protocol/openid-connect/userinfo", self.issuer)
    }

    pub async fn stats(&self) -> IdpStats {
        serde_json::from_value(self.control("stats", None).await).expect("IdP stats parse")
    }

    /// Token requests with this grant_type, answered or not.
    pub async fn token_requests(&self, grant: &str) -> u64 {
        self.stats().await.token_requests(grant)
    }

    pub async fn total_token_requests(&self) -> u64 {
        self.stats().await.total
    }

    pub async fn reset_stats(&self) {
        self.control("reset-stats", Some(json!({}))).await;
    }

    pub async fn set_mode(&self, mode: IdpMode) {
        self.control("mode", Some(json!({ "mode": mode }))).await;
    }

    /// Makes every refresh token issued so far inactive (as an admin's "sign out all sessions").
    pub async fn revoke_refresh_tokens(&self) {
        self.control("revoke-refresh-tokens", Some(json!({}))).await;
    }

    /// Lifetime of the access and id tokens issued from now on.
    pub async fn set_lifetime(&self, seconds: u64) {
        self.control("lifetime", Some(json!({ "seconds": seconds })))
            .await;
    }

    /// Replaces the realm's clients, e.g. to rotate a client secret.
    pub async fn set_clients(&self, clients: &[IdpClient]) {
        self.control("clients", Some(json!(clients))).await;
    }

    /// Replaces the realm's users.
    pub async fn set_users(&self, users: &[IdpUser]) {
        self.control("users", Some(json!(users))).await;
    }

    /// Kills the IdP and waits for it to exit, so its port is free again.
    pub async fn stop(mut self) {
        self.child.kill().await.expect("killing the test IdP");
    }

    /// Stops the IdP and starts a new one with the same options on the same port. Nothing survives but the
    /// options: stats, modes, refresh tokens and signing keys are new.
    pub async fn restart(&mut self) {
        self.child.kill().await.expect("killing the test IdP");
        let options = self.options.clone().port(self.port);
        let mut fresh = TestIdp::start(options).await;
        fresh.options.port = self.options.port;
        *self = fresh;
    }

    async fn control(&self, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/__control/{path}", self.base_url());
        let request = match body {
            Some(body) => self.http.post(&url).json(&body),
            None => self.http.get(&url),
        };
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("IdP control {path}: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "IdP control {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("IdP control {path}: {e}: {text}"))
    }
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
