//! The subcommands behind `main`: reading the settings layers, `serve`, `check` and `token`.
//! Each returns the process exit code; logs go to stderr, stdout carries only what a
//! subcommand is asked to print.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{CommandFactory, FromArgMatches};

use crate::config::{Cli, Command, Config, ConfigError, Settings};
use crate::metrics::Metrics;

/// Exit code for a configuration the proxy cannot run with.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code when no credential could be obtained.
pub const EXIT_NO_CREDENTIAL: u8 = 1;

/// Parses the command line and the environment, then overlays the TOML file.
pub fn parse() -> Result<(Command, Settings), ConfigError> {
    let mut command = Cli::command();
    let unknown = crate::config::unknown_env_vars(&command);
    if !unknown.is_empty() {
        return Err(ConfigError(format!(
            "unknown environment variable(s) {}: no setting has that name (see --help)",
            unknown.join(", ")
        )));
    }
    let matches = command
        .try_get_matches_from_mut(std::env::args_os())
        .unwrap_or_else(|e| match from_environment(&command, &e) {
            Some(message) => {
                eprintln!("seldon-auth-proxy: {message}");
                std::process::exit(EXIT_CONFIG.into());
            }
            None => e.exit(),
        });
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let from_file = match &cli.settings.config {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    Ok((
        cli.command.unwrap_or(Command::Serve),
        cli.settings.over(from_file),
    ))
}

/// clap names the flag of a bad value even when the value came from the environment; this
/// names the variable the user actually set instead.
fn from_environment(command: &clap::Command, error: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        error.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return None;
    }
    let Some(ContextValue::String(arg_text)) = error.get(ContextKind::InvalidArg) else {
        return None;
    };
    let arg = command.get_arguments().find(|a| {
        a.get_long().is_some_and(|long| {
            arg_text.starts_with(&format!("--{long} ")) || *arg_text == format!("--{long}")
        })
    })?;
    let long = format!("--{}", arg.get_long()?);
    let given_as_flag = std::env::args().any(|a| a == long || a.starts_with(&format!("{long}=")));
    let env = arg.get_env()?.to_string_lossy().into_owned();
    if given_as_flag || std::env::var_os(&env).is_none() {
        return None;
    }
    let value = match error.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => format!(" `{v}`"),
        _ => String::new(),
    };
    let reason = match (
        error.get(ContextKind::ValidValue),
        std::error::Error::source(error),
    ) {
        (Some(ContextValue::Strings(valid)), _) => {
            format!(": expected one of {}", valid.join(", "))
        }
        (_, Some(cause)) => format!(": {cause}"),
        _ => String::new(),
    };
    Some(format!("{env}: invalid value{value}{reason}"))
}

/// Warnings about how secrets were given, printed once at start-up.
pub fn warn_about_secrets(config: &Config) {
    let args: Vec<String> = std::env::args().collect();
    for flag in Settings::secrets_in_flags(&args) {
        tracing::warn!(
            "{flag} was given on the command line, where other users can read it (ps, /proc); use SELDON_AUTH_PROXY_{} or {flag}-file instead",
            flag.trim_start_matches("--").replace('-', "_").to_uppercase()
        );
    }
    use std::os::unix::fs::PermissionsExt;
    let files = [
        config.auth.client_secret.as_ref().and_then(|s| s.file()),
        config.auth.password.as_ref().and_then(|s| s.file()),
        config.auth.static_token_file.as_deref(),
        config.inbound_token_file.as_deref(),
    ];
    for path in files.into_iter().flatten() {
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    "{} is readable by group or others (mode {:o}); chmod 600 it",
                    path.display(),
                    meta.permissions().mode() & 0o777
                );
            }
        }
    }
    if config.tls.insecure_skip_verify {
        tracing::warn!("insecure_skip_verify is on: TLS certificates of the IdP AND the upstream are NOT verified; anyone on the path can read the credentials");
    }
}

/// Runs the proxy until SIGTERM or Ctrl-C, then drains and exits 0.
pub async fn serve(config: Config) -> ExitCode {
    let signals = match Signals::install() {
        Ok(signals) => signals,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    let running = match crate::start(config).await {
        Ok(running) => running,
        Err(e) => {
            tracing::error!("cannot start: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    signals.wait().await;
    running.shutdown();
    running.wait().await;
    ExitCode::SUCCESS
}

/// SIGTERM and SIGINT, listened for from the moment this is made: make it before announcing
/// that the proxy listens, so a signal sent right after that line is never lost.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on SIGTERM or SIGINT.
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.interrupt.recv() => tracing::info!("interrupt received"),
        }
    }
}

/// Obtains one credential; `check` prints a redacted summary, `token` the bare token.
pub async fn check_or_token(command: Command, config: Config) -> ExitCode {
    let manager = match crate::credential_manager(&config, Arc::new(Metrics::default())) {
        Ok(manager) => manager,
        Err(e) => {
            eprintln!("seldon-auth-proxy: {e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let credential = match manager.obtain().await {
        Ok(credential) => credential,
        Err(e) => {
            eprintln!("seldon-auth-proxy: no credential: {}", e.message);
            return ExitCode::from(EXIT_NO_CREDENTIAL);
        }
    };
    let mut out = std::io::stdout().lock();
    let written = if command == Command::Token {
        match &credential.token {
            Some(token) => writeln!(out, "{}", token.expose()),
            None => {
                eprintln!(
                    "seldon-auth-proxy: the {} method yields a session cookie, not a bearer token; call the platform through the proxy instead",
                    config.auth.method
                );
                return ExitCode::from(EXIT_NO_CREDENTIAL);
            }
        }
    } else {
        writeln!(out, "{}", summary(&config, &credential))
    };
    match written.and_then(|_| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(EXIT_NO_CREDENTIAL),
    }
}

/// A redacted, human-readable description of a credential.
fn summary(config: &Config, credential: &crate::credential::Credential) -> String {
    let expires_in = credential
        .schedule
        .expires_at
        .saturating_duration_since(tokio::time::Instant::now());
    let claims = credential
        .token
        .as_ref()
        .and_then(|t| public_claims(t.expose()))
        .unwrap_or_default();
    format!(
        "ok: obtained a credential\n  upstream:     {}\n  auth_method:  {}\n  grant:        {}\n  header:       {} (value redacted)\n  expires_in:   {}s\n  refreshable:  {}{claims}",
        config.upstream,
        config.auth.method,
        credential.grant,
        credential.header_name,
        expires_in.as_secs(),
        if credential.refresh_token.is_some() { "yes (refresh token held)" } else { "by repeating the grant" },
    )
}

/// The identity claims of a JWT (never its signature or the token itself).
fn public_claims(token: &str) -> Option<String> {
    let claims = crate::credential::lifetime::jwt_claims(token)?;
    let mut text = String::new();
    for key in ["iss", "sub", "preferred_username", "email", "aud", "azp"] {
        if let Some(value) = claims.get(key) {
            let shown = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            text.push_str(&format!("\n  {key:<13} {shown}"));
        }
    }
    Some(text)
}
