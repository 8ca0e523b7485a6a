//! Helpers shared by the integration tests, one job per file (each file's first line says which).
pub mod deps;
pub mod dex;
pub mod echo;
pub mod fault_stack;
pub mod fault_upstream;
pub mod gate;
pub mod http;
pub mod idp;
pub mod platform;
pub mod proxy;
pub mod proxy_child;
pub mod raw_http;
pub mod sdk;
pub mod tls_certs;
pub mod token_relay;
