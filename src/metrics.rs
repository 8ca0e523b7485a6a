//! Counters and histograms in Prometheus text format: lock-free atomics, no registry.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency histogram, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
/// Grants that obtain tokens, as labelled in `seldon_auth_proxy_token_requests_total`.
pub const GRANTS: [&str; 7] = [
    "client_credentials",
    "password",
    "refresh_token",
    "authorization_code",
    "session_login",
    "static_file",
    "other",
];
/// Kinds of error the proxy answers itself.
pub const ERROR_KINDS: [&str; 11] = [
    "token_unavailable",
    "upstream_unreachable",
    "upstream_timeout",
    "upstream_busy",
    "upstream_tls",
    "path_not_allowed",
    "method_not_allowed",
    "forbidden_host",
    "forbidden_origin",
    "unauthorized",
    "bad_request",
];

#[derive(Default)]
pub struct Metrics {
    requests_by_class: [AtomicU64; 5],
    latency_buckets: [AtomicU64; 14],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    token_ok: [AtomicU64; GRANTS.len()],
    token_error: [AtomicU64; GRANTS.len()],
    proxy_errors: [AtomicU64; ERROR_KINDS.len()],
    upstream_401: AtomicU64,
}

fn grant_index(grant: &str) -> usize {
    GRANTS
        .iter()
        .position(|g| *g == grant)
        .unwrap_or(GRANTS.len() - 1)
}

impl Metrics {
    /// Records one request answered to a caller.
    pub fn request(&self, status: u16, elapsed: Duration) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.requests_by_class[class].fetch_add(1, Relaxed);
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.latency_buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Relaxed);
    }

    pub fn token_request(&self, grant: &str, ok: bool) {
        let counters = if ok {
            &self.token_ok
        } else {
            &self.token_error
        };
        counters[grant_index(grant)].fetch_add(1, Relaxed);
    }

    pub fn proxy_error(&self, kind: &str) {
        if let Some(i) = ERROR_KINDS.iter().position(|k| *k == kind) {
            self.proxy_errors[i].fetch_add(1, Relaxed);
        }
    }

    pub fn upstream_unauthorized(&self) {
        self.upstream_401.fetch_add(1, Relaxed);
    }

    /// Token requests made so far, of every grant and outcome.
    pub fn token_requests_total(&self) -> u64 {
        self.token_ok
            .iter()
            .chain(self.token_error.iter())
            .map(|c| c.load(Relaxed))
            .sum()
    }

    /// The text exposition; `token_expiry` is the seconds left on the current credential,
    /// `open_connections` the callers' connections each worker serves.
    pub fn render(
        &self,
        token_expiry: Option<f64>,
        ready: bool,
        open_connections: &[usize],
    ) -> String {
        let mut out = String::with_capacity(4096);
        let _ = writeln!(out, "# HELP seldon_auth_proxy_requests_total Requests answered to callers, by status class.");
        let _ = writeln!(out, "# TYPE seldon_auth_proxy_requests_total counter");
        for (i, class) in CLASSES.iter().enumerate() {
            let _ = writeln!(
                out,
                "seldon_auth_proxy_requests_total{{code_class=\"{class}\"}} {}",
                self.requests_by_class[i].load(Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP seldon_auth_proxy_request_duration_seconds Time from receiving a request to sending its response head.");
        let _ = writeln!(
            out,
            "# TYPE seldon_auth_proxy_request_duration_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Relaxed);
            let _ = writeln!(
                out,
                "seldon_auth_proxy_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
            );
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(
            out,
            "seldon_auth_proxy_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "seldon_auth_proxy_request_duration_seconds_sum {}",
            self.latency_sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "seldon_auth_proxy_request_duration_seconds_count {count}"
        );
        let _ = writeln!(out, "# HELP seldon_auth_proxy_token_requests_total Calls to the identity provider, by grant and outcome.");
        let _ = writeln!(out, "# TYPE seldon_auth_proxy_token_requests_total counter");
        for (i, grant) in GRANTS.iter().enumerate() {
            for (outcome, counters) in [("success", &self.token_ok), ("error", &self.token_error)] {
                let _ = writeln!(
                    out,
                    "seldon_auth_proxy_token_requests_total{{grant=\"{grant}\",outcome=\"{outcome}\"}} {}",
                    counters[i].load(Relaxed)
                );
            }
        }
        let _ = writeln!(out, "# HELP seldon_auth_proxy_errors_total Responses the proxy made itself, by kind (see x-seldon-auth-proxy-error).");
        let _ = writeln!(out, "# TYPE seldon_auth_proxy_errors_total counter");
        for (i, kind) in ERROR_KINDS.iter().enumerate() {
            let _ = writeln!(
                out,
                "seldon_auth_proxy_errors_total{{kind=\"{kind}\"}} {}",
                self.proxy_errors[i].load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP seldon_auth_proxy_upstream_unauthorized_total Upstream 401 answers seen."
        );
        let _ = writeln!(
            out,
            "# TYPE seldon_auth_proxy_upstream_unauthorized_total counter"
        );
        let _ = writeln!(
            out,
            "seldon_auth_proxy_upstream_unauthorized_total {}",
            self.upstream_401.load(Relaxed)
        );
        let _ = writeln!(out, "# HELP seldon_auth_proxy_token_expiry_seconds Seconds until the current credential expires (negative when expired, absent before the first).");
        let _ = writeln!(out, "# TYPE seldon_auth_proxy_token_expiry_seconds gauge");
        if let Some(secs) = token_expiry {
            let _ = writeln!(out, "seldon_auth_proxy_token_expiry_seconds {secs:.3}");
        }
        let _ = writeln!(
            out,
            "# HELP seldon_auth_proxy_ready 1 while a usable credential is held."
        );
        let _ = writeln!(out, "# TYPE seldon_auth_proxy_ready gauge");
        let _ = writeln!(out, "seldon_auth_proxy_ready {}", u8::from(ready));
        let _ = writeln!(
            out,
            "# HELP seldon_auth_proxy_open_connections Callers' connections open, by worker."
        );
        let _ = writeln!(out, "# TYPE seldon_auth_proxy_open_connections gauge");
        for (worker, open) in open_connections.iter().enumerate() {
            let _ = writeln!(
                out,
                "seldon_auth_proxy_open_connections{{worker=\"{worker}\"}} {open}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request(200, Duration::from_micros(300));
        m.request(503, Duration::from_millis(20));
        m.token_request("client_credentials", true);
        let text = m.render(Some(12.5), true, &[3, 2]);
        assert!(text.contains("seldon_auth_proxy_requests_total{code_class=\"2xx\"} 1"));
        assert!(text.contains("seldon_auth_proxy_requests_total{code_class=\"5xx\"} 1"));
        assert!(text.contains("seldon_auth_proxy_request_duration_seconds_bucket{le=\"0.0005\"} 1"));
        assert!(text.contains("seldon_auth_proxy_request_duration_seconds_bucket{le=\"0.025\"} 2"));
        assert!(text.contains("seldon_auth_proxy_request_duration_seconds_count 2"));
        assert!(text.contains(
            "seldon_auth_proxy_token_requests_total{grant=\"client_credentials\",outcome=\"success\"} 1"
        ));
        assert!(text.contains("seldon_auth_proxy_token_expiry_seconds 12.500"));
        assert!(text.contains("seldon_auth_proxy_open_connections{worker=\"0\"} 3\n"));
        assert!(text.contains("seldon_auth_proxy_open_connections{worker=\"1\"} 2\n"));
        assert_eq!(m.token_requests_total(), 1);
    }
}
