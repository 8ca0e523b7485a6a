//! When a token expires and when to refresh it: read from the JWT `exp` of the token sent,
//! falling back to `expires_in`, with skew, a capped refresh point and jitter.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rand::Rng;
use tokio::time::Instant;

/// The schedule of one credential, all measured from the moment it was received.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// When the platform will refuse it.
    pub expires_at: Instant,
    /// The last moment it is sent (a skew before expiry).
    pub usable_until: Instant,
    /// When the background task replaces it.
    pub refresh_at: Instant,
    /// Its expiry as Unix seconds, for metrics and summaries.
    pub expires_at_unix: u64,
}

/// The claims of a JWT, read without checking the signature (the proxy is the token's bearer,
/// not its audience). `None` when the token is not a JWT.
pub fn jwt_claims(token: &str) -> Option<serde_json::Value> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The `exp` claim of a JWT; `None` when the token is not a JWT or has no numeric `exp`.
pub fn jwt_expiry(token: &str) -> Option<u64> {
    match &jwt_claims(token)?["exp"] {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f as u64)),
        _ => None,
    }
}

fn precise_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Seconds since the Unix epoch, by the local clock.
pub fn unix_now() -> u64 {
    precise_now().as_secs()
}

/// The shortest lifetime scheduled, so a token already expired by the local clock cannot
/// cause a busy loop of refreshes.
const MIN_LIFETIME: Duration = Duration::from_secs(2);
/// The longest lifetime scheduled.
const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Lifetime of a token as seen now: from its JWT `exp`, else from `expires_in`.
/// Returns the lifetime and a warning when the clock disagrees with the token.
pub fn lifetime(token: &str, expires_in: Option<u64>) -> (Duration, Option<String>) {
    let now = unix_now();
    match jwt_expiry(token) {
        // Measured against the sub-second clock: `exp` is whole seconds, and a whole-second
        // "now" would overstate a short token's life by up to a second.
        Some(exp) if exp > now => (Duration::from_secs(exp).saturating_sub(precise_now()), None),
        Some(exp) => {
            let fallback = expires_in.filter(|s| *s > 0).map(Duration::from_secs);
            let warning = format!(
                "the token's exp is {}s in the past by the local clock (clock skew?); using {}",
                now.saturating_sub(exp),
                match fallback {
                    Some(d) => format!("expires_in of {}s", d.as_secs()),
                    None => format!("a minimal lifetime of {}s", MIN_LIFETIME.as_secs()),
                }
            );
            (fallback.unwrap_or(MIN_LIFETIME), Some(warning))
        }
        None => match expires_in {
            Some(s) if s > 0 => (Duration::from_secs(s), None),
            _ => (
                Duration::from_secs(300),
                Some(
                    "the token is not a JWT and the response gave no expires_in; assuming 300s"
                        .into(),
                ),
            ),
        },
    }
}

impl Schedule {
    /// Schedules a credential received now with the given lifetime.
    ///
    /// - usable until `lifetime - skew`, where skew is 10% of the lifetime, at most 30 s;
    /// - refreshed at 75% of the lifetime, but no later than 60 s before expiry and no earlier
    ///   than half the lifetime (so short tokens still get most of their life), then ±5% jitter.
    pub fn new(lifetime: Duration) -> Schedule {
        let now = Instant::now();
        // A token claiming to live for ages (or an IdP's absurd `expires_in`) must not
        // overflow the clock arithmetic below; it is refreshed within a year anyway.
        let lifetime = lifetime.clamp(MIN_LIFETIME, MAX_LIFETIME);
        let skew = (lifetime / 10).min(Duration::from_secs(30));
        let target = lifetime.mul_f64(0.75);
        let latest = lifetime.saturating_sub(Duration::from_secs(60));
        // Jitter after the clamps, so a fleet of sidecars never refreshes in lockstep.
        let jitter = rand::thread_rng().gen_range(0.95..=1.05);
        let refresh_after = target.min(latest).max(lifetime / 2).mul_f64(jitter);
        Schedule {
            expires_at: now + lifetime,
            usable_until: now + (lifetime - skew),
            refresh_at: now + refresh_after,
            expires_at_unix: unix_now().saturating_add(lifetime.as_secs()),
        }
    }
}

/// An unsigned JWT with these claims, for unit tests.
#[cfg(test)]
pub(crate) fn jwt_with(claims: serde_json::Value) -> String {
    let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.sig",
        enc.encode(br#"{"alg":"RS256"}"#),
        enc.encode(claims.to_string())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_comes_from_the_jwt_not_expires_in() {
        let exp = unix_now() + 100;
        let token = jwt_with(serde_json::json!({ "exp": exp }));
        assert_eq!(jwt_expiry(&token), Some(exp));
        let (life, warning) = lifetime(&token, Some(3600));
        assert!(life <= Duration::from_secs(100) && life >= Duration::from_secs(99));
        assert!(warning.is_none());
    }

    #[test]
    fn opaque_tokens_use_expires_in() {
        assert_eq!(jwt_expiry("opaque-token"), None);
        assert_eq!(lifetime("opaque", Some(42)).0, Duration::from_secs(42));
    }

    #[test]
    fn an_already_expired_jwt_is_clamped_and_reported() {
        let token = jwt_with(serde_json::json!({ "exp": unix_now() - 50 }));
        let (life, warning) = lifetime(&token, None);
        assert_eq!(life, MIN_LIFETIME);
        assert!(warning.unwrap().contains("clock"));
    }

    #[test]
    fn absurd_lifetimes_are_clamped_not_overflowed() {
        let token = jwt_with(serde_json::json!({ "exp": 1e300 }));
        let (life, _) = lifetime(&token, None);
        let s = Schedule::new(life);
        assert!(s.expires_at - Instant::now() <= MAX_LIFETIME);
        let s = Schedule::new(Duration::from_secs(u64::MAX));
        assert!(s.refresh_at < s.usable_until);
    }

    #[test]
    fn schedule_refreshes_before_the_skewed_expiry() {
        for secs in [3u64, 10, 60, 300, 3600, 86400] {
            let s = Schedule::new(Duration::from_secs(secs));
            assert!(s.refresh_at < s.usable_until, "{secs}s");
            assert!(s.usable_until < s.expires_at, "{secs}s");
            let skew = s.expires_at - s.usable_until;
            assert!(skew <= Duration::from_secs(30));
            let to_refresh = s.refresh_at - (s.expires_at - Duration::from_secs(secs));
            assert!(
                to_refresh >= Duration::from_secs(secs).mul_f64(0.45),
                "{secs}s"
            );
            if secs >= 300 {
                assert!(
                    s.expires_at - s.refresh_at >= Duration::from_secs(60),
                    "{secs}s"
                );
            }
        }
    }
}
