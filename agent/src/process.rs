//! What we know about an observed process, from /proc.
use std::{fs, path::Path, sync::Arc};

use lru::LruCache;

use crate::container::ContainerIds;

/// Identity of an observed process, read once per pid.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ProcessInfo {
    pub pid: u32,
    /// Executable file name (`python3.11`), from /proc/PID/exe, else comm.
    pub exe_name: String,
    /// Full executable path, when readable.
    pub exe_path: Option<String>,
    /// The process's own `OTEL_SERVICE_NAME`, if set in its environment.
    pub otel_service_name: Option<String>,
    /// The process's own `OTEL_RESOURCE_ATTRIBUTES`, unparsed.
    pub otel_resource_attributes: Option<String>,
    /// Its container and pod, from its cgroup.
    pub container: ContainerIds,
}

impl ProcessInfo {
    /// Reads /proc/PID (or another procfs root, for tests). A process that already exited
    /// yields what could be read (at least the pid).
    pub fn read(proc_root: &Path, pid: u32) -> Self {
        let dir = proc_root.join(pid.to_string());
        let exe_path = fs::read_link(dir.join("exe")).ok().map(|p| {
            p.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string()
        });
        let exe_name = exe_path
            .as_deref()
            .and_then(|p| Path::new(p).file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .or_else(|| {
                fs::read_to_string(dir.join("comm"))
                    .ok()
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_default();
        let environ = fs::read(dir.join("environ")).unwrap_or_default();
        Self {
            pid,
            exe_name,
            exe_path,
            otel_service_name: env_var(&environ, "OTEL_SERVICE_NAME"),
            otel_resource_attributes: env_var(&environ, "OTEL_RESOURCE_ATTRIBUTES"),
            container: fs::read_to_string(dir.join("cgroup"))
                .map(|c| ContainerIds::from_proc_cgroup(&c))
                .unwrap_or_default(),
        }
    }
}

/// Value of `name` in a NUL-separated environ block; empty values count as unset.
pub fn env_var(environ: &[u8], name: &str) -> Option<String> {
    environ.split(|&b| b == 0).find_map(|kv| {
        let rest = kv.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
        (!rest.is_empty()).then(|| String::from_utf8_lossy(rest).into_owned())
    })
}

/// Bounded pid → info cache; entries are dropped when the process exits.
pub struct ProcessCache {
    cache: LruCache<u32, Arc<ProcessInfo>>,
    proc_root: std::path::PathBuf,
}

impl ProcessCache {
    pub fn new(capacity: usize) -> Self {
        Self::with_root(capacity, "/proc")
    }

    pub fn with_root(capacity: usize, root: impl Into<std::path::PathBuf>) -> Self {
        let cap =
            std::num::NonZeroUsize::new(capacity.max(1)).unwrap_or(std::num::NonZeroUsize::MIN);
        Self {
            cache: LruCache::new(cap),
            proc_root: root.into(),
        }
    }

    /// The process's info; `comm` (from the kernel) names it when /proc no longer can.
    pub fn get(&mut self, pid: u32, comm: &[u8]) -> Arc<ProcessInfo> {
        if let Some(p) = self.cache.get(&pid) {
            return p.clone();
        }
        let mut info = ProcessInfo::read(&self.proc_root, pid);
        if info.exe_name.is_empty() {
            let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
            info.exe_name = String::from_utf8_lossy(&comm[..end]).into_owned();
        }
        let info = Arc::new(info);
        self.cache.put(pid, info.clone());
        info
    }

    pub fn forget(&mut self, pid: u32) {
        self.cache.pop(&pid);
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_env_vars_exactly() {
        let env = b"A=1\0OTEL_SERVICE_NAME=shop\0OTEL_SERVICE_NAMEX=no\0EMPTY=\0";
        assert_eq!(env_var(env, "OTEL_SERVICE_NAME").as_deref(), Some("shop"));
        assert_eq!(env_var(env, "A").as_deref(), Some("1"));
        assert_eq!(env_var(env, "EMPTY"), None);
        assert_eq!(env_var(env, "MISSING"), None);
        assert_eq!(env_var(b"", "A"), None);
    }

    #[test]
    fn reads_own_process() {
        let me = ProcessInfo::read(Path::new("/proc"), std::process::id());
        assert!(!me.exe_name.is_empty());
        assert!(me.exe_path.is_some());
    }

    #[test]
    fn vanished_process_yields_pid_only() {
        let p = ProcessInfo::read(Path::new("/nonexistent-proc"), 12345);
        assert_eq!(p.pid, 12345);
        assert_eq!(p.exe_name, "");
    }

    #[test]
    fn kernel_comm_names_vanished_processes() {
        let mut c = ProcessCache::with_root(2, "/nonexistent-proc");
        assert_eq!(c.get(7, b"curl\0\0\0\0").exe_name, "curl");
        assert_eq!(c.get(8, b"sixteen-bytes-xx").exe_name, "sixteen-bytes-xx");
    }

    #[test]
    fn cache_is_bounded() {
        let mut c = ProcessCache::with_root(2, "/nonexistent-proc");
        for pid in 1..10 {
            c.get(pid, b"x\0");
        }
        assert_eq!(c.len(), 2);
        c.forget(9);
        assert_eq!(c.len(), 1);
    }
}
