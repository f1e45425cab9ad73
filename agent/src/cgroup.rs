//! Where sock_ops attaches: the root of the host's cgroup v2 hierarchy.
//!
//! In a container with a cgroup namespace of its own (the default for containerd and
//! Docker on cgroup v2, so for a Kubernetes DaemonSet), the cgroup2 mount the agent sees
//! is its own subtree. A program attached there sees only the agent's own sockets, and
//! injection would silently do nothing for every other pod. The hierarchy's root is found
//! among the cgroup2 mounts this process can reach: its own (a hostPath mount of the
//! host's `/sys/fs/cgroup` is one), then pid 1's through `/proc/1/root` (with the host's
//! pid namespace, pid 1 is the host's init).
use std::{fs, path::Path};

/// The directory to attach cgroup programs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRoot {
    /// A path this process can open.
    pub path: String,
    /// The root of the whole hierarchy; false: only a subtree was reachable.
    pub is_hierarchy_root: bool,
}

impl CgroupRoot {
    /// For logs and `tapir doctor`.
    pub fn describe(&self) -> String {
        if self.is_hierarchy_root {
            self.path.clone()
        } else {
            format!(
                "{}: not the root of the cgroup hierarchy (Tapir runs in a cgroup namespace of \
                 its own), so traceparent injection reaches only the processes below it; mount \
                 the host's /sys/fs/cgroup into the container (hostPath) or run with hostPID",
                self.path
            )
        }
    }
}

/// The mount points of the cgroup v2 hierarchy in a mountinfo table.
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let fstype = post.split_whitespace().next()?;
            let mount_point = pre.split_whitespace().nth(4)?;
            (fstype == "cgroup2").then(|| mount_point.to_string())
        })
        .collect()
}

/// A cgroup v2 directory that is the hierarchy's root: `cgroup.events` exists in every
/// cgroup but the root (also in the root of a cgroup namespace, which is not the real one).
fn is_hierarchy_root(dir: &str) -> bool {
    let d = Path::new(dir);
    d.join("cgroup.procs").exists() && !d.join("cgroup.events").exists()
}

/// The host's cgroup v2 root as seen from this process.
pub fn host_cgroup_root() -> Result<CgroupRoot, String> {
    let own = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    // Unreadable without the right to trace pid 1: then there is no such candidate.
    let init = fs::read_to_string("/proc/1/mountinfo").unwrap_or_default();
    choose(&own, &init, &is_hierarchy_root)
}

/// The first of the candidates that is the hierarchy's root, else the own mount (a
/// subtree, said so in the answer).
fn choose(
    own_mountinfo: &str,
    init_mountinfo: &str,
    is_root: &dyn Fn(&str) -> bool,
) -> Result<CgroupRoot, String> {
    let own = cgroup2_mounts(own_mountinfo);
    let via_init = cgroup2_mounts(init_mountinfo)
        .into_iter()
        .map(|m| format!("/proc/1/root{m}"));
    if let Some(path) = own.iter().cloned().chain(via_init).find(|p| is_root(p)) {
        return Ok(CgroupRoot {
            path,
            is_hierarchy_root: true,
        });
    }
    own.into_iter()
        .next()
        .map(|path| CgroupRoot {
            path,
            is_hierarchy_root: false,
        })
        .ok_or_else(|| "no cgroup v2 mount (sock_ops attaches to a cgroup v2)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PURE: &str = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw";

    #[test]
    fn finds_cgroup2_mounts_in_hybrid_and_pure_layouts() {
        let hybrid = "35 25 0:30 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                      36 25 0:31 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(cgroup2_mounts(hybrid), ["/sys/fs/cgroup/unified"]);
        assert_eq!(cgroup2_mounts(PURE), ["/sys/fs/cgroup"]);
        assert!(cgroup2_mounts("garbage\n\n - ").is_empty());
        assert!(cgroup2_mounts("1 2 3\n - cgroup2").is_empty());
    }

    #[test]
    fn the_hierarchy_root_wins_over_a_namespaced_mount() {
        // A container's own view (its namespace's root) first, the host's mounted at /host.
        let info = "40 30 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n\
                    41 30 0:26 /../.. /host/sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        let root = choose(info, "", &|p| p == "/host/sys/fs/cgroup").unwrap();
        assert_eq!(root.path, "/host/sys/fs/cgroup");
        assert!(root.is_hierarchy_root);
        assert_eq!(root.describe(), "/host/sys/fs/cgroup");
        // On a host: the one mount is the root.
        let root = choose(PURE, PURE, &|p| p == "/sys/fs/cgroup").unwrap();
        assert_eq!(root.path, "/sys/fs/cgroup");
    }

    #[test]
    fn pid_1_root_is_the_next_candidate() {
        let own_view = "50 40 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        let root = choose(own_view, PURE, &|p| p.starts_with("/proc/1/root")).unwrap();
        assert_eq!(root.path, "/proc/1/root/sys/fs/cgroup");
        assert!(root.is_hierarchy_root);
    }

    #[test]
    fn only_a_subtree_is_used_and_said_so() {
        let own_view = "50 40 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        let root = choose(own_view, "", &|_| false).unwrap();
        assert_eq!(root.path, "/sys/fs/cgroup");
        assert!(!root.is_hierarchy_root);
        assert!(root.describe().contains("hostPath"), "{}", root.describe());
        let err = choose("", "", &|_| true).unwrap_err();
        assert!(err.contains("no cgroup v2"), "{err}");
    }
}
