//! Loops over data. Kernels from 5.17 have `bpf_loop`: the verifier checks its callback
//! once, however many steps run. The `compat` build (for 5.10 to 5.16, chosen by the
//! loader when the kernel lacks `bpf_loop` or `bpf_task_pt_regs`) runs the same step functions in a bounded loop
//! inside a global function of its own: the verifier checks a global function once, on
//! its own, instead of once per caller state, and walks its loop step by step, so its step
//! limits are lower.

/// A loop step: `(index, context) -> 0 to go on, 1 to stop`, as `bpf_loop` calls it. Its
/// context points to one u64 (the byte count it scans, or unused).
pub type Step = extern "C" fn(u64, *mut core::ffi::c_void) -> i64;

/// `repeat!(NAME, step, compat_max, steps, arg)`: runs `step(0, &arg)`, `step(1, &arg)`, …
/// for `steps` steps or until one returns non-zero. The compat build runs at most
/// `compat_max` steps, in the global function NAME.
macro_rules! repeat {
    ($name:ident, $step:path, $compat_max:expr, $steps:expr, $arg:expr) => {{
        let steps: u32 = $steps;
        let arg: u64 = $arg;
        // Both builds type-check the step and the limit.
        let _: ($crate::looping::Step, u64) = ($step, $compat_max as u64);
        #[cfg(not(feature = "compat"))]
        {
            let step: $crate::looping::Step = $step;
            let mut arg = arg;
            // SAFETY: `step` and the context (one u64 on this stack) follow bpf_loop's
            // contract.
            unsafe {
                aya_ebpf::helpers::generated::bpf_loop(
                    steps,
                    step as *mut core::ffi::c_void,
                    &mut arg as *mut u64 as *mut core::ffi::c_void,
                    0,
                )
            };
        }
        #[cfg(feature = "compat")]
        {
            #[unsafe(no_mangle)]
            #[inline(never)]
            pub extern "C" fn $name(steps: u64, arg: u64) -> i64 {
                let max: u64 = $compat_max as u64;
                let n = if steps < max { steps } else { max };
                // Kept even when the step ignores it: the verifier checks that a global
                // function's caller passes every argument it declares.
                let mut arg = core::hint::black_box(arg);
                let mut i = 0u64;
                while i < n {
                    if $step(i, &mut arg as *mut u64 as *mut core::ffi::c_void) != 0 {
                        break;
                    }
                    i += 1;
                }
                0
            }
            $name(steps as u64, arg);
        }
    }};
}
pub(crate) use repeat;
