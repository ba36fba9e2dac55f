//! The module-graph check: the top-level modules of each workspace crate must not use each
//! other in a circle, and the `spooky` crate's must follow its layer table ([`SPOOKY_LAYERS`],
//! drawn in docs/architecture.md): a module uses only modules of layers below its own.
//!
//! Edges come from `crate::NAME` paths in the source (`use` lines and inline paths, comments
//! and unit-test modules left out), as `../shared/tools/modcycles.py` reads them.
//! `cargo xtask test` runs it first; `cargo test -p xtask` runs it as a unit test too.

use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The `spooky` crate's top-level modules, top to bottom. A module may use modules of later
/// rows only; modules of one row do not use each other.
pub const SPOOKY_LAYERS: &[&[&str]] = &[
    &["app"],
    &["ops"],
    &["worker"],
    &["quic", "tcp"],
    &["http"],
    &["health", "acme", "dns"],
    &["upstream"],
    &["steering"],
    &["telemetry"],
    &["snapshot"],
    &["board", "certs", "keys", "stats", "policy", "privilege"],
    &["routing", "lb"],
    &["config"],
];

/// `module → modules it uses`, for the crate whose sources are in `src`: the `crate::NAME`
/// paths of its files, its `super::` paths that climb to the crate root, and the modules
/// behind the re-exports it goes through (`crate::M::Item` where `M` re-exports `Item` from
/// `X`: an edge to `X` too, so a re-export cannot hide an upward edge).
pub fn graph(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut files = Vec::new();
    for file in rust_files(src)? {
        let rel = file.strip_prefix(src).unwrap_or(&file).to_path_buf();
        let Some(first) = rel.iter().next() else {
            continue;
        };
        let top = first.to_string_lossy().trim_end_matches(".rs").to_owned();
        let unit_tests =
            rel.file_name().is_some_and(|n| n == "tests.rs") && rel.components().count() > 1;
        if top == "lib" || top == "main" || top == "bin" || unit_tests {
            continue;
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        files.push((top, module_depth(&rel), code_only(&text)));
    }
    let reexports: BTreeMap<(String, String), String> = files
        .iter()
        .flat_map(|(top, _, code)| {
            reexports(code)
                .into_iter()
                .map(move |(name, from)| ((top.clone(), name), from))
        })
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (top, depth, code) in &files {
        let used = edges.entry(top.clone()).or_default();
        let mut names = uses(code);
        names.extend(super_uses(code, *depth));
        for (m, item) in item_paths(code) {
            if let Some(from) = reexports.get(&(m, item)) {
                names.insert(from.clone());
            }
        }
        names.remove(top);
        used.extend(names);
    }
    Ok(edges)
}

/// How deep a file's module is: `x.rs` and `x/mod.rs` are 1 (`super::` of theirs is the
/// crate root), `x/y.rs` is 2, and so on.
fn module_depth(rel: &Path) -> usize {
    let parts = rel.components().count();
    if rel.file_name().is_some_and(|n| n == "mod.rs") {
        parts - 1
    } else {
        parts
    }
}

/// The top-level modules that `super::` paths reach in a file of module depth `depth`:
/// `super::` repeated `depth` times is the crate root, and the name after it a module.
fn super_uses(code: &str, depth: usize) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("super::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue; // the middle of a `super::super::` chain, or another word
        }
        let mut rest = &code[i..];
        let mut climbs = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            climbs += 1;
            rest = r;
        }
        if climbs != depth {
            continue; // inside its own top-level module
        }
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group[..group.find('}').unwrap_or(group.len())]
                .split(',')
                .collect(),
            None => vec![rest],
        };
        for n in names {
            let name = ident(n.trim());
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// `(Item, X)` for each `pub use crate::X::…::Item` (or `{Item, …}`, or `… as Item`) in
/// `code`: what its module re-exports from module `X`.
fn reexports(code: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for stmt in code.split(';') {
        let stmt = stmt.trim();
        let Some(at) = stmt.find("use crate::") else {
            continue;
        };
        if !stmt[..at].trim_start().starts_with("pub") {
            continue;
        }
        let path = &stmt[at + "use crate::".len()..];
        let from = ident(path);
        let items: Vec<&str> = match (path.find('{'), path.rfind('}')) {
            (Some(a), Some(b)) if a < b => path[a + 1..b].split(',').collect(),
            _ => vec![path.rsplit("::").next().unwrap_or("")],
        };
        for item in items {
            let item = item.trim();
            let name = item.rsplit(" as ").next().unwrap_or(item).trim();
            let name = name.rsplit("::").next().unwrap_or(name);
            if !name.is_empty() && name != "self" && name != "*" {
                out.push((ident(name), from.clone()));
            }
        }
    }
    out
}

/// `(M, Item)` for each `crate::M::Item` path in `code` (and each item of
/// `crate::M::{Item, …}`).
fn item_paths(code: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        if code[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        let m = ident(rest);
        let Some(after) = rest[m.len()..].strip_prefix("::") else {
            continue;
        };
        match after.strip_prefix('{') {
            Some(group) => {
                for item in group[..group.find('}').unwrap_or(group.len())].split(',') {
                    out.push((m.clone(), ident(item.trim())));
                }
            }
            None => out.push((m.clone(), ident(after))),
        }
    }
    out
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect()
}

fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in
            std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The source without comments and without its `#[cfg(test)] mod tests { … }` (unit tests
/// may reach anywhere).
fn code_only(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules named by `crate::NAME` and `use crate::{NAME, …}`.
fn uses(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `spooky_crate::` or similar
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let name = ident(item.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// A circle in `edges`, if there is one (as a path that starts and ends on the same module).
pub fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if edges.contains_key(next) {
                if let Some(c) = visit(next, edges, path, done) {
                    return Some(c);
                }
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|n| visit(n, edges, &mut Vec::new(), &mut done))
}

/// The edges of `edges` that break `layers` (not strictly downward), and the modules the
/// table does not place.
pub fn layer_violations(
    edges: &BTreeMap<String, BTreeSet<String>>,
    layers: &[&[&str]],
) -> Vec<String> {
    let rank = |m: &str| layers.iter().position(|row| row.contains(&m));
    let mut out = Vec::new();
    for (from, tos) in edges {
        let Some(r_from) = rank(from) else {
            out.push(format!("module `{from}` is not in the layer table"));
            continue;
        };
        for to in tos.iter().filter(|t| edges.contains_key(*t)) {
            match rank(to) {
                Some(r_to) if r_to > r_from => {}
                Some(_) => out.push(format!("`{from}` uses `{to}`, which is not below it")),
                None => {}
            }
        }
    }
    out
}

/// Checks every crate of the workspace at `root`; prints a summary.
///
/// # Errors
/// The circles and layer violations found.
pub fn check(root: &Path) -> Result<()> {
    let crates = [
        ("spooky", root.join("spooky/src"), Some(SPOOKY_LAYERS)),
        ("spooky-peers", root.join("spooky/peers/src"), None),
        ("spooky-common", root.join("spooky-common/src"), None),
        ("xtask", root.join("xtask/src"), None),
    ];
    let mut problems = Vec::new();
    let mut modules = 0;
    for (name, src, layers) in crates {
        let edges = graph(&src)?;
        modules += edges.len();
        if let Some(cycle) = find_cycle(&edges) {
            problems.push(format!(
                "{name}: modules in a circle: {}",
                cycle.join(" → ")
            ));
        }
        if let Some(layers) = layers {
            problems.extend(
                layer_violations(&edges, layers)
                    .into_iter()
                    .map(|v| format!("{name}: {v}")),
            );
        }
    }
    if !problems.is_empty() {
        bail!("module graph:\n  {}", problems.join("\n  "));
    }
    eprintln!("module graph: no circle, spooky's layers hold ({modules} top-level modules)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edges(list: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        list.iter()
            .map(|(m, to)| (m.to_string(), to.iter().map(|t| t.to_string()).collect()))
            .collect()
    }

    #[test]
    fn paths_and_groups_are_edges_comments_and_tests_are_not() {
        let code = code_only(
            "use crate::a::X;\nuse crate::{b, c::D};\nfn f() { crate::d::g(); } // crate::e\n\
             /// [`crate::f`]\nlet s = spooky_crate::z;\n#[cfg(test)]\nmod tests {\n use crate::t; }",
        );
        let got: Vec<String> = uses(&code).into_iter().collect();
        assert_eq!(got, ["a", "b", "c", "d"]);
    }

    #[test]
    fn super_paths_to_the_root_and_reexports_are_edges() {
        // `super::` from `a.rs` (depth 1) is the root; from `a/b.rs` (depth 2) it is `a`.
        let code = code_only("use super::c::X;\nuse super::super::d::Y;\nuse super::{e, f};");
        let one: Vec<String> = super_uses(&code, 1).into_iter().collect();
        assert_eq!(one, ["c", "e", "f"]);
        let two: Vec<String> = super_uses(&code, 2).into_iter().collect();
        assert_eq!(two, ["d"]);
        assert_eq!(module_depth(Path::new("a/mod.rs")), 1);
        assert_eq!(module_depth(Path::new("a/b.rs")), 2);
        assert_eq!(module_depth(Path::new("a.rs")), 1);
        let re = reexports(&code_only(
            "pub use crate::stats::Protocol;\npub(crate) use crate::x::{A, b::C as D};\nuse crate::y::Z;",
        ));
        assert_eq!(
            re,
            [
                ("Protocol".to_string(), "stats".to_string()),
                ("A".into(), "x".into()),
                ("D".into(), "x".into())
            ]
        );
        assert_eq!(
            item_paths("crate::http::Protocol; crate::m::{P, q::R}"),
            [
                ("http".to_string(), "Protocol".to_string()),
                ("m".into(), "P".into()),
                ("m".into(), "q".into())
            ]
        );
    }

    #[test]
    fn a_reexport_cannot_hide_an_upward_edge() {
        let dir = std::env::temp_dir().join(format!("spooky-layers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("low")).unwrap();
        std::fs::write(dir.join("low/mod.rs"), "pub use crate::high::Secret;\n").unwrap();
        std::fs::write(
            dir.join("mid.rs"),
            "use crate::low::Secret;\nuse super::low::X;\n",
        )
        .unwrap();
        std::fs::write(dir.join("high.rs"), "pub struct Secret;\n").unwrap();
        let edges = graph(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(edges["mid"].contains("high"), "{edges:?}");
        assert!(edges["mid"].contains("low"), "{edges:?}");
        let layers: &[&[&str]] = &[&["high"], &["mid"], &["low"]];
        let v = layer_violations(&edges, layers);
        assert!(
            v.contains(&"`mid` uses `high`, which is not below it".to_string()),
            "{v:?}"
        );
        assert!(
            v.contains(&"`low` uses `high`, which is not below it".to_string()),
            "{v:?}"
        );
    }

    #[test]
    fn circles_and_upward_edges_are_found() {
        let ok = edges(&[
            ("app", &["quic", "config"]),
            ("quic", &["config"]),
            ("config", &[]),
        ]);
        assert_eq!(find_cycle(&ok), None);
        let layers: &[&[&str]] = &[&["app"], &["quic"], &["config"]];
        assert!(layer_violations(&ok, layers).is_empty());
        let circle = edges(&[
            ("quic", &["config"]),
            ("config", &["ops"]),
            ("ops", &["quic"]),
        ]);
        assert_eq!(
            find_cycle(&circle),
            Some(vec![
                "config".into(),
                "ops".into(),
                "quic".into(),
                "config".into()
            ])
        );
        let upward = edges(&[("app", &[]), ("config", &["quic"]), ("quic", &[])]);
        assert_eq!(
            layer_violations(&upward, layers),
            ["`config` uses `quic`, which is not below it"]
        );
        let unknown = edges(&[("misc", &[])]);
        assert_eq!(
            layer_violations(&unknown, layers),
            ["module `misc` is not in the layer table"]
        );
    }

    #[test]
    fn the_workspace_holds() {
        check(&crate::workspace_root()).unwrap();
    }

    #[test]
    fn this_workspace_keeps_its_layers() {
        check(&crate::workspace_root()).unwrap();
    }
}
