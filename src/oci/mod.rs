//! OCI distribution vocabulary: repository names, references, digests and media types, each a
//! validated newtype so that nothing past the router ever handles an unchecked string.
//!
//! Architecture: docs/ARCHITECTURE.md, "Protocol surface".

pub mod digest;
pub mod headers;
pub mod image_ref;
pub mod media;
pub mod name;
pub mod reference;

pub use digest::{Digest, DigestAlgorithm, DigestError, Hasher};
pub use headers::{API_VERSION, API_VERSION_HEADER, DIGEST_HEADER};
pub use image_ref::{ImageRef, ImageRefError};
pub use name::{NameError, RepoName};
pub use reference::{Reference, ReferenceError, Tag};
