//! `cargo xtask image`: the agent as a container image, written as a `docker save` archive
//! without a container engine, for a DaemonSet (`deploy/kubernetes/tapir.yaml`).
//!
//! The image holds what `tapir` needs and nothing else: the binary (debug info stripped:
//! 13 MB instead of 80), the C libraries it links (as `ldd` resolves them on the build
//! machine, so the image runs wherever the binary does), the CA certificates for an https
//! collector, and empty mount points. `docker load`, `podman load`, `kind load
//! image-archive` and `ctr images import` take the archive as it is.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::{setup, status};

/// Where the binary sits in the image, and what it runs by default.
pub const ENTRYPOINT: &str = "/usr/local/bin/tapir";
const CMD: &str = "run";
/// Read by tonic's native roots (rustls-native-certs looks here first on Debian's layout).
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Mount points a container runtime fills in; `/host/sys/fs/cgroup` is the DaemonSet's
/// hostPath for the node's cgroup hierarchy.
const EMPTY_DIRS: &[&str] = &["proc", "sys", "dev", "tmp", "host/sys/fs/cgroup"];

/// The image's default tag: `tapir:<workspace version>`, as the DaemonSet names it.
pub fn default_tag() -> String {
    format!("tapir:{}", env!("CARGO_PKG_VERSION"))
}

pub fn default_archive(root: &Path) -> PathBuf {
    root.join("target/tapir-image.tar")
}

/// Writes the image of `bin` to `out` as `tag`.
pub fn write(root: &Path, bin: &Path, tag: &str, out: &Path) -> Result<()> {
    setup::ensure_debian(&[("objcopy", "binutils")])?;
    let work = root.join("target/image");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    let rootfs = work.join("rootfs");
    for d in EMPTY_DIRS {
        fs::create_dir_all(rootfs.join(d))?;
    }
    let dst = under(&rootfs, ENTRYPOINT);
    fs::create_dir_all(dst.parent().context("entrypoint has a directory")?)?;
    status(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(bin)
            .arg(&dst),
        "stripping the binary's debug info (objcopy)",
    )?;
    for lib in linked_libraries(bin)? {
        copy_resolved(&lib, &under(&rootfs, &lib))?;
    }
    if Path::new(CA_BUNDLE).exists() {
        copy_resolved(Path::new(CA_BUNDLE), &under(&rootfs, CA_BUNDLE))?;
    } else {
        eprintln!("xtask: {CA_BUNDLE} not found: the image cannot verify an https collector");
    }
    fs::set_permissions(
        rootfs.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )?;

    let archive = work.join("archive");
    fs::create_dir_all(&archive)?;
    let layer_tar = work.join("layer.tar");
    tar(&rootfs, &layer_tar)?;
    let layer_id = sha256(&layer_tar)?;
    fs::create_dir_all(archive.join(&layer_id))?;
    fs::rename(&layer_tar, archive.join(&layer_id).join("layer.tar"))?;
    let config = serde_json::to_vec_pretty(&config_json(&layer_id))?;
    let config_path = work.join("config.json");
    fs::write(&config_path, &config)?;
    let config_id = sha256(&config_path)?;
    fs::rename(&config_path, archive.join(format!("{config_id}.json")))?;
    fs::write(
        archive.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest_json(&config_id, &layer_id, tag))?,
    )?;
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    tar(&archive, out)?;
    eprintln!(
        "xtask: wrote the image {tag} to {} ({:.1} MB). Load it with one of:\n  \
         docker load -i {0}\n  podman load -i {0}\n  kind load image-archive {0}\n  \
         ctr -n k8s.io images import {0}\n\
         then: kubectl apply -f deploy/kubernetes/tapir.yaml",
        out.display(),
        fs::metadata(out)?.len() as f64 / 1e6,
    );
    Ok(())
}

/// `path` (absolute, as the image sees it) inside the staging root.
fn under(rootfs: &Path, path: impl AsRef<Path>) -> PathBuf {
    rootfs.join(path.as_ref().strip_prefix("/").unwrap_or(path.as_ref()))
}

/// The libraries `bin` loads, at the paths the dynamic linker asks for (the interpreter's
/// path as written in the binary, the others as ldd resolved them).
fn linked_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("could not run ldd (Debian's libc-bin)")?;
    if !out.status.success() {
        bail!(
            "ldd {} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let libs = parse_ldd(&String::from_utf8_lossy(&out.stdout))?;
    if !libs.iter().any(|l| l.ends_with("libc.so.6")) {
        bail!("ldd did not list libc.so.6 for {}", bin.display());
    }
    Ok(libs)
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or, for the interpreter and
        // the vDSO, "/lib64/ld-linux-x86-64.so.2 (0x…)" and "linux-vdso.so.1 (0x…)".
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    bail!("ldd: {} not found on this machine", name.trim());
                }
                rest.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Copies the file `src` points to (following symlinks: Debian's /lib64 links into /lib).
fn copy_resolved(src: &Path, dst: &Path) -> Result<()> {
    if let Some(dir) = dst.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(src, dst).with_context(|| format!("copying {} into the image", src.display()))?;
    Ok(())
}

/// A reproducible tar of `dir`'s contents: sorted, owned by root, dated at the epoch.
fn tar(dir: &Path, out: &Path) -> Result<()> {
    status(
        Command::new("tar")
            .args([
                "--create",
                "--format=gnu",
                "--sort=name",
                "--owner=0",
                "--group=0",
            ])
            .args(["--numeric-owner", "--mtime=@0", "--file"])
            .arg(out)
            .arg("--directory")
            .arg(dir)
            .arg("."),
        &format!("writing {}", out.display()),
    )
}

fn sha256(file: &Path) -> Result<String> {
    let out = Command::new("sha256sum")
        .arg(file)
        .output()
        .context("could not run sha256sum")?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().next() {
        Some(hex) if out.status.success() && hex.len() == 64 => Ok(hex.to_string()),
        _ => bail!("sha256sum {} failed", file.display()),
    }
}

/// The image configuration (the OCI image spec's, as `docker save` writes it).
fn config_json(layer_id: &str) -> serde_json::Value {
    json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": [ENTRYPOINT],
            "Cmd": [CMD],
            "Env": ["PATH=/usr/local/bin"],
            "Labels": {
                "org.opencontainers.image.title": "tapir",
                "org.opencontainers.image.description":
                    "eBPF zero-code instrumentation: HTTP exchanges as OpenTelemetry spans and metrics",
                "org.opencontainers.image.version": env!("CARGO_PKG_VERSION"),
            },
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{layer_id}")] },
        "history": [{ "created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image" }],
    })
}

/// `docker save`'s manifest.json: which config and layers make up which tag.
fn manifest_json(config_id: &str, layer_id: &str, tag: &str) -> serde_json::Value {
    json!([{
        "Config": format!("{config_id}.json"),
        "RepoTags": [tag],
        "Layers": [format!("{layer_id}/layer.tar")],
    }])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_paths_to_copy() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f2e)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2d)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f2e)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        let err = parse_ldd("\tlibssl.so.3 => not found\n").unwrap_err();
        assert!(err.to_string().contains("libssl.so.3 not found"), "{err}");
        assert!(parse_ldd("").unwrap().is_empty());
    }

    #[test]
    fn the_manifest_names_the_config_and_the_layer_by_digest() {
        let m = manifest_json("c0ffee", "1a7e2", "tapir:9.9.9");
        assert_eq!(m[0]["Config"], "c0ffee.json");
        assert_eq!(m[0]["RepoTags"][0], "tapir:9.9.9");
        assert_eq!(m[0]["Layers"][0], "1a7e2/layer.tar");
        let c = config_json("1a7e2");
        assert_eq!(c["rootfs"]["diff_ids"][0], "sha256:1a7e2");
        assert_eq!(c["config"]["Entrypoint"][0], ENTRYPOINT);
        assert_eq!(c["config"]["Cmd"][0], "run");
        assert!(default_tag().starts_with("tapir:"));
    }

    #[test]
    fn paths_land_under_the_staging_root() {
        let r = Path::new("/tmp/rootfs");
        assert_eq!(
            under(r, ENTRYPOINT),
            Path::new("/tmp/rootfs/usr/local/bin/tapir")
        );
        assert_eq!(under(r, "lib64/x"), Path::new("/tmp/rootfs/lib64/x"));
    }
}
