//! One worker's upstream connections: HTTP/1.1 connections opened through the connector (TLS,
//! outbound proxy), handed back when a response has been read to its end, reused while they
//! stay open, closed after sitting idle, and no more requests in flight than a set limit (so
//! a thousand callers do not open a thousand upstream connections, each with its buffers).
//!
//! A worker talks to one origin from one thread, so a general-purpose client's per-request work
//! (a connector clone, a keyed pool lookup, a task per connection) buys nothing: connections
//! are [`Connection`]s of our own, read and written by the request using them.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;
use tower::ServiceExt;

use crate::body::ForwardBody;
use crate::outbound::UpstreamTcp;
use crate::upstream_http1::{Connection, Http1Error, RequestHead, SendFailure};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An upstream connection's stream: plain TCP, or TLS over it.
type UpstreamIo = Either<TcpStream, TlsStream<TokioIo<TokioIo<TcpStream>>>>;

/// A connection, boxed so that handing it between the pool and a response moves a pointer.
type PooledConnection = Box<Connection<UpstreamIo>>;

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the upstream failed")]
    Connect(#[source] BoxError),
    #[error("the upstream connection failed")]
    Request(#[source] Http1Error),
    #[error("no response head from the upstream in time")]
    TimedOut,
}

impl UpstreamError {
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect(_))
    }

    /// Whether the connection was found closed or reset before an answer came.
    pub fn is_stale(&self) -> bool {
        matches!(self, UpstreamError::Request(e) if e.is_stale())
    }
}

/// How far one worker's pool may grow.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Idle connections kept for reuse.
    pub max_idle: usize,
    /// Requests in flight at once; a request beyond it waits for one to finish.
    pub max_in_flight: usize,
    /// A response body the upstream sends nothing of for this long is cut short.
    pub body_stall: Duration,
}

struct IdleConnection {
    connection: PooledConnection,
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
    body_stall: Duration,
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
            body_stall: limits.body_stall,
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

    /// Sends a request with `head` (in origin form) and `body` on an idle connection, or on a
    /// new one when none is left or when `fresh` (a retry after a stale pooled one). `now` is
    /// the caller's reading of the clock, for telling which idle connections are too old; with
    /// no response head by `deadline`, it fails with [`UpstreamError::TimedOut`].
    pub async fn send(
        self: &Arc<Self>,
        place: InFlight,
        head: &RequestHead<'_>,
        body: ForwardBody,
        fresh: bool,
        now: Instant,
        deadline: Instant,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let pooled = if fresh { None } else { self.checkout(now) };
        let mut connection = match pooled {
            Some(connection) => connection,
            None => self.connect_by(deadline).await?,
        };
        let sent = match connection.send_by(head, body, deadline).await {
            // The connection failed before any of the request was written (a pooled one the
            // upstream had just closed): it goes once more on a new connection, whatever
            // its method, since the upstream never saw it.
            Err(SendFailure::Unsent(unsent, error)) => {
                tracing::debug!("a pooled upstream connection failed before the request went out ({error}); sending it on a new one");
                connection = self.connect_by(deadline).await?;
                connection.send_by(head, unsent, deadline).await
            }
            sent => sent,
        };
        let response_head = sent.map_err(|failure| match failure {
            SendFailure::Unsent(_, e) | SendFailure::Failed(e) => UpstreamError::Request(e),
            SendFailure::TimedOut => UpstreamError::TimedOut,
        })?;
        let done = connection.response_done();
        let mut body = PooledBody {
            owner: Some((connection, self.clone(), place)),
        };
        if done {
            body.release();
        }
        Ok(Response::from_parts(response_head, body))
    }

    /// A new connection, given up at `deadline`.
    async fn connect_by(
        self: &Arc<Self>,
        deadline: Instant,
    ) -> Result<PooledConnection, UpstreamError> {
        tokio::time::timeout_at(deadline, self.connect())
            .await
            .map_err(|_| UpstreamError::TimedOut)?
    }

    fn idle(&self) -> MutexGuard<'_, VecDeque<IdleConnection>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection that is still open and not past its idle time.
    fn checkout(&self, now: Instant) -> Option<PooledConnection> {
        loop {
            let mut candidate = self.idle().pop_back()?;
            if now.saturating_duration_since(candidate.since) < self.idle_timeout
                && candidate.connection.is_usable()
            {
                return Some(candidate.connection);
            }
            // Dropping the connection closes it.
        }
    }

    /// Pools a connection whose response has ended, if it can carry another request and the
    /// pool has room. One still owing the upstream part of a request body (the upstream
    /// answered before reading it all) is closed: finishing a body nobody waits for could take
    /// as long as the caller dawdles, holding a place among the requests in flight.
    fn give_back(&self, connection: PooledConnection, place: InFlight) {
        drop(place);
        if !connection.is_reusable() {
            return;
        }
        let mut idle = self.idle();
        if idle.len() < self.max_idle {
            idle.push_back(IdleConnection {
                connection,
                since: Instant::now(),
            });
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<PooledConnection, UpstreamError> {
        self.start_sweeper();
        let stream = self
            .connector
            .clone()
            .oneshot(self.destination.clone())
            .await
            .map_err(UpstreamError::Connect)?;
        let io = match stream {
            MaybeHttpsStream::Http(tcp) => Either::Left(tcp.into_inner()),
            MaybeHttpsStream::Https(tls) => Either::Right(tls.into_inner()),
        };
        Ok(Box::new(
            Connection::new(io).with_stall_limit(self.body_stall),
        ))
    }

    /// Closes connections idle too long, or closed by the upstream, even when no request comes
    /// to find them, until the pool is dropped. Started by the first connection, on the
    /// worker's runtime.
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
                    .retain_mut(|c| c.since.elapsed() < timeout && c.connection.is_usable());
            }
        });
    }
}

/// A response body from a pooled connection: once read to its end, the connection goes back
/// to the pool; dropped earlier, the connection closes.
pub struct PooledBody {
    /// The connection, its pool and the request's place in flight, until the body ends.
    owner: Option<(PooledConnection, Arc<UpstreamPool>, InFlight)>,
}

/// A request's place among those in flight to the upstream; dropping it frees the place.
pub struct InFlight {
    _permit: OwnedSemaphorePermit,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((connection, pool, place)) = self.owner.take() {
            pool.give_back(connection, place);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = Http1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Http1Error>>> {
        let this = &mut *self;
        let Some((connection, ..)) = &mut this.owner else {
            return Poll::Ready(None);
        };
        match connection.poll_body(cx) {
            Poll::Ready(Some(Ok(data))) => {
                // hyper stops polling once a body of known length is complete.
                if connection.response_done() {
                    this.release();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Poll::Ready(None) => {
                this.release();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                // A stall is reported (once per idle_timeout at most); a closing upstream is
                // already in the caller's cut-short body, and could repeat at every request.
                if matches!(e, Http1Error::Stalled(_)) {
                    tracing::warn!("an answer was cut short: {e}");
                } else {
                    tracing::debug!("an answer was cut short: {e}");
                }
                this.owner = None; // the connection and the place go
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.owner
            .as_ref()
            .map_or(true, |(connection, ..)| connection.response_done())
    }

    fn size_hint(&self) -> SizeHint {
        self.owner
            .as_ref()
            .map_or(SizeHint::with_exact(0), |(connection, ..)| {
                connection.size_hint()
            })
    }
}
