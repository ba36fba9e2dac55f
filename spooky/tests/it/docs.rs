//! The docs say what the code does: every metric `/metrics` exposes is in
//! docs/operations.md's table, and every configuration key the parser accepts is in
//! docs/configuration.md. A metric or key added without its line fails here.

use crate::support::*;
use spooky_peers::client::Request;
use std::collections::BTreeSet;
use std::time::Duration;

fn doc(name: &str) -> String {
    std::fs::read_to_string(repo_root().join("docs").join(name)).unwrap()
}

/// Whether `word` stands in `text` as a word of its own (not inside a longer name).
fn mentions(text: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_name) && !after.is_some_and(is_name)
    })
}

#[test]
fn every_metric_is_documented() {
    let b = backend("b1");
    let p = proxy(
        &pool(
            "main",
            "/",
            None,
            "round-robin",
            &[("b1", b.addr)],
            "rate_limit: {requests_per_second: 100}",
        ),
        "quic:\n  retry: off\n",
        1,
    );
    let mut c = client(p.addr);
    c.request(&Request::get("localhost", "/"), Duration::from_secs(10))
        .unwrap();
    let text = p.running.as_ref().unwrap().metrics_text();
    let names: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(names.len() > 50, "{names:?}");
    let ops = doc("operations.md");
    let missing: Vec<&&str> = names
        .iter()
        .filter(|n| !ops.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics not in docs/operations.md: {missing:?}"
    );
}

#[test]
fn every_config_key_is_documented() {
    // The keys are the fields of the raw (serde) structs: `pub NAME:` lines of
    // `struct Raw…` bodies in config/raw.rs.
    let raw = std::fs::read_to_string(repo_root().join("spooky/src/config/raw.rs")).unwrap();
    let mut keys = BTreeSet::new();
    let mut in_struct = false;
    let mut renamed: Option<String> = None;
    for line in raw.lines() {
        let t = line.trim();
        if let Some(r) = t.strip_prefix("#[serde(rename = \"") {
            renamed = r.split('"').next().map(str::to_owned);
            continue;
        }
        if t.starts_with("pub(super) struct Raw") || t.starts_with("pub struct Raw") {
            in_struct = t.ends_with('{');
            continue;
        }
        if in_struct && t == "}" {
            in_struct = false;
            continue;
        }
        if in_struct {
            if let Some(name) = t
                .strip_prefix("pub ")
                .and_then(|r| r.split_once(':'))
                .map(|(n, _)| n.trim())
            {
                keys.insert(renamed.take().unwrap_or_else(|| name.to_owned()));
            }
        }
    }
    assert!(keys.len() > 60, "{keys:?}");
    let config = doc("configuration.md");
    let missing: Vec<&String> = keys.iter().filter(|k| !mentions(&config, k)).collect();
    assert!(
        missing.is_empty(),
        "configuration keys not in docs/configuration.md: {missing:?}"
    );
}
