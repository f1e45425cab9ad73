//! `cargo xtask build | run | test | bench`: everything a newcomer needs, installed on demand.
use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod image;
mod setup;

#[derive(Parser)]
#[command(about = "Tapir's build, run, test and bench tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF object (nightly, bpfel) and the release `tapir` binary that embeds it.
    Build,
    /// Build, then run `tapir` as root with the given arguments: `cargo xtask run -- doctor`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build, install test dependencies, run unit tests and the root end-to-end tests.
    Test {
        /// Only run end-to-end tests whose name matches (pytest -k expression).
        #[arg(short = 'k')]
        filter: Option<String>,
        /// Skip the unit tests.
        #[arg(long)]
        e2e_only: bool,
    },
    /// Build, then write the agent's container image as a `docker save` archive (for
    /// `docker load`, `podman load`, `kind load image-archive`, `ctr images import`), as
    /// deploy/kubernetes/tapir.yaml runs it. Needs no container engine.
    Image {
        /// The image's name and tag.
        #[arg(long, default_value_t = image::default_tag())]
        tag: String,
        /// Where to write the archive (default: target/tapir-image.tar).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Benchmarks: overhead on observed services and the agent's own cost.
    Bench {
        /// A smoke run: two short groups of each benchmark (about 6 minutes).
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let root = project_root();
    match cli.cmd {
        Cmd::Build => build(&root).map(|_| ()),
        Cmd::Run { args } => {
            let bin = build(&root)?;
            run_tapir(&bin, &args)
        }
        Cmd::Test { filter, e2e_only } => test(&root, filter.as_deref(), e2e_only),
        Cmd::Image { tag, out } => {
            let bin = build(&root)?;
            let out = out.unwrap_or_else(|| image::default_archive(&root));
            image::write(&root, &bin, &tag, &out)
        }
        Cmd::Bench { quick } => {
            let bin = build(&root)?;
            bench::run(&root, &bin, quick)
        }
    }
}

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn ebpf_object(root: &Path) -> PathBuf {
    root.join("agent-ebpf/target/bpfel-unknown-none/release/tapir-ebpf")
}

/// The `compat` build of the eBPF programs (kernels without bpf_loop), in a target
/// directory of its own so that the two builds do not overwrite each other.
pub fn ebpf_compat_object(root: &Path) -> PathBuf {
    root.join("agent-ebpf/target/compat/bpfel-unknown-none/release/tapir-ebpf")
}

/// Builds everything; returns the path of the release binary.
fn build(root: &Path) -> Result<PathBuf> {
    setup::ensure_ebpf_toolchain(root)?;
    for (features, target_dir, what) in [
        (
            "",
            "target",
            "building the eBPF programs (nightly, bpfel-unknown-none)",
        ),
        (
            "compat",
            "target/compat",
            "building the eBPF programs for kernels without bpf_loop (--features compat)",
        ),
    ] {
        status(
            Command::new("rustup")
                .args(["run", "nightly", "cargo", "build", "--release"])
                .args(["-Z", "build-std=core", "--target", "bpfel-unknown-none"])
                .args(["--features", features, "--target-dir", target_dir])
                .current_dir(root.join("agent-ebpf"))
                // The outer `cargo xtask` sets these for the stable toolchain; the nightly
                // build must not inherit them.
                .env_remove("RUSTC")
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("CARGO")
                .env_remove("CARGO_TARGET_DIR"),
            what,
        )?;
    }
    for obj in [ebpf_object(root), ebpf_compat_object(root)] {
        if !obj.exists() {
            bail!("the eBPF build finished but {} is missing", obj.display());
        }
    }
    status(
        Command::new(cargo())
            .args(["build", "--release", "-p", "tapir"])
            .env("TAPIR_EBPF_OBJECT", ebpf_object(root))
            .env("TAPIR_EBPF_COMPAT_OBJECT", ebpf_compat_object(root))
            .env_remove("CARGO_TARGET_DIR")
            .current_dir(root),
        "building the tapir binary",
    )?;
    Ok(root.join("target/release/tapir"))
}

fn run_tapir(bin: &Path, args: &[OsString]) -> Result<()> {
    let mut cmd = if is_root() {
        Command::new(bin)
    } else {
        eprintln!("xtask: tapir needs root to load eBPF programs; running it with sudo");
        let mut c = Command::new("sudo");
        c.arg("-E").arg(bin);
        c
    };
    cmd.args(args);
    let st = cmd
        .status()
        .with_context(|| format!("could not start {}", bin.display()))?;
    if !st.success() {
        bail!("tapir exited with {st}");
    }
    Ok(())
}

fn test(root: &Path, filter: Option<&str>, e2e_only: bool) -> Result<()> {
    let bin = build(root)?;
    if !e2e_only {
        status(
            Command::new(cargo())
                .args(["test", "--workspace", "--release"])
                .env("TAPIR_EBPF_OBJECT", ebpf_object(root))
                .env("TAPIR_EBPF_COMPAT_OBJECT", ebpf_compat_object(root))
                .env_remove("CARGO_TARGET_DIR")
                .current_dir(root),
            "unit tests",
        )?;
    }
    let python = setup::ensure_test_deps(root)?;
    if !is_root() {
        if env::var("CI").is_ok_and(|v| v == "true") {
            bail!("the end-to-end tests must run as root under CI");
        }
        eprintln!("xtask: not root: skipping the end-to-end tests (they load eBPF programs)");
        return Ok(());
    }
    // The deployment tests (tests/test_deploy.py) run the agent from its image.
    let image = image::default_archive(root);
    image::write(root, &bin, &image::default_tag(), &image)?;
    let mut cmd = Command::new(python);
    cmd.args(["-m", "pytest", "-v", "-p", "no:cacheprovider", "tests"])
        .env("TAPIR_BIN", &bin)
        .env("TAPIR_IMAGE", &image)
        .current_dir(root);
    if let Some(k) = filter {
        cmd.args(["-k", k]);
    }
    status(&mut cmd, "end-to-end tests")
}

pub fn cargo() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn status(cmd: &mut Command, what: &str) -> Result<()> {
    let st = cmd
        .status()
        .with_context(|| format!("{what}: could not start {:?}", cmd.get_program()))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}
