//! Fuzz target `config`: arbitrary UTF-8 through `spooky::config::parse_with`.
//!
//! Checked:
//! - validation never panics;
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
//! Validation's I/O goes through [`Fixtures`], an in-memory `config::Env`: it serves the
//! fixture files (read once at start) and nothing else, resolves no host name and knows one
//! user, so the fuzzer never touches the filesystem, the network or the user database.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spooky::config::{parse_with, ConfigError, Env};
use spooky_common::CidLayout;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The fixture files by path, and the one user this "machine" has.
struct Fixtures {
    files: HashMap<PathBuf, Vec<u8>>,
}

impl Env for Fixtures {
    fn read(&self, path: &Path) -> std::io::Result<Vec<u8>> {
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }

    fn user(&self, name: &str) -> Option<(u32, u32)> {
        (name == "spooky").then_some((998, 998))
    }
}

/// Every file under `fuzz/fixtures/config`, by the path `parse_with` will ask for.
fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let mut files = HashMap::new();
        let mut dirs = vec![base()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir)
                .expect("fixture directory")
                .flatten()
            {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else {
                    let bytes = std::fs::read(&path).expect("fixture file");
                    files.insert(path, bytes);
                }
            }
        }
        Fixtures { files }
    })
}

fuzz_target!(|input: &[u8]| {
    let Ok(yaml) = std::str::from_utf8(input) else {
        return;
    };
    let (base, env) = (base(), fixtures());
    let first = parse_with(yaml, &base, env);
    let second = parse_with(yaml, &base, env);
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

fn base() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/config")
}

fn describe(r: &Result<spooky::config::Config, ConfigError>) -> String {
    match r {
        Ok(c) => format!("{c:?}"),
        Err(e) => e.to_string(),
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
        // Backends named by DNS are found at run time; a redirect route needs none.
        assert!(
            !up.backends.is_empty() || !up.named.is_empty() || up.redirect.is_some(),
            "pool {} has no backend",
            up.name
        );
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
