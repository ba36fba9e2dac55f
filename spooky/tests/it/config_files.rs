//! Configuration files on disk: every shipped `.yaml` under `config/` and every full example in
//! `docs/configuration.md` must load, and every broken file under
//! `spooky/tests/data/bad-configs/` must fail with exactly the text stored beside it
//! (`NAME.yaml` → `NAME.expected`).
//!
//! The configs name `config/certs/spooky.{crt,key}` (made by `cargo xtask certs`, not in git);
//! [`ensure_certs`] makes them with the same generator when they are missing.
//!
//! To rewrite the `.expected` files after a deliberate message change, run with
//! `SPOOKY_BLESS=1` and review the diff.

#![cfg(test)]

use std::fs;
use std::path::{Path, PathBuf};

use spooky::config::{load, parse, ConfigError};

use crate::support::repo_root;

/// Makes sure the demo certificates in `config/certs` exist.
fn ensure_certs() {
    crate::support::certs_dir();
}

/// Every file under `dir` (recursively) whose name ends in `.yaml` or `.yml`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The fenced ```` ```yaml ```` blocks of a Markdown text that are whole configurations (contain
/// a top-level `version:` line), with the line each starts on.
fn full_yaml_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in markdown.lines().enumerate() {
        match &mut current {
            None if line.trim_start().starts_with("```yaml") => {
                current = Some((n + 1, String::new()))
            }
            None => {}
            Some(_) if line.trim_start().starts_with("```") => {
                if let Some((start, text)) = current.take() {
                    if text.lines().any(|l| l.starts_with("version:")) {
                        blocks.push((start, text));
                    }
                }
            }
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    blocks
}

#[test]
fn shipped_configs_all_load() {
    ensure_certs();
    let files = yaml_files(&repo_root().join("config"));
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    for expected in [
        "config.yaml",
        "minimal.yaml",
        "multi-upstream.yaml",
        "sites.yaml",
        "tls-backends.yaml",
        "edge-policy.yaml",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(expected)),
            "{expected} not among {names:?}"
        );
    }
    let failures: Vec<String> = files
        .iter()
        .filter_map(|f| load(f).err().map(|e| format!("{}:\n{e}", f.display())))
        .collect();
    assert!(
        failures.is_empty(),
        "shipped configs that do not load:\n\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn shipped_default_config_is_the_documented_demo() {
    ensure_certs();
    let c = load(&repo_root().join("config/config.yaml")).unwrap();
    assert_eq!(c.listen.addr, "0.0.0.0:9889".parse().unwrap());
    let demo = c.upstream("demo").expect("upstream demo");
    let ids: Vec<&str> = demo.backends.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["demo-1", "demo-2"]);
    assert!(demo
        .backends
        .iter()
        .all(|b| b.tls.is_none() && b.health_check.enabled));
    assert_eq!(demo.backends[0].address, "127.0.0.1:7001".parse().unwrap());
    assert_eq!(demo.backends[1].address, "127.0.0.1:7002".parse().unwrap());
}

/// Full examples in the docs resolve relative paths against `config/`, like the shipped file.
#[test]
fn full_examples_in_configuration_md_load() {
    ensure_certs();
    let doc = repo_root().join("docs/configuration.md");
    let markdown = fs::read_to_string(&doc).unwrap();
    let blocks = full_yaml_blocks(&markdown);
    assert!(
        !blocks.is_empty(),
        "no full ```yaml example (with `version:`) in {}",
        doc.display()
    );
    let base = repo_root().join("config");
    let failures: Vec<String> = blocks
        .iter()
        .filter_map(|(line, yaml)| {
            parse(yaml, &base)
                .err()
                .map(|e| format!("block at docs/configuration.md:{line}:\n{e}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "doc examples that do not load:\n\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn bad_configs_fail_with_the_expected_error() {
    ensure_certs();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/bad-configs");
    let bless = std::env::var_os("SPOOKY_BLESS").is_some();
    let files = yaml_files(&dir);
    assert!(
        files.len() >= 10,
        "expected the bad-config corpus in {}",
        dir.display()
    );
    let mut failures = Vec::new();
    for file in &files {
        let expected_path = file.with_extension("expected");
        let got = match load(file) {
            Ok(_) => {
                failures.push(format!("{}: loaded, but must fail", file.display()));
                continue;
            }
            Err(e) => e,
        };
        assert_eq!(got.exit_code(), 1, "{}: {got}", file.display());
        let got = got.to_string();
        if bless {
            fs::write(&expected_path, format!("{got}\n")).unwrap();
            continue;
        }
        match fs::read_to_string(&expected_path) {
            Ok(want) if want.trim_end_matches('\n') == got => {}
            Ok(want) => failures.push(format!(
                "{}:\n--- expected\n{}\n--- got\n{got}",
                file.display(),
                want.trim_end_matches('\n')
            )),
            Err(e) => failures.push(format!("{}: {e}", expected_path.display())),
        }
    }
    // An `.expected` without its `.yaml` is a test that silently stopped running.
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "expected")
            && !path.with_extension("yaml").is_file()
        {
            failures.push(format!("{}: no matching .yaml", path.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn missing_config_file_is_a_read_error_with_exit_code_2() {
    let path = repo_root().join("config/does-not-exist.yaml");
    let err = load(&path).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert_eq!(err.exit_code(), 2);
}
