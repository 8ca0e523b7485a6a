//! The credential cache: moka holds the current credential; requests read it without waiting
//! while a usable one is held, a background task replaces it before expiry, and every fetch
//! is single-flight.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};
use rand::Rng;
use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};
pub use tokio_util::sync::CancellationToken as Shutdown;

use super::source::Source;
use super::{Credential, FailureClass, FetchError};
use crate::metrics::Metrics;

/// Transient failures are retried after 1 s, 2 s, 4 s ... up to this.
const MAX_TRANSIENT_BACKOFF: Duration = Duration::from_secs(10);
/// Configuration failures (a refused client or user) are retried this often at most,
/// or sooner when a secret file changes.
const CONFIGURATION_RETRY: Duration = Duration::from_secs(60);
/// An upstream 401 invalidates a credential at most this often.
const MIN_INVALIDATION_INTERVAL: Duration = Duration::from_secs(5);
/// A failing refresh is retried this long before the held credential's cutoff at the latest
/// (or [`MIN_RETRY`] after the failure, when less than that is left).
const LAST_CHANCE_MARGIN: Duration = Duration::from_millis(500);
/// The shortest retry delay, so failures never spin.
const MIN_RETRY: Duration = Duration::from_millis(200);
/// How often watched secret files are checked for changes.
const FILE_POLL: Duration = Duration::from_secs(2);

/// Raises a flag for as long as it lives.
struct Flag<'a>(&'a AtomicBool);

impl<'a> Flag<'a> {
    fn raise(flag: &'a AtomicBool) -> Flag<'a> {
        flag.store(true, Ordering::SeqCst);
        Flag(flag)
    }
}

impl Drop for Flag<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// Why a request cannot have a credential right now.
#[derive(Clone, Debug)]
pub struct Unavailable {
    pub message: String,
    pub retry_after: Duration,
    pub class: FailureClass,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Trigger {
    /// A request found no usable credential: obeys the failure backoff.
    Request,
    /// The background task: does the backoff itself.
    Background,
    /// An upstream 401 on a credential: rate limited.
    Invalidate,
}

struct Failure {
    error: FetchError,
    attempts: u32,
    failed_at: Instant,
    retry_at: Instant,
}

pub struct CredentialManager {
    /// Holds the credential keyed by identity; its entry's compute is the single flight.
    cache: Cache<Arc<str>, Arc<Credential>>,
    /// The credential last put in the cache, for a lock-free read on every request.
    latest: ArcSwapOption<Credential>,
    key: Arc<str>,
    source: Arc<Source>,
    /// The runtime that runs the background task, and every call to the IdP; set once the
    /// background task runs, after which failures are retried, and logged as such.
    runtime: OnceLock<tokio::runtime::Handle>,
    generation: AtomicU64,
    failure: Mutex<Option<Failure>>,
    last_invalidation: Mutex<Option<Instant>>,
    wake: Notify,
    files_changed: AtomicBool,
    /// True while a call to the IdP is under way.
    attempting: AtomicBool,
    metrics: Arc<Metrics>,
}

impl CredentialManager {
    pub fn new(source: Source, metrics: Arc<Metrics>) -> Arc<CredentialManager> {
        Arc::new(CredentialManager {
            cache: Cache::builder().max_capacity(16).build(),
            latest: ArcSwapOption::empty(),
            key: Arc::from(source.identity()),
            source: Arc::new(source),
            runtime: OnceLock::new(),
            generation: AtomicU64::new(0),
            failure: Mutex::new(None),
            last_invalidation: Mutex::new(None),
            wake: Notify::new(),
            files_changed: AtomicBool::new(false),
            attempting: AtomicBool::new(false),
            metrics,
        })
    }

    /// The credential to send now. Waits on the IdP only when no usable credential is held
    /// and no recent failure says the wait would be in vain.
    pub async fn current(&self) -> Result<Arc<Credential>, Unavailable> {
        // The warm path: one atomic load of the latest credential the cache was given.
        let held = self.latest.load_full();
        if let Some(credential) = &held {
            if credential.is_usable(Instant::now()) {
                return Ok(credential.clone());
            }
        }
        let seen = held.map(|c| c.generation).unwrap_or(0);
        self.refresh(seen, Trigger::Request).await
    }

    /// The held credential, usable or not.
    pub async fn held(&self) -> Option<Arc<Credential>> {
        self.cache.get(&self.key).await
    }

    /// Whether a usable credential is held.
    pub async fn is_ready(&self) -> bool {
        self.held()
            .await
            .is_some_and(|c| c.is_usable(Instant::now()))
    }

    /// Seconds until the held credential expires.
    pub async fn expires_in_seconds(&self) -> Option<f64> {
        let held = self.held().await?;
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Some(held.schedule.expires_at_unix as f64 - now)
    }

    /// The last failure to obtain a credential, if the latest attempt failed.
    pub fn last_failure(&self) -> Option<FetchError> {
        self.lock_failure().as_ref().map(|f| f.error.clone())
    }

    /// Obtains a fresh credential now, whatever is held (for `check` and `token`).
    pub async fn obtain(&self) -> Result<Arc<Credential>, Unavailable> {
        let seen = self.generation.load(Ordering::SeqCst);
        self.refresh(seen, Trigger::Background).await
    }

    /// The upstream refused `generation` with 401: replace it once. Returns the credential
    /// to retry with, or `None` when no new one could be had.
    pub async fn invalidate(&self, generation: u64) -> Option<Arc<Credential>> {
        self.refresh(generation, Trigger::Invalidate).await.ok()
    }

    fn lock_failure(&self) -> std::sync::MutexGuard<'_, Option<Failure>> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn unavailable(error: &FetchError, retry_at: Instant) -> Unavailable {
        let retry_after = retry_at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1));
        Unavailable {
            message: error.message.clone(),
            retry_after,
            class: error.class,
        }
    }

    /// A recent failure that makes a request give up at once, rather than call the IdP again.
    fn failure_gate(&self) -> Option<Unavailable> {
        let failure = self.lock_failure();
        let f = failure.as_ref()?;
        (f.retry_at > Instant::now()).then(|| Self::unavailable(&f.error, f.retry_at))
    }

    /// A failure recorded after `since`: whoever queued behind that attempt takes its
    /// outcome instead of calling the IdP again at once.
    fn failed_since(&self, since: Instant) -> Option<Unavailable> {
        let failure = self.lock_failure();
        let f = failure.as_ref()?;
        (f.failed_at >= since).then(|| Self::unavailable(&f.error, f.retry_at))
    }

    /// Records a failed attempt and schedules the next (see [`retry_delay`]), returning when that is.
    fn record_failure(&self, error: &FetchError, held: Option<&Credential>) -> Instant {
        let mut failure = self.lock_failure();
        let attempts = failure.as_ref().map(|f| f.attempts + 1).unwrap_or(1);
        let usable_for = held.map(|c| {
            c.schedule
                .usable_until
                .saturating_duration_since(Instant::now())
        });
        let jitter = rand::thread_rng().gen_range(0.8..=1.0);
        let delay = retry_delay(error.class, attempts, usable_for, jitter);
        if self.runtime.get().is_none() {
            // A one-shot caller (`check`, `token`) reports the failure itself.
            tracing::debug!("could not obtain a credential: {}", error.message);
        } else {
            self.log_failure(error, attempts, delay);
        }
        let now = Instant::now();
        *failure = Some(Failure {
            error: error.clone(),
            attempts,
            failed_at: now,
            retry_at: now + delay,
        });
        now + delay
    }

    fn log_failure(&self, error: &FetchError, attempts: u32, delay: Duration) {
        match error.class {
            FailureClass::Transient => tracing::warn!(
                attempt = attempts,
                retry_in_ms = delay.as_millis() as u64,
                "could not obtain a credential: {}",
                error.message
            ),
            FailureClass::Configuration => tracing::error!(
                attempt = attempts,
                retry_in_s = delay.as_secs(),
                "could not obtain a credential, check the configuration: {}",
                error.message
            ),
            FailureClass::NeedsLogin => tracing::error!(
                attempt = attempts,
                retry_in_s = delay.as_secs(),
                "could not obtain a credential, a person must log in again: {}",
                error.message
            ),
        }
    }

    fn invalidation_allowed(&self) -> bool {
        let mut last = self
            .last_invalidation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < MIN_INVALIDATION_INTERVAL) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Single-flight replacement of the credential of generation `seen`: callers queue on
    /// the cache entry, and whoever finds a newer usable credential takes it without a call.
    async fn refresh(&self, seen: u64, trigger: Trigger) -> Result<Arc<Credential>, Unavailable> {
        // While the IdP is failing and another attempt is under way, a request does not queue
        // behind it: it is answered at once.
        if trigger == Trigger::Request && self.attempting.load(Ordering::SeqCst) {
            if let Some(failure) = self.lock_failure().as_ref() {
                return Err(Self::unavailable(&failure.error, failure.retry_at));
            }
        }
        let queued_at = Instant::now();
        let outcome = self
            .cache
            .entry(self.key.clone())
            .and_try_compute_with(|existing| async move {
                let existing = existing.map(|e| e.into_value());
                if let Some(credential) = &existing {
                    let newer = credential.generation > seen;
                    if newer && credential.is_usable(Instant::now()) {
                        return Ok(Op::Nop);
                    }
                    if trigger == Trigger::Invalidate && (newer || !self.invalidation_allowed()) {
                        return Ok(Op::Nop);
                    }
                }
                if trigger == Trigger::Request {
                    if let Some(unavailable) = self.failure_gate() {
                        return Err(unavailable);
                    }
                }
                if let Some(unavailable) = self.failed_since(queued_at) {
                    return Err(unavailable);
                }
                let attempt = {
                    // Cleared on drop, also when the waiting caller goes away mid-attempt.
                    let _attempting = Flag::raise(&self.attempting);
                    // The call runs as its own task on the control runtime: it finishes even
                    // when the waiting caller goes away (a refresh token the IdP rotated is
                    // saved, never lost half-way), and file reads stay off the workers.
                    let source = self.source.clone();
                    let previous = existing.clone();
                    let task = async move { source.acquire(previous.as_deref()).await };
                    let handle = match self.runtime.get() {
                        Some(runtime) => runtime.spawn(task),
                        None => tokio::spawn(task),
                    };
                    handle.await.unwrap_or_else(|e| {
                        Err(FetchError::transient(format!(
                            "the credential task ended abnormally: {e}"
                        )))
                    })
                };
                match attempt {
                    Ok(acquired) => {
                        if let Some(warning) = &acquired.warning {
                            tracing::warn!("{warning}");
                        }
                        let recovered = self.lock_failure().take().is_some();
                        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
                        let lifetime = acquired
                            .schedule
                            .expires_at
                            .saturating_duration_since(Instant::now());
                        tracing::info!(
                            grant = acquired.grant,
                            generation,
                            lifetime_s = lifetime.as_secs(),
                            recovered,
                            "obtained a credential"
                        );
                        let credential = Arc::new(Credential {
                            generation,
                            header_name: acquired.header_name,
                            header_value: acquired.header_value,
                            schedule: acquired.schedule,
                            refresh_token: acquired.refresh_token,
                            grant: acquired.grant,
                            token: acquired.token,
                        });
                        self.latest.store(Some(credential.clone()));
                        // Counted once requests (which read `latest`) can have it.
                        self.metrics.token_request(credential.grant, true);
                        Ok(Op::Put(credential))
                    }
                    Err(error) => {
                        self.metrics
                            .token_request(self.source.primary_grant(), false);
                        let retry_at = self.record_failure(&error, existing.as_deref());
                        Err(Self::unavailable(&error, retry_at))
                    }
                }
            })
            .await?;
        match outcome {
            CompResult::Inserted(entry)
            | CompResult::ReplacedWith(entry)
            | CompResult::Unchanged(entry) => {
                let credential = entry.into_value();
                if credential.is_usable(Instant::now()) {
                    Ok(credential)
                } else {
                    Err(Unavailable {
                        message: "the credential has expired and no new one could be obtained yet"
                            .into(),
                        retry_after: Duration::from_secs(1),
                        class: FailureClass::Transient,
                    })
                }
            }
            CompResult::StillNone(_) | CompResult::Removed(_) => Err(Unavailable {
                message: "no credential has been obtained yet".into(),
                retry_after: Duration::from_secs(1),
                class: FailureClass::Transient,
            }),
        }
    }

    /// Starts the background refresh loop and the secret-file watcher.
    pub fn spawn_background(self: &Arc<Self>, shutdown: Shutdown) {
        let _ = self.runtime.set(tokio::runtime::Handle::current());
        let manager = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { manager.refresh_loop(stop).await });
        let files = self.source.watched_files();
        if !files.is_empty() {
            let manager = self.clone();
            tokio::spawn(async move { manager.watch_files(files, shutdown).await });
        }
    }

    async fn refresh_loop(self: Arc<Self>, shutdown: Shutdown) {
        loop {
            let held = self.held().await;
            let retry_at = self.lock_failure().as_ref().map(|f| f.retry_at);
            let next = match (retry_at, &held) {
                (Some(at), _) => at,
                (None, Some(credential)) => credential.schedule.refresh_at,
                (None, None) => Instant::now(),
            };
            tracing::debug!(
                in_ms = next.saturating_duration_since(Instant::now()).as_millis() as u64,
                after_failure = retry_at.is_some(),
                "next credential refresh scheduled"
            );
            tokio::select! {
                _ = sleep_until(next) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.cancelled() => return,
            }
            let files_changed = self.files_changed.swap(false, Ordering::SeqCst);
            let held = self.held().await;
            // A changed secret file means the old failure may be fixed: try at once.
            if files_changed {
                let retry_now =
                    self.lock_failure().is_some() || self.source.replace_on_file_change();
                if !retry_now {
                    continue;
                }
            } else if let Some(credential) = &held {
                let due = Instant::now() >= credential.schedule.refresh_at;
                if !due && self.lock_failure().is_none() {
                    continue;
                }
            }
            let seen = held.map(|c| c.generation).unwrap_or(0);
            let _ = self.refresh(seen, Trigger::Background).await;
        }
    }

    async fn watch_files(self: Arc<Self>, files: Vec<PathBuf>, shutdown: Shutdown) {
        let stamp = |path: &PathBuf| {
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.modified().ok(), m.len()))
        };
        let mut last: Vec<_> = files.iter().map(stamp).collect();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(FILE_POLL) => {}
                _ = shutdown.cancelled() => return,
            }
            let now: Vec<_> = files.iter().map(stamp).collect();
            if now != last {
                tracing::info!("a secret file changed; obtaining a credential with it");
                last = now;
                self.files_changed.store(true, Ordering::SeqCst);
                self.wake.notify_one();
            }
        }
    }
}

/// How long to wait before the next attempt after `attempts` failures in a row.
///
/// A transient failure is retried after 1 s, 2 s, 4 s ... up to [`MAX_TRANSIENT_BACKOFF`]
/// (times `jitter`), but while a held credential is still usable (`usable_for`) never later
/// than [`LAST_CHANCE_MARGIN`] before it stops being so, and in its last moments every
/// [`MIN_RETRY`] (never sooner): an IdP that comes back before the credential runs out causes
/// no failed call. Once nothing usable is held, the plain backoff spares a failing IdP.
fn retry_delay(
    class: FailureClass,
    attempts: u32,
    usable_for: Option<Duration>,
    jitter: f64,
) -> Duration {
    match class {
        FailureClass::Transient => {
            let base = Duration::from_secs(1u64 << attempts.saturating_sub(1).min(4))
                .min(MAX_TRANSIENT_BACKOFF);
            let backoff = base.mul_f64(jitter).max(MIN_RETRY);
            match usable_for.filter(|left| !left.is_zero()) {
                Some(left) => backoff.min(left.saturating_sub(LAST_CHANCE_MARGIN).max(MIN_RETRY)),
                None => backoff,
            }
        }
        FailureClass::Configuration | FailureClass::NeedsLogin => CONFIGURATION_RETRY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRANSIENT: FailureClass = FailureClass::Transient;

    #[test]
    fn transient_failures_back_off_exponentially_up_to_the_cap() {
        let delays: Vec<u64> = (1..=7)
            .map(|n| retry_delay(TRANSIENT, n, None, 1.0).as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10, 10]);
        assert_eq!(
            retry_delay(TRANSIENT, 1, None, 0.8),
            Duration::from_millis(800)
        );
    }

    #[test]
    fn a_held_credential_brings_the_retry_before_its_last_usable_moment() {
        // 2.5 s left: the 4 s backoff is cut to 2 s.
        let left = Some(Duration::from_millis(2500));
        assert_eq!(retry_delay(TRANSIENT, 3, left, 1.0), Duration::from_secs(2));
        // Plenty left: the backoff stands.
        assert_eq!(
            retry_delay(TRANSIENT, 3, Some(Duration::from_secs(60)), 1.0),
            Duration::from_secs(4)
        );
    }

    #[test]
    fn in_a_held_credentials_last_moments_the_retry_comes_every_min_retry() {
        // 600 ms left is less than the margin plus the shortest retry: it is tried again
        // after MIN_RETRY, not after the full second of backoff.
        for left_ms in [1, 250, 600, 699] {
            assert_eq!(
                retry_delay(TRANSIENT, 1, Some(Duration::from_millis(left_ms)), 1.0),
                MIN_RETRY,
                "{left_ms} ms left"
            );
        }
    }

    #[test]
    fn once_nothing_usable_is_held_the_plain_backoff_applies() {
        assert_eq!(
            retry_delay(TRANSIENT, 5, Some(Duration::ZERO), 1.0),
            Duration::from_secs(10)
        );
    }

    #[test]
    fn configuration_failures_wait_the_configuration_retry() {
        for class in [FailureClass::Configuration, FailureClass::NeedsLogin] {
            assert_eq!(
                retry_delay(class, 1, Some(Duration::from_secs(1)), 1.0),
                CONFIGURATION_RETRY
            );
        }
    }
}
