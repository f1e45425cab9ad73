//! Syscall tracepoints are attached through tracefs, which many hosts do not mount at boot.
use std::{ffi::CString, io, path::Path};

use thiserror::Error;

pub const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUGFS_TRACING: &str = "/sys/kernel/debug/tracing";

#[derive(Debug, Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted and mounting it at {TRACEFS} failed: {0} (mount it with `mount -t tracefs tracefs {TRACEFS}`)")]
    Mount(#[source] io::Error),
}

/// What [`ensure_mounted`] found or did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TracefsState {
    AlreadyMounted,
    MountedNow,
}

pub fn is_mounted() -> bool {
    Path::new(TRACEFS).join("events").is_dir() || Path::new(DEBUGFS_TRACING).join("events").is_dir()
}

/// Mounts tracefs at its standard place when no tracefs is visible.
pub fn ensure_mounted() -> Result<TracefsState, TracefsError> {
    if is_mounted() {
        return Ok(TracefsState::AlreadyMounted);
    }
    let c = |s: &str| CString::new(s).map_err(|e| TracefsError::Mount(io::Error::other(e)));
    let (src, target, fstype) = (c("tracefs")?, c(TRACEFS)?, c("tracefs")?);
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::Mount(io::Error::last_os_error()));
    }
    Ok(TracefsState::MountedNow)
}
