//! Errors the proxy answers itself: each kind has one status, the
//! `x-seldon-auth-proxy-error` header and a JSON body a person can act on.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// The header that marks a response the proxy made itself, naming the kind.
pub const ERROR_HEADER: &str = "x-seldon-auth-proxy-error";

#[derive(Debug)]
pub enum ProxyError {
    /// No usable credential: never forward without one.
    TokenUnavailable {
        message: String,
        retry_after: Duration,
    },
    UpstreamUnreachable(String),
    UpstreamTimeout(Duration),
    /// `upstream_max_connections` requests were in flight for all of `upstream_timeout`.
    UpstreamBusy(Duration),
    UpstreamTls(String),
    PathNotAllowed,
    MethodNotAllowed,
    ForbiddenHost,
    ForbiddenOrigin,
    Unauthorized,
    BadRequest(String),
}

impl ProxyError {
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::TokenUnavailable { .. } => "token_unavailable",
            ProxyError::UpstreamUnreachable(_) => "upstream_unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::UpstreamBusy(_) => "upstream_busy",
            ProxyError::UpstreamTls(_) => "upstream_tls",
            ProxyError::PathNotAllowed => "path_not_allowed",
            ProxyError::MethodNotAllowed => "method_not_allowed",
            ProxyError::ForbiddenHost => "forbidden_host",
            ProxyError::ForbiddenOrigin => "forbidden_origin",
            ProxyError::Unauthorized => "unauthorized",
            ProxyError::BadRequest(_) => "bad_request",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::TokenUnavailable { .. } | ProxyError::UpstreamBusy(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamTls(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::PathNotAllowed => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ForbiddenHost | ProxyError::ForbiddenOrigin => StatusCode::FORBIDDEN,
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    pub fn message(&self) -> String {
        match self {
            ProxyError::TokenUnavailable { message, .. } => {
                format!("no credential is available for the platform: {message}")
            }
            ProxyError::UpstreamUnreachable(m) => format!("the platform could not be reached: {m}"),
            ProxyError::UpstreamTimeout(d) => format!(
                "the platform did not answer within {} (upstream_timeout)",
                humantime::format_duration(*d)
            ),
            ProxyError::UpstreamBusy(d) => format!(
                "upstream_max_connections requests to the platform were in flight and none finished within {} (upstream_timeout); nothing was sent",
                humantime::format_duration(*d)
            ),
            ProxyError::UpstreamTls(m) => format!("TLS to the platform failed: {m}"),
            ProxyError::PathNotAllowed => "this path is not forwarded; only paths under the allowed prefixes are (allowed_path_prefix)".into(),
            ProxyError::MethodNotAllowed => "CONNECT and TRACE are not forwarded".into(),
            ProxyError::ForbiddenHost => "the Host header is not one this proxy answers to (allowed_host); this guards against DNS rebinding".into(),
            ProxyError::ForbiddenOrigin => "requests from web pages are refused unless their origin is listed in allowed_origin".into(),
            ProxyError::Unauthorized => "present the local inbound token as `Authorization: Bearer <token>`".into(),
            ProxyError::BadRequest(m) => m.clone(),
        }
    }

    /// The response sent to the caller.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({ "error": self.kind(), "message": self.message() });
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.kind()));
        match self {
            ProxyError::TokenUnavailable { retry_after, .. } => {
                headers.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after.as_secs().max(1)),
                );
            }
            ProxyError::UpstreamBusy(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1));
            }
            ProxyError::MethodNotAllowed => {
                headers.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            ProxyError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_unavailable_is_503_with_retry_after_and_json() {
        let e = ProxyError::TokenUnavailable {
            message: "the IdP is down".into(),
            retry_after: Duration::from_secs(4),
        };
        let r = e.to_response();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[ERROR_HEADER], "token_unavailable");
        assert_eq!(r.headers()[header::RETRY_AFTER], "4");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
