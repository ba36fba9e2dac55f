//! Embeds the eBPF object built by `cargo xtask build-ebpf`
//! (`spooky-ebpf/target/bpfel-unknown-none/release/spooky-ebpf`): its path goes to the crate
//! as `SPOOKY_EBPF_OBJECT`. When it has not been built, the crate still builds (with a
//! warning) against an empty file, and loading fails at run time with
//! `EbpfError::ObjectMissing`, which says to run `cargo xtask build-ebpf`.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let root = manifest.parent().map(PathBuf::from).unwrap_or_default();
    let object = root.join("spooky-ebpf/target/bpfel-unknown-none/release/spooky-ebpf");
    // Watch the object, or while it is missing its nearest existing ancestor directory (a
    // missing path would rerun this script on every build), so its first build is noticed.
    let watched = object.ancestors().find(|p| p.exists()).unwrap_or(&root);
    println!("cargo:rerun-if-changed={}", watched.display());
    println!("cargo:rerun-if-changed=build.rs");
    let embedded = if object.is_file() {
        object
    } else {
        println!(
            "cargo:warning=eBPF object {} not found: run `cargo xtask build-ebpf` (spooky builds without it; loading eBPF fails at run time)",
            object.display()
        );
        let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
        let empty = out.join("spooky-ebpf.missing");
        if let Err(e) = std::fs::write(&empty, b"") {
            println!("cargo:warning=cannot write {}: {e}", empty.display());
        }
        empty
    };
    println!("cargo:rustc-env=SPOOKY_EBPF_OBJECT={}", embedded.display());
}
