//! The token lifecycle: credentials, how each method obtains one, and the cache that keeps
//! the current one fresh.

pub mod auth_code;
pub mod lifetime;
pub mod manager;
pub mod oidc;
pub mod session;
pub mod source;
pub mod static_file;
pub mod token_file;

use http::{HeaderName, HeaderValue};
use tokio::time::Instant;

use crate::secret::Secret;
pub use lifetime::Schedule;
pub use manager::CredentialManager;

/// One credential as sent to the platform.
#[derive(Debug)]
pub struct Credential {
    /// Increases with every credential obtained; a 401 invalidates one generation once.
    pub generation: u64,
    /// `authorization` or `cookie`.
    pub header_name: HeaderName,
    /// Marked sensitive, so it never prints.
    pub header_value: HeaderValue,
    pub schedule: Schedule,
    /// Kept for the next refresh, when the IdP issued one.
    pub refresh_token: Option<Secret>,
    /// The grant that produced it, for metrics and summaries.
    pub grant: &'static str,
    /// The bare token, for `token` and `check` (None for cookies).
    pub token: Option<Secret>,
}

impl Credential {
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.schedule.usable_until
    }
}

/// A credential as a source hands it over, before the manager numbers it.
pub struct Acquired {
    pub header_name: HeaderName,
    pub header_value: HeaderValue,
    pub schedule: Schedule,
    pub refresh_token: Option<Secret>,
    pub grant: &'static str,
    pub token: Option<Secret>,
    /// Something odd the source noticed (clock skew), logged once by the manager.
    pub warning: Option<String>,
}

/// How a failure to obtain a credential should be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    /// The IdP refused our client or user: fix the configuration; retried slowly.
    Configuration,
    /// Network trouble, timeouts, 5xx: retried with backoff.
    Transient,
    /// A human must act (run `login` again); retried slowly.
    NeedsLogin,
}

/// Why a credential could not be obtained. The message quotes the IdP's OAuth error and
/// never a secret.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    pub class: FailureClass,
    pub message: String,
    /// The OAuth error code when the IdP sent one (`invalid_grant`, ...).
    pub oauth_error: Option<String>,
}

impl FetchError {
    pub fn transient(message: impl Into<String>) -> Self {
        FetchError {
            class: FailureClass::Transient,
            message: message.into(),
            oauth_error: None,
        }
    }

    pub fn configuration(message: impl Into<String>) -> Self {
        FetchError {
            class: FailureClass::Configuration,
            message: message.into(),
            oauth_error: None,
        }
    }
}

/// A bearer header value, marked sensitive.
pub fn bearer(token: &str) -> Result<HeaderValue, FetchError> {
    let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
        FetchError::transient("the token contains characters not allowed in a header")
    })?;
    value.set_sensitive(true);
    Ok(value)
}
