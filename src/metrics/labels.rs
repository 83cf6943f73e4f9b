//! Label values shared by the families several layers count into: fixed sets, never client
//! input.
//!
//! Architecture: docs/ARCHITECTURE.md, "Metrics".

use http::Method;

/// The `method` label of a request: the methods berth sends or serves, `OTHER` for the rest
/// (a client's made-up method must not create a series).
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}
