//! `seldon-auth-proxy dev`: wires the embedded IdP and platform to the real proxy.

use std::process::ExitCode;

use crate::config::Settings;

pub async fn run(_settings: Settings) -> ExitCode {
    eprintln!("seldon-auth-proxy: dev is not wired yet");
    ExitCode::from(2)
}
