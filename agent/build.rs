//! Embeds the eBPF objects built by `cargo xtask build` (nightly, bpfel target): the
//! programs for kernels with `bpf_loop`, and the `compat` build for older ones.
//!
//! A plain `cargo build`/`cargo test` with stable only must keep working, so when an
//! object is missing an empty one is embedded and `tapir run` says how to build it.
use std::{env, fs, path::PathBuf};

fn embed(var: &str, default: PathBuf, out_name: &str) -> anyhow::Result<()> {
    let obj = env::var_os(var).map(PathBuf::from).unwrap_or(default);
    println!("cargo:rerun-if-env-changed={var}");
    println!("cargo:rerun-if-changed={}", obj.display());
    let out = PathBuf::from(env::var("OUT_DIR")?).join(out_name);
    match fs::read(&obj) {
        Ok(bytes) => fs::write(&out, bytes)?,
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found: embedding none (run `cargo xtask build`)",
                obj.display()
            );
            fs::write(&out, [])?;
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let ebpf = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../agent-ebpf/target");
    embed(
        "TAPIR_EBPF_OBJECT",
        ebpf.join("bpfel-unknown-none/release/tapir-ebpf"),
        "tapir.bpf.o",
    )?;
    embed(
        "TAPIR_EBPF_COMPAT_OBJECT",
        ebpf.join("compat/bpfel-unknown-none/release/tapir-ebpf"),
        "tapir-compat.bpf.o",
    )
}
