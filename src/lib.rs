//! berth: a pull-through caching edge proxy for OCI / Docker registries.
//!
//! Request path (docs/ARCHITECTURE.md, "Request path"): [`server`] accepts connections → [`proxy::App`] routes
//! ([`router`]) and picks the origin ([`upstream::Upstreams`]) → [`cache`] answers or fills from
//! the [`upstream`] client; replicas of a region fetch each blob once per [`cluster`]. Errors
//! are typed per layer and become HTTP answers in [`error::Error::into_response`] only.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod body;
pub mod bundle;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod error;
pub mod logwriter;
pub mod metrics;
pub mod nodeconf;
pub mod oci;
pub mod proxy;
pub mod router;
pub mod secret;
pub mod server;
pub mod shared;
pub mod upstream;
pub mod warm;

pub use config::Config;
pub use server::{start, Running};
