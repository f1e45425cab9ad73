//! Embeds the eBPF object built by `cargo xtask build` (nightly, bpfel target).
//!
//! A plain `cargo build`/`cargo test` with stable only must keep working, so when the
//! object is missing an empty one is embedded and `tapir run` says how to build it.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let default_obj =
        manifest_dir.join("../agent-ebpf/target/bpfel-unknown-none/release/tapir-ebpf");
    let obj = env::var_os("TAPIR_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or(default_obj);
    println!("cargo:rerun-if-env-changed=TAPIR_EBPF_OBJECT");
    println!("cargo:rerun-if-changed={}", obj.display());
    let out = PathBuf::from(env::var("OUT_DIR")?).join("tapir.bpf.o");
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
