//! Development aid only: verifies RS256/ES256 JWTs against a JWKS fetched over HTTP, for the platform stand-in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tokio::sync::Mutex;

/// Keys are refetched after this long even when every kid is known.
const CACHE_TTL: Duration = Duration::from_secs(300);
/// An unknown kid triggers a refetch at most once in this window.
const UNKNOWN_KID_RETRY: Duration = Duration::from_secs(10);
/// Never refetch more often than this, whatever kids are presented.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_millis(250);
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a token was not accepted; `Display` gives a short human reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("token expired")]
    Expired,
    #[error("token not yet valid")]
    NotYetValid,
    #[error("bad signature")]
    BadSignature,
    #[error("unknown signing key")]
    UnknownKey,
    #[error("wrong issuer")]
    WrongIssuer,
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The JWKS could not be fetched and no cached copy exists: not the token's fault.
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
}

/// A JWKS-backed JWT verifier with a small cache; checks signature, `exp`/`nbf` (no leeway) and issuer.
pub struct JwksVerifier {
    jwks_url: String,
    expected_issuer: Option<String>,
    http: reqwest::Client,
    cache: Mutex<KeyCache>,
}

#[derive(Default)]
struct KeyCache {
    keys: Vec<CachedKey>,
    fetched_at: Option<Instant>,
    /// kid -> when a refetch last failed to find it.
    misses: HashMap<String, Instant>,
}

#[derive(Clone)]
struct CachedKey {
    kid: Option<String>,
    /// `alg` from the JWK, if it pins one.
    alg: Option<Algorithm>,
    algorithms: &'static [Algorithm],
    key: DecodingKey,
}

impl JwksVerifier {
    /// `expected_issuer`: when given, the `iss` claim must equal it. No audience is required.
    pub fn new(jwks_url: String, expected_issuer: Option<String>) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(FETCH_TIMEOUT)
            .build()
            .unwrap_or_default();
        JwksVerifier {
            jwks_url,
            expected_issuer,
            http,
            cache: Mutex::new(KeyCache::default()),
        }
    }

    pub fn jwks_url(&self) -> &str {
        &self.jwks_url
    }

    /// Verifies `token` and returns its claims.
    pub async fn verify(&self, token: &str) -> Result<Value, VerifyError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| classify(e.into_kind()))?;
        let candidates = self.keys_for(header.kid.as_deref()).await?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = 0;
        validation.validate_aud = false;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        if let Some(issuer) = &self.expected_issuer {
            validation.set_issuer(&[issuer]);
        }
        let mut outcome = Err(VerifyError::UnknownKey);
        for candidate in candidates {
            if !candidate.algorithms.contains(&header.alg)
                || candidate.alg.is_some_and(|alg| alg != header.alg)
            {
                outcome = Err(VerifyError::Malformed(format!(
                    "algorithm {:?} does not match the signing key",
                    header.alg
                )));
                continue;
            }
            outcome = jsonwebtoken::decode::<Value>(token, &candidate.key, &validation)
                .map(|data| data.claims)
                .map_err(|e| classify(e.into_kind()));
            // Only a signature mismatch is worth trying the next key (kid-less tokens).
            if outcome != Err(VerifyError::BadSignature) {
                break;
            }
        }
        outcome
    }

    /// Keys that may have signed a token with this kid; refetches the JWKS when needed.
    async fn keys_for(&self, kid: Option<&str>) -> Result<Vec<CachedKey>, VerifyError> {
        let mut cache = self.cache.lock().await;
        let stale = not_within(cache.fetched_at, CACHE_TTL);
        let mut found = matching(&cache.keys, kid);
        let unknown_kid = found.is_empty()
            && kid.is_some_and(|kid| not_within(cache.misses.get(kid).copied(), UNKNOWN_KID_RETRY));
        let may_refetch = not_within(cache.fetched_at, MIN_REFETCH_INTERVAL);
        if stale || (unknown_kid && may_refetch) {
            match self.fetch().await {
                Ok(keys) => {
                    cache.keys = keys;
                    cache.fetched_at = Some(Instant::now());
                    found = matching(&cache.keys, kid);
                }
                Err(reason) if cache.keys.is_empty() => {
                    return Err(VerifyError::KeysUnavailable(reason))
                }
                Err(reason) => {
                    tracing::warn!(%reason, "keeping cached JWKS after a failed refetch")
                }
            }
            if let (Some(kid), true) = (kid, found.is_empty()) {
                if cache.misses.len() > 256 {
                    cache.misses.clear();
                }
                cache.misses.insert(kid.to_string(), Instant::now());
            }
        }
        if found.is_empty() {
            return Err(VerifyError::UnknownKey);
        }
        Ok(found)
    }

    async fn fetch(&self) -> Result<Vec<CachedKey>, String> {
        let response = self
            .http
            .get(&self.jwks_url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("fetching JWKS: {e}"))?;
        let set: Value = response
            .json()
            .await
            .map_err(|e| format!("reading JWKS: {e}"))?;
        let entries = set
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("JWKS has no keys array")?;
        // Keys of types we cannot use are skipped, not fatal.
        Ok(entries.iter().filter_map(usable_key).collect())
    }
}

fn usable_key(entry: &Value) -> Option<CachedKey> {
    let jwk: Jwk = serde_json::from_value(entry.clone()).ok()?;
    let algorithms: &'static [Algorithm] = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => &[
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return None,
        },
        _ => return None,
    };
    let alg = match jwk.common.key_algorithm {
        Some(alg) => Some(format!("{alg:?}").parse::<Algorithm>().ok()?),
        None => None,
    };
    Some(CachedKey {
        kid: jwk.common.key_id.clone(),
        alg,
        algorithms,
        key: DecodingKey::from_jwk(&jwk).ok()?,
    })
}

/// True unless `at` happened less than `window` ago.
fn not_within(at: Option<Instant>, window: Duration) -> bool {
    !matches!(at, Some(at) if at.elapsed() < window)
}

/// With a kid: the key carrying it. Without one: every key, tried in turn.
fn matching(keys: &[CachedKey], kid: Option<&str>) -> Vec<CachedKey> {
    keys.iter()
        .filter(|key| kid.is_none() || key.kid.as_deref() == kid)
        .cloned()
        .collect()
}

fn classify(kind: ErrorKind) -> VerifyError {
    match kind {
        ErrorKind::ExpiredSignature => VerifyError::Expired,
        ErrorKind::ImmatureSignature => VerifyError::NotYetValid,
        ErrorKind::InvalidSignature => VerifyError::BadSignature,
        ErrorKind::InvalidIssuer => VerifyError::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) => {
            VerifyError::Malformed(format!("missing {claim} claim"))
        }
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => VerifyError::Malformed("not a valid JWT".to_string()),
        other => VerifyError::Malformed(format!("{other:?}")),
    }
}
