//! Registry push notifications (docs/ARCHITECTURE.md, "Cache"): distribution's notification
//! envelopes (`notifications.endpoints` in its config) and Azure Container Registry webhooks,
//! received on the admin listener's `POST /events`. A push of a tag makes berth's mapping of
//! that tag stale at once (the next request revalidates it with the origin), a delete of a tag
//! forgets it, a delete of a manifest drops it from the cache. Events only ever make berth ask
//! the origin sooner: they are never evidence of anything, so a forged one costs at most an
//! extra HEAD.

use serde::Deserialize;

use super::App;
use crate::oci::{Digest, RepoName, Tag};

/// What the events of one delivery changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    /// Tag mappings made stale by pushes.
    pub stale: u64,
    /// Tag mappings forgotten by deletes.
    pub forgotten: u64,
    /// Manifests dropped by deletes.
    pub dropped: u64,
    /// Events that named nothing berth keeps (pulls, blob pushes, other repositories).
    pub ignored: u64,
}

/// Why a delivery was refused.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// The body is neither a distribution envelope nor an ACR webhook payload.
    #[error("not a registry event: {0}")]
    Invalid(String),
    /// `upstream=` names no upstream (and there is no default).
    #[error("unknown upstream {0:?}")]
    UnknownUpstream(String),
}

#[derive(Deserialize)]
struct Envelope {
    events: Vec<Event>,
}

#[derive(Deserialize)]
struct Event {
    action: String,
    target: Target,
}

#[derive(Deserialize)]
struct Target {
    repository: String,
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    digest: Option<String>,
    #[serde(default, rename = "mediaType")]
    media_type: Option<String>,
}

/// The events of one delivery: an envelope of several, or one ACR event.
fn parse(body: &[u8]) -> Result<Vec<Event>, EventsError> {
    if let Ok(e) = serde_json::from_slice::<Envelope>(body) {
        return Ok(e.events);
    }
    serde_json::from_slice::<Event>(body)
        .map(|e| vec![e])
        .map_err(|e| EventsError::Invalid(e.to_string()))
}

impl App {
    /// Applies a delivery from the origin of `upstream` (the default when `None`). Blocking
    /// (tag mappings live on disk too).
    pub fn apply_events(
        &self,
        upstream: Option<&str>,
        body: &[u8],
    ) -> Result<Applied, EventsError> {
        let name = match upstream {
            Some(n) => self
                .upstreams()
                .by_name(n)
                .map(|u| u.name().to_owned())
                .ok_or_else(|| EventsError::UnknownUpstream(n.to_owned()))?,
            None => self
                .upstreams()
                .default_upstream()
                .map(|u| u.name().to_owned())
                .ok_or_else(|| EventsError::UnknownUpstream("(default)".into()))?,
        };
        let mut applied = Applied::default();
        for event in parse(body)? {
            let Ok(repo) = event.target.repository.parse::<RepoName>() else {
                applied.ignored += 1;
                continue;
            };
            let tag = event
                .target
                .tag
                .as_deref()
                .and_then(|t| t.parse::<Tag>().ok());
            let is_blob = event
                .target
                .media_type
                .as_deref()
                .is_some_and(|m| m.contains("layer") || m.contains("config"));
            let tags = self.cache().tags();
            let outcome = match (event.action.as_str(), &tag) {
                ("push", Some(tag)) => {
                    applied.stale += tags.mark_stale(&name, &repo, tag);
                    "stale"
                }
                ("delete", Some(tag)) => {
                    applied.forgotten += tags.remove_all(&name, &repo, tag);
                    "forgotten"
                }
                ("delete", None) if !is_blob => {
                    match event.target.digest.as_deref().map(str::parse::<Digest>) {
                        Some(Ok(d)) => match self.cache().purge_digest(&d, false) {
                            Ok(r) => {
                                applied.dropped += r.manifests;
                                "dropped"
                            }
                            Err(_) => "ignored",
                        },
                        _ => "ignored",
                    }
                }
                _ => "ignored",
            };
            if outcome == "ignored" {
                applied.ignored += 1;
            }
            self.metrics()
                .events
                .with_label_values(&[action_label(&event.action), outcome])
                .inc();
            tracing::info!(upstream = %name, repository = %repo, tag = ?event.target.tag, action = %event.action, outcome, "registry event");
        }
        Ok(applied)
    }
}

/// A bounded label value for an event's action.
fn action_label(action: &str) -> &'static str {
    match action {
        "push" => "push",
        "delete" => "delete",
        "pull" => "pull",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_envelopes_and_acr_payloads() {
        let env = br#"{"events":[{"id":"1","action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:00","repository":"a/b","tag":"v1"}}]}"#;
        let e = parse(env).unwrap();
        assert_eq!(
            (e[0].action.as_str(), e[0].target.tag.as_deref()),
            ("push", Some("v1"))
        );
        let acr = br#"{"id":"x","timestamp":"2026-01-01T00:00:00Z","action":"delete","target":{"repository":"a/b","tag":"v2"}}"#;
        let e = parse(acr).unwrap();
        assert_eq!(
            (e[0].action.as_str(), e[0].target.repository.as_str()),
            ("delete", "a/b")
        );
        assert!(parse(b"{}").is_err());
        assert!(parse(b"not json").is_err());
    }
}
