//! `cargo xtask package`: a Debian package of Spooky, built with Debian's own tools and no
//! other: the release binary (the same `cargo build` as the quickstart's, so after it this
//! builds nothing), stripped, and the packaging files of `spooky/debian/` are laid out in a
//! staging tree, `dpkg-shlibdeps` computes the shared-library dependencies, and
//! `dpkg-deb --build --root-owner-group` makes `target/debian/spooky_VERSION_ARCH.deb`.
//!
//! The version is the top entry of `spooky/debian/changelog` (its upstream part must be the
//! crate's version); the architecture is `dpkg --print-architecture`. What the package
//! installs, and why, is docs/install.md.

use crate::{ebpf, setup, workspace_root};
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Files of `spooky/debian/` installed by the package: (source, destination in the package,
/// mode, gzipped as Debian wants man pages and changelogs).
const INSTALLED: &[(&str, &str, u32, bool)] = &[
    (
        "spooky.service",
        "usr/lib/systemd/system/spooky.service",
        0o644,
        false,
    ),
    ("config.yaml", "etc/spooky/config.yaml", 0o644, false),
    ("logrotate", "etc/logrotate.d/spooky", 0o644, false),
    ("spooky.1", "usr/share/man/man1/spooky.1.gz", 0o644, true),
    (
        "changelog",
        "usr/share/doc/spooky/changelog.Debian.gz",
        0o644,
        true,
    ),
    (
        "lintian-overrides",
        "usr/share/lintian/overrides/spooky",
        0o644,
        false,
    ),
];

/// Files of `spooky/debian/` that go into the package's control area as they are.
const CONTROL: &[(&str, u32)] = &[
    ("conffiles", 0o644),
    ("postinst", 0o755),
    ("prerm", 0o755),
    ("postrm", 0o755),
];

/// `cargo xtask package`: prerequisites first (like the quickstart), then [`build`].
pub fn run() -> Result<()> {
    setup::apt()?;
    setup::ebpf_toolchain()?;
    let deb = build()?;
    println!("{}", deb.display());
    eprintln!("check it with: lintian {}", deb.display());
    Ok(())
}

/// The release build of the `spooky` binary, with exactly the quickstart's arguments: the
/// same packages selected means the same features, so whichever of the two runs second
/// finds everything fresh and builds nothing.
pub fn build_release(root: &Path) -> Result<()> {
    eprintln!("==> building spooky (release)");
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "spooky",
            "-p",
            "spooky-peers",
            "--bins",
        ])
        .current_dir(root)
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    Ok(())
}

/// The Debian version (`UPSTREAM-REVISION`) of the package: the top entry of
/// `spooky/debian/changelog`.
pub fn version(root: &Path) -> Result<String> {
    let changelog = root.join("spooky/debian/changelog");
    let out = output(
        Command::new("dpkg-parsechangelog")
            .arg("-l")
            .arg(&changelog)
            .args(["-S", "Version"]),
    )?;
    let version = out.trim().to_owned();
    let upstream = version
        .rsplit_once('-')
        .map_or(version.as_str(), |(u, _)| u);
    ensure!(
        upstream == env!("CARGO_PKG_VERSION"),
        "{}: version {version}, but the crate is {}: add a changelog entry",
        changelog.display(),
        env!("CARGO_PKG_VERSION")
    );
    Ok(version)
}

/// Where [`build`] puts the package: `target/debian/spooky_VERSION_ARCH.deb`.
pub fn deb_path(root: &Path) -> Result<PathBuf> {
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    Ok(root.join(format!(
        "target/debian/spooky_{}_{}.deb",
        version(root)?,
        arch.trim()
    )))
}

/// Builds the eBPF object and the release binary (both no-ops when fresh), then the package.
/// Returns its path.
pub fn build() -> Result<PathBuf> {
    let started = Instant::now();
    let root = workspace_root();
    // The binary embeds the kernel object (include_bytes): it must be there first.
    ebpf::build(true)?;
    build_release(&root)?;
    eprintln!("==> cargo xtask package");
    let deb = deb_path(&root)?;
    let version = version(&root)?;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    let arch = arch.trim();
    let src = root.join("spooky/debian");
    let stage = root.join(format!("target/debian/stage-{arch}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)
            .with_context(|| format!("cannot remove {}", stage.display()))?;
    }

    // /usr/bin/spooky, stripped as dh_strip does (lintian wants no debugging symbols and no
    // .comment or .note sections).
    let bin = put(&stage, "usr/bin/spooky", 0o755, |dest| {
        std::fs::copy(root.join("target/release/spooky"), dest).context("target/release/spooky")?;
        crate::setup::run(
            Command::new("strip")
                .args([
                    "--remove-section=.comment",
                    "--remove-section=.note",
                    "--strip-unneeded",
                ])
                .arg(dest),
        )
    })?;
    for (from, to, mode, gzip) in INSTALLED {
        let source = src.join(from);
        put(&stage, to, *mode, |dest| {
            if *gzip {
                let file = std::fs::File::create(dest)?;
                crate::setup::run(
                    Command::new("gzip")
                        .args(["-9", "-n", "-c"])
                        .arg(&source)
                        .stdout(file),
                )
            } else {
                std::fs::copy(&source, dest)
                    .map(|_| ())
                    .with_context(|| source.display().to_string())
            }
        })?;
    }
    put(&stage, "usr/share/doc/spooky/copyright", 0o644, |dest| {
        std::fs::write(dest, copyright(&root)?).map_err(Into::into)
    })?;

    // The control area.
    for (name, mode) in CONTROL {
        let source = src.join(name);
        put(&stage, &format!("DEBIAN/{name}"), *mode, |dest| {
            std::fs::copy(&source, dest)
                .map(|_| ())
                .with_context(|| source.display().to_string())
        })?;
    }
    let conffiles = std::fs::read_to_string(src.join("conffiles"))?;
    for conffile in conffiles.lines().filter(|l| !l.trim().is_empty()) {
        ensure!(
            stage.join(conffile.trim_start_matches('/')).is_file(),
            "conffile {conffile} is not in the package"
        );
    }
    let md5sums = md5sums(&stage, &conffiles)?;
    put(&stage, "DEBIAN/md5sums", 0o644, |dest| {
        std::fs::write(dest, md5sums).map_err(Into::into)
    })?;
    let control = std::fs::read_to_string(src.join("control"))?
        .replace("${Version}", &version)
        .replace("${Architecture}", arch)
        .replace("${Installed-Size}", &installed_size(&stage)?.to_string())
        .replace("${shlibs:Depends}", &shlibs_depends(&root, &bin)?);
    ensure!(
        !control.contains("${"),
        "spooky/debian/control: a substitution was left: {control}"
    );
    put(&stage, "DEBIAN/control", 0o644, |dest| {
        std::fs::write(dest, control).map_err(Into::into)
    })?;

    // Reproducible: the archive's times are the changelog entry's.
    let epoch = output(
        Command::new("dpkg-parsechangelog")
            .arg("-l")
            .arg(src.join("changelog"))
            .args(["-S", "Timestamp"]),
    )?;
    if deb.exists() {
        std::fs::remove_file(&deb)?;
    }
    crate::setup::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&stage)
            .arg(&deb)
            .env("SOURCE_DATE_EPOCH", epoch.trim())
            .stdout(Stdio::null()),
    )?;
    eprintln!(
        "<== cargo xtask package: {} in {:.1}s",
        deb.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(deb)
}

/// Makes `rel` under `stage` with `make` (its parents 0755), then sets its mode.
fn put(
    stage: &Path,
    rel: &str,
    mode: u32,
    make: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dest = stage.join(rel);
    if let Some(dir) = dest.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
    make(&dest).with_context(|| format!("cannot make {rel}"))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))?;
    Ok(dest)
}

/// `spooky/debian/copyright` (the header and the Files paragraph) and a stand-alone License
/// paragraph holding LICENSE.md, in the machine-readable format's layout: every line
/// indented by one space, empty lines as ` .`.
fn copyright(root: &Path) -> Result<String> {
    let mut out = std::fs::read_to_string(root.join("spooky/debian/copyright"))?;
    let license = std::fs::read_to_string(root.join("LICENSE.md"))?;
    out.push_str("\nLicense: Elastic-2.0\n");
    for line in license.trim().lines() {
        if line.trim().is_empty() {
            out.push_str(" .\n");
        } else {
            out.push(' ');
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
    Ok(out)
}

/// Every regular file of the package but the conffiles (dpkg keeps their sums itself), as
/// `md5sum` prints them with paths relative to the root.
fn md5sums(stage: &Path, conffiles: &str) -> Result<String> {
    let mut files = Vec::new();
    walk(stage, &mut |path, meta| {
        let rel = path.strip_prefix(stage).unwrap_or(path);
        let absolute = format!("/{}", rel.display());
        if meta.is_file()
            && !rel.starts_with("DEBIAN")
            && !conffiles.lines().any(|c| c.trim() == absolute)
        {
            files.push(rel.to_path_buf());
        }
    })?;
    files.sort();
    output(Command::new("md5sum").args(&files).current_dir(stage))
}

/// Installed-Size in KiB, as dpkg-gencontrol computes it: each regular file and symlink
/// rounded up to whole KiB, one for every other entry (directories).
fn installed_size(stage: &Path) -> Result<u64> {
    let mut kib = 0;
    walk(stage, &mut |path, meta| {
        if path
            .strip_prefix(stage)
            .is_ok_and(|r| r.starts_with("DEBIAN"))
        {
            return;
        }
        kib += if meta.is_file() || meta.file_type().is_symlink() {
            meta.len().div_ceil(1024)
        } else {
            1
        };
    })?;
    Ok(kib)
}

/// Calls `visit` for every entry below `dir` (not `dir` itself), not following symlinks.
fn walk(dir: &Path, visit: &mut dyn FnMut(&Path, &std::fs::Metadata)) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let meta = std::fs::symlink_metadata(&path)?;
        visit(&path, &meta);
        if meta.is_dir() {
            walk(&path, visit)?;
        }
    }
    Ok(())
}

/// The binary's shared-library dependencies from `dpkg-shlibdeps` (which wants to run in a
/// source tree: it is given a minimal `debian/control` of its own).
fn shlibs_depends(root: &Path, binary: &Path) -> Result<String> {
    let tree = root.join("target/debian/shlibdeps");
    std::fs::create_dir_all(tree.join("debian"))?;
    std::fs::write(
        tree.join("debian/control"),
        "Source: spooky\n\nPackage: spooky\nArchitecture: any\n",
    )?;
    let out = output(
        Command::new("dpkg-shlibdeps")
            .arg("-O")
            .arg(format!("-e{}", binary.display()))
            .current_dir(&tree),
    )?;
    let depends = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .context("dpkg-shlibdeps printed no shlibs:Depends")?
        .trim()
        .to_owned();
    ensure!(
        depends.contains("libc6"),
        "dpkg-shlibdeps: {depends}: no libc6?"
    );
    Ok(depends)
}

/// The command's standard output; a failure names the command and shows its errors.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    String::from_utf8(out.stdout).with_context(|| format!("{cmd:?}: output not UTF-8"))
}
