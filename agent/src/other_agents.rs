//! Another Tapir agent on the same host: a second DaemonSet pod during a rollout with
//! `maxSurge`, or a `tapir run` started by hand next to the DaemonSet's. Both would report
//! every exchange they observe (duplicate spans and metrics), and only the first to claim
//! a connection injects `traceparent` into it. Found by the kernel programs the other
//! agent holds (all named `tapir_*`), which the kernel lists whatever pid or mount
//! namespace that agent runs in.
use std::collections::HashSet;

use aya::{programs::loaded_programs, Ebpf};

/// What every one of Tapir's kernel programs is called (the kernel keeps 15 bytes of it).
const PREFIX: &str = "tapir_";

/// The kernel's ids of the programs `ebpf` loaded.
pub fn own_programs(ebpf: &Ebpf) -> HashSet<u32> {
    ebpf.programs()
        .filter_map(|(_, p)| p.info().ok())
        .map(|i| i.id())
        .collect()
}

/// Tapir programs loaded on this host that are not among `own`: their count. An agent that
/// has just exited can leave some for a moment (the kernel frees its maps, and the
/// programs they hold, from a work queue): with `settle` (`tapir doctor`, often run right
/// after an agent stops), counted again a few times before answering. An agent checking
/// once its own programs are loaded does not wait: a stopped agent is gone by then.
pub fn foreign_programs(own: &HashSet<u32>, settle: bool) -> Result<usize, String> {
    let mut n = count_foreign(own)?;
    for _ in 0..3 {
        if n == 0 || !settle {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        n = count_foreign(own)?;
    }
    Ok(n)
}

fn count_foreign(own: &HashSet<u32>) -> Result<usize, String> {
    let mut foreign = 0;
    for info in loaded_programs() {
        let info = info.map_err(|e| format!("listing the host's BPF programs: {e}"))?;
        if is_foreign(info.name_as_str(), info.id(), own) {
            foreign += 1;
        }
    }
    Ok(foreign)
}

fn is_foreign(name: Option<&str>, id: u32, own: &HashSet<u32>) -> bool {
    name.is_some_and(|n| n.starts_with(PREFIX)) && !own.contains(&id)
}

/// The warning `run` and `watch` print when `n` > 0.
pub fn describe(n: usize) -> String {
    format!(
        "another Tapir agent is running on this host ({n} Tapir kernel programs not this \
         agent's are loaded): \
         each agent reports every exchange it observes (two `tapir run`s export duplicate \
         spans and metrics), and only the first to claim a connection injects traceparent \
         into it; stop one of them, or give them disjoint --pid/--exe/--open-port"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tapir_programs_of_others_count() {
        let own = HashSet::from([7, 8]);
        assert!(is_foreign(Some("tapir_exit_read"), 9, &own));
        assert!(!is_foreign(Some("tapir_exit_read"), 7, &own), "our own");
        assert!(!is_foreign(Some("sd_fw_ingress"), 9, &own), "systemd's");
        assert!(!is_foreign(Some("tapi"), 9, &own));
        assert!(!is_foreign(None, 9, &own), "a kernel without program names");
        assert!(describe(3).contains("(3 Tapir kernel programs"));
    }
}
