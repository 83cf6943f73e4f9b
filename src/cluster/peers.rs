//! The peer set and the owner of a digest: rendezvous (highest random weight) hashing, so that
//! every replica with the same set names the same owner, and a peer joining or leaving moves
//! only the digests it owns.
//!
//! Architecture: docs/ARCHITECTURE.md, "Peers".

use std::net::SocketAddr;

use sha2::{Digest as _, Sha256};

use crate::oci::Digest;

/// The replicas of the cluster as this one sees them, sorted, this replica included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSet {
    members: Vec<String>,
    /// What `cluster.peers_dns` resolved to last (kept when a later lookup fails).
    resolved: Vec<SocketAddr>,
}

impl PeerSet {
    /// The set from this replica's name `me` (and the addresses it resolves to, `self_addrs`),
    /// the static list and the addresses `cluster.peers_dns` resolved to. An entry naming one
    /// of this replica's addresses is this replica, under its own name.
    pub fn new(
        me: &str,
        self_addrs: &[SocketAddr],
        statics: &[String],
        resolved: &[SocketAddr],
    ) -> PeerSet {
        let name = |entry: String| -> String {
            match entry.parse::<SocketAddr>() {
                Ok(a) if self_addrs.contains(&a) => me.to_owned(),
                _ => entry,
            }
        };
        let mut members: Vec<String> = std::iter::once(me.to_owned())
            .chain(statics.iter().map(|s| name(canonical(s))))
            .chain(resolved.iter().map(|a| name(a.to_string())))
            .collect();
        members.sort();
        members.dedup();
        PeerSet {
            members,
            resolved: resolved.to_vec(),
        }
    }

    /// Every replica's name, sorted.
    pub fn members(&self) -> &[String] {
        &self.members
    }

    /// The addresses of the last successful DNS lookup.
    pub fn resolved(&self) -> &[SocketAddr] {
        &self.resolved
    }
}

/// A peer's name as every replica writes it: a socket address in its standard form
/// (`[::1]:5002`), a host name in lower case.
pub fn canonical(host_port: &str) -> String {
    match host_port.parse::<SocketAddr>() {
        Ok(a) => a.to_string(),
        Err(_) => host_port.to_ascii_lowercase(),
    }
}

/// The owner of `digest` among `members`: the one with the highest weight
/// `sha256(member \0 digest)`; `None` for an empty set.
pub fn owner_of<'a>(members: &'a [String], digest: &Digest) -> Option<&'a str> {
    let d = digest.to_string();
    members
        .iter()
        .map(|m| (weight(m, &d), m))
        .max()
        .map(|(_, m)| m.as_str())
}

fn weight(member: &str, digest: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(member.as_bytes());
    h.update([0]);
    h.update(digest.as_bytes());
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("sha256 is 32 bytes"))
}

/// Whether `a == b`, in time that depends on the lengths only (the secret's length is not
/// hidden; its content is).
pub(super) fn constant_time_eq(a: &str, b: &str) -> bool {
    crate::secret::constant_time_eq(a.as_bytes(), b.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(i: u32) -> Digest {
        Digest::sha256_of(&i.to_be_bytes())
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_replica_names_the_same_owner_whatever_its_list_order() {
        let a = PeerSet::new(
            "10.0.0.1:5002",
            &[],
            &names(&["10.0.0.2:5002", "10.0.0.3:5002"]),
            &[],
        );
        let b = PeerSet::new(
            "10.0.0.2:5002",
            &[],
            &names(&["10.0.0.3:5002", "10.0.0.1:5002"]),
            &[],
        );
        assert_eq!(a.members(), b.members());
        for i in 0..100 {
            assert_eq!(
                owner_of(a.members(), &digest(i)),
                owner_of(b.members(), &digest(i))
            );
        }
    }

    #[test]
    fn ownership_is_spread_and_a_leaving_peer_moves_only_its_own_digests() {
        let three = names(&["a:1", "b:1", "c:1"]);
        let two = names(&["a:1", "b:1"]);
        let mut counts = std::collections::HashMap::new();
        for i in 0..3000 {
            let d = digest(i);
            let owner = owner_of(&three, &d).unwrap();
            *counts.entry(owner).or_insert(0) += 1;
            if owner != "c:1" {
                assert_eq!(owner_of(&two, &d), Some(owner), "only c's digests move");
            }
        }
        for (peer, n) in counts {
            assert!((800..1200).contains(&n), "{peer} owns {n} of 3000");
        }
        assert_eq!(owner_of(&[], &digest(1)), None);
    }

    #[test]
    fn dns_answers_and_static_entries_naming_this_replica_are_this_replica() {
        let me_addr: SocketAddr = "10.0.0.1:5002".parse().unwrap();
        let other: SocketAddr = "10.0.0.2:5002".parse().unwrap();
        let set = PeerSet::new(
            "berth-0.berth:5002",
            &[me_addr],
            &names(&["10.0.0.1:5002", "BERTH-0.berth:5002"]),
            &[me_addr, other],
        );
        assert_eq!(
            set.members(),
            names(&["10.0.0.2:5002", "berth-0.berth:5002"]).as_slice()
        );
        assert_eq!(set.resolved(), &[me_addr, other]);
        // Addresses in their standard form: an IPv6 peer is one peer however it is written.
        assert_eq!(canonical("[0:0::1]:5002"), "[::1]:5002");
    }

    #[test]
    fn secrets_compare_by_content() {
        assert!(constant_time_eq("s3cret", "s3cret"));
        assert!(!constant_time_eq("s3cret", "s3creT"));
        assert!(!constant_time_eq("s3cret", "s3cre"));
        assert!(!constant_time_eq("", "x"));
    }
}
