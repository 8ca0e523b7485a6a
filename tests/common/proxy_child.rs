//! The real `seldon-auth-proxy` binary as a child process: runs to completion (`check`, `token`, start-up refusals)
//! with their exit code and output, and a serving proxy whose listeners are read from its "listening" log line,
//! stopped with SIGTERM.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot::{self, error::TryRecvError};
use tokio::task::JoinHandle;

use super::http::client;
use super::proxy::{ready_within, API};

/// Path of the binary cargo built for these tests.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_seldon-auth-proxy")
}

/// Removes every `SELDON_AUTH_PROXY_*` variable and every proxy variable (`HTTPS_PROXY`, `no_proxy`, ...) of the
/// test's environment from `command`'s.
pub fn scrub_env(command: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let text = key.to_string_lossy();
        if text.starts_with("SELDON_AUTH_PROXY_") || text.to_ascii_lowercase().ends_with("_proxy") {
            command.env_remove(&key);
        }
    }
}

/// The binary with `args` and a [`scrub_env`]ed environment, stdin closed, stdout and stderr piped, killed if
/// dropped.
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(binary());
    command.args(args);
    scrub_env(&mut command);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// What a finished run printed and how it ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// None when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `command` (any program) to its end with stdin closed and stdout and stderr captured; panics if it does
/// not finish within `limit` (and kills it).
pub async fn output_within(mut command: Command, limit: Duration) -> Outcome {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let what = format!("{:?}", command.as_std());
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("{what} cannot run: {e}"));
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    Outcome {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs the binary to its end (at most 60 s) with extra environment variables.
pub async fn run(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    run_within(args, env, Duration::from_secs(60)).await
}

/// Runs the binary to its end (at most `limit`) with extra environment variables.
pub async fn run_within(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Outcome {
    let mut command = command(args);
    command.envs(env.iter().copied());
    output_within(command, limit).await
}

/// Runs a prepared command to its end (at most 60 s).
pub async fn run_command(command: Command) -> Outcome {
    output_within(command, Duration::from_secs(60)).await
}

/// Reads `reader` line by line into `lines` until it closes; sends the addresses of the first "listening" line
/// to `listening`, if given.
fn collect_lines<R>(
    reader: R,
    lines: Arc<Mutex<Vec<String>>>,
    mut listening: Option<oneshot::Sender<(SocketAddr, SocketAddr)>>,
) -> JoinHandle<()>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut reader = BufReader::new(reader).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            let heard = listening.is_some().then(|| listening_addresses(&line));
            lines.lock().unwrap().push(line);
            if let Some(Some(addresses)) = heard {
                let _ = listening.take().unwrap().send(addresses);
            }
        }
    })
}

/// Collects the lines of a child's pipe (stdout or stderr) until it closes.
pub fn collect(
    reader: impl AsyncRead + Unpin + Send + 'static,
) -> (Arc<Mutex<Vec<String>>>, JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let task = collect_lines(reader, lines.clone(), None);
    (lines, task)
}

/// Sends SIGTERM to `pid` (a child the test spawned and has not reaped, so the pid is not reused); the return code
/// of kill(2).
pub fn send_sigterm(pid: u32) -> i32 {
    // SAFETY: kill(2) only sends a signal; the caller's pid is its own unreaped child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }
}

/// The proxy and admin addresses of the "seldon-auth-proxy listening" log line, text or JSON.
pub fn listening_addresses(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    if !line.contains("seldon-auth-proxy listening") {
        return None;
    }
    if line.trim_start().starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(line).ok()?;
        return Some((
            json.get("proxy")?.as_str()?.parse().ok()?,
            json.get("admin")?.as_str()?.parse().ok()?,
        ));
    }
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .and_then(|v| v.trim_matches('"').parse().ok())
    };
    Some((field("proxy=")?, field("admin=")?))
}

/// A running proxy process, its stdout and stderr collected. Killed when dropped.
pub struct ProxyChild {
    child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl ProxyChild {
    /// Starts `seldon-auth-proxy ARGS` (`serve`, or no subcommand, with `--listen 127.0.0.1:0 --admin-listen
    /// 127.0.0.1:0`) with extra environment variables and waits for its "listening" log line; panics with its
    /// stderr if it exits or says nothing within 20 s.
    pub async fn spawn(args: &[&str], env: &[(&str, &str)]) -> ProxyChild {
        let mut command = command(args);
        command.envs(env.iter().copied());
        let mut child = command.spawn().expect("the binary runs");
        let (stdout, stdout_done) = collect(child.stdout.take().expect("piped stdout"));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (listening, mut heard) = oneshot::channel();
        let stderr_done = collect_lines(
            child.stderr.take().expect("piped stderr"),
            stderr.clone(),
            Some(listening),
        );
        // Polled every 25 ms, as the tests were written against: the binary logs "listening" a moment before it
        // handles SIGTERM, so a signal sent the instant the line appears can kill it by default.
        let started = Instant::now();
        let (proxy, admin) = loop {
            match heard.try_recv() {
                Ok(addresses) => break addresses,
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Closed) => {
                    let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                    panic!(
                        "the proxy closed its stderr ({status:?}) before listening; stderr:\n{}",
                        stderr.lock().unwrap().join("\n")
                    );
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                // Let the reader take the last lines.
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "the proxy exited ({status}) before listening; stderr:\n{}",
                    stderr.lock().unwrap().join("\n")
                );
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill().await;
                panic!(
                    "the proxy did not listen within 20 s; stderr:\n{}",
                    stderr.lock().unwrap().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        ProxyChild {
            child,
            proxy,
            admin,
            stdout,
            stderr,
            readers: vec![stdout_done, stderr_done],
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.proxy)
    }

    /// `http://127.0.0.1:PORT` of the admin listener.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// `url` + the API root + `path`.
    pub fn api(&self, path: &str) -> String {
        format!("{}{API}{path}", self.url())
    }

    /// Waits until /readyz answers 200; returns how long that took, or None after `limit`.
    #[must_use]
    pub async fn wait_ready(&self, limit: Duration) -> Option<Duration> {
        ready_within(&client(), &self.admin_url(), limit).await
    }

    /// Sends SIGTERM to the process (which must not have been reaped yet).
    pub fn sigterm(&self) {
        let pid = self.child.id().expect("the proxy has not been reaped");
        let rc = send_sigterm(pid);
        assert_eq!(rc, 0, "kill(SIGTERM): {}", std::io::Error::last_os_error());
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit, killing it after `limit` (then None), and for its output to be read.
    async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = self.child.kill().await;
                None
            }
        };
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        status
    }

    /// Waits for the process to exit; panics with its stderr if it has not within `limit` (and kills it).
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        self.exit_within(limit).await.unwrap_or_else(|| {
            panic!(
                "the proxy did not exit within {limit:?}; stderr:\n{}",
                self.stderr_lines().join("\n")
            )
        })
    }

    /// SIGTERM, then waits up to 15 s (then SIGKILL, and no exit code); returns everything it printed.
    pub async fn terminate(mut self) -> Outcome {
        if let Some(pid) = self.child.id() {
            send_sigterm(pid);
        }
        let status = self.exit_within(Duration::from_secs(15)).await;
        Outcome {
            code: status.and_then(|s| s.code()),
            stdout: self.stdout_text(),
            stderr: self.stderr_text(),
        }
    }

    /// The stderr lines so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    /// The stderr so far, each line ended with `\n`.
    pub fn stderr_text(&self) -> String {
        text(&self.stderr)
    }

    /// The stdout so far, each line ended with `\n`.
    pub fn stdout_text(&self) -> String {
        text(&self.stdout)
    }
}

fn text(lines: &Mutex<Vec<String>>) -> String {
    lines
        .lock()
        .unwrap()
        .iter()
        .map(|line| format!("{line}\n"))
        .collect()
}
