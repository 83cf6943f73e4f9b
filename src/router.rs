//! Parses request paths into routes (docs/ARCHITECTURE.md, "Protocol surface"). Everything here is pure: no I/O, so it is
//! tested in process and fuzzable.

use percent_encoding::percent_decode_str;

use crate::error::Error;
use crate::oci::{Digest, Reference, RepoName};

/// A parsed `/v2/...` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v2/`: API version check.
    Base,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest {
        /// Repository (possibly with an upstream prefix, resolved later).
        name: RepoName,
        /// Tag or digest.
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`.
    Blob {
        /// Repository.
        name: RepoName,
        /// The blob's digest.
        digest: Digest,
    },
    /// `/v2/<name>/blobs/uploads/...`: pushes, which a pull-through cache refuses.
    Upload,
    /// `/v2/<name>/tags/list`.
    Tags {
        /// Repository.
        name: RepoName,
    },
    /// `/v2/<name>/referrers/<digest>`.
    Referrers {
        /// Repository.
        name: RepoName,
        /// Subject digest.
        digest: Digest,
    },
    /// `/v2/_catalog`: not offered by a cache.
    Catalog,
}

impl Route {
    /// Stable label for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::Upload => "upload",
            Route::Tags { .. } => "tags",
            Route::Referrers { .. } => "referrers",
            Route::Catalog => "catalog",
        }
    }
}

fn decode(segment: &str) -> String {
    percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

/// Parses a request path (without query).
pub fn parse(path: &str) -> Result<Route, Error> {
    let not_found = || Error::NotFound(format!("no route for {}", truncate(path)));
    let rest = match path {
        "/v2" | "/v2/" => return Ok(Route::Base),
        p => p.strip_prefix("/v2/").ok_or_else(not_found)?,
    };
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Ok(Route::Tags {
            name: name.parse()?,
        });
    }
    // Upload sessions: `<name>/blobs/uploads/` and `<name>/blobs/uploads/<id>` (ids have no
    // slash). Checked on the path's tail only: a repository may itself be called
    // `team/blobs/uploads`, and its manifests and blobs are pulled like any other.
    if rest.ends_with("/blobs/uploads") || rest.ends_with("/blobs/uploads/") {
        return Ok(Route::Upload);
    }
    let (head, last) = rest.rsplit_once('/').ok_or_else(not_found)?;
    if let Some(name) = head.strip_suffix("/manifests") {
        let name: RepoName = name.parse()?;
        return Ok(Route::Manifest {
            name,
            reference: decode(last).parse()?,
        });
    }
    if let Some(name) = head.strip_suffix("/blobs") {
        let name: RepoName = name.parse()?;
        return Ok(Route::Blob {
            name,
            digest: decode(last).parse()?,
        });
    }
    if let Some(name) = head.strip_suffix("/referrers") {
        let name: RepoName = name.parse()?;
        return Ok(Route::Referrers {
            name,
            digest: decode(last).parse()?,
        });
    }
    if head.ends_with("/blobs/uploads") {
        return Ok(Route::Upload);
    }
    Err(not_found())
}

/// The route a path would take, for labelling requests the parser refused.
pub fn classify(path: &str) -> &'static str {
    if !path.starts_with("/v2") {
        "unknown"
    } else if path.contains("/blobs/uploads") {
        "upload"
    } else if path.contains("/blobs/") {
        "blob"
    } else if path.contains("/manifests/") {
        "manifest"
    } else if path.ends_with("/tags/list") {
        "tags"
    } else if path.contains("/referrers/") {
        "referrers"
    } else {
        "unknown"
    }
}

/// The first value of query parameter `key`, form-decoded (`+` is a space, `%XX` escapes
/// decoded, bad UTF-8 replaced).
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> String {
        format!("sha256:{}", "c".repeat(64))
    }

    #[test]
    fn routes() {
        assert_eq!(parse("/v2/").unwrap(), Route::Base);
        assert!(matches!(
            parse("/v2/library/alpine/manifests/latest").unwrap(),
            Route::Manifest { .. }
        ));
        assert!(matches!(
            parse(&format!("/v2/a/manifests/{}", d())).unwrap(),
            Route::Manifest {
                reference: Reference::Digest(_),
                ..
            }
        ));
        assert!(matches!(
            parse(&format!("/v2/a/b/blobs/{}", d())).unwrap(),
            Route::Blob { .. }
        ));
        assert!(matches!(
            parse(&format!("/v2/a/blobs/{}", d().replace(':', "%3A"))).unwrap(),
            Route::Blob { .. }
        ));
        assert!(matches!(
            parse("/v2/a/tags/list").unwrap(),
            Route::Tags { .. }
        ));
        assert!(matches!(
            parse(&format!("/v2/a/referrers/{}", d())).unwrap(),
            Route::Referrers { .. }
        ));
        assert_eq!(parse("/v2/a/blobs/uploads/").unwrap(), Route::Upload);
        assert_eq!(parse("/v2/a/blobs/uploads/123").unwrap(), Route::Upload);
        assert_eq!(parse("/v2/a/blobs/uploads").unwrap(), Route::Upload);
        // A repository called `…/blobs/uploads` is pulled like any other.
        assert!(matches!(
            parse("/v2/team/blobs/uploads/manifests/v1").unwrap(),
            Route::Manifest { name, .. } if name.as_str() == "team/blobs/uploads"
        ));
        assert!(matches!(
            parse(&format!("/v2/team/blobs/uploads/blobs/{}", d())).unwrap(),
            Route::Blob { name, .. } if name.as_str() == "team/blobs/uploads"
        ));
        // A repository may itself contain a "manifests" component.
        assert!(matches!(
            parse("/v2/x/manifests/manifests/v1").unwrap(),
            Route::Manifest { .. }
        ));
    }

    #[test]
    fn bad_input_is_a_client_error() {
        for p in [
            "/v2/../etc/passwd/blobs/sha256:00",
            "/v2/a/blobs/sha256:zz",
            "/v2/a/blobs/md5:abc",
            "/v2/A/manifests/latest",
            "/v2/a/manifests/.bad",
            "/v2/a%2fb/manifests/latest",
            "/v2//manifests/latest",
            "/v3/",
            "/",
            "/v2/a",
            "/v2/a/unknown/x",
        ] {
            let e = parse(p).unwrap_err();
            assert!(e.status().is_client_error(), "{p}: {e:?}");
        }
    }

    #[test]
    fn queries() {
        assert_eq!(
            query_param(Some("ns=registry.example%3A5000&n=1"), "ns").as_deref(),
            Some("registry.example:5000")
        );
        assert_eq!(query_param(Some("n=1"), "ns"), None);
        assert_eq!(query_param(None, "ns"), None);
        // `+` is a space, `%2B` a plus; the first of repeated keys counts.
        assert_eq!(
            query_param(Some("&q=a+b%2B&q=2"), "q").as_deref(),
            Some("a b+")
        );
    }
}
