//! The static method: a token read from a file, re-read when the file changes.

use std::path::PathBuf;
use std::time::Duration;

use http::header::AUTHORIZATION;

use super::{bearer, lifetime, Acquired, FetchError, Schedule};
use crate::secret::{read_secret_file, Secret};

/// How long a static token without a JWT `exp` is used before the file is read again.
const OPAQUE_RECHECK: Duration = Duration::from_secs(300);

pub struct StaticFile {
    pub path: PathBuf,
}

impl StaticFile {
    pub fn acquire(&self) -> Result<Acquired, FetchError> {
        let token = read_secret_file(&self.path).map_err(|e| {
            FetchError::configuration(format!(
                "cannot read static_token_file {}: {e}",
                self.path.display()
            ))
        })?;
        let token = token.expose().trim();
        if token.is_empty() {
            return Err(FetchError::configuration(format!(
                "static_token_file {} is empty",
                self.path.display()
            )));
        }
        let now = lifetime::unix_now();
        let life = match lifetime::jwt_expiry(token) {
            // Nobody will refresh a token in a file: once expired it is refused, not resent.
            Some(exp) if exp <= now => {
                return Err(FetchError::configuration(format!(
                    "the token in static_token_file {} expired {}s ago (by the local clock); put a fresh token in the file",
                    self.path.display(),
                    now - exp
                )))
            }
            Some(exp) => Duration::from_secs(exp - now),
            None => OPAQUE_RECHECK,
        };
        Ok(Acquired {
            header_name: AUTHORIZATION,
            header_value: bearer(token)?,
            schedule: Schedule::new(life),
            refresh_token: None,
            grant: "static_file",
            token: Some(Secret::new(token)),
            warning: None,
        })
    }
}
