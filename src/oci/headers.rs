//! Header names and values of the distribution protocol (docs/ARCHITECTURE.md, "Request path").

/// Header carrying a manifest's or blob's content digest.
pub const DIGEST_HEADER: &str = "docker-content-digest";
/// Header naming the distribution API version, on every answer.
pub const API_VERSION_HEADER: &str = "docker-distribution-api-version";
/// The value of [`API_VERSION_HEADER`].
pub const API_VERSION: &str = "registry/2.0";
