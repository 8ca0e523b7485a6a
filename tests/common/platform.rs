//! The platform stand-in of `seldon_auth_proxy::dev::platform` on an ephemeral loopback port, verifying bearer
//! tokens with a test IdP's keys and issuer.
#![allow(dead_code)]

use seldon_auth_proxy::dev::platform::{self, DevPlatform, PlatformOptions};

use super::idp::TestIdp;

/// The platform stand-in, verifying tokens against `idp`'s JWKS and issuer.
pub async fn platform_for(idp: &TestIdp) -> DevPlatform {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port for the platform stand-in");
    platform::start(
        listener,
        PlatformOptions {
            jwks_url: idp.jwks_uri.clone(),
            issuer: Some(idp.issuer.clone()),
        },
    )
    .await
    .expect("the platform stand-in starts")
}
