//! Every kernel hook Tapir uses, declared as data: attaching, `tapir doctor` and error
//! messages all read this one table.

/// How a program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// A tracefs tracepoint: (category, name).
    TracePoint(&'static str, &'static str),
}

/// The injection programs, attached outside [`PROBES`]: sk_msg on the sockhash of claimed
/// client sockets, sock_ops on the cgroup v2 root.
pub const SK_MSG_PROGRAM: &str = "tapir_sk_msg";
pub const SOCK_OPS_PROGRAM: &str = "tapir_sock_ops";

/// Every program of the eBPF object, once each: [`PROBES`]' (in their order; syscalls of
/// one shape share a program), the injection ones and the TLS uprobes.
pub fn program_names() -> Vec<&'static str> {
    unique_programs(PROBES)
        .into_iter()
        .chain([SOCK_OPS_PROGRAM, SK_MSG_PROGRAM])
        .chain(crate::loader::tls_programs())
        .collect()
}

/// The programs of `probes`, in their order, each once.
pub fn unique_programs<'a>(probes: impl IntoIterator<Item = &'a Probe>) -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Vec::new();
    for p in probes {
        if !names.contains(&p.program) {
            names.push(p.program);
        }
    }
    names
}

#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Program (function) name in the eBPF object.
    pub program: &'static str,
    pub hook: Hook,
    /// Without a required probe the agent does not start.
    pub required: bool,
    /// What the user loses when this probe cannot be attached.
    pub without: &'static str,
}

const fn tp(
    program: &'static str,
    name: &'static str,
    required: bool,
    without: &'static str,
) -> Probe {
    Probe {
        program,
        hook: Hook::TracePoint("syscalls", name),
        required,
        without,
    }
}

const fn sched(program: &'static str, name: &'static str, without: &'static str) -> Probe {
    Probe {
        program,
        hook: Hook::TracePoint("sched", name),
        required: false,
        without,
    }
}

pub const PROBES: &[Probe] = &[
    tp(
        "tapir_exit_accept4",
        "sys_exit_accept4",
        true,
        "accepted connections are not known to be server-side",
    ),
    tp(
        "tapir_exit_accept",
        "sys_exit_accept",
        false,
        "servers using accept() (not accept4) get their role inferred from traffic",
    ),
    tp(
        "tapir_exit_connect",
        "sys_exit_connect",
        true,
        "outgoing connections are not known to be client-side",
    ),
    tp(
        "tapir_exit_read_buf",
        "sys_exit_read",
        true,
        "requests and responses read with read() are missed",
    ),
    tp(
        "tapir_exit_read_vec",
        "sys_exit_readv",
        false,
        "data read with readv() is missed",
    ),
    tp(
        "tapir_exit_read_buf",
        "sys_exit_recvfrom",
        false,
        "data read with recv()/recvfrom() is missed",
    ),
    tp(
        "tapir_exit_read_vec",
        "sys_exit_recvmsg",
        false,
        "data read with recvmsg() is missed",
    ),
    tp(
        "tapir_exit_write_buf",
        "sys_exit_write",
        true,
        "requests and responses sent with write() are missed",
    ),
    tp(
        "tapir_exit_write_vec",
        "sys_exit_writev",
        false,
        "data sent with writev() (nginx) is missed",
    ),
    tp(
        "tapir_exit_write_buf",
        "sys_exit_sendto",
        false,
        "data sent with send()/sendto() is missed",
    ),
    tp(
        "tapir_exit_write_vec",
        "sys_exit_sendmsg",
        false,
        "data sent with sendmsg() is missed",
    ),
    tp(
        "tapir_exit_sendfile",
        "sys_exit_sendfile64",
        false,
        "bodies sent with sendfile() are not counted; such responses end late",
    ),
    tp(
        "tapir_enter_close",
        "sys_enter_close",
        true,
        "closed connections are noticed late; close-delimited responses end late",
    ),
    tp(
        "tapir_enter_dup2",
        "sys_enter_dup2",
        false,
        "an fd replaced with dup2() may be misclassified",
    ),
    tp(
        "tapir_enter_dup3",
        "sys_enter_dup3",
        false,
        "an fd replaced with dup3() may be misclassified",
    ),
    tp(
        "tapir_enter_close_range",
        "sys_enter_close_range",
        false,
        "fds closed with close_range() may be misclassified",
    ),
    tp(
        "tapir_exit_listen",
        "sys_exit_listen",
        false,
        "with --open-port, processes that start listening after start are not observed",
    ),
    sched(
        "tapir_sched_exec",
        "sched_process_exec",
        "fds closed by exec() may be misclassified",
    ),
    sched(
        "tapir_sched_fork",
        "sched_process_fork",
        "with --pid or --exe, processes forked after start are not observed",
    ),
    sched(
        "tapir_sched_exit",
        "sched_process_exit",
        "state of exited processes is freed late (by LRU eviction)",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_are_unique_and_only_data_syscalls_share_a_program() {
        for (i, p) in PROBES.iter().enumerate() {
            assert!(PROBES[i + 1..].iter().all(|q| q.hook != p.hook), "{p:?}");
        }
        let names = program_names();
        assert_eq!(names.len(), 23);
        for name in &names {
            let hooks: Vec<_> = PROBES
                .iter()
                .filter(|p| p.program == *name)
                .map(|p| match p.hook {
                    Hook::TracePoint(_, tp) => tp,
                })
                .collect();
            let expected: &[&str] = match *name {
                "tapir_exit_read_buf" => &["sys_exit_read", "sys_exit_recvfrom"],
                "tapir_exit_write_buf" => &["sys_exit_write", "sys_exit_sendto"],
                "tapir_exit_read_vec" => &["sys_exit_readv", "sys_exit_recvmsg"],
                "tapir_exit_write_vec" => &["sys_exit_writev", "sys_exit_sendmsg"],
                SK_MSG_PROGRAM | SOCK_OPS_PROGRAM => &[],
                n if crate::loader::tls_programs().any(|t| t == n) => &[],
                _ => {
                    assert_eq!(hooks.len(), 1, "{name}");
                    continue;
                }
            };
            assert_eq!(hooks, expected, "{name}");
        }
    }

    #[test]
    fn every_probe_says_what_is_lost() {
        assert!(PROBES.iter().all(|p| !p.without.is_empty()));
    }
}
