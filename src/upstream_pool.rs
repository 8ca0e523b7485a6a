//! One worker's upstream connections: HTTP/1.1 connections opened through the connector (TLS,
//! outbound proxy), handed back when a response has been read to its end, reused while they
//! stay open, closed after sitting idle, and no more requests in flight than a set limit (so
//! a thousand callers do not open a thousand upstream connections, each with its buffers).
//!
//! Written on hyper's connection API rather than hyper-util's general-purpose client: a worker
//! talks to one origin from one thread, so the general client's per-request work (a connector
//! clone, a keyed pool lookup, a task spawned to watch each connection come back) buys nothing.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::body::ForwardBody;
use crate::outbound::UpstreamTcp;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the upstream failed")]
    Connect(#[source] BoxError),
    #[error("the upstream connection failed")]
    Request(#[source] hyper::Error),
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }
}

/// How far one worker's pool may grow.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Idle connections kept for reuse.
    pub max_idle: usize,
    /// Requests in flight at once; a request beyond it waits for one to finish.
    pub max_in_flight: usize,
}

struct IdleConnection {
    sender: SendRequest<ForwardBody>,
    since: Instant,
}

pub struct UpstreamPool {
    connector: HttpsConnector<UpstreamTcp>,
    /// `scheme://authority` of the upstream, what the connector dials.
    destination: Uri,
    /// Most recently used at the back (taken first, its socket is warm), oldest at the front.
    idle: Mutex<VecDeque<IdleConnection>>,
    max_idle: usize,
    in_flight: Arc<Semaphore>,
    idle_timeout: Duration,
    sweeper_started: std::sync::atomic::AtomicBool,
}

impl UpstreamPool {
    pub fn new(
        connector: HttpsConnector<UpstreamTcp>,
        destination: Uri,
        limits: Limits,
        idle_timeout: Duration,
    ) -> Arc<UpstreamPool> {
        Arc::new(UpstreamPool {
            connector,
            destination,
            idle: Mutex::new(VecDeque::new()),
            max_idle: limits.max_idle,
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight.max(1))),
            idle_timeout,
            sweeper_started: Default::default(),
        })
    }

    /// A place among the requests in flight, held by the response until its body ends, when
    /// one is free now.
    pub fn try_admit(&self) -> Option<InFlight> {
        let permit = self.in_flight.clone().try_acquire_owned().ok()?;
        Some(InFlight { _permit: permit })
    }

    /// A place among the requests in flight, waiting for one while `max_in_flight` requests
    /// hold one (try [`Self::try_admit`] first; bound the wait with a timeout).
    pub async fn admit(&self) -> Result<InFlight, UpstreamError> {
        tracing::debug!("upstream_max_connections reached; the request waits");
        // Fails only if the semaphore were closed, which it never is.
        self.in_flight
            .clone()
            .acquire_owned()
            .await
            .map(|permit| InFlight { _permit: permit })
            .map_err(|e| UpstreamError::Connect(Box::new(e)))
    }

    /// Sends `request` (in origin form) on an idle connection, or on a new one when none is
    /// left or when `fresh` (a retry after a stale pooled one).
    pub async fn send(
        self: &Arc<Self>,
        place: InFlight,
        request: Request<ForwardBody>,
        fresh: bool,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let pooled = if fresh { None } else { self.checkout() };
        let mut sender = match pooled {
            Some(sender) => sender,
            None => self.connect().await?,
        };
        let response = match sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut error) => match error.take_message() {
                // The connection closed before any of the request was written (a pooled one the
                // upstream had just closed): it goes once more on a new connection, whatever
                // its method, since the upstream never saw it.
                Some(unsent) => {
                    tracing::debug!("a pooled upstream connection closed before the request went out; sending it on a new one");
                    sender = self.connect().await?;
                    sender
                        .send_request(unsent)
                        .await
                        .map_err(UpstreamError::Request)?
                }
                None => return Err(UpstreamError::Request(error.into_error())),
            },
        };
        let (parts, inner) = response.into_parts();
        let mut body = PooledBody {
            inner,
            owner: Some((sender, self.clone(), place)),
        };
        if body.inner.is_end_stream() {
            body.release();
        }
        Ok(Response::from_parts(parts, body))
    }

    fn idle(&self) -> MutexGuard<'_, VecDeque<IdleConnection>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection that is ready for a request and not past its
    /// idle time.
    fn checkout(&self) -> Option<SendRequest<ForwardBody>> {
        loop {
            let candidate = self.idle().pop_back()?;
            // Only ready connections are pooled; one that is no longer ready has closed.
            if candidate.since.elapsed() < self.idle_timeout && candidate.sender.is_ready() {
                return Some(candidate.sender);
            }
            // Dropping the sender closes the connection.
        }
    }

    /// Pools a connection whose response has ended. One still writing its request body (the
    /// upstream answered before reading it all) is pooled once that is done, and keeps its
    /// place among the requests in flight until then.
    fn give_back(self: Arc<Self>, mut sender: SendRequest<ForwardBody>, place: InFlight) {
        if sender.is_ready() {
            drop(place);
            self.pool(sender);
        } else if !sender.is_closed() {
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    drop(place);
                    self.pool(sender);
                }
            });
        }
    }

    fn pool(&self, sender: SendRequest<ForwardBody>) {
        let mut idle = self.idle();
        if idle.len() < self.max_idle {
            idle.push_back(IdleConnection {
                sender,
                since: Instant::now(),
            });
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<SendRequest<ForwardBody>, UpstreamError> {
        self.start_sweeper();
        let io = self
            .connector
            .clone()
            .oneshot(self.destination.clone())
            .await
            .map_err(UpstreamError::Connect)?;
        let (sender, connection) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(|e| UpstreamError::Connect(Box::new(e)))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Closes connections idle too long even when no request comes to find them, until the
    /// pool is dropped. Started by the first connection, on the worker's runtime.
    fn start_sweeper(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.sweeper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<UpstreamPool> = Arc::downgrade(self);
        let every = (self.idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { break };
                let timeout = pool.idle_timeout;
                pool.idle()
                    .retain(|c| c.since.elapsed() < timeout && !c.sender.is_closed());
            }
        });
    }
}

/// A response body from a pooled connection: once read to its end, the connection goes back
/// to the pool; dropped earlier, the connection closes (hyper cannot reuse it).
pub struct PooledBody {
    inner: Incoming,
    /// The connection, its pool and the request's place in flight, until the body ends.
    owner: Option<(SendRequest<ForwardBody>, Arc<UpstreamPool>, InFlight)>,
}

/// A request's place among those in flight to the upstream; dropping it frees the place.
pub struct InFlight {
    _permit: OwnedSemaphorePermit,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((sender, pool, place)) = self.owner.take() {
            pool.give_back(sender, place);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            // hyper's server stops reading a body after its trailers.
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() || this.inner.is_end_stream() => {
                this.release()
            }
            Poll::Ready(Some(Err(_))) => this.owner = None, // the connection and the place go
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
