//! `tapir doctor`: what this host's kernel offers, probed for real (by loading tiny
//! programs and maps, not by comparing version numbers), and what stops working without it.
use std::{fmt::Write as _, fs, path::Path};

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{is_helper_supported, is_map_supported, is_program_supported, BpfHelper},
};

use crate::{loader, tracefs};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Missing,
    /// Could not be determined (e.g. the probe itself failed).
    Unknown,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Missing => "missing",
            Status::Unknown => "unknown",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Check {
    pub feature: String,
    pub status: Status,
    /// What was found (version, path, error).
    pub detail: String,
    /// What stops working without it.
    pub without: &'static str,
    /// Tapir cannot capture anything without a core feature.
    pub core: bool,
}

/// One kernel capability to probe.
#[derive(Debug, Clone, Copy)]
enum Probe {
    Program(ProgramType),
    Map(MapType),
    Helper(ProgramType, BpfHelper),
}

/// (feature, probe, core, what stops working without it)
const KERNEL_FEATURES: &[(&str, Probe, bool, &str)] = &[
    (
        "program type: tracepoint",
        Probe::Program(ProgramType::TracePoint),
        true,
        "nothing can be captured (syscall tracepoints)",
    ),
    (
        "program type: raw_tracepoint",
        Probe::Program(ProgramType::RawTracePoint),
        false,
        "nothing today (reserved for cheaper syscall hooks)",
    ),
    (
        "program type: kprobe/uprobe",
        Probe::Program(ProgramType::KProbe),
        false,
        "nothing today (reserved for reading TLS inside libssl; TLS connections are counted, not read)",
    ),
    (
        "program type: sock_ops",
        Probe::Program(ProgramType::SockOps),
        false,
        "traceparent injection into outgoing requests",
    ),
    (
        "program type: sk_msg",
        Probe::Program(ProgramType::SkMsg),
        false,
        "traceparent injection into outgoing requests",
    ),
    (
        "map: ring buffer",
        Probe::Map(MapType::RingBuf),
        true,
        "no events reach the agent",
    ),
    (
        "map: LRU hash",
        Probe::Map(MapType::LruHash),
        true,
        "connections cannot be tracked",
    ),
    (
        "map: per-CPU array",
        Probe::Map(MapType::PerCpuArray),
        true,
        "no scratch space for payload copies",
    ),
    (
        "map: sockhash",
        Probe::Map(MapType::SockHash),
        false,
        "traceparent injection into outgoing requests",
    ),
    (
        "helper: bpf_probe_read_user",
        Probe::Helper(ProgramType::TracePoint, BpfHelper::BPF_FUNC_probe_read_user),
        true,
        "payloads cannot be copied",
    ),
    (
        "helper: bpf_ringbuf_output",
        Probe::Helper(ProgramType::TracePoint, BpfHelper::BPF_FUNC_ringbuf_output),
        true,
        "no events reach the agent",
    ),
    (
        "helper: bpf_loop",
        Probe::Helper(ProgramType::TracePoint, BpfHelper::BPF_FUNC_loop),
        false,
        COMPAT_USED,
    ),
    (
        "helper: bpf_task_pt_regs",
        Probe::Helper(ProgramType::TracePoint, BpfHelper::BPF_FUNC_task_pt_regs),
        false,
        COMPAT_USED,
    ),
    (
        "helper: bpf_msg_push_data",
        Probe::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_push_data),
        false,
        "traceparent injection into outgoing requests",
    ),
];

/// What a kernel without a helper of the standard programs gets (see loader::Programs; a
/// test ties the size to agent_common::COMPAT_SCAN_BYTES).
const COMPAT_USED: &str =
    "the compat programs are used: the kernel scans a head's first 2 KiB for its traceparent";

fn run_probe(p: Probe) -> (Status, String) {
    let r = match p {
        Probe::Program(t) => is_program_supported(t).map_err(|e| e.to_string()),
        Probe::Map(t) => is_map_supported(t).map_err(|e| e.to_string()),
        Probe::Helper(t, h) => is_helper_supported(t, h).map_err(|e| e.to_string()),
    };
    match r {
        Ok(true) => (Status::Ok, "loaded a test program/map".into()),
        Ok(false) => (Status::Missing, "rejected by the kernel".into()),
        Err(e) => (Status::Unknown, e),
    }
}

/// Probes the running host. May mount tracefs (and says so).
pub fn check_host() -> Vec<Check> {
    let mut checks = Vec::new();
    let privileged = privileges();
    checks.push(Check {
        feature: "privileges (root or CAP_BPF+CAP_PERFMON+CAP_SYS_ADMIN)".into(),
        status: if privileged.0 {
            Status::Ok
        } else {
            Status::Missing
        },
        detail: privileged.1,
        without: "nothing can be loaded: run tapir as root",
        core: true,
    });
    checks.push(Check {
        feature: "kernel".into(),
        status: Status::Ok,
        detail: kernel_release(),
        without: "",
        core: false,
    });
    let vulnerability = |name: &str| {
        fs::read_to_string(format!("/sys/devices/system/cpu/vulnerabilities/{name}")).ok()
    };
    checks.push(Check {
        feature: "CPU return mitigations".into(),
        status: Status::Ok,
        detail: return_mitigations(
            vulnerability("spec_rstack_overflow").as_deref(),
            vulnerability("retbleed").as_deref(),
        ),
        without: "",
        core: false,
    });
    let sockops_pid = loader::sockops_knows_pid();
    checks.push(Check {
        feature: "sock_ops knows the connecting process".into(),
        status: if sockops_pid {
            Status::Ok
        } else {
            Status::Missing
        },
        detail: if sockops_pid {
            "Linux 6.10 or later".into()
        } else {
            "needs Linux 6.10 (bpf_get_current_pid_tgid in sock_ops)".into()
        },
        without: "connections of processes left out by --exe/--pid/--exclude-exe are still \
                  claimed for injection (~5 µs each), though never injected into",
        core: false,
    });
    let btf_path = Path::new("/sys/kernel/btf/vmlinux");
    let (status, detail) = if !btf_path.exists() {
        (
            Status::Missing,
            "no /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF)".to_string(),
        )
    } else {
        match loader::kernel_offsets() {
            Ok(o) => (
                Status::Ok,
                format!(
                    "struct offsets resolved (sock.sk_protocol at {})",
                    o.sock_protocol
                ),
            ),
            Err(e) => (Status::Missing, format!("{e}: {}", error_chain(&e))),
        }
    };
    checks.push(Check {
        feature: "kernel BTF".into(),
        status,
        detail,
        without: "sockets cannot be found from file descriptors",
        core: true,
    });
    let (status, detail) = match tracefs::ensure_mounted() {
        Ok(tracefs::TracefsState::AlreadyMounted) => (Status::Ok, "mounted".to_string()),
        Ok(tracefs::TracefsState::MountedNow) => (
            Status::Ok,
            format!("was not mounted: mounted it at {}", tracefs::TRACEFS),
        ),
        Err(e) => (Status::Missing, e.to_string()),
    };
    checks.push(Check {
        feature: "tracefs".into(),
        status,
        detail,
        without: "syscall tracepoints cannot be attached",
        core: true,
    });
    let sys_tp = Path::new(tracefs::TRACEFS).join("events/syscalls/sys_enter_read");
    checks.push(Check {
        feature: "syscall tracepoints".into(),
        status: if sys_tp.exists() {
            Status::Ok
        } else {
            Status::Missing
        },
        detail: if sys_tp.exists() {
            "events/syscalls present".into()
        } else {
            "no events/syscalls (CONFIG_FTRACE_SYSCALLS)".into()
        },
        without: "nothing can be captured",
        core: true,
    });
    for (feature, probe, core, without) in KERNEL_FEATURES {
        let (status, detail) = run_probe(*probe);
        checks.push(Check {
            feature: (*feature).into(),
            status,
            detail,
            without,
            core: *core,
        });
    }
    let uprobes = Path::new(tracefs::TRACEFS).join("uprobe_events").exists();
    checks.push(Check {
        feature: "uprobe events".into(),
        status: if uprobes { Status::Ok } else { Status::Missing },
        detail: if uprobes {
            "uprobe_events present".into()
        } else {
            "no uprobe_events (CONFIG_UPROBE_EVENTS)".into()
        },
        without: "HTTPS is not read (TLS connections are counted, not read)",
        core: false,
    });
    let libs = crate::tls_libs::find(&mut std::collections::HashSet::new());
    checks.push(Check {
        feature: "OpenSSL to probe (libssl, Node.js)".into(),
        status: if libs.is_empty() {
            Status::Missing
        } else {
            Status::Ok
        },
        detail: if libs.is_empty() {
            "no libssl.so mapped by a process or at the usual paths, no program exporting OpenSSL"
                .into()
        } else {
            libs.iter()
                .map(|l| match &l.points {
                    Ok(_) => l.path.display().to_string(),
                    Err(e) => format!("{} (not probed: {e})", l.path.display()),
                })
                .collect::<Vec<_>>()
                .join(", ")
        },
        without: "HTTPS is not read until a libssl is there when Tapir starts",
        core: false,
    });
    let (status, detail) = match crate::rearm::pidfd_getfd_works() {
        Ok(()) => (
            Status::Ok,
            "copied a descriptor of this process".to_string(),
        ),
        Err(e) => (Status::Missing, e.to_string()),
    };
    checks.push(Check {
        feature: "pidfd_getfd".into(),
        status,
        detail,
        without: "only the first request of a kept-alive connection gets a traceparent",
        core: false,
    });
    let cg = crate::cgroup::host_cgroup_root();
    checks.push(Check {
        feature: "cgroup v2".into(),
        // A subtree only (a cgroup namespace of its own): injection misses other processes.
        status: match &cg {
            Ok(root) if root.is_hierarchy_root => Status::Ok,
            _ => Status::Missing,
        },
        detail: match cg {
            Ok(root) => root.describe(),
            Err(e) => e,
        },
        without: "traceparent injection (sock_ops attaches to a cgroup v2)",
        core: false,
    });
    // Switched on and straight off again: the statistics only cost while someone holds them.
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime);
    checks.push(Check {
        feature: "BPF run-time statistics".into(),
        status: if stats.is_ok() {
            Status::Ok
        } else {
            Status::Missing
        },
        detail: match stats {
            Ok(_) => "BPF_ENABLE_STATS".into(),
            Err(e) => e.to_string(),
        },
        without: "--ebpf-stats (what each kernel program costs) needs `sysctl -w kernel.bpf_stats_enabled=1`",
        core: false,
    });
    // Before the verification below loads Tapir's programs in this process.
    let others = crate::other_agents::foreign_programs(&Default::default(), true);
    checks.push(Check {
        feature: "no other Tapir agent running".into(),
        status: match others {
            Ok(0) => Status::Ok,
            Ok(_) => Status::Missing,
            Err(_) => Status::Unknown,
        },
        detail: match others {
            Ok(0) => "no other agent's kernel programs are loaded".into(),
            Ok(n) => format!("{n} kernel programs of other Tapir agents are loaded"),
            Err(e) => e,
        },
        without: "with two agents, each reports every exchange it observes (duplicates), and \
                  only the first to claim a connection injects into it",
        core: false,
    });
    // The test programs above are small; the real ones can still be refused (stack size,
    // verifier complexity): load them all, as `tapir run` does, and attach none.
    let verified = if loader::has_embedded_object() {
        loader::verify_programs()
    } else {
        Err("binary built without them: use `cargo xtask build`".into())
    };
    checks.push(Check {
        feature: "embedded eBPF programs".into(),
        status: if verified.is_ok() {
            Status::Ok
        } else {
            Status::Missing
        },
        detail: match verified {
            Ok(n) => format!(
                "all {n} pass this kernel's verifier ({})",
                loader::Programs::for_this_kernel().describe()
            ),
            Err(e) => summarize(&e),
        },
        without: "nothing can be loaded",
        core: true,
    });
    checks
}

/// A (verifier) message for a table cell: its first line (what failed) and its last two
/// (the verifier's verdict and totals), the instruction trace between them left out.
fn summarize(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    match lines.as_slice() {
        [] => String::new(),
        [first, .., a, b] if lines.len() > 3 => format!("{first} | … | {a} | {b}"),
        _ => lines.join(" | "),
    }
}

/// True when every core feature is present: the agent can capture.
pub fn core_ok(checks: &[Check]) -> bool {
    checks.iter().all(|c| !c.core || c.status == Status::Ok)
}

pub fn render(checks: &[Check]) -> String {
    let w = checks
        .iter()
        .map(|c| c.feature.len())
        .max()
        .unwrap_or(7)
        .max(7);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<w$}  {:<7}  DETAIL / WITHOUT IT",
        "FEATURE", "STATUS"
    );
    for c in checks {
        let _ = writeln!(
            out,
            "{:<w$}  {:<7}  {}",
            c.feature,
            c.status.label(),
            c.detail
        );
        if c.status != Status::Ok && !c.without.is_empty() {
            let tag = if c.core { "core" } else { "optional" };
            let _ = writeln!(
                out,
                "{:<w$}  {:<7}  without it ({tag}): {}",
                "", "", c.without
            );
        }
    }
    let verdict = if core_ok(checks) {
        "core capture works on this host"
    } else {
        "core capture CANNOT work on this host: fix the 'core' lines above"
    };
    let _ = writeln!(out, "\n{verdict}");
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut src = e.source();
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    parts.join(": ")
}

/// What the CPU's return-stack mitigations mean for Tapir's cost. Under AMD's SRSO "Safe
/// RET" or a retbleed return thunk every kernel return takes a detour: the kernel programs
/// cost about twice what they do on an unmitigated host (BENCHMARKS.md, finding 24).
fn return_mitigations(srso: Option<&str>, retbleed: Option<&str>) -> String {
    let (srso, retbleed) = (srso.map(str::trim), retbleed.map(str::trim));
    let costly = [("SRSO", srso), ("retbleed", retbleed)]
        .into_iter()
        .find_map(|(name, state)| {
            let state = state?;
            let thunked = ["Safe RET", "return thunk"]
                .iter()
                .any(|m| state.contains(m));
            thunked.then(|| format!("{name}: {state}"))
        });
    match (costly, srso.or(retbleed)) {
        (Some(found), _) => format!(
            "{found}: every kernel return takes a detour, so the kernel programs cost about \
             twice as much (~0.2 µs per hooked syscall before they run, ~0.15 µs per read of \
             the process's memory); --ebpf-stats shows what they cost here"
        ),
        (None, Some(_)) => "no return-thunk mitigation: kernel programs run at full speed".into(),
        (None, None) => "not reported by this kernel".into(),
    }
}

/// The running kernel's release ("6.18.44-…"), or "unknown".
pub(crate) fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// (privileged, detail). Root, or the capabilities the loader needs.
fn privileges() -> (bool, String) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return (true, "running as root".into());
    }
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = cap_eff(&status).unwrap_or(0);
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let has = |c: u32| caps & (1u64 << c) != 0;
    let ok = has(CAP_SYS_ADMIN) && has(CAP_PERFMON) && has(CAP_BPF);
    (ok, format!("not root; effective capabilities {caps:#x}"))
}

fn cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compat_texts_name_the_compat_programs_limit() {
        let kib = agent_common::COMPAT_SCAN_BYTES / 1024;
        assert!(
            COMPAT_USED.contains(&format!("first {kib} KiB")),
            "{COMPAT_USED}"
        );
        for p in [
            loader::Programs::Compat { forced: false },
            loader::Programs::Compat { forced: true },
        ] {
            assert!(
                p.describe().ends_with(&format!("up to {kib} KiB")),
                "{}",
                p.describe()
            );
        }
    }

    #[test]
    fn verifier_messages_keep_their_first_and_last_lines() {
        assert_eq!(summarize(""), "");
        assert_eq!(summarize("one"), "one");
        assert_eq!(summarize("a\n\nb\nc"), "a | b | c");
        assert_eq!(
            summarize(
                "program x refused: denied\n0: r1 = 0\n1: exit\nstack too large\nprocessed 9 insns"
            ),
            "program x refused: denied | … | stack too large | processed 9 insns"
        );
    }

    fn check(feature: &str, status: Status, core: bool) -> Check {
        Check {
            feature: feature.into(),
            status,
            detail: "d".into(),
            without: "it breaks",
            core,
        }
    }

    #[test]
    fn missing_core_feature_fails_the_verdict() {
        let checks = vec![
            check("a", Status::Ok, true),
            check("ring buffer", Status::Missing, true),
        ];
        assert!(!core_ok(&checks));
        let table = render(&checks);
        assert!(table.contains("ring buffer"));
        assert!(table.contains("missing"));
        assert!(table.contains("without it (core): it breaks"));
        assert!(table.contains("CANNOT"));
    }

    #[test]
    fn unknown_core_feature_fails_the_verdict() {
        assert!(!core_ok(&[check("x", Status::Unknown, true)]));
    }

    #[test]
    fn missing_optional_feature_keeps_core_working() {
        let checks = vec![
            check("a", Status::Ok, true),
            check("sk_msg", Status::Missing, false),
        ];
        assert!(core_ok(&checks));
        assert!(render(&checks).contains("without it (optional)"));
    }

    #[test]
    fn return_mitigations_say_what_they_cost() {
        let safe_ret = return_mitigations(
            Some("Vulnerable: Safe RET, no microcode\n"),
            Some("Not affected\n"),
        );
        assert!(
            safe_ret.starts_with("SRSO: Vulnerable: Safe RET, no microcode: every kernel return"),
            "{safe_ret}"
        );
        let thunk = return_mitigations(None, Some("Mitigation: untrained return thunk; SMT off"));
        assert!(
            thunk.starts_with("retbleed: Mitigation: untrained return thunk"),
            "{thunk}"
        );
        assert_eq!(
            return_mitigations(Some("Not affected"), Some("Not affected")),
            "no return-thunk mitigation: kernel programs run at full speed"
        );
        assert_eq!(
            return_mitigations(None, None),
            "not reported by this kernel"
        );
    }

    #[test]
    fn parses_effective_capabilities() {
        assert_eq!(
            cap_eff("Name:\tx\nCapEff:\t000001ffffffffff\n"),
            Some(0x1ff_ffff_ffff)
        );
        assert_eq!(cap_eff("CapEff: zz"), None);
    }
}
