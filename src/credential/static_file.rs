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
        let (life, warning) = match lifetime::jwt_expiry(token) {
            Some(_) => lifetime::lifetime(token, None),
            None => (OPAQUE_RECHECK, None),
        };
        Ok(Acquired {
            header_name: AUTHORIZATION,
            header_value: bearer(token)?,
            schedule: Schedule::new(life),
            refresh_token: None,
            grant: "static_file",
            token: Some(Secret::new(token)),
            warning,
        })
    }
}
