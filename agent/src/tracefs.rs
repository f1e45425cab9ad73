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

/// The byte offset of `field` in the records of tracepoint `category/event`, from its
/// format file (None when the file or the field is missing).
pub fn field_offset(category: &str, event: &str, field: &str) -> Option<u32> {
    [TRACEFS, DEBUGFS_TRACING].iter().find_map(|root| {
        let path = Path::new(root)
            .join("events")
            .join(category)
            .join(event)
            .join("format");
        parse_field_offset(&std::fs::read_to_string(path).ok()?, field)
    })
}

/// Finds `field:<type> <field>;\toffset:N;` in a tracepoint format file.
fn parse_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()?;
        // Arrays are declared as `char name[16]`.
        if name.split('[').next()? != field {
            return None;
        }
        rest.trim()
            .strip_prefix("offset:")?
            .split(';')
            .next()?
            .trim()
            .parse()
            .ok()
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    const FORK_6_18: &str = "name: sched_process_fork
ID: 366
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] child_comm;\toffset:16;\tsize:4;\tsigned:0;
\tfield:pid_t child_pid;\toffset:20;\tsize:4;\tsigned:1;

print fmt: \"comm=%s pid=%d child_comm=%s child_pid=%d\", __get_str(parent_comm)
";

    const FORK_5_15: &str = "format:
\tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:char child_comm[16];\toffset:28;\tsize:16;\tsigned:0;
\tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;
";

    #[test]
    fn field_offsets_come_from_the_format_file() {
        assert_eq!(parse_field_offset(FORK_6_18, "child_pid"), Some(20));
        assert_eq!(parse_field_offset(FORK_6_18, "parent_pid"), Some(12));
        assert_eq!(parse_field_offset(FORK_6_18, "child_comm"), Some(16));
        assert_eq!(parse_field_offset(FORK_5_15, "child_pid"), Some(44));
        assert_eq!(parse_field_offset(FORK_5_15, "child_comm"), Some(28));
        // Not a prefix match, not a missing field, not garbage.
        assert_eq!(parse_field_offset(FORK_6_18, "pid"), None);
        assert_eq!(parse_field_offset(FORK_6_18, "child"), None);
        assert_eq!(parse_field_offset("field:int x;\toffset:abc;", "x"), None);
        assert_eq!(parse_field_offset("", "x"), None);
    }
}
