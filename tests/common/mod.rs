pub mod deps;
pub mod idp;
