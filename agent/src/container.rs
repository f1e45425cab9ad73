//! The container and Kubernetes pod a process runs in, from its cgroup path
//! (`/proc/PID/cgroup`). They become `container.id` and `k8s.pod.uid` on its resource, which
//! is what the OpenTelemetry Collector's `k8sattributes` processor needs to add the pod's
//! name, namespace and workload: Tapir itself never talks to the Kubernetes API.
//!
//! Layouts recognized, as container runtimes name cgroups:
//! - systemd driver: `…/kubepods-burstable-pod<uid, '_' for '-'>.slice/cri-containerd-<id>.scope`
//!   (also `docker-<id>.scope`, `crio-<id>.scope`, `libpod-<id>.scope`);
//! - cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>`, `/docker/<id>`.

/// What a cgroup path says of the process's container.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ContainerIds {
    /// The runtime's container id (64 hex digits).
    pub container_id: Option<String>,
    /// The Kubernetes pod's UID.
    pub pod_uid: Option<String>,
}

impl ContainerIds {
    /// From the content of `/proc/PID/cgroup` (cgroup v2 `0::/path`, or v1 lines): the
    /// first line whose path names a container or a pod.
    pub fn from_proc_cgroup(content: &str) -> Self {
        content
            .lines()
            .filter_map(|line| line.splitn(3, ':').nth(2))
            .map(Self::from_path)
            .find(|ids| ids.container_id.is_some() || ids.pod_uid.is_some())
            .unwrap_or_default()
    }

    fn from_path(path: &str) -> Self {
        let mut ids = Self::default();
        for segment in path.split('/') {
            if let Some(uid) = pod_uid(segment) {
                ids.pod_uid = Some(uid);
            }
            if let Some(id) = container_id(segment) {
                ids.container_id = Some(id.to_string());
            }
        }
        ids
    }
}

/// `<runtime>-<id>.scope` or a bare id.
fn container_id(segment: &str) -> Option<&str> {
    let bare = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = ["cri-containerd-", "docker-", "crio-", "libpod-"]
        .iter()
        .find_map(|prefix| bare.strip_prefix(prefix))
        .unwrap_or(bare);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid with '_'>.slice` (systemd).
fn pod_uid(segment: &str) -> Option<String> {
    let bare = segment.strip_suffix(".slice").unwrap_or(segment);
    let uid = if bare.starts_with("kubepods") {
        bare.rsplit_once("-pod")?.1
    } else {
        bare.strip_prefix("pod")?
    };
    let uid = uid.replace('_', "-");
    is_uid(&uid).then_some(uid)
}

/// 8-4-4-4-12 hex digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f8c2b1a9d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a";
    const UID: &str = "0b7e54f2-2f1c-4c5e-9a5d-0e1f2a3b4c5d";

    fn ids(content: &str) -> (Option<String>, Option<String>) {
        let c = ContainerIds::from_proc_cgroup(content);
        (c.container_id, c.pod_uid)
    }

    #[test]
    fn kubernetes_with_the_systemd_driver() {
        let uid_ = UID.replace('-', "_");
        for runtime in ["cri-containerd", "crio", "docker"] {
            let line = format!(
                "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/{runtime}-{ID}.scope\n"
            );
            assert_eq!(ids(&line), (Some(ID.into()), Some(UID.into())), "{runtime}");
        }
        // Guaranteed QoS has no class slice.
        let line = format!("0::/kubepods.slice/kubepods-pod{uid_}.slice/cri-containerd-{ID}.scope");
        assert_eq!(ids(&line), (Some(ID.into()), Some(UID.into())));
    }

    #[test]
    fn kubernetes_with_the_cgroupfs_driver_and_cgroup_v1() {
        let content = format!("12:memory:/kubepods/besteffort/pod{UID}/{ID}\n0::/\n");
        assert_eq!(ids(&content), (Some(ID.into()), Some(UID.into())));
    }

    #[test]
    fn plain_containers_and_hosts() {
        assert_eq!(
            ids(&format!("0::/system.slice/docker-{ID}.scope")),
            (Some(ID.into()), None)
        );
        assert_eq!(ids(&format!("0::/docker/{ID}")), (Some(ID.into()), None));
        assert_eq!(
            ids(&format!("0::/machine.slice/libpod-{ID}.scope/container")),
            (Some(ID.into()), None)
        );
        // A host's processes, and lookalikes.
        for content in [
            "0::/user.slice/user-0.slice/session-1.scope",
            "0::/",
            "",
            "garbage",
            "0::/kubepods.slice/kubepods-podnot-a-uid.slice",
            "0::/docker/abc",
            "0::/podcast/1234",
        ] {
            assert_eq!(ids(content), (None, None), "{content:?}");
        }
    }

    #[test]
    fn random_input_never_panics() {
        use proptest::prelude::*;
        proptest!(|(s in ".{0,300}")| {
            let _ = ContainerIds::from_proc_cgroup(&s);
        });
    }
}
