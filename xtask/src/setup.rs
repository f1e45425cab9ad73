//! Installs what the build and the tests need, once, and says how to fix what it cannot.
use std::{
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{cargo, status};

const BPF_LINKER_VERSION: &str = "0.13.0";

/// nightly + rust-src + bpf-linker (linked against nightly's own libLLVM).
pub fn ensure_ebpf_toolchain(root: &Path) -> Result<()> {
    let sysroot = nightly_sysroot().context(
        "the nightly Rust toolchain is required to build the eBPF programs; \
         install it with `rustup toolchain install nightly`",
    )?;
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        eprintln!("xtask: installing rust-src for nightly (needed by -Z build-std)");
        status(
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
            "installing rust-src for nightly",
        )?;
    }
    if bpf_linker_works() {
        return Ok(());
    }
    install_bpf_linker(root, &sysroot)
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("could not run rustup")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// bpf-linker loads nightly's libLLVM at run time: check it through `rustup run nightly`,
/// which puts the toolchain's lib directory on the library path, as cargo does.
fn bpf_linker_works() -> bool {
    Command::new("rustup")
        .args(["run", "nightly", "bpf-linker", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn install_bpf_linker(root: &Path, sysroot: &Path) -> Result<()> {
    let libdir = sysroot.join("lib");
    let llvm = fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: bpf-linker needs the nightly toolchain's LLVM",
                libdir.display()
            )
        })?;
    // "libLLVM.so.22.1-rust-1.97.0-nightly" → 22
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split(['.', '-'])
        .next()
        .unwrap_or_default()
        .to_string();
    if major.is_empty() || !major.chars().all(|c| c.is_ascii_digit()) {
        bail!("cannot tell the LLVM version of {llvm}");
    }
    let prefix = root.join("target/llvm-prefix");
    let link = prefix.join("lib/libLLVM.so");
    fs::create_dir_all(prefix.join("lib"))?;
    let _ = fs::remove_file(&link);
    symlink(libdir.join(&llvm), &link)
        .with_context(|| format!("linking {} to {}", link.display(), llvm))?;
    eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} (about a minute)");
    status(
        Command::new(cargo())
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .env("LLVM_PREFIX", &prefix),
        "installing bpf-linker (needs crates.io and a C++ compiler; see TOOLCHAIN notes in README)",
    )?;
    if !bpf_linker_works() {
        bail!("bpf-linker was installed but `rustup run nightly bpf-linker --version` fails");
    }
    Ok(())
}

/// Debian commands the end-to-end tests drive, by the package that provides them.
/// qemu, busybox, cpio, xz and Debian's python3 boot older kernels (tests/kernels/boot.sh).
const DEBIAN_TOOLS: &[(&str, &str)] = &[
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("nginx", "nginx"),
    ("redis-server", "redis-server"),
    ("ip", "iproute2"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("cpio", "cpio"),
    ("xz", "xz-utils"),
    ("python3", "python3"),
];

/// Installs the Debian packages and the Python environment of the end-to-end tests;
/// returns the Python interpreter to run pytest with.
pub fn ensure_test_deps(root: &Path) -> Result<PathBuf> {
    ensure_debian(DEBIAN_TOOLS)?;
    ensure_venv(root, &root.join("tests/requirements.txt"))
}

pub fn ensure_debian(tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(cmd, _)| !have_command(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    status(
        Command::new("apt-get").arg("update").arg("-q"),
        "apt-get update (needs root and Debian's package mirror)",
    )?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("apt-get install {}", missing.join(" ")),
    )?;
    Ok(())
}

fn have_command(cmd: &str) -> bool {
    ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"]
        .iter()
        .any(|d| Path::new(d).join(cmd).exists())
}

/// A virtualenv under target/ with the test requirements; rebuilt when they change.
pub fn ensure_venv(root: &Path, requirements: &Path) -> Result<PathBuf> {
    let venv = root.join("target/e2e-venv");
    let python = venv.join("bin/python");
    let wanted = fs::read_to_string(requirements)
        .with_context(|| format!("reading {}", requirements.display()))?;
    let stamp = venv.join("requirements.installed");
    if python.exists() && fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(python);
    }
    if !python.exists() {
        status(
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
            "creating the test virtualenv (needs python3 with venv)",
        )?;
    }
    eprintln!("xtask: installing Python test requirements");
    status(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(requirements),
        "pip install of the test requirements (needs PyPI)",
    )?;
    fs::write(&stamp, wanted)?;
    Ok(python)
}
