//! Secret values (client secrets, passwords, tokens) that never print themselves.

use std::fmt;
use std::path::{Path, PathBuf};

/// A string that must never reach a log line: `Debug` and `Display` print `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret comes from: given inline, or read from a file each time it is needed
/// (Kubernetes rotates mounted secrets in place, so a file is re-read rather than cached).
#[derive(Clone, Debug)]
pub enum SecretSource {
    Inline(Secret),
    File(PathBuf),
}

impl SecretSource {
    /// Reads the secret now; a file loses one trailing newline (`\n` or `\r\n`).
    pub fn read(&self) -> std::io::Result<Secret> {
        match self {
            SecretSource::Inline(secret) => Ok(secret.clone()),
            SecretSource::File(path) => read_secret_file(path),
        }
    }

    pub fn file(&self) -> Option<&Path> {
        match self {
            SecretSource::File(path) => Some(path),
            SecretSource::Inline(_) => None,
        }
    }
}

/// Reads a secret file, trimming exactly one trailing newline.
pub fn read_secret_file(path: &Path) -> std::io::Result<Secret> {
    let mut text = std::fs::read_to_string(path)?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(Secret(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_the_value() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret:?} {secret}"), "[redacted] [redacted]");
        assert_eq!(secret.expose(), "hunter2");
    }

    #[test]
    fn file_loses_exactly_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "abc\n\n").unwrap();
        assert_eq!(read_secret_file(&path).unwrap().expose(), "abc\n");
        std::fs::write(&path, "abc\r\n").unwrap();
        assert_eq!(read_secret_file(&path).unwrap().expose(), "abc");
        std::fs::write(&path, "abc").unwrap();
        assert_eq!(read_secret_file(&path).unwrap().expose(), "abc");
    }
}
