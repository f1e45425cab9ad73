//! What the agent itself uses of the node: CPU time, memory, threads. Exported as the
//! OpenTelemetry `process.*` metrics under the agent's resource, so that its cost shows on
//! the same dashboards as the services it observes (OBI and the Prometheus client
//! libraries export their own the same way).

/// One reading of the agent's own usage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// CPU time in user mode, microseconds.
    pub user_us: u64,
    /// CPU time in kernel mode (syscalls, page faults; not the kernel programs, which run in
    /// the observed processes' calls), microseconds.
    pub system_us: u64,
    /// Resident memory, bytes.
    pub resident_bytes: u64,
    /// Virtual memory, bytes.
    pub virtual_bytes: u64,
    pub threads: u64,
}

impl Usage {
    /// Reads the calling process's usage; a part that cannot be read stays 0.
    pub fn read() -> Self {
        let mut usage = Self::default();
        // SAFETY: getrusage writes into the struct it is given; zeroed is a valid rusage.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: a valid pointer to an rusage.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            usage.user_us = micros(ru.ru_utime);
            usage.system_us = micros(ru.ru_stime);
        }
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            if let Some((size, resident)) = parse_statm(&statm) {
                let page = page_size();
                usage.virtual_bytes = size.saturating_mul(page);
                usage.resident_bytes = resident.saturating_mul(page);
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            usage.threads = parse_threads(&status).unwrap_or(0);
        }
        usage
    }
}

fn micros(t: libc::timeval) -> u64 {
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let us = u64::try_from(t.tv_usec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(us)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// `/proc/PID/statm`: total program size and resident set, in pages (the first two of
/// its seven fields).
fn parse_statm(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_ascii_whitespace();
    let size = fields.next()?.parse().ok()?;
    let resident = fields.next()?.parse().ok()?;
    Some((size, resident))
}

/// The `Threads:` line of `/proc/PID/status`.
fn parse_threads(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn statm_fields() {
        assert_eq!(parse_statm("1234 567 89 1 0 300 0\n"), Some((1234, 567)));
        assert_eq!(parse_statm("1234"), None);
        assert_eq!(parse_statm(""), None);
        assert_eq!(parse_statm("x 5 6"), None);
        assert_eq!(parse_statm("-1 5"), None);
        assert_eq!(parse_statm("99999999999999999999999 5"), None);
    }

    #[test]
    fn threads_line() {
        let status = "Name:\ttapir\nState:\tS (sleeping)\nThreads:\t7\nSigQ:\t0/95\n";
        assert_eq!(parse_threads(status), Some(7));
        assert_eq!(parse_threads("Name:\ttapir\n"), None);
        assert_eq!(parse_threads("Threads:\tmany\n"), None);
        // Only the field itself, not a line that merely contains the word.
        assert_eq!(parse_threads("Name:\tThreads: 3\n"), None);
    }

    #[test]
    fn reads_this_process() {
        let before = Usage::read();
        // Some CPU time and memory of our own to see.
        let v: Vec<u64> = (0..2_000_000u64).map(|i| i.wrapping_mul(i)).collect();
        let after = Usage::read();
        assert!(v.iter().any(|&x| x > 1));
        assert!(after.user_us + after.system_us > before.user_us + before.system_us);
        assert!(after.resident_bytes > 1 << 20, "{after:?}");
        assert!(after.virtual_bytes >= after.resident_bytes, "{after:?}");
        assert!(after.threads >= 1, "{after:?}");
    }

    proptest! {
        #[test]
        fn never_panics_on_any_text(text in ".{0,200}") {
            let _ = parse_statm(&text);
            let _ = parse_threads(&text);
        }
    }
}
