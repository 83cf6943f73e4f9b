//! OCI distribution vocabulary: repository names, references, digests and media types, each a
//! validated newtype so that nothing past the router ever handles an unchecked string.

pub mod digest;
pub mod image_ref;
pub mod media;
pub mod name;
pub mod reference;

pub use digest::{Digest, DigestAlgorithm, DigestError, Hasher};
pub use image_ref::{ImageRef, ImageRefError};
pub use name::{NameError, RepoName};
pub use reference::{Reference, ReferenceError, Tag};
