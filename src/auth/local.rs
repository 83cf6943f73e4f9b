//! Local client authentication for upstreams in `service` mode: an htpasswd file of bcrypt
//! hashes, a file of static bearer tokens, and the short-lived tokens berth issues from its own
//! `/token` endpoint.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::oci::Digest;
use crate::secret::Secret;

/// Most issued tokens and verified passwords remembered.
const MAX_ISSUED: u64 = 100_000;
/// How long a successful bcrypt verification is remembered (bcrypt is deliberately slow).
const VERIFIED_TTL: Duration = Duration::from_secs(60);

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
    issued: Cache<String, String>,
    verified: Cache<String, ()>,
    token_ttl: Duration,
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
            token_ttl,
        })
    }

    /// Checks a username and password against the htpasswd file (bcrypt on the blocking pool).
    pub async fn verify_password(self: &Arc<Self>, user: &str, password: &Secret) -> bool {
        let Some(hash) = self.users.get(user).cloned() else {
            return false;
        };
        let key = token_key(&format!("{user}\0{}\0{hash}", password.expose()));
        if self.verified.contains_key(&key) {
            return true;
        }
        let pw = password.clone();
        let ok = tokio::task::spawn_blocking(move || {
            bcrypt::verify(pw.expose(), &hash).unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        if ok {
            self.verified.insert(key, ());
        }
        ok
    }

    /// The user a bearer token (static or issued by berth) belongs to.
    pub fn verify_token(&self, token: &str) -> Option<String> {
        let k = token_key(token);
        self.static_tokens
            .get(&k)
            .cloned()
            .or_else(|| self.issued.get(&k))
    }

    /// Issues a token for `user` (empty for anonymous): the token and its lifetime.
    pub fn issue(&self, user: &str) -> (Secret, Duration) {
        let token = hex::encode(rand::random::<[u8; 32]>());
        self.issued.insert(token_key(&token), user.to_owned());
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
        assert_eq!(a.verify_token("tok-123").as_deref(), Some("ci"));
        assert_eq!(a.verify_token("plain-token").as_deref(), Some("token"));
        assert_eq!(a.verify_token("other"), None);
        let (t, _) = a.issue("alice");
        assert_eq!(a.verify_token(t.expose()).as_deref(), Some("alice"));
        std::fs::write(dir.path().join("bad"), "alice:plaintext\n").unwrap();
        assert!(
            LocalAuth::load(Some(&dir.path().join("bad")), None, Duration::from_secs(1)).is_err()
        );
    }
}
