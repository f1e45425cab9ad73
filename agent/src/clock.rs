//! Kernel timestamps are CLOCK_MONOTONIC; exported times are wall-clock (Unix epoch).

/// Converts monotonic nanoseconds to Unix-epoch nanoseconds. The offset is measured once
/// and re-measured on [`MonoToWall::refresh`], so NTP steps are picked up.
#[derive(Debug, Clone, Copy)]
pub struct MonoToWall {
    offset_ns: i128,
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// CLOCK_MONOTONIC now, in the kernel's `bpf_ktime_get_ns` scale.
pub fn monotonic_now_ns() -> u64 {
    now_ns(libc::CLOCK_MONOTONIC) as u64
}

/// CLOCK_MONOTONIC_COARSE in whole seconds: the time at the last tick (a few ms behind),
/// read from the vDSO without a TSC read; for once-a-second bookkeeping on hot paths.
pub fn coarse_monotonic_secs() -> u64 {
    (now_ns(libc::CLOCK_MONOTONIC_COARSE) / 1_000_000_000) as u64
}

impl MonoToWall {
    pub fn new() -> Self {
        let mut c = Self { offset_ns: 0 };
        c.refresh();
        c
    }

    pub fn refresh(&mut self) {
        // Bracket the realtime read between two monotonic reads to halve the error.
        let m1 = now_ns(libc::CLOCK_MONOTONIC);
        let r = now_ns(libc::CLOCK_REALTIME);
        let m2 = now_ns(libc::CLOCK_MONOTONIC);
        self.offset_ns = r - (m1 + m2) / 2;
    }

    pub fn to_unix_ns(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.offset_ns).clamp(0, u64::MAX as i128) as u64
    }
}

impl Default for MonoToWall {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_now_to_now() {
        let c = MonoToWall::new();
        let wall = c.to_unix_ns(monotonic_now_ns()) as i128;
        let real = now_ns(libc::CLOCK_REALTIME);
        assert!(
            (wall - real).abs() < 50_000_000,
            "off by {} ns",
            wall - real
        );
    }

    #[test]
    fn never_underflows() {
        let c = MonoToWall { offset_ns: -10 };
        assert_eq!(c.to_unix_ns(5), 0);
    }
}
