//! Development aid behind `seldon-auth-proxy dev`: embedded loopback stand-ins for the IdP and the platform API (never used by `serve`).

pub mod idp;
pub mod jwks;
pub mod platform;
mod run;
pub use run::run;
