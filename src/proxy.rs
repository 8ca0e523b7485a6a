//! Forward one request: admit it, replace its credentials, rewrite the target, drop
//! hop-by-hop headers, stream both bodies, and map upstream failures to clear errors.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use tokio::time::Instant;
use url::Url;

use crate::access_log;
use crate::body::{ForwardBody, ReplayCopy};
use crate::caller_fields::CallerFields;
use crate::credential::{session, Credential, CredentialManager};
use crate::error::ProxyError;
use crate::guard::Guard;
use crate::metrics::Metrics;
use crate::outbound::UpstreamTcp;
use crate::upstream_http1::RequestHead;
use crate::upstream_pool::{self, PooledBody, UpstreamError, UpstreamPool};

/// What the caller receives: the upstream's streamed body, or a body the proxy made.
pub type ResponseBody = Either<PooledBody, Full<Bytes>>;

/// A static, not a constant, so the fields the proxy sets can lend it out.
static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Idle upstream connections close before the usual 60 s of load balancers.
const UPSTREAM_IDLE: Duration = Duration::from_secs(30);

/// The upstream as requests are rewritten to it.
pub struct Upstream {
    url: Url,
    /// `scheme://authority`, e.g. `https://ml.example.com`.
    origin: String,
    /// The base path of the upstream URL without its trailing slash (usually empty).
    base_path: String,
    /// The Host header sent (ingresses route by it).
    host: HeaderValue,
    /// `scheme://authority`, what connections are opened to.
    destination: Uri,
}

impl Upstream {
    pub fn new(url: &Url) -> anyhow::Result<Upstream> {
        let origin = url.origin().ascii_serialization();
        let authority = origin
            .split_once("://")
            .map(|(_, a)| a.to_owned())
            .unwrap_or_default();
        Ok(Upstream {
            url: url.clone(),
            base_path: url.path().trim_end_matches('/').to_owned(),
            host: HeaderValue::try_from(authority.as_str())?,
            destination: origin.parse()?,
            origin,
        })
    }

    /// The upstream request target, in origin form, for a caller's request target (already
    /// admitted by the guard).
    fn uri(&self, target: &Uri) -> Result<Uri, ProxyError> {
        let cannot = || ProxyError::BadRequest("the request target cannot be forwarded".into());
        let path_and_query = target.path_and_query().cloned();
        let path_and_query = if self.base_path.is_empty() {
            // The caller's target as received, shared rather than copied or parsed again.
            path_and_query
        } else {
            let text = format!(
                "{}{}",
                self.base_path,
                path_and_query.as_ref().map_or("/", |pq| pq.as_str())
            );
            Some(text.parse().map_err(|_| cannot())?)
        };
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = path_and_query;
        Uri::from_parts(parts).map_err(|_| cannot())
    }

    /// A `Location` on the upstream's own origin, made relative so the caller stays behind
    /// the proxy; other locations pass unchanged.
    fn rewrite_location(&self, location: &HeaderValue) -> Option<HeaderValue> {
        let text = location.to_str().ok()?;
        let rest = text.strip_prefix(self.origin.as_str())?;
        let rest = if rest.is_empty() { "/" } else { rest };
        if !rest.starts_with('/') || rest.starts_with("//") {
            return None;
        }
        let rest = rest.strip_prefix(self.base_path.as_str()).unwrap_or(rest);
        HeaderValue::try_from(rest).ok()
    }
}

/// Everything the workers share.
pub struct Shared {
    pub manager: Arc<CredentialManager>,
    pub metrics: Arc<Metrics>,
    pub guard: Guard,
    pub upstream: Upstream,
    pub upstream_timeout: Duration,
    /// One line per request (see `access_log`).
    pub access_log: bool,
    /// The session cookie's name when the credential is a platform session (Dex).
    pub session_cookie: Option<String>,
}

/// One worker's forwarder, with its own upstream connection pool.
#[derive(Clone)]
pub struct Forwarder {
    shared: Arc<Shared>,
    pool: Arc<UpstreamPool>,
}

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A request id for a request that came without one: a random prefix for this process and a
/// counter, both in hex (`1a2b3c4d-2f`).
fn new_request_id() -> HeaderValue {
    use std::sync::OnceLock;
    static PREFIX: OnceLock<[u8; 8]> = OnceLock::new();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let prefix = PREFIX.get_or_init(|| {
        let random = rand::random::<u32>();
        std::array::from_fn(|i| HEX[(random >> (28 - 4 * i) & 0xf) as usize])
    });
    let n = REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = [0u8; 8 + 1 + 16];
    id[..8].copy_from_slice(prefix);
    id[8] = b'-';
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1) as usize;
    for i in 0..digits {
        id[9 + i] = HEX[(n >> (4 * (digits - 1 - i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id[..9 + digits]).unwrap_or(HeaderValue::from_static("0"))
}

/// Headers that describe one connection, not the message (RFC 9110 7.6.1), plus the
/// credentials a caller may send to a proxy.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    KEEP_ALIVE,
    PROXY_CONNECTION,
];

/// Where `name` is in [`HOP_BY_HOP`]: one match on the name's text, comparisons of plain
/// strings instead of nine `HeaderName` comparisons per header.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "te" => 1,
        "trailer" => 2,
        "transfer-encoding" => 3,
        "upgrade" => 4,
        "proxy-authorization" => 5,
        "proxy-authenticate" => 6,
        "keep-alive" => 7,
        "proxy-connection" => 8,
        _ => return None,
    })
}

/// `Host`, as a static to lend out.
static HOST: HeaderName = header::HOST;

/// The fields the proxy sets on every forwarded request, in place of the caller's.
fn forwarded_fields<'a>(
    host: &'a HeaderValue,
    request_id: &'a HeaderValue,
    credential: &'a Credential,
) -> [(&'a HeaderName, &'a HeaderValue); 3] {
    [
        (&HOST, host),
        (&REQUEST_ID, request_id),
        (&credential.header_name, &credential.header_value),
    ]
}

/// The caller's fields not forwarded: hop-by-hop ones and the caller's credentials, whatever
/// kind of credential the proxy sends. (Those the proxy sets are left out anyway: see
/// `RequestHead`.)
fn not_forwarded(name: &HeaderName) -> bool {
    matches!(name.as_str(), "authorization" | "cookie") || hop_by_hop_index(name).is_some()
}

/// Removes the fields a `Connection` field names (RFC 9110 7.6.1); `keep-alive` and `close`,
/// the usual values, name none.
fn remove_fields_connection_names(headers: &mut HeaderMap) {
    let names_nothing = |token: &[u8]| {
        token.eq_ignore_ascii_case(b"keep-alive") || token.eq_ignore_ascii_case(b"close")
    };
    // Empty, and so not allocated, for the usual values.
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|token| !names_nothing(token.as_bytes()))
        .filter_map(|token| HeaderName::try_from(token).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
}

/// Removes the hop-by-hop headers and those the `Connection` header lists. One pass over the
/// names finds which are present (most messages carry none), so the map is hashed only for
/// those.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = [false; 9];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    if present[0] {
        remove_fields_connection_names(headers);
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
}

impl Forwarder {
    pub fn new(
        shared: Arc<Shared>,
        connector: HttpsConnector<UpstreamTcp>,
        limits: upstream_pool::Limits,
    ) -> Forwarder {
        let pool = UpstreamPool::new(
            connector,
            shared.upstream.destination.clone(),
            limits,
            UPSTREAM_IDLE,
        );
        Forwarder { shared, pool }
    }

    /// Handles one request from a caller; never fails (errors become responses).
    pub async fn handle(&self, request: Request<Incoming>) -> Response<ResponseBody> {
        let (parts, body) = request.into_parts();
        self.respond(parts, Some(body)).await
    }

    /// Handles one request from its head and its body (`None`: it has none).
    pub async fn respond(
        &self,
        parts: http::request::Parts,
        body: Option<Incoming>,
    ) -> Response<ResponseBody> {
        let started = Instant::now();
        let method = parts.method.clone();
        let target = parts.uri.clone();
        let path = target.path();
        let fields = CallerFields::of(&parts.headers);
        let request_id = fields.request_id.cloned().unwrap_or_else(new_request_id);
        let admitted = self
            .shared
            .guard
            .admit(&parts.method, parts.version, &parts.uri, &fields);
        let names_fields_to_drop = fields.connection;
        let forwarded = match admitted {
            Ok(()) => {
                self.forward(parts, body, &request_id, names_fields_to_drop)
                    .await
            }
            Err(refused) => Err(refused),
        };
        let finished = Instant::now();
        let (mut response, upstream_elapsed) = match forwarded {
            Ok((response, sent)) => (response.map(Either::Left), Some(finished - sent)),
            Err(error) => {
                self.shared.metrics.proxy_error(error.kind());
                if matches!(
                    error,
                    ProxyError::TokenUnavailable { .. }
                        | ProxyError::UpstreamUnreachable(_)
                        | ProxyError::UpstreamTls(_)
                        | ProxyError::UpstreamTimeout(_)
                        | ProxyError::UpstreamBusy(_)
                ) {
                    tracing::warn!(kind = error.kind(), %method, path, "{}", error.message());
                }
                (error.to_response().map(Either::Right), None)
            }
        };
        response
            .headers_mut()
            .insert(&REQUEST_ID, request_id.clone());
        let elapsed = finished - started;
        let status = response.status().as_u16();
        self.shared.metrics.request(status, elapsed);
        if self.shared.access_log {
            access_log::record(&access_log::Entry {
                method: method.as_str(),
                path,
                status,
                upstream: upstream_elapsed,
                total: elapsed,
                request_id: request_id.as_bytes(),
            });
        }
        response
    }

    /// Forwards an admitted request with the proxy's credential; returns the response and
    /// when the request was sent.
    async fn forward(
        &self,
        mut parts: http::request::Parts,
        body: Option<Incoming>,
        request_id: &HeaderValue,
        names_fields_to_drop: bool,
    ) -> Result<(Response<PooledBody>, Instant), ProxyError> {
        let shared = &*self.shared;
        parts.uri = shared.upstream.uri(&parts.uri)?;
        let credential =
            shared
                .manager
                .current()
                .await
                .map_err(|u| ProxyError::TokenUnavailable {
                    message: u.message,
                    retry_after: u.retry_after,
                })?;
        if names_fields_to_drop {
            remove_fields_connection_names(&mut parts.headers);
        }
        let (body, copy) = match body {
            Some(body) => ForwardBody::from_incoming(body),
            None => (ForwardBody::Empty, None),
        };
        let set = forwarded_fields(&shared.upstream.host, request_id, &credential);
        let head = RequestHead {
            parts: &parts,
            set: &set,
            leave_out: not_forwarded,
        };

        let sent = Instant::now();
        let idempotent = parts.method.is_idempotent();
        let mut response = match self.send_once(&head, body, false, sent).await {
            Ok(response) => response,
            // A pooled connection the upstream had closed: an idempotent request whose body is
            // still at hand goes once more, on a fresh connection, invisibly.
            Err(SendError::Upstream(e)) if idempotent && e.is_stale() => {
                let Some(body) = body_again(copy.as_ref()) else {
                    return Err(classify_upstream_error(e));
                };
                tracing::debug!("a pooled upstream connection was closed; retrying on a fresh one");
                self.send_once(&head, body, true, Instant::now()).await?
            }
            Err(e) => return Err(e.into()),
        };
        if self.refused(&response) {
            shared.metrics.upstream_unauthorized();
            match body_again(copy.as_ref()) {
                Some(body) => {
                    // Single-flight and rate limited: many 401s on one credential cause one
                    // token request; the request is replayed once, never looped.
                    tracing::debug!(
                        generation = credential.generation,
                        "the platform refused the credential; replacing it and replaying once"
                    );
                    let fresh = shared.manager.invalidate(credential.generation).await;
                    if let Some(fresh) = fresh.filter(|f| f.generation != credential.generation) {
                        // The refused response gives up its connection and its place among
                        // the upstream requests in flight before the replay takes one.
                        drop(response);
                        let set = forwarded_fields(&shared.upstream.host, request_id, &fresh);
                        let head = RequestHead { set: &set, ..head };
                        response = self.send_once(&head, body, false, Instant::now()).await?;
                        if self.refused(&response) {
                            shared.metrics.upstream_unauthorized();
                        }
                    }
                }
                None => {
                    let manager = shared.manager.clone();
                    let generation = credential.generation;
                    tokio::spawn(async move { manager.invalidate(generation).await });
                }
            }
            // A session's login redirect is never passed back: the caller cannot follow it.
            if response.status().is_redirection() && self.refused(&response) {
                return Err(ProxyError::TokenUnavailable {
                    message:
                        "the platform session expired and was being renewed; retry the request"
                            .into(),
                    retry_after: Duration::from_secs(1),
                });
            }
        }

        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(cookie) = &shared.session_cookie {
            session::strip_session_set_cookie(&mut parts.headers, cookie);
        }
        if let Some(location) = parts.headers.get(header::LOCATION) {
            if let Some(rewritten) = shared.upstream.rewrite_location(location) {
                parts.headers.insert(header::LOCATION, rewritten);
            }
        }
        Ok((Response::from_parts(parts, body), sent))
    }

    /// Whether the upstream refused the credential: a 401, or for a platform session a
    /// redirect into the login flow.
    fn refused(&self, response: &Response<PooledBody>) -> bool {
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            return true;
        }
        self.shared.session_cookie.is_some()
            && status.is_redirection()
            && response
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .is_some_and(|l| session::is_login_redirect(l, &self.shared.upstream.url))
    }

    /// Sends one request upstream, on a pooled connection or a `fresh` one, once a place among
    /// the requests in flight is free; each wait is bounded by the response-head timeout,
    /// counted from `now` when a place is free at once.
    async fn send_once(
        &self,
        head: &RequestHead<'_>,
        body: ForwardBody,
        fresh: bool,
        now: Instant,
    ) -> Result<Response<PooledBody>, SendError> {
        let timeout = self.shared.upstream_timeout;
        // A timer only when the request has to wait for a place.
        let (place, now) = match self.pool.try_admit() {
            Some(place) => (place, now),
            None => {
                let place = tokio::time::timeout(timeout, self.pool.admit())
                    .await
                    .map_err(|_| SendError::Busy(timeout))?
                    .map_err(SendError::Upstream)?;
                (place, Instant::now())
            }
        };
        self.pool
            .send(place, head, body, fresh, now, now + timeout)
            .await
            .map_err(|e| match e {
                UpstreamError::TimedOut => SendError::Timeout(timeout),
                e => SendError::Upstream(e),
            })
    }
}

/// Why a request got no response head from the upstream.
enum SendError {
    Timeout(Duration),
    /// No place among the requests in flight came free in time.
    Busy(Duration),
    Upstream(UpstreamError),
}

impl From<SendError> for ProxyError {
    fn from(error: SendError) -> ProxyError {
        match error {
            SendError::Timeout(timeout) => ProxyError::UpstreamTimeout(timeout),
            SendError::Busy(timeout) => ProxyError::UpstreamBusy(timeout),
            SendError::Upstream(e) => classify_upstream_error(e),
        }
    }
}

/// The body to send again (a retry or a replay), when the whole of it is at hand.
fn body_again(copy: Option<&ReplayCopy>) -> Option<ForwardBody> {
    match copy {
        None => Some(ForwardBody::Empty),
        Some(copy) => copy.replayable().map(|bytes| {
            if bytes.is_empty() {
                ForwardBody::Empty
            } else {
                ForwardBody::Buffered(Some(bytes))
            }
        }),
    }
}

/// Names what went wrong talking to the upstream without echoing anything sensitive.
fn classify_upstream_error(error: UpstreamError) -> ProxyError {
    let mut causes = String::new();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        if !causes.is_empty() {
            causes.push_str(": ");
        }
        causes.push_str(&cause.to_string());
        source = cause.source();
    }
    let lower = causes.to_ascii_lowercase();
    if lower.contains("certificate")
        || lower.contains("invalidcertificate")
        || lower.contains("unknownissuer")
    {
        ProxyError::UpstreamTls(format!(
            "the upstream's certificate was not trusted ({causes}); set ca_file to its CA bundle"
        ))
    } else if error.is_connect() {
        ProxyError::UpstreamUnreachable(if causes.is_empty() {
            "connection failed".into()
        } else {
            causes
        })
    } else {
        ProxyError::UpstreamUnreachable(if causes.is_empty() {
            error.to_string()
        } else {
            causes
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hop_by_hop_header_is_found_at_its_place_and_no_other_is() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        for name in [
            header::HOST,
            header::AUTHORIZATION,
            header::CONTENT_LENGTH,
            REQUEST_ID.clone(),
        ] {
            assert_eq!(hop_by_hop_index(&name), None, "{name}");
        }
    }

    #[test]
    fn same_origin_locations_become_relative() {
        let up = Upstream::new(&Url::parse("https://ml.example.com").unwrap()).unwrap();
        let loc = |s: &'static str| up.rewrite_location(&HeaderValue::from_static(s));
        assert_eq!(
            loc("https://ml.example.com/seldon-deploy/api/v1alpha1/x?y=1").unwrap(),
            "/seldon-deploy/api/v1alpha1/x?y=1"
        );
        assert_eq!(loc("https://ml.example.com").unwrap(), "/");
        assert!(loc("https://ml.example.com.evil.org/x").is_none());
        assert!(loc("https://other.example.com/x").is_none());
        assert!(loc("/relative").is_none());
    }

    #[test]
    fn request_ids_are_a_process_prefix_and_a_hex_counter() {
        let first = new_request_id();
        let second = new_request_id();
        let (prefix, n) = first.to_str().unwrap().split_once('-').unwrap();
        let (prefix2, n2) = second.to_str().unwrap().split_once('-').unwrap();
        assert_eq!(prefix, prefix2);
        assert_eq!(prefix.len(), 8);
        assert!(prefix.bytes().all(|b| b.is_ascii_hexdigit()));
        let (n, n2) = (
            u64::from_str_radix(n, 16).unwrap(),
            u64::from_str_radix(n2, 16).unwrap(),
        );
        assert!(n2 > n, "{first:?} then {second:?}");
        REQUEST_COUNTER.store(0xabc_0000_0000, Ordering::Relaxed);
        assert!(new_request_id().to_str().unwrap().ends_with("-abc00000000"));
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn upstream_uri_keeps_the_raw_path_and_query() {
        let up = Upstream::new(&Url::parse("http://127.0.0.1:9000/base/").unwrap()).unwrap();
        let uri = up
            .uri(&"/seldon-deploy/api/v1alpha1/a%2Fb?x=1&x=2".parse().unwrap())
            .unwrap();
        assert_eq!(
            uri.to_string(),
            "/base/seldon-deploy/api/v1alpha1/a%2Fb?x=1&x=2"
        );
        assert_eq!(up.host, "127.0.0.1:9000");
        assert_eq!(up.destination.to_string(), "http://127.0.0.1:9000/");
    }
}
