//! Runs the `seldon-auth-proxy` binary as a child process with its stdout and stderr captured, for tests
//! of start-up refusals, warnings and log redaction.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_seldon-auth-proxy")
}

/// The binary with `args`, no `SELDON_AUTH_PROXY_*` variables from the test's environment, no proxy variables.
pub fn command(args: &[&str]) -> Command {
    let mut command = Command::new(binary());
    command.args(args);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("SELDON_AUTH_PROXY_") || key.to_ascii_lowercase().ends_with("_proxy") {
            command.env_remove(key);
        }
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// What a finished run printed.
#[derive(Debug, Clone)]
pub struct Finished {
    /// None when killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs the binary to its end (killed after `limit`).
pub async fn run(args: &[&str], envs: &[(&str, &str)], limit: Duration) -> Finished {
    let mut command = command(args);
    for (k, v) in envs {
        command.env(k, v);
    }
    let child = command.spawn().expect("the binary runs");
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "`seldon-auth-proxy {}` did not finish within {limit:?}",
                args.join(" ")
            )
        })
        .expect("waiting for the binary");
    Finished {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A running proxy process. Killed when dropped; [`ProxyChild::terminate`] stops it with SIGTERM.
pub struct ProxyChild {
    child: Child,
    pub stdout: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

fn drain<R: AsyncRead + Unpin + Send + 'static>(reader: R, into: Arc<Mutex<String>>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(reader).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut text = into.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
        }
    });
}

/// The value of `key` in the "seldon-auth-proxy listening" line, text (`key=value`) or JSON (`"key":"value"`).
fn listening_field(line: &str, key: &str) -> Option<SocketAddr> {
    let text_form = format!(" {key}=");
    let json_form = format!("\"{key}\":\"");
    let (start, end_char) = if let Some(i) = line.find(&text_form) {
        (i + text_form.len(), ' ')
    } else {
        (line.find(&json_form)? + json_form.len(), '"')
    };
    let rest = &line[start..];
    let value = rest.split(end_char).next()?;
    value.trim_matches('"').parse().ok()
}

impl ProxyChild {
    /// Starts `seldon-auth-proxy <args>` (give `--listen 127.0.0.1:0 --admin-listen 127.0.0.1:0`) and waits
    /// for its "listening" log line; panics with the output if it exits or says nothing within 20 s.
    pub async fn spawn(args: &[&str], envs: &[(&str, &str)]) -> ProxyChild {
        let mut command = command(args);
        for (k, v) in envs {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("the binary runs");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        drain(child.stdout.take().unwrap(), stdout.clone());
        drain(child.stderr.take().unwrap(), stderr.clone());
        let started = Instant::now();
        loop {
            let found = {
                let text = stderr.lock().unwrap();
                text.lines()
                    .find(|l| l.contains("seldon-auth-proxy listening"))
                    .map(|l| (listening_field(l, "proxy"), listening_field(l, "admin")))
            };
            if let Some((Some(proxy), Some(admin))) = found {
                return ProxyChild {
                    child,
                    stdout,
                    stderr,
                    proxy,
                    admin,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!(
                    "the proxy exited ({status}) before listening; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill().await;
                panic!(
                    "the proxy did not listen within 20 s; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.proxy)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn stderr_text(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout_text(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// SIGTERM, then waits up to 15 s (then SIGKILL); returns the exit code and everything printed.
    pub async fn terminate(mut self) -> Finished {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on the PID of our own child.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        let status = match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = self.child.kill().await;
                None
            }
        };
        // Let the readers take the last lines.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Finished {
            code: status.and_then(|s| s.code()),
            stdout: self.stdout_text(),
            stderr: self.stderr_text(),
        }
    }
}
