//! The config loader: TOML text, then `--set` and `BERTH_*` overrides, then validation into a
//! typed `Config`. Input: the TOML text, where a line `@set KEY=VALUE` is a `--set` flag and a
//! line `@env NAME=VALUE` an environment variable instead. Relative paths resolve against a
//! directory holding a password file, a CA file, an htpasswd file and a tokens file.
#![no_main]

use std::collections::HashSet;
use std::path::Path;
use std::sync::OnceLock;

use berth::config::{self, units, AuthMode, Config};
use libfuzzer_sys::fuzz_target;
use toml::{Table, Value};

fn base() -> &'static Path {
    static BASE: OnceLock<tempfile::TempDir> = OnceLock::new();
    BASE.get_or_init(|| {
        let d = tempfile::tempdir().expect("temp dir");
        for (name, text) in [
            ("password", "hunter2\n"),
            ("ca.pem", "not a certificate\n"),
            ("htpasswd", "user:$2y$05$abcdefghijklmnopqrstuu\n"),
            ("tokens", "ci:secret-token\n"),
        ] {
            std::fs::write(d.path().join(name), text).expect("fixture file");
        }
        d
    })
    .path()
}

/// Whether every string stays inside the base directory: the loader opens files the config
/// names (a password file), and `/dev/zero` or a FIFO would only hang the fuzzer.
fn confined(v: &Value) -> bool {
    match v {
        Value::String(s) => !s.starts_with(['/', '\\']) && !s.contains(".."),
        Value::Array(a) => a.iter().all(confined),
        Value::Table(t) => t.values().all(confined),
        _ => true,
    }
}

fn check(c: &Config) {
    assert!(!c.upstreams.is_empty());
    assert!(c.upstreams.iter().filter(|u| u.default).count() <= 1);
    let mut names = HashSet::new();
    for u in &c.upstreams {
        assert!(names.insert(u.name.as_str()), "{:?} twice", u.name);
        assert!(u.aliases.contains(&u.name), "{u:?}");
        assert!(
            matches!(u.url.scheme_str(), Some("http" | "https")),
            "{u:?}"
        );
        assert!(u.url.authority().is_some());
        assert!(!(u.offline && u.auth == AuthMode::Passthrough));
    }
    assert!(c.cache.disk_bytes > 0);
    if let Some(n) = c.server.worker_threads {
        assert!((1..=1024).contains(&n));
    }
    if let Some(u) = &c.server.external_url {
        assert!(u.starts_with("http://") || u.starts_with("https://"));
        assert!(!u.ends_with('/'));
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut toml_text = String::new();
    let mut sets = Vec::new();
    let mut env = Vec::new();
    for line in text.lines() {
        if let Some(s) = line.strip_prefix("@set ") {
            sets.push(s);
        } else if let Some(e) = line.strip_prefix("@env ") {
            let (k, v) = e.split_once('=').unwrap_or((e, ""));
            env.push((k.to_owned(), v.to_owned()));
        } else {
            toml_text.push_str(line);
            toml_text.push('\n');
        }
        // The unit parsers see every line, too.
        if let Ok(d) = units::parse_duration(line) {
            let _ = d.as_secs();
        }
        let _ = units::parse_size(line);
    }
    let Ok(mut table) = toml_text.parse::<Table>() else {
        return;
    };
    let mut errors = Vec::new();
    config::apply_env_overrides(&mut table, env, &mut errors);
    for s in &sets {
        if let Err(e) = config::apply_override(&mut table, s) {
            errors.push(e);
        }
    }
    if !table.values().all(confined) {
        return;
    }
    match Config::from_table(table, base()) {
        Ok(c) => check(&c),
        Err(e) => {
            assert!(!e.0.is_empty());
            let _ = e.to_string();
        }
    }
});
