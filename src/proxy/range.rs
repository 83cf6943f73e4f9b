//! `Range: bytes=...` on blob GETs: one range, satisfiable or not.
//!
//! Architecture: docs/ARCHITECTURE.md, "Protocol surface".

/// What a Range header asks of an object of known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable Range header: the whole object (RFC 9110 lets a server ignore one it cannot
    /// parse, or several ranges).
    Full,
    /// Bytes `start..end` (end exclusive).
    Partial {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// A well-formed range outside the object: 416.
    Unsatisfiable,
}

/// Interprets a Range header value against an object of `size` bytes.
pub fn parse(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (a.is_empty(), num(a), num(b)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial {
                    start: size.saturating_sub(n),
                    end: size,
                }
            }
        }
        (false, Some(start), None) if b.is_empty() => {
            if start >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial { start, end: size }
            }
        }
        (false, Some(start), Some(last)) if last >= start => {
            if start >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial {
                    start,
                    end: last.saturating_add(1).min(size),
                }
            }
        }
        _ => RangeRequest::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeRequest::*;

    #[test]
    fn ranges() {
        assert_eq!(parse(None, 10), Full);
        assert_eq!(parse(Some("bytes=0-4"), 10), Partial { start: 0, end: 5 });
        assert_eq!(parse(Some("bytes=5-"), 10), Partial { start: 5, end: 10 });
        assert_eq!(parse(Some("bytes=-3"), 10), Partial { start: 7, end: 10 });
        assert_eq!(parse(Some("bytes=-30"), 10), Partial { start: 0, end: 10 });
        assert_eq!(
            parse(Some("bytes=2-100"), 10),
            Partial { start: 2, end: 10 }
        );
        assert_eq!(parse(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse(Some("bytes=20-30"), 10), Unsatisfiable);
        assert_eq!(parse(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse(Some("bytes=5-2"), 10), Full);
        assert_eq!(parse(Some("bytes=a-b"), 10), Full);
        assert_eq!(parse(Some("bytes=0-1,3-4"), 10), Full);
        assert_eq!(parse(Some("items=0-1"), 10), Full);
        assert_eq!(parse(Some("bytes=99999999999999999999999-"), 10), Full);
    }
}
