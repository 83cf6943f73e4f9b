//! Local client authentication for upstreams in `service` mode: an htpasswd file of bcrypt
//! hashes, a file of static bearer tokens, and the short-lived tokens berth issues from its own
//! `/token` endpoint.
//!
//! A token berth issues is bound to what it was issued for: the upstream it names (audience),
//! the subject that authenticated, the repositories of its scope, and its expiry. Verification
//! checks all four, so a token never opens another upstream or repository. bcrypt checks run
//! on a bounded number of blocking threads, and a refused password is remembered for a short,
//! growing while, so a stream of wrong passwords costs little CPU.
//!
//! Architecture: docs/ARCHITECTURE.md, "Authorization".

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::sync::Cache;

use crate::oci::Digest;
use crate::secret::Secret;

/// Most issued tokens and verified passwords remembered.
const MAX_ISSUED: u64 = 100_000;
/// How long a successful bcrypt verification is remembered (bcrypt is deliberately slow).
const VERIFIED_TTL: Duration = Duration::from_secs(60);
/// Longest a password check waits for a bcrypt thread before it is refused as overload.
const BCRYPT_QUEUE_WAIT: Duration = Duration::from_secs(10);

/// What a token berth issued grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The upstream it was issued for (its audience).
    pub audience: String,
    /// Who authenticated: a local user or static token name; empty for anonymous.
    pub subject: String,
    /// Repositories (as the upstream names them) it may pull from.
    pub repositories: BTreeSet<String>,
    /// When it stops being accepted.
    pub expires: Instant,
}

/// Why a bearer token was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCheck {
    /// Accepted.
    Valid,
    /// Not a token berth knows (never issued, or expired).
    Unknown,
    /// Issued for another upstream, repository or subject.
    OutOfScope,
}

/// Why a password could not be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many password checks in progress")]
pub struct Overloaded;

/// Why the local credential files could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LocalAuthError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line of the htpasswd file is not `user:$2y$...`.
    #[error("{path} line {line}: expected user:bcrypt-hash (htpasswd -B)")]
    Htpasswd {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
    },
}

/// Local users and tokens.
pub struct LocalAuth {
    users: HashMap<String, String>,
    static_tokens: HashMap<String, String>,
    issued: Cache<String, Arc<Grant>>,
    verified: Cache<String, ()>,
    refused: super::backoff::Backoff,
    bcrypt: tokio::sync::Semaphore,
    token_ttl: Duration,
    clock: crate::clock::Clock,
}

fn token_key(token: &str) -> String {
    Digest::sha256_of(token.as_bytes()).hex().to_owned()
}

impl LocalAuth {
    /// Loads the configured files (either may be absent).
    pub fn load(
        htpasswd: Option<&Path>,
        tokens: Option<&Path>,
        token_ttl: Duration,
    ) -> Result<LocalAuth, LocalAuthError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| LocalAuthError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let mut users = HashMap::new();
        if let Some(p) = htpasswd {
            for (i, line) in read(p)?.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                match line.split_once(':') {
                    Some((u, h)) if h.starts_with("$2") => {
                        users.insert(u.to_owned(), h.to_owned());
                    }
                    _ => {
                        return Err(LocalAuthError::Htpasswd {
                            path: p.display().to_string(),
                            line: i + 1,
                        })
                    }
                }
            }
        }
        let mut static_tokens = HashMap::new();
        if let Some(p) = tokens {
            for line in read(p)?.lines() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (name, token) = line.split_once(':').unwrap_or(("token", line));
                static_tokens.insert(token_key(token.trim()), name.trim().to_owned());
            }
        }
        Ok(LocalAuth {
            users,
            static_tokens,
            issued: Cache::builder()
                .max_capacity(MAX_ISSUED)
                .time_to_live(token_ttl)
                .build(),
            verified: Cache::builder()
                .max_capacity(MAX_ISSUED)
                .time_to_live(VERIFIED_TTL)
                .build(),
            refused: super::backoff::Backoff::default(),
            bcrypt: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()),
            ),
            token_ttl,
            clock: crate::clock::Clock::default(),
        })
    }

    /// Times issued tokens by `clock` (the authorizer's).
    pub fn with_clock(mut self, clock: crate::clock::Clock) -> LocalAuth {
        self.clock = clock;
        self
    }

    /// Checks a username and password against the htpasswd file. bcrypt runs on at most one
    /// blocking thread per CPU; a password refused moments ago is refused again without a
    /// bcrypt run (the wait grows with each refusal); past [`BCRYPT_QUEUE_WAIT`] in the queue
    /// the check gives up with [`Overloaded`].
    pub async fn check_password(
        self: &Arc<Self>,
        user: &str,
        password: &Secret,
    ) -> Result<bool, Overloaded> {
        let Some(hash) = self.users.get(user).cloned() else {
            return Ok(false);
        };
        let key = token_key(&format!("{user}\0{}\0{hash}", password.expose()));
        if self.verified.contains_key(&key) {
            return Ok(true);
        }
        if self.refused.blocked(&key).is_some() {
            return Ok(false);
        }
        let permit = tokio::time::timeout(BCRYPT_QUEUE_WAIT, self.bcrypt.acquire())
            .await
            .map_err(|_| Overloaded)?
            .map_err(|_| Overloaded)?;
        let pw = password.clone();
        let ok = tokio::task::spawn_blocking(move || {
            bcrypt::verify(pw.expose(), &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        drop(permit);
        if ok {
            self.refused.succeeded(&key);
            self.verified.insert(key, ());
        } else {
            self.refused.failed(&key);
        }
        Ok(ok)
    }

    /// [`LocalAuth::check_password`], with overload counted as a refusal.
    pub async fn verify_password(self: &Arc<Self>, user: &str, password: &Secret) -> bool {
        self.check_password(user, password).await.unwrap_or(false)
    }

    /// The name of a static token from the tokens file.
    pub fn static_token(&self, token: &str) -> Option<String> {
        self.static_tokens.get(&token_key(token)).cloned()
    }

    /// Checks a bearer token for a request to `upstream` (repository `repo`, or none for the
    /// `/v2/` probe). Static tokens from the tokens file open every `service` upstream (the
    /// operator wrote them for that); tokens berth issued open only the upstream, subject and
    /// repositories they were issued for, until they expire. `anonymous_ok` says whether the
    /// upstream takes anonymous clients (an anonymous grant is worth nothing elsewhere).
    pub fn check_token(
        &self,
        token: &str,
        upstream: &str,
        repo: Option<&str>,
        anonymous_ok: bool,
    ) -> TokenCheck {
        let k = token_key(token);
        if self.static_tokens.contains_key(&k) {
            return TokenCheck::Valid;
        }
        let Some(g) = self.issued.get(&k) else {
            return TokenCheck::Unknown;
        };
        if g.expires <= self.clock.now() {
            return TokenCheck::Unknown;
        }
        let subject_ok = if g.subject.is_empty() {
            anonymous_ok
        } else {
            self.users.contains_key(&g.subject)
                || self.static_tokens.values().any(|n| *n == g.subject)
        };
        let repo_ok = repo.is_none_or(|r| g.repositories.contains(r));
        if g.audience == upstream && subject_ok && repo_ok {
            TokenCheck::Valid
        } else {
            TokenCheck::OutOfScope
        }
    }

    /// Issues a token for `subject` (empty for anonymous) at `audience`, for `repositories`:
    /// the token and its lifetime.
    pub fn issue(
        &self,
        audience: &str,
        subject: &str,
        repositories: BTreeSet<String>,
    ) -> (Secret, Duration) {
        let token = hex::encode(rand::random::<[u8; 32]>());
        self.issued.insert(
            token_key(&token),
            Arc::new(Grant {
                audience: audience.to_owned(),
                subject: subject.to_owned(),
                repositories,
                expires: self.clock.now() + self.token_ttl,
            }),
        );
        (Secret::new(token), self.token_ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn htpasswd_and_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let hash = bcrypt::hash("pw", 4).unwrap();
        std::fs::write(
            dir.path().join("htpasswd"),
            format!("# users\nalice:{hash}\n"),
        )
        .unwrap();
        std::fs::write(dir.path().join("tokens"), "ci:tok-123\nplain-token\n").unwrap();
        let a = Arc::new(
            LocalAuth::load(
                Some(&dir.path().join("htpasswd")),
                Some(&dir.path().join("tokens")),
                Duration::from_secs(60),
            )
            .unwrap(),
        );
        assert!(a.verify_password("alice", &Secret::new("pw".into())).await);
        assert!(a.verify_password("alice", &Secret::new("pw".into())).await);
        assert!(
            !a.verify_password("alice", &Secret::new("nope".into()))
                .await
        );
        assert!(!a.verify_password("bob", &Secret::new("pw".into())).await);
        assert_eq!(a.static_token("tok-123").as_deref(), Some("ci"));
        assert_eq!(a.static_token("plain-token").as_deref(), Some("token"));
        assert_eq!(a.static_token("other"), None);
        assert_eq!(
            a.check_token("tok-123", "svc", Some("x"), false),
            TokenCheck::Valid
        );
        assert_eq!(
            a.check_token("other", "svc", None, true),
            TokenCheck::Unknown
        );
        let repos: BTreeSet<String> = ["team/app".to_owned()].into();
        let (t, _) = a.issue("svc", "alice", repos);
        let t = t.expose();
        assert_eq!(
            a.check_token(t, "svc", Some("team/app"), false),
            TokenCheck::Valid
        );
        assert_eq!(a.check_token(t, "svc", None, false), TokenCheck::Valid);
        // Another upstream, another repository: refused.
        assert_eq!(
            a.check_token(t, "other", Some("team/app"), false),
            TokenCheck::OutOfScope
        );
        assert_eq!(
            a.check_token(t, "svc", Some("team/secret"), false),
            TokenCheck::OutOfScope
        );
        // An anonymous grant opens nothing where anonymous clients are refused.
        let (anon, _) = a.issue("pub", "", ["team/app".to_owned()].into());
        assert_eq!(
            a.check_token(anon.expose(), "pub", Some("team/app"), true),
            TokenCheck::Valid
        );
        assert_eq!(
            a.check_token(anon.expose(), "svc", Some("team/app"), false),
            TokenCheck::OutOfScope
        );
        // A subject that no longer exists locally.
        let (ghost, _) = a.issue("svc", "mallory", ["team/app".to_owned()].into());
        assert_eq!(
            a.check_token(ghost.expose(), "svc", Some("team/app"), false),
            TokenCheck::OutOfScope
        );
        std::fs::write(dir.path().join("bad"), "alice:plaintext\n").unwrap();
        assert!(
            LocalAuth::load(Some(&dir.path().join("bad")), None, Duration::from_secs(1)).is_err()
        );
    }
}
