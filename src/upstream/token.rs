//! Docker / OAuth2 token dance with an origin's token service, and the per-scope token cache.
//!
//! Architecture: docs/ARCHITECTURE.md, "Upstream client".

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde::Deserialize;

use super::challenge::Challenge;
use super::{HttpClient, UpstreamError};
use crate::config::Credentials;
use crate::secret::Secret;

/// Most tokens berth keeps per upstream (bounds memory; the least used go first).
const MAX_TOKENS: u64 = 10_000;
/// Longest berth keeps a token, whatever `expires_in` the token service granted: a grant near
/// `u64::MAX` seconds must not overflow `Instant`.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Largest token response accepted.
const MAX_TOKEN_RESPONSE: usize = 1 << 20;

/// How long a refused login is remembered, so that a wrong password does not send every
/// client request to the token service.
const REFUSAL_MEMORY: Duration = Duration::from_secs(10);

/// Tokens per scope, valid until shortly before their `expires_in`. Concurrent requests that
/// need a token for the same scope share one fetch; requests for other scopes never wait for
/// it (one lock per scope, not a shared one).
pub struct TokenCache {
    tokens: moka::sync::Cache<String, (Secret, Instant)>,
    refusals: moka::sync::Cache<String, UpstreamError>,
    fetching: moka::sync::Cache<String, Arc<tokio::sync::Mutex<()>>>,
}

impl Default for TokenCache {
    fn default() -> Self {
        TokenCache {
            tokens: moka::sync::Cache::builder()
                .max_capacity(MAX_TOKENS)
                .build(),
            refusals: moka::sync::Cache::builder()
                .max_capacity(MAX_TOKENS)
                .time_to_live(REFUSAL_MEMORY)
                .build(),
            fetching: moka::sync::Cache::builder()
                .max_capacity(MAX_TOKENS)
                .time_to_idle(Duration::from_secs(600))
                .build(),
        }
    }
}

impl TokenCache {
    /// A token for `scope`: a cached one other than `failed` (the token the origin just
    /// refused), or a fresh one from `fetch`, fetched once however many requests wait for it.
    /// A refusal by the token service is remembered briefly.
    pub async fn get_or_fetch<F, Fut>(
        &self,
        scope: &str,
        failed: Option<&str>,
        fetch: F,
    ) -> Result<Secret, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(Secret, Duration), UpstreamError>>,
    {
        let lock = self
            .fetching
            .get_with_by_ref(scope, || Arc::new(tokio::sync::Mutex::new(())));
        let _guard = lock.lock().await;
        if let Some(t) = self.get(scope) {
            if Some(t.expose()) != failed {
                return Ok(t);
            }
        }
        if let Some(e) = self.refusals.get(scope) {
            return Err(e);
        }
        match fetch().await {
            Ok((token, life)) => {
                self.put(scope, token.clone(), life);
                Ok(token)
            }
            Err(e) => {
                if matches!(&e, UpstreamError::Status { status, .. } if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN)
                {
                    self.refusals.insert(scope.to_owned(), e.clone());
                }
                Err(e)
            }
        }
    }

    /// A cached, still valid token for `scope`.
    pub fn get(&self, scope: &str) -> Option<Secret> {
        self.tokens
            .get(scope)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(t, _)| t)
    }

    /// Keeps `token` for `scope` for `lifetime` (at most a day).
    pub fn put(&self, scope: &str, token: Secret, lifetime: Duration) {
        let until = Instant::now() + lifetime.min(MAX_TOKEN_LIFETIME);
        self.tokens.insert(scope.to_owned(), (token, until));
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// How long before a token's expiry berth stops using it.
fn usable_lifetime(expires_in: u64) -> Duration {
    let margin = (expires_in / 5).clamp(1, 30);
    Duration::from_secs(expires_in.saturating_sub(margin).max(1))
}

/// Fetches a token for `scope` from the realm named in a Bearer `challenge`: GET with Basic
/// credentials (or anonymously), falling back to an OAuth2 password-grant POST where the token
/// service does not serve GET.
pub async fn fetch(
    client: &HttpClient,
    upstream: &str,
    challenge: &Challenge,
    scope: &str,
    credentials: Option<&Credentials>,
    timeout: Duration,
) -> Result<(Secret, Duration), UpstreamError> {
    let err = |reason: String| UpstreamError::Token {
        upstream: upstream.to_owned(),
        reason,
    };
    let realm = challenge
        .param("realm")
        .ok_or_else(|| err("challenge has no realm".into()))?;
    let service = challenge.param("service");
    let enc = |s: &str| utf8_percent_encode(s, NON_ALPHANUMERIC).to_string();
    let mut query = Vec::new();
    if let Some(s) = service {
        query.push(format!("service={}", enc(s)));
    }
    if !scope.is_empty() {
        query.push(format!("scope={}", enc(scope)));
    }
    let sep = if realm.contains('?') { '&' } else { '?' };
    let url = format!("{realm}{sep}{}", query.join("&"));
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(&url)
        .header(header::USER_AGENT, super::USER_AGENT);
    if let Some(c) = credentials {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            c.username,
            c.password.expose()
        ));
        req = req.header(header::AUTHORIZATION, format!("Basic {basic}"));
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|_| err("realm is not a valid URL".into()))?;
    let (status, body) = send(client, req, timeout, &err).await?;
    let (status, body) = match (status, credentials) {
        (StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED, Some(c)) => {
            let mut form = vec![
                "grant_type=password".to_owned(),
                format!("username={}", enc(&c.username)),
                format!("password={}", enc(c.password.expose())),
                "client_id=berth".to_owned(),
            ];
            if let Some(s) = service {
                form.push(format!("service={}", enc(s)));
            }
            if !scope.is_empty() {
                form.push(format!("scope={}", enc(scope)));
            }
            let req = Request::builder()
                .method(Method::POST)
                .uri(realm)
                .header(header::USER_AGENT, super::USER_AGENT)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Full::new(Bytes::from(form.join("&"))))
                .map_err(|_| err("realm is not a valid URL".into()))?;
            send(client, req, timeout, &err).await?
        }
        _ => (status, body),
    };
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        // The credentials were refused: an answer about the client, not a failure.
        return Err(UpstreamError::Status {
            upstream: upstream.to_owned(),
            status,
            retry_after: None,
        });
    }
    if !status.is_success() {
        return Err(err(format!("answered {}", status.as_u16())));
    }
    parse_token_response(&body).map_err(err)
}

/// Reads a token service's answer: the token (`token`, else `access_token`) and how long berth
/// may use it. Separate from [`fetch`] so that origin bodies can be fuzzed without a network.
pub fn parse_token_response(body: &[u8]) -> Result<(Secret, Duration), String> {
    let parsed: TokenResponse =
        serde_json::from_slice(body).map_err(|e| format!("unreadable token response: {e}"))?;
    let token = parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| "token response has no token".to_owned())?;
    Ok((
        Secret::new(token),
        usable_lifetime(parsed.expires_in.unwrap_or(60)),
    ))
}

async fn send(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
    err: &impl Fn(String) -> UpstreamError,
) -> Result<(StatusCode, Bytes), UpstreamError> {
    let fut = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| err(format!("request failed: {}", super::error_chain(&e))))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE)
            .collect()
            .await
            .map_err(|e| err(format!("reading answer: {e}")))?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| err("timed out".into()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_leave_a_margin() {
        assert_eq!(usable_lifetime(300), Duration::from_secs(270));
        assert_eq!(usable_lifetime(60), Duration::from_secs(48));
        assert_eq!(usable_lifetime(1), Duration::from_secs(1));
        assert_eq!(usable_lifetime(0), Duration::from_secs(1));
    }

    #[test]
    fn cache_expires() {
        let c = TokenCache::default();
        c.put("s", Secret::new("t".into()), Duration::from_secs(60));
        assert_eq!(c.get("s").unwrap().expose(), "t");
        c.put("s", Secret::new("t".into()), Duration::ZERO);
        assert!(c.get("s").is_none());
    }

    /// One slow token service call holds up only the requests for its own scope.
    #[tokio::test]
    async fn a_slow_fetch_blocks_only_its_own_scope() {
        let c = Arc::new(TokenCache::default());
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let (entered, started) = tokio::sync::oneshot::channel::<()>();
        let slow = {
            let c = c.clone();
            tokio::spawn(async move {
                c.get_or_fetch("repository:a:pull", None, || async move {
                    let _ = entered.send(());
                    let _ = held.await;
                    Ok((Secret::new("ta".into()), Duration::from_secs(60)))
                })
                .await
            })
        };
        started.await.unwrap();
        // Another scope: answered while the first fetch is still held.
        let other = tokio::time::timeout(
            Duration::from_secs(10),
            c.get_or_fetch("repository:b:pull", None, || async {
                Ok((Secret::new("tb".into()), Duration::from_secs(60)))
            }),
        )
        .await
        .expect("another scope does not wait for a slow fetch")
        .unwrap();
        assert_eq!(other.expose(), "tb");
        // The same scope shares the slow fetch once it lands.
        let same = {
            let c = c.clone();
            tokio::spawn(async move {
                c.get_or_fetch("repository:a:pull", None, || async {
                    Ok((Secret::new("second fetch".into()), Duration::from_secs(60)))
                })
                .await
            })
        };
        release.send(()).unwrap();
        assert_eq!(slow.await.unwrap().unwrap().expose(), "ta");
        assert_eq!(same.await.unwrap().unwrap().expose(), "ta");
    }
}
