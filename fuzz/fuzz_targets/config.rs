//! Fuzz target `config`: arbitrary UTF-8 through `spooky::config::parse`.
//!
//! Checked:
//! - `parse` never panics;
//! - every error says where: a YAML/shape error carries serde's location (line and column),
//!   a rule error lists at least one problem, each with a field path;
//! - the same text gives the same answer twice (no order that depends on hashing);
//! - an accepted configuration holds what downstream code relies on without re-checking: a
//!   connection-ID layout `CidLayout::new` accepts, routes whose prefix starts with `/`,
//!   pools sorted by unique name with at least one backend, backend ids unique, status
//!   ranges in order.
//!
//! Relative TLS paths resolve against `fuzz/fixtures/config/`, which holds placeholder PEM
//! files under the names the shipped configs use, so valid configurations reach `Ok`.
//!
//! `parse` does I/O: it reads the TLS files a configuration names and resolves backend host
//! names. The fuzzer must do neither to the outside world, so:
//! - `getaddrinfo` is replaced in this binary by a stub that always fails (no DNS query ever
//!   leaves the machine; `host:port` backends then fail with "cannot resolve");
//! - inputs whose strings could name a device or kernel file (`dev`, `proc`, `sys`, `fd`:
//!   `/dev/zero` would be read forever) are skipped, see [`may_read_devices`].

#![no_main]

use libfuzzer_sys::fuzz_target;
use spooky::config::{parse, ConfigError};
use spooky_common::CidLayout;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Substrings that a path to something other than a regular file would contain.
const DEVICE_HINTS: [&str; 4] = ["dev", "proc", "sys", "fd"];
/// What the YAML parser takes as a line break (YAML 1.1, as libyaml reads it).
const LINE_BREAKS: [char; 5] = ['\n', '\r', '\u{85}', '\u{2028}', '\u{2029}'];

fuzz_target!(|input: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(input) else {
        return;
    };
    if may_read_devices(yaml) {
        return;
    }
    let base = fixtures();
    let first = parse(yaml, &base);
    let second = parse(yaml, &base);
    assert_eq!(
        describe(&first),
        describe(&second),
        "parse gave two answers"
    );
    match first {
        Ok(config) => check_config(&config),
        Err(ConfigError::Syntax(e)) => {
            assert!(e.location().is_some(), "YAML error without a location: {e}")
        }
        Err(ConfigError::Invalid(problems)) => {
            assert!(!problems.is_empty(), "Invalid with no problem listed");
            for p in &problems {
                // `(file)` names the file as a whole (a second YAML document).
                assert!(
                    p.path == "(file)" || is_field_path(&p.path),
                    "not a field path: {:?} ({})",
                    p.path,
                    p.message
                );
                assert!(!p.message.is_empty(), "empty message at {}", p.path);
            }
        }
        Err(e @ ConfigError::Read { .. }) => panic!("parse read a file as the config: {e}"),
    }
});

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/config")
}

fn describe(r: &Result<spooky::config::Config, ConfigError>) -> String {
    match r {
        Ok(c) => format!("{c:?}"),
        Err(e) => e.to_string(),
    }
}

/// Whether any string in the document might lead `parse` to open a device or kernel file.
/// Without a backslash every scalar is (up to folding) a piece of the text itself, so the
/// text is searched, comments left out (so that the shipped, commented configs are not
/// skipped: a hint after ` #` inside a quoted path would sit in a directory named `… #`,
/// which does not exist); with one, a double-quoted escape could spell a hint, so the
/// document is loaded as a `serde_yaml::Value` and every scalar, key and tag searched (a text
/// that does not even load as a `Value` is skipped).
fn may_read_devices(yaml: &str) -> bool {
    let hinted = |s: &str| DEVICE_HINTS.iter().any(|h| s.contains(h));
    if yaml.split(LINE_BREAKS).map(without_comment).any(hinted) {
        return true;
    }
    if !yaml.contains('\\') {
        return false;
    }
    match serde_yaml::from_str::<serde_yaml::Value>(yaml) {
        Ok(value) => value_hinted(&value, &hinted),
        Err(_) => true,
    }
}

/// `line` up to its first `#` that starts the line or follows a space or tab.
fn without_comment(line: &str) -> &str {
    let bytes = line.as_bytes();
    let cut = (0..bytes.len())
        .find(|&i| bytes[i] == b'#' && (i == 0 || bytes[i - 1] == b' ' || bytes[i - 1] == b'\t'));
    cut.map_or(line, |i| &line[..i])
}

fn value_hinted(value: &serde_yaml::Value, hinted: &dyn Fn(&str) -> bool) -> bool {
    use serde_yaml::Value;
    match value {
        Value::String(s) => hinted(s),
        Value::Sequence(items) => items.iter().any(|v| value_hinted(v, hinted)),
        Value::Mapping(map) => map
            .iter()
            .any(|(k, v)| value_hinted(k, hinted) || value_hinted(v, hinted)),
        Value::Tagged(t) => hinted(&t.tag.to_string()) || value_hinted(&t.value, hinted),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// `version`, `listen.tls.cert`, `upstream.api.backends[1].address`: dotted keys with list
/// indices. Pool names appear as written (the name rule is itself reported on such a path),
/// so any character but a line break is allowed between the dots.
fn is_field_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains(['\n', '\r'])
        && path
            .split('.')
            .next()
            .is_some_and(|top| top.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
}

fn check_config(config: &spooky::config::Config) {
    let q = &config.quic;
    let sid_len = u8::try_from(q.server_id.len()).unwrap_or(u8::MAX);
    if let Err(e) = CidLayout::new(q.cid_len, sid_len, q.generation) {
        panic!("accepted quic section makes no CID layout: {e:?} ({q:?})");
    }
    let names: Vec<&str> = config.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert!(
        names.windows(2).all(|w| w[0] < w[1]),
        "pools not sorted: {names:?}"
    );
    assert!(!config.upstreams.is_empty());
    let mut ids = HashSet::new();
    for up in &config.upstreams {
        assert!(up.route.path_prefix.starts_with('/'), "{:?}", up.route);
        assert!(!up.backends.is_empty(), "pool {} has no backend", up.name);
        for b in &up.backends {
            assert!(ids.insert(b.id.as_str()), "backend id {} twice", b.id);
            assert_ne!(b.address.port(), 0);
            for &(lo, hi) in &b.health_check.expected_status {
                assert!(lo <= hi, "status range {lo}..={hi}");
            }
        }
    }
    if let Some(w) = config.workers {
        assert!(w >= 1);
    }
}

/// Replaces the C library's resolver for this binary (the linker binds std's call to this
/// definition): always "name does not resolve", so fuzzing never sends a DNS query.
///
/// # Safety
/// Called by std with valid pointers; it touches none of them.
#[no_mangle]
pub unsafe extern "C" fn getaddrinfo(
    _node: *const std::ffi::c_char,
    _service: *const std::ffi::c_char,
    _hints: *const std::ffi::c_void,
    _res: *mut *mut std::ffi::c_void,
) -> std::ffi::c_int {
    const EAI_NONAME: std::ffi::c_int = -2;
    EAI_NONAME
}
