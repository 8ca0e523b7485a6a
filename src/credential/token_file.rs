//! The auth_code token file: where `login` stores the tokens and the proxy keeps the rotated
//! refresh token, written atomically with mode 0600 and never through a symbolic link.

use std::fs::{DirBuilder, File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::config::TokenField;
use crate::secret::Secret;

/// The file name under the cache directory.
const FILE_NAME: &str = "tokens.json";
/// The folder under the user's cache directory.
const APP_DIR: &str = "seldon-auth-proxy";
/// A token file larger than this is not one of ours.
const MAX_SIZE: u64 = 1024 * 1024;
/// The format written; older or newer ones are refused with a request to log in again.
const VERSION: u32 = 1;

/// What a login left behind. Tokens are [`Secret`]s, so a Debug print shows none of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTokens {
    /// The issuer and client the tokens belong to.
    pub issuer: String,
    pub client_id: String,
    pub refresh_token: Option<Secret>,
    /// The token sent to the platform (of `token_field`), with its expiry in Unix seconds.
    pub token: Option<Secret>,
    pub token_field: TokenField,
    pub expires_at: Option<u64>,
    /// When the file was written, in Unix seconds.
    pub saved_at: u64,
}

/// The file's JSON form.
#[derive(Serialize, Deserialize)]
struct OnDisk {
    version: u32,
    issuer: String,
    client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    token_field: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
    saved_at: u64,
}

fn field_name(field: TokenField) -> &'static str {
    match field {
        TokenField::IdToken => "id_token",
        TokenField::AccessToken => "access_token",
    }
}

/// The default place: `$XDG_CACHE_HOME/seldon-auth-proxy/tokens.json`, else
/// `~/.cache/seldon-auth-proxy/tokens.json`.
pub fn default_path() -> Result<PathBuf, String> {
    let xdg = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = match xdg {
        Some(dir) => dir,
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .map(|home| home.join(".cache"))
            .ok_or_else(|| {
                "token_cache_file: cannot find the user's cache directory (neither XDG_CACHE_HOME nor HOME is set); give --token-cache-file".to_owned()
            })?,
    };
    Ok(base.join(APP_DIR).join(FILE_NAME))
}

/// The configured path, or the default one.
pub fn resolve(configured: Option<&Path>) -> Result<PathBuf, String> {
    match configured {
        Some(path) => Ok(path.to_path_buf()),
        None => default_path(),
    }
}

/// Reads the token file. `Ok(None)` when it does not exist; an error when it cannot be read,
/// is a symbolic link, or is not a token file.
pub fn load(path: &Path) -> Result<Option<StoredTokens>, String> {
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(format!(
                "{} is a symbolic link; the token file is never read or written through one",
                path.display()
            ))
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > MAX_SIZE {
        return Err(format!(
            "{} is too large to be a token file",
            path.display()
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "{} is readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let disk: OnDisk = serde_json::from_str(&text).map_err(|_| {
        format!(
            "{} is not a token file written by `seldon-auth-proxy login`",
            path.display()
        )
    })?;
    if disk.version != VERSION {
        return Err(format!(
            "{} has format version {}, this build reads version {VERSION}",
            path.display(),
            disk.version
        ));
    }
    let token_field = match disk.token_field.as_str() {
        "id_token" => TokenField::IdToken,
        "access_token" => TokenField::AccessToken,
        _ => return Err(format!("{} names an unknown token_field", path.display())),
    };
    let nonempty = |t: Option<String>| t.filter(|t| !t.is_empty()).map(Secret::new);
    Ok(Some(StoredTokens {
        issuer: disk.issuer,
        client_id: disk.client_id,
        refresh_token: nonempty(disk.refresh_token),
        token: nonempty(disk.token),
        token_field,
        expires_at: disk.expires_at,
        saved_at: disk.saved_at,
    }))
}

/// Writes the token file atomically (see [`write_private`]).
pub fn save(path: &Path, tokens: &StoredTokens) -> std::io::Result<()> {
    let disk = OnDisk {
        version: VERSION,
        issuer: tokens.issuer.clone(),
        client_id: tokens.client_id.clone(),
        refresh_token: tokens.refresh_token.as_ref().map(|t| t.expose().to_owned()),
        token: tokens.token.as_ref().map(|t| t.expose().to_owned()),
        token_field: field_name(tokens.token_field).to_owned(),
        expires_at: tokens.expires_at,
        saved_at: tokens.saved_at,
    };
    let mut bytes = serde_json::to_vec_pretty(&disk).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    write_private(path, &bytes)
}

/// Creates the folder of `path` (mode 0700) when it is missing.
pub fn ensure_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            if dir.is_dir() {
                return Ok(());
            }
            DirBuilder::new().recursive(true).mode(0o700).create(dir)
        }
        _ => Ok(()),
    }
}

/// Replaces `path` with `bytes`: a temporary file in the same folder is created with
/// O_EXCL|O_NOFOLLOW and mode 0600, written, synced and renamed into place. A symbolic link
/// at `path` is replaced, never followed; readers see the old or the new file, never a mix.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    ensure_parent(path)?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the token file path names no file",
            )
        })?
        .to_string_lossy()
        .into_owned();
    let mut attempt = 0;
    let (tmp, mut file) = loop {
        let tmp = dir.join(format!(
            ".{name}.{:016x}.tmp",
            rand::thread_rng().next_u64()
        ));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(file) => break (tmp, file),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
            Err(e) => return Err(e),
        }
    };
    let written = (|| {
        // The umask can only have removed bits; make it exactly 0600 all the same.
        file.set_permissions(Permissions::from_mode(0o600))?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Make the rename itself durable; a folder that cannot be opened only loses that.
    if let Ok(dir) = File::open(&dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredTokens {
        StoredTokens {
            issuer: "http://127.0.0.1:1/auth/realms/x".into(),
            client_id: "cli".into(),
            refresh_token: Some(Secret::new("rt-1")),
            token: Some(Secret::new("tok-1")),
            token_field: TokenField::IdToken,
            expires_at: Some(123),
            saved_at: 100,
        }
    }

    #[test]
    fn round_trip_with_mode_0600_in_a_new_folder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a").join("b").join("tokens.json");
        assert_eq!(load(&path).unwrap(), None);
        save(&path, &sample()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let folder = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(folder & 0o077, 0);
        assert_eq!(load(&path).unwrap(), Some(sample()));
        // No temporary file is left behind.
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn a_symlink_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        let path = dir.path().join("tokens.json");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
        save(&path, &sample()).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(load(&path).unwrap(), Some(sample()));
    }

    #[test]
    fn debug_shows_no_token_and_garbage_is_refused() {
        let text = format!("{:?}", sample());
        assert!(!text.contains("rt-1") && !text.contains("tok-1"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        std::fs::write(&path, "{\"refresh_token\":\"secret-value\"}").unwrap();
        let err = load(&path).unwrap_err();
        assert!(
            err.contains("not a token file") && !err.contains("secret-value"),
            "{err}"
        );
    }

    #[test]
    fn default_path_is_under_the_cache_directory() {
        let path = default_path().unwrap();
        assert!(
            path.ends_with("seldon-auth-proxy/tokens.json"),
            "{}",
            path.display()
        );
    }
}
