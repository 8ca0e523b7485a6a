//! Static checks of the example configs in `config/`: one per auth method
//! plus local development, flat TOML using only known setting names, every
//! key commented, and no secret written inline.
//! (Whether each one actually obtains a credential is checked by running
//! `seldon-auth-proxy check --config FILE` against the test IdP.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Every setting the proxy accepts in its config file.
const KNOWN_KEYS: &[&str] = &[
    "upstream",
    "listen",
    "allow_non_loopback",
    "admin_listen",
    "auth_method",
    "oidc_server",
    "token_endpoint",
    "client_id",
    "client_secret",
    "client_secret_file",
    "username",
    "password",
    "password_file",
    "scope",
    "token_field",
    "audience",
    "resource",
    "static_token_file",
    "session_cookie_name",
    "redirect_uri",
    "token_cache_file",
    "allowed_path_prefix",
    "allowed_host",
    "allowed_origin",
    "inbound_token_file",
    "ca_file",
    "insecure_skip_verify",
    "client_cert",
    "client_key",
    "allow_plain_http",
    "max_header_bytes",
    "header_read_timeout",
    "idle_timeout",
    "upstream_connect_timeout",
    "upstream_timeout",
    "idp_timeout",
    "max_connections",
    "shutdown_delay",
    "shutdown_grace",
    "log_format",
    "log_level",
];

/// Example file, its auth method, and the keys that method needs in the file
/// (secrets excluded: they may come from the environment instead).
const EXAMPLES: &[(&str, &str, &[&str])] = &[
    (
        "client-credentials.toml",
        "client_credentials",
        &["oidc_server", "client_id"],
    ),
    (
        "password-grant.toml",
        "password_grant",
        &["oidc_server", "client_id", "username"],
    ),
    (
        "auth-code.toml",
        "auth_code",
        &["oidc_server", "client_id", "redirect_uri"],
    ),
    ("session.toml", "session", &["username"]),
    ("static.toml", "static", &["static_token_file"]),
    (
        "local-dev.toml",
        "password_grant",
        &["oidc_server", "client_id", "username"],
    ),
];

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn load(name: &str) -> (String, toml::Table) {
    let text = std::fs::read_to_string(config_dir().join(name))
        .unwrap_or_else(|e| panic!("config/{name}: {e}"));
    let table = text
        .parse::<toml::Table>()
        .unwrap_or_else(|e| panic!("config/{name}: invalid TOML: {e}"));
    (text, table)
}

fn is_loopback(addr: &str) -> bool {
    addr.starts_with("unix:")
        || addr
            .parse::<SocketAddr>()
            .is_ok_and(|a| a.ip().is_loopback())
        || addr.starts_with("localhost:")
}

#[test]
fn every_example_exists_and_is_accounted_for() {
    let mut on_disk: Vec<String> = std::fs::read_dir(config_dir())
        .expect("config/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    on_disk.sort();
    let mut expected: Vec<String> = EXAMPLES.iter().map(|e| e.0.to_string()).collect();
    expected.sort();
    assert_eq!(
        on_disk, expected,
        "config/*.toml and this test's list differ"
    );
}

#[test]
fn examples_are_flat_known_and_free_of_secrets() {
    for (name, method, required) in EXAMPLES {
        let (text, table) = load(name);
        assert!(
            text.starts_with('#'),
            "config/{name}: must open with a comment"
        );
        for (key, value) in &table {
            assert!(
                KNOWN_KEYS.contains(&key.as_str()),
                "config/{name}: unknown key {key}"
            );
            let flat = match value {
                toml::Value::Table(_) => false,
                toml::Value::Array(items) => items.iter().all(|i| i.is_str()),
                _ => true,
            };
            assert!(
                flat,
                "config/{name}: {key} must be a plain value or a list of strings"
            );
        }
        for secret in ["client_secret", "password"] {
            assert!(
                !table.contains_key(secret),
                "config/{name}: {secret} inline; use {secret}_file or the environment"
            );
        }
        assert!(
            table.contains_key("upstream"),
            "config/{name}: upstream is required"
        );
        assert_eq!(
            table.get("auth_method").and_then(|v| v.as_str()),
            Some(*method),
            "config/{name}: auth_method"
        );
        for key in *required {
            assert!(
                table.contains_key(*key),
                "config/{name}: {method} needs {key}"
            );
        }
        for key in ["listen", "admin_listen"] {
            if let Some(addr) = table.get(key).and_then(|v| v.as_str()) {
                assert!(
                    is_loopback(addr),
                    "config/{name}: {key} {addr} should be loopback"
                );
            }
        }
        for off in ["allow_non_loopback", "insecure_skip_verify"] {
            assert_ne!(
                table.get(off).and_then(|v| v.as_bool()),
                Some(true),
                "config/{name}: examples must not turn on {off}"
            );
        }
    }
}

#[test]
fn every_key_is_commented() {
    for (name, _, _) in EXAMPLES {
        let (text, _) = load(name);
        let lines: Vec<&str> = text.lines().collect();
        for (n, line) in lines.iter().enumerate() {
            let is_key = line.split_once('=').is_some_and(|(k, _)| {
                !k.trim().is_empty() && k.trim().chars().all(|c| c.is_ascii_lowercase() || c == '_')
            });
            if is_key && !line.starts_with('#') {
                let above = if n == 0 { "" } else { lines[n - 1] };
                assert!(
                    above.trim_start().starts_with('#'),
                    "config/{name}:{}: `{line}` needs a comment line above it",
                    n + 1
                );
            }
        }
    }
}
