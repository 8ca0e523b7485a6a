//! The real Python SDK as a client: the SDK script and Python run without proxy variables.
#![allow(dead_code)]

use std::time::Duration;

use super::deps::{python, repo_root};
use super::proxy_child::{output_within, scrub_env};

/// The last line `tests/python/sdk_through_proxy.py` prints when every check passed.
pub const SDK_FINAL_LINE: &str = "SDK through proxy: all checks passed";

/// The path of the SDK script that drives the platform through the proxy.
pub fn sdk_script() -> String {
    repo_root()
        .join("tests/python/sdk_through_proxy.py")
        .to_string_lossy()
        .into_owned()
}

/// Runs Python with `args`, no proxy variables, and `env` (at most 120 s); returns (exit code,
/// stdout, stderr).
pub async fn run_python(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = tokio::process::Command::new(python().await);
    scrub_env(&mut command);
    command
        .args(args)
        .envs(env.iter().copied())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let outcome = output_within(command, Duration::from_secs(120)).await;
    (outcome.code, outcome.stdout, outcome.stderr)
}
