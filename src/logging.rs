//! Logging to stderr, as text for people or one JSON object per line, off the request
//! path (a background writer; access lines have their own, in `access_log`), with
//! dependencies held to info unless named explicitly.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// A bare level (`debug`, `trace`) applies to this proxy; dependencies (HTTP and TLS
/// libraries, which can print protocol details) stay at info unless the filter names them.
pub fn filter(level: &str) -> EnvFilter {
    let bare = ["error", "warn", "info", "debug", "trace", "off"]
        .contains(&level.to_ascii_lowercase().as_str());
    let directives = if bare {
        let dependencies = match level.to_ascii_lowercase().as_str() {
            "debug" | "trace" => "info".to_owned(),
            other => other.to_owned(),
        };
        format!("{dependencies},seldon_auth_proxy={level},access={level}")
    } else {
        level.to_owned()
    };
    EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber; keep the guard alive until exit so lines are flushed
/// (access lines are flushed by `access_log::flush`).
pub fn init(format: LogFormat, level: &str) -> WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        // The writer thread flushes whenever it has drained what was handed to it, so the
        // buffer only merges lines that arrive together into one system call.
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    // Access lines are batched by the access log itself and written straight to stderr.
    crate::access_log::install(std::io::stderr(), format);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(writer)
        .with_target(false);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
    guard
}
