//! The `seldon-auth-proxy` binary: parse settings, start logging, run a subcommand, and map
//! the outcome to an exit code (0 ok, 1 no credential, 2 bad configuration).

use std::process::ExitCode;

use seldon_auth_proxy::cli::{self, EXIT_CONFIG};
use seldon_auth_proxy::config::{Command, Config, LogFormat};
use seldon_auth_proxy::logging;

fn main() -> ExitCode {
    let (command, settings) = match cli::parse() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("seldon-auth-proxy: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let format = settings.log_format.unwrap_or(LogFormat::Text);
    let level = settings.log_level.clone().unwrap_or_else(|| "info".into());
    let _log_guard = logging::init(format, &level);
    raise_open_file_limit();

    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("seldon-auth-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Dev(args) = command {
        return runtime.block_on(seldon_auth_proxy::dev::run(args, settings));
    }
    let config = match Config::from_settings(settings) {
        Ok(config) => config,
        Err(e) => {
            // With JSON logs, the line that explains a crash-looping sidecar is JSON too.
            match format {
                LogFormat::Json => tracing::error!("invalid configuration: {e}"),
                LogFormat::Text => eprintln!("seldon-auth-proxy: {e}"),
            }
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    cli::warn_about_secrets(&config);
    runtime.block_on(async move {
        match command {
            Command::Serve => cli::serve(config).await,
            Command::Check | Command::Token => cli::check_or_token(command, config).await,
            Command::Login => seldon_auth_proxy::login::run(config).await,
            Command::Dev(_) => unreachable!("handled above"),
        }
    })
}

/// 1000 clients need 2000 sockets: raise the soft open-file limit to the hard limit.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
