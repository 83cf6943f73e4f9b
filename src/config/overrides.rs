//! Per-key overrides of the config file: `--set section.key=value` and
//! `BERTH_SECTION__KEY=value` (upstreams by index: `upstream.0.url`, `BERTH_UPSTREAM__0__URL`).
//!
//! Architecture: docs/ARCHITECTURE.md, "Configuration".

use toml::{Table, Value};

/// Applies one `path.to.key=value` override. The value is read as a TOML value when it parses as
/// one (`true`, `5`, `["a","b"]`, `"quoted"`), else taken as a plain string.
pub fn apply_override(table: &mut Table, assignment: &str) -> Result<(), String> {
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| format!("--set {assignment:?}: expected section.key=value"))?;
    let segments: Vec<String> = path.trim().split('.').map(|s| s.to_owned()).collect();
    set_path(table, &segments, parse_value(raw)).map_err(|e| format!("--set {path}: {e}"))
}

/// Applies every `BERTH_SECTION__KEY` variable in `vars` (other variables are ignored).
pub fn apply_env_overrides(
    table: &mut Table,
    vars: impl IntoIterator<Item = (String, String)>,
    errors: &mut Vec<String>,
) {
    let mut vars: Vec<_> = vars
        .into_iter()
        .filter(|(k, _)| k.starts_with("BERTH_") && k.contains("__"))
        .collect();
    vars.sort();
    for (k, v) in vars {
        let segments: Vec<String> = k["BERTH_".len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        if let Err(e) = set_path(table, &segments, parse_value(&v)) {
            errors.push(format!("{k}: {e}"));
        }
    }
}

fn parse_value(raw: &str) -> Value {
    let raw = raw.trim();
    format!("v = {raw}")
        .parse::<Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_owned()))
}

fn set_path(table: &mut Table, segments: &[String], value: Value) -> Result<(), String> {
    let (first, rest) = segments
        .split_first()
        .ok_or_else(|| "empty key".to_owned())?;
    if first.is_empty() {
        return Err("empty key segment".into());
    }
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return Ok(());
    }
    let entry = table
        .entry(first.clone())
        .or_insert_with(|| Value::Table(Table::new()));
    match entry {
        Value::Table(t) => set_path(t, rest, value),
        Value::Array(items) => {
            let idx: usize = rest[0]
                .parse()
                .map_err(|_| format!("{first} is a list: give an index, as {first}.0.key"))?;
            if idx > items.len() {
                return Err(format!(
                    "{first} has {} entries; index {idx} is past the end",
                    items.len()
                ));
            }
            if idx == items.len() {
                items.push(Value::Table(Table::new()));
            }
            match &mut items[idx] {
                Value::Table(t) if rest.len() > 1 => set_path(t, &rest[1..], value),
                _ => Err(format!("{first}.{idx} needs a key")),
            }
        }
        _ => Err(format!("{first} is not a table")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_nested_keys_and_array_entries() {
        let mut t: Table = "[cache]\ndir = \"a\"\n[[upstream]]\nname = \"x\"\n"
            .parse()
            .unwrap();
        apply_override(&mut t, "cache.disk_bytes=1GiB").unwrap();
        apply_override(&mut t, "upstream.0.default=true").unwrap();
        apply_override(&mut t, "server.listen=127.0.0.1:0").unwrap();
        assert_eq!(t["cache"]["disk_bytes"].as_str(), Some("1GiB"));
        assert_eq!(t["upstream"][0]["default"].as_bool(), Some(true));
        assert_eq!(t["server"]["listen"].as_str(), Some("127.0.0.1:0"));
        let mut errs = vec![];
        apply_env_overrides(
            &mut t,
            vec![
                ("BERTH_CACHE__TAG_TTL".to_owned(), "10s".to_owned()),
                ("HOME".to_owned(), "/".to_owned()),
            ],
            &mut errs,
        );
        assert!(errs.is_empty());
        assert_eq!(t["cache"]["tag_ttl"].as_str(), Some("10s"));
        assert!(apply_override(&mut t, "upstream.x.url=1").is_err());
        assert!(apply_override(&mut t, "nonsense").is_err());
    }
}
