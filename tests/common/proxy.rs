//! The proxy under test, in-process (`seldon_auth_proxy::start` on port-0 listeners) or as the real binary
//! (`CARGO_BIN_EXE_seldon-auth-proxy`, its addresses read from its "listening" log line), plus the HTTP
//! client the tests call it with. Everything started here is stopped on `stop()` and on drop.
#![allow(dead_code)]

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use seldon_auth_proxy::config::{Config, Settings};
use seldon_auth_proxy::Running;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::idp::{IdpOptions, TestIdp};

/// The confidential client every test IdP knows.
pub const CLIENT_ID: &str = "sdk";
pub const CLIENT_SECRET: &str = "s3cret";
/// The user for password_grant.
pub const USERNAME: &str = "alice";
pub const PASSWORD: &str = "pw";
/// The platform API root the proxy forwards by default.
pub const API: &str = "/seldon-deploy/api/v1alpha1";
/// The subject of client_credentials tokens for [`CLIENT_ID`].
pub const SERVICE_ACCOUNT: &str = "service-account-sdk";
/// The header that marks answers the proxy made itself.
pub const ERROR_HEADER: &str = "x-seldon-auth-proxy-error";

/// An IdP with the test client and user, issuing tokens that live `lifetime` seconds.
pub fn idp_options(lifetime: u64) -> IdpOptions {
    IdpOptions::default()
        .client(CLIENT_ID, CLIENT_SECRET)
        .user(USERNAME, PASSWORD)
        .token_lifetime(lifetime)
}

/// client_credentials against `idp`, forwarding to `upstream`, on ephemeral loopback ports with a short
/// shutdown delay.
pub fn settings(upstream: &str, idp: &TestIdp) -> Settings {
    Settings {
        upstream: Some(upstream.to_owned()),
        oidc_server: Some(idp.issuer.clone()),
        client_id: Some(CLIENT_ID.into()),
        client_secret: Some(CLIENT_SECRET.into()),
        listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        workers: Some(2),
        shutdown_delay: Some(Duration::from_millis(50)),
        shutdown_grace: Some(Duration::from_secs(5)),
        ..Settings::default()
    }
}

/// A proxy running in this process.
pub struct Proxy {
    running: Option<Running>,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin: String,
}

impl Proxy {
    pub async fn start(settings: Settings) -> Proxy {
        let config = Config::from_settings(settings).expect("a valid test configuration");
        let running = seldon_auth_proxy::start(config)
            .await
            .expect("the proxy starts");
        Proxy {
            url: running.proxy_url().expect("a TCP listener"),
            admin: format!("http://{}", running.admin_addr),
            running: Some(running),
        }
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("running")
    }

    /// `url` + the API root + `path`.
    pub fn api(&self, path: &str) -> String {
        format!("{}{API}{path}", self.url)
    }

    /// Waits until /readyz answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        wait_ready(&self.admin, timeout).await;
    }

    /// Runs the shutdown sequence to its end.
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown();
            tokio::time::timeout(Duration::from_secs(30), running.wait())
                .await
                .expect("the proxy shuts down within 30s");
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            running.shutdown();
        }
    }
}

/// A client for calling the proxy: no proxies from the environment, no redirects, a pool.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// Polls `admin`/readyz until it answers 200.
pub async fn wait_ready(admin: &str, timeout: Duration) {
    let http = client();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status = http
            .get(format!("{admin}/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string());
        if status == Ok(200) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{admin}/readyz is not 200 after {timeout:?} (last: {status:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The claims of a JWT (unverified), or None when it is not one.
pub fn jwt_claims(token: &str) -> Option<serde_json::Value> {
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

// ---------------------------------------------------------------- the real binary

/// Path of the binary cargo built for these tests.
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_seldon-auth-proxy")
}

/// A command running the binary with `args`, with no `SELDON_AUTH_PROXY_*` variable inherited from the
/// test's environment, killed if dropped.
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(exe());
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SELDON_AUTH_PROXY_") {
            command.env_remove(key);
        }
    }
    command
}

/// What a finished run printed and how it ended.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary to completion (at most 60 s) with extra environment variables.
pub async fn run(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut command = command(args);
    command.envs(env.iter().copied());
    run_command(command).await
}

/// Runs a prepared command to completion (at most 60 s).
pub async fn run_command(mut command: Command) -> Outcome {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = command.spawn().expect("the binary runs");
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the binary finishes within 60s")
        .expect("the binary's output");
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `serve` running as a child process.
pub struct Served {
    child: Child,
    pub pid: u32,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin: String,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_done: Option<tokio::task::JoinHandle<()>>,
}

impl Served {
    /// Starts `seldon-auth-proxy serve ARGS` with extra environment and waits for its "listening" line.
    pub async fn spawn(args: &[&str], env: &[(&str, &str)]) -> Served {
        let mut command = command(&["serve"]);
        command
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("the binary runs");
        let pid = child.id().expect("a pid");
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut addresses = None;
        let startup = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                stderr.lock().unwrap().push(line.clone());
                if let Some(found) = listening_addresses(&line) {
                    addresses = Some(found);
                    return;
                }
            }
        })
        .await;
        let Some((proxy, admin)) = addresses else {
            let _ = child.kill().await;
            panic!(
                "serve did not report its listeners ({startup:?}); stderr:\n{}",
                stderr.lock().unwrap().join("\n")
            );
        };
        let stderr_done = {
            let stderr = stderr.clone();
            tokio::spawn(async move {
                while let Ok(Some(line)) = lines.next_line().await {
                    stderr.lock().unwrap().push(line);
                }
            })
        };
        Served {
            child,
            pid,
            url: format!("http://{proxy}"),
            admin: format!("http://{admin}"),
            stderr,
            stderr_done: Some(stderr_done),
        }
    }

    /// `url` + the API root + `path`.
    pub fn api(&self, path: &str) -> String {
        format!("{}{API}{path}", self.url)
    }

    /// Sends SIGTERM to the process.
    pub fn sigterm(&self) {
        // SAFETY: kill(2) with a pid this test spawned and still holds (not yet reaped).
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM): {}", std::io::Error::last_os_error());
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit (killing it after `timeout`) and for its stderr to close.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait for the proxy"),
            Err(_) => {
                let _ = self.child.kill().await;
                panic!(
                    "the proxy did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr().join("\n")
                );
            }
        };
        if let Some(done) = self.stderr_done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
        }
        status
    }

    /// Kills the process and waits for it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// The stderr lines so far.
    pub fn stderr(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }
}

/// The proxy and admin addresses of the "seldon-auth-proxy listening" log line, text or JSON.
pub fn listening_addresses(line: &str) -> Option<(String, String)> {
    if !line.contains("seldon-auth-proxy listening") {
        return None;
    }
    if line.trim_start().starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(line).ok()?;
        return Some((
            json.get("proxy")?.as_str()?.to_owned(),
            json.get("admin")?.as_str()?.to_owned(),
        ));
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .map(|v| v.trim_matches('"').to_owned())
    };
    Some((field("proxy=")?, field("admin=")?))
}

/// Writes `contents` to `dir/name` with mode 0600 and returns the path as text.
pub fn secret_file(dir: &Path, name: &str, contents: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write a secret file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
    path.to_str().expect("a UTF-8 temp path").to_owned()
}

// ---------------------------------------------------------------- exact bytes over TCP

/// A response read off a raw TCP connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// The status line and headers, as received.
    pub head: String,
    /// The body, de-chunked when it was chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Every value of a header (names compared case-insensitively).
    pub fn headers_named(&self, name: &str) -> Vec<String> {
        self.head
            .lines()
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers_named(name).into_iter().next()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Sends `request` byte for byte to `url` (`http://HOST:PORT`) and reads until the server closes the
/// connection, so the request should say `Connection: close`.
pub async fn raw_http(url: &str, request: &str) -> RawResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("write the request");
        let mut bytes = Vec::new();
        stream
            .read_to_end(&mut bytes)
            .await
            .expect("read the response");
        bytes
    };
    let bytes = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("a response within 30s, then the connection closed");
    parse_raw_response(&bytes)
}

/// Parses one HTTP/1.1 response (head, then a body with Content-Length, chunked, or to the end).
pub fn parse_raw_response(bytes: &[u8]) -> RawResponse {
    let split = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no complete response head in {:?}",
                String::from_utf8_lossy(bytes)
            )
        });
    let head = String::from_utf8_lossy(&bytes[..split]).into_owned();
    let rest = &bytes[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let mut response = RawResponse {
        status,
        head,
        body: Vec::new(),
    };
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"));
    response.body = if chunked {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let line_end = at
                + rest[at..]
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .expect("a chunk size line");
            let size_text = String::from_utf8_lossy(&rest[at..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .expect("a hexadecimal chunk size");
            at = line_end + 2;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&rest[at..at + size]);
            at += size + 2;
        }
        body
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length.parse().expect("a numeric Content-Length");
        rest[..length.min(rest.len())].to_vec()
    } else {
        rest.to_vec()
    };
    response
}
