//! The trio most resilience and security tests run: the test IdP (the test client and user), a [`FaultUpstream`]
//! verifying its tokens, and the proxy in-process in front of it; started ready, stopped in order.
#![allow(dead_code)]

use std::time::Duration;

use seldon_auth_proxy::config::Settings;

use super::fault_upstream::FaultUpstream;
use super::idp::{IdpOptions, TestIdp};
use super::proxy::{for_idp, idp_options, Proxy};

/// An IdP issuing tokens that live `lifetime` seconds, an upstream verifying them and a proxy with
/// `settings(for_idp(..))`, ready within 10 s.
pub async fn stack(
    lifetime: u64,
    settings: impl FnOnce(Settings) -> Settings,
) -> (TestIdp, FaultUpstream, Proxy) {
    stack_with(idp_options(lifetime), settings).await
}

/// [`stack`] with an IdP started with these options (e.g. on a [`restartable_port`]).
///
/// [`restartable_port`]: crate::common::proxy::restartable_port
pub async fn stack_with(
    idp: IdpOptions,
    settings: impl FnOnce(Settings) -> Settings,
) -> (TestIdp, FaultUpstream, Proxy) {
    let idp = TestIdp::start(idp).await;
    let upstream = FaultUpstream::start(&idp).await;
    let proxy = Proxy::start(settings(for_idp(&upstream.url(), &idp))).await;
    proxy
        .wait_ready(Duration::from_secs(10))
        .await
        .expect("ready");
    (idp, upstream, proxy)
}

/// Stops the proxy, then the upstream, then the IdP.
pub async fn stop_stack(idp: TestIdp, upstream: FaultUpstream, proxy: Proxy) {
    proxy.stop().await;
    upstream.stop().await;
    idp.stop().await;
}
