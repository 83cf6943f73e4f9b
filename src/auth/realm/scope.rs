//! Token scopes (`repository:NAME:ACTIONS`) as a client names them at berth, translated to the
//! origin's repository names (docs/ARCHITECTURE.md, "Authorization" and "Chaining").

use std::collections::BTreeSet;

use super::TokenRequest;
use crate::oci::RepoName;
use crate::upstream::Upstream;

/// Translates `repository:NAME:ACTIONS` from the name a client uses at berth to the origin's.
pub(super) fn translate_scope(scope: &str, upstream: &Upstream) -> String {
    let mut parts = scope.splitn(3, ':');
    let (Some(kind), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next()) else {
        return scope.to_owned();
    };
    if kind != "repository" {
        return scope.to_owned();
    }
    let name = name
        .strip_prefix(&format!("{}/", upstream.name()))
        .unwrap_or(name);
    let name = match name.parse::<RepoName>() {
        Ok(n) if upstream.config().docker_hub && n.components() == 1 => {
            n.with_library_prefix().to_string()
        }
        _ => name.to_owned(),
    };
    match &upstream.config().repository_prefix {
        Some(p) => format!("{kind}:{p}/{name}:{actions}"),
        None => format!("{kind}:{name}:{actions}"),
    }
}

/// The repository a `repository:NAME:ACTIONS` scope names.
pub(super) fn scope_repository(scope: &str) -> Option<&str> {
    let mut parts = scope.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("repository"), Some(name), Some(_)) => Some(name),
        _ => None,
    }
}

/// The repositories (as `upstream` names them) a token request asks to pull from.
pub(super) fn pull_scopes(req: &TokenRequest, upstream: &Upstream) -> BTreeSet<String> {
    req.scopes()
        .iter()
        .filter_map(|s| {
            let t = translate_scope(s, upstream);
            let mut parts = t.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("repository"), Some(name), Some(actions))
                    if actions.split(',').any(|a| a == "pull" || a == "*") =>
                {
                    Some(name.to_owned())
                }
                _ => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Upstreams;

    #[test]
    fn scopes_carry_the_upstream_repository_prefix() {
        let c = crate::config::Config::from_toml(
            "[[upstream]]\nname = \"region\"\nurl = \"http://r:5000/docker.io\"\naliases = [\"docker.io\"]\ndefault = true\n",
        )
        .unwrap();
        let ups = Upstreams::new(&c.upstreams).unwrap();
        let u = &ups.all()[0];
        assert_eq!(
            translate_scope("repository:region/alpine:pull", u),
            "repository:docker.io/library/alpine:pull"
        );
        assert_eq!(
            translate_scope("repository:org/app:pull", u),
            "repository:docker.io/org/app:pull"
        );
        assert_eq!(
            translate_scope("registry:catalog:*", u),
            "registry:catalog:*"
        );
    }
}
