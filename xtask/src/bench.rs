//! `cargo xtask bench`: baseline vs agent, same run (issue: benchmarks).
use std::path::Path;

use anyhow::{bail, Result};

pub fn run(_root: &Path, _bin: &Path, _quick: bool) -> Result<()> {
    bail!("benchmarks are not implemented yet")
}
