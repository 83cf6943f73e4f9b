//! deploy/systemd/berth.service is hardened: `systemd-analyze security --offline=yes` rates its
//! exposure at most 2.0 ("OK"), and it runs as the user its sysusers.d file creates.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::require_binary;

/// The highest exposure the unit may have.
const MAX_EXPOSURE: f64 = 2.0;

fn unit_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd/berth.service")
}

/// The overall exposure `systemd-analyze` gives a unit file.
fn exposure(unit: &Path) -> f64 {
    let out = Command::new(require_binary("systemd-analyze"))
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit)
        .stdin(Stdio::null())
        .output()
        .expect("systemd-analyze starts");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure level:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    line.split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unparsable: {line}"))
}

#[test]
fn unit_exposure_is_at_most_two() {
    let level = exposure(&unit_path());
    assert!(
        level <= MAX_EXPOSURE,
        "berth.service exposure {level} > {MAX_EXPOSURE}"
    );

    // The same unit without its hardening block scores worse: the check can fail.
    let text = std::fs::read_to_string(unit_path()).unwrap();
    let (head, _) = text.split_once("# Hardening:").expect("hardening block");
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("berth.service");
    std::fs::write(
        &bare,
        format!("{head}\n[Install]\nWantedBy=multi-user.target\n"),
    )
    .unwrap();
    let bare_level = exposure(&bare);
    assert!(
        bare_level > MAX_EXPOSURE,
        "unhardened unit scored {bare_level}"
    );
}

#[test]
fn unit_runs_as_the_sysusers_user_and_owns_the_cache() {
    let unit = std::fs::read_to_string(unit_path()).unwrap();
    let sysusers = std::fs::read_to_string(unit_path().with_file_name("berth.sysusers")).unwrap();
    let user = sysusers
        .lines()
        .find_map(|l| l.strip_prefix("u "))
        .and_then(|l| l.split_whitespace().next())
        .expect("a `u` line");
    assert!(unit.contains(&format!("\nUser={user}\n")), "User={user}");
    assert!(unit.contains(&format!("\nGroup={user}\n")), "Group={user}");
    assert!(unit.contains("\nCacheDirectory=berth\n"));
    // Files a root-run warm/import left are handed back before berth opens the cache.
    let chown = unit
        .lines()
        .find(|l| l.starts_with("ExecStartPre=+"))
        .expect("privileged ExecStartPre");
    assert!(
        chown.contains("/var/cache/berth") && chown.contains(&format!("chown -h {user}:{user}")),
        "{chown}"
    );
}
