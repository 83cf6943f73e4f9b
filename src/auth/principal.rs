//! Who is asking: the credential a client presented, and a key for it that is a hash, never the
//! credential itself (docs/ARCHITECTURE.md, "Authorization").

use base64::Engine as _;
use http::{header, HeaderMap};

use crate::oci::Digest;
use crate::secret::Secret;

/// A credential from an `Authorization` header.
#[derive(Debug, Clone)]
pub enum Credential {
    /// No `Authorization` header.
    Anonymous,
    /// `Authorization: Bearer <token>`.
    Bearer(Secret),
    /// `Authorization: Basic <user:password>`.
    Basic {
        /// Username.
        user: String,
        /// Password.
        password: Secret,
    },
}

/// A client and the key its authorization decisions are cached under.
#[derive(Debug, Clone)]
pub struct Principal {
    /// What it presented.
    pub credential: Credential,
    /// `anonymous`, or the sha256 of the credential.
    pub key: String,
}

/// Why an `Authorization` header was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed Authorization header")]
pub struct MalformedAuthorization;

impl Principal {
    /// The anonymous principal.
    pub fn anonymous() -> Principal {
        Principal {
            credential: Credential::Anonymous,
            key: "anonymous".into(),
        }
    }

    /// Reads the `Authorization` header.
    pub fn from_headers(h: &HeaderMap) -> Result<Principal, MalformedAuthorization> {
        let Some(v) = h.get(header::AUTHORIZATION) else {
            return Ok(Principal::anonymous());
        };
        let v = v.to_str().map_err(|_| MalformedAuthorization)?.trim();
        let (scheme, rest) = v.split_once(' ').ok_or(MalformedAuthorization)?;
        let rest = rest.trim();
        let key = Digest::sha256_of(v.as_bytes()).hex().to_owned();
        let credential = if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
            Credential::Bearer(Secret::new(rest.to_owned()))
        } else if scheme.eq_ignore_ascii_case("basic") {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .map_err(|_| MalformedAuthorization)?;
            let s = String::from_utf8(raw).map_err(|_| MalformedAuthorization)?;
            let (user, password) = s.split_once(':').ok_or(MalformedAuthorization)?;
            Credential::Basic {
                user: user.to_owned(),
                password: Secret::new(password.to_owned()),
            }
        } else {
            return Err(MalformedAuthorization);
        };
        Ok(Principal { credential, key })
    }

    /// Whether no credential was presented.
    pub fn is_anonymous(&self) -> bool {
        matches!(self.credential, Credential::Anonymous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_hashes() {
        let mut h = HeaderMap::new();
        assert!(Principal::from_headers(&h).unwrap().is_anonymous());
        h.insert(header::AUTHORIZATION, "Bearer abc.def".parse().unwrap());
        let p = Principal::from_headers(&h).unwrap();
        assert!(matches!(&p.credential, Credential::Bearer(t) if t.expose() == "abc.def"));
        assert!(!p.key.contains("abc"));
        assert_eq!(p.key.len(), 64);
        h.insert(
            header::AUTHORIZATION,
            "Basic YWxpY2U6czNjcmV0".parse().unwrap(),
        );
        let p = Principal::from_headers(&h).unwrap();
        assert!(
            matches!(&p.credential, Credential::Basic { user, password } if user == "alice" && password.expose() == "s3cret")
        );
        for bad in ["Bearer", "Basic !!!", "Digest x", "Basic Zm9v"] {
            h.insert(header::AUTHORIZATION, bad.parse().unwrap());
            assert!(Principal::from_headers(&h).is_err(), "{bad}");
        }
    }
}
