//! The OpenTelemetry resource of an observed process: who produced the telemetry, as the
//! process's own SDK would have described itself.
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::{
    resource::{ResourceDetector, TelemetryResourceDetector},
    Resource,
};
use opentelemetry_semantic_conventions::resource as semres;

use crate::process::ProcessInfo;

/// `telemetry.distro.name` of everything Tapir exports.
pub const DISTRO_NAME: &str = "tapir";
/// `telemetry.distro.version`: this crate's version.
pub const DISTRO_VERSION: &str = env!("CARGO_PKG_VERSION");
/// `service.name` of the agent's own metrics.
pub const AGENT_SERVICE_NAME: &str = "tapir";

/// `OTEL_RESOURCE_ATTRIBUTES` (`k1=v1,k2=v2`, W3C Baggage-style percent-encoding) as
/// decoded (key, value) pairs, in order. Entries without `=` or with an empty key are
/// skipped; keys and values are trimmed.
pub fn parse_resource_attributes(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let k = decode(k.trim());
            let v = decode(v.trim());
            (!k.is_empty()).then_some((k, v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The process's `service.name`: its own `OTEL_SERVICE_NAME`, else `service.name` in its
/// `OTEL_RESOURCE_ATTRIBUTES`, else its executable name (`unknown_service` if even that is
/// unknown).
pub fn service_name(p: &ProcessInfo, attrs: &[(String, String)]) -> String {
    if let Some(n) = p
        .otel_service_name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        return n.to_string();
    }
    if let Some((_, v)) = attrs
        .iter()
        .rev()
        .find(|(k, v)| k == semres::SERVICE_NAME && !v.is_empty())
    {
        return v.clone();
    }
    if !p.exe_name.is_empty() {
        return p.exe_name.clone();
    }
    "unknown_service".to_string()
}

/// `process.runtime.name` for interpreters and VMs recognisable from the executable name.
/// Native servers (nginx, envoy, Go and Rust binaries) have none.
pub fn runtime_name(exe: &str) -> Option<&'static str> {
    let e = exe.to_ascii_lowercase();
    let starts = |p: &str| {
        e == p
            || e.strip_prefix(p).is_some_and(|r| {
                r.starts_with(|c: char| c.is_ascii_digit() || c == '.' || c == '-')
            })
    };
    if starts("python") {
        Some("cpython")
    } else if starts("pypy") {
        Some("pypy")
    } else if e == "node" || e == "nodejs" {
        Some("nodejs")
    } else if e == "java" {
        Some("java")
    } else if starts("ruby") {
        Some("ruby")
    } else if starts("php") || starts("php-fpm") || e.starts_with("php-fpm") {
        Some("php")
    } else if e == "dotnet" {
        Some("dotnet")
    } else if e == "bun" {
        Some("bun")
    } else if e == "deno" {
        Some("deno")
    } else if e == "erl" || e == "beam.smp" {
        Some("beam")
    } else {
        None
    }
}

/// This host's name in the agent's UTS namespace: the node's on a host or on the host
/// network, the pod's otherwise (then `host.name` in the agent's resource attributes
/// names the node: see [`Node::new`]).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// What the agent says of the node the observed processes run on: its `host.name`, and
/// the agent's own `OTEL_RESOURCE_ATTRIBUTES` other than `service.*`, `process.*` and
/// `telemetry.*` (`k8s.node.name`, `k8s.cluster.name`, `cloud.region`…), which every
/// process's resource carries unless the process's own attributes say otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    pub host_name: String,
    pub attrs: Vec<(String, String)>,
}

impl Node {
    /// `host.name` in the agent's attributes wins over the kernel's host name: a DaemonSet
    /// pod off the host network has the pod's name as its host name.
    pub fn new(kernel_host_name: String, agent_resource_attributes: Option<&str>) -> Self {
        let mut host_name = kernel_host_name;
        let mut attrs = Vec::new();
        for (k, v) in agent_resource_attributes
            .map(parse_resource_attributes)
            .unwrap_or_default()
        {
            if k == semres::HOST_NAME {
                host_name = v;
            } else if !["service.", "process.", "telemetry."]
                .iter()
                .any(|p| k.starts_with(p))
            {
                attrs.push((k, v));
            }
        }
        Self { host_name, attrs }
    }

    #[cfg(test)]
    pub(crate) fn named(host_name: &str) -> Self {
        Self::new(host_name.to_string(), None)
    }
}

/// The resource of an observed process.
///
/// Tapir's defaults (`process.*`, `host.name`, `service.instance.id` = `{host.name}:{pid}`,
/// `telemetry.*`) and the node's attributes come first; the process's own
/// `OTEL_RESOURCE_ATTRIBUTES` override them, like the SDK's environment detector would;
/// `service.name` follows [`service_name`].
pub fn process_resource(p: &ProcessInfo, node: &Node) -> Resource {
    let attrs = p
        .otel_resource_attributes
        .as_deref()
        .map(parse_resource_attributes)
        .unwrap_or_default();
    let host = &node.host_name;
    let mut kvs = vec![
        KeyValue::new(semres::SERVICE_INSTANCE_ID, format!("{host}:{}", p.pid)),
        KeyValue::new(semres::PROCESS_PID, i64::from(p.pid)),
        KeyValue::new(semres::HOST_NAME, host.clone()),
        KeyValue::new(semres::TELEMETRY_DISTRO_NAME, DISTRO_NAME),
        KeyValue::new(semres::TELEMETRY_DISTRO_VERSION, DISTRO_VERSION),
    ];
    if !p.exe_name.is_empty() {
        kvs.push(KeyValue::new(
            semres::PROCESS_EXECUTABLE_NAME,
            p.exe_name.clone(),
        ));
    }
    if let Some(path) = &p.exe_path {
        kvs.push(KeyValue::new(semres::PROCESS_EXECUTABLE_PATH, path.clone()));
    }
    if let Some(rt) = runtime_name(&p.exe_name) {
        kvs.push(KeyValue::new(semres::PROCESS_RUNTIME_NAME, rt));
    }
    kvs.extend(
        node.attrs
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
    );
    // For the collector's k8sattributes processor (pod name, namespace, workload).
    if let Some(id) = &p.container.container_id {
        kvs.push(KeyValue::new(semres::CONTAINER_ID, id.clone()));
    }
    if let Some(uid) = &p.container.pod_uid {
        kvs.push(KeyValue::new(semres::K8S_POD_UID, uid.clone()));
    }
    kvs.extend(
        attrs
            .iter()
            .filter(|(k, _)| k != semres::SERVICE_NAME)
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
    );
    kvs.push(KeyValue::new(semres::SERVICE_NAME, service_name(p, &attrs)));
    build(kvs)
}

/// The agent's own resource (`service.name=tapir`), with the agent's own
/// `OTEL_RESOURCE_ATTRIBUTES` (except `service.name`).
pub fn agent_resource(host: &str, agent_resource_attributes: Option<&str>) -> Resource {
    let mut kvs = vec![
        KeyValue::new(
            semres::SERVICE_INSTANCE_ID,
            format!("{host}:{}", std::process::id()),
        ),
        KeyValue::new(semres::PROCESS_PID, i64::from(std::process::id())),
        KeyValue::new(semres::HOST_NAME, host.to_string()),
        KeyValue::new(semres::TELEMETRY_DISTRO_NAME, DISTRO_NAME),
        KeyValue::new(semres::TELEMETRY_DISTRO_VERSION, DISTRO_VERSION),
        KeyValue::new(semres::SERVICE_VERSION, DISTRO_VERSION),
    ];
    if let Some(a) = agent_resource_attributes {
        kvs.extend(
            parse_resource_attributes(a)
                .into_iter()
                .filter(|(k, _)| k != semres::SERVICE_NAME)
                .map(|(k, v)| KeyValue::new(k, v)),
        );
    }
    kvs.push(KeyValue::new(semres::SERVICE_NAME, AGENT_SERVICE_NAME));
    build(kvs)
}

/// `telemetry.sdk.*` exactly as the SDK sets them, then `kvs` (later keys win).
fn build(kvs: Vec<KeyValue>) -> Resource {
    let sdk = TelemetryResourceDetector.detect();
    Resource::builder_empty()
        .with_attributes(sdk.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())))
        .with_attributes(kvs)
        .build()
}

/// `service.name` of a resource ("" if absent).
pub fn resource_service_name(r: &Resource) -> String {
    match r.get(&opentelemetry::Key::from_static_str(semres::SERVICE_NAME)) {
        Some(Value::String(s)) => s.to_string(),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::Key;

    fn proc(svc: Option<&str>, attrs: Option<&str>) -> ProcessInfo {
        ProcessInfo {
            pid: 4242,
            exe_name: "python3.12".into(),
            exe_path: Some("/usr/bin/python3.12".into()),
            otel_service_name: svc.map(Into::into),
            otel_resource_attributes: attrs.map(Into::into),
            container: Default::default(),
        }
    }

    fn get(r: &Resource, k: &'static str) -> Option<String> {
        r.get(&Key::from_static_str(k)).map(|v| v.to_string())
    }

    #[test]
    fn service_name_precedence() {
        let both = proc(Some("from-env"), Some("service.name=from-attrs"));
        assert_eq!(
            get(&process_resource(&both, &Node::named("h")), "service.name").unwrap(),
            "from-env"
        );
        let attrs_only = proc(None, Some("a=1,service.name=from-attrs"));
        assert_eq!(
            get(
                &process_resource(&attrs_only, &Node::named("h")),
                "service.name"
            )
            .unwrap(),
            "from-attrs"
        );
        let neither = proc(None, Some("a=1"));
        assert_eq!(
            get(
                &process_resource(&neither, &Node::named("h")),
                "service.name"
            )
            .unwrap(),
            "python3.12"
        );
        let blank = proc(Some("  "), Some("service.name="));
        assert_eq!(service_name(&blank, &[]), "python3.12");
        let nothing = ProcessInfo::default();
        assert_eq!(service_name(&nothing, &[]), "unknown_service");
    }

    #[test]
    fn resource_attributes_are_percent_decoded() {
        let a = parse_resource_attributes(
            " deployment.environment.name = prod%20eu ,team=a%2Cb,bad,=x,k=v=w,utf=%E2%82%AC",
        );
        assert_eq!(
            a,
            vec![
                ("deployment.environment.name".into(), "prod eu".into()),
                ("team".into(), "a,b".into()),
                ("k".into(), "v=w".into()),
                ("utf".into(), "€".into()),
            ]
        );
        let r = process_resource(
            &proc(None, Some("service.name=shop%20api,team=a%2Cb")),
            &Node::named("h"),
        );
        assert_eq!(get(&r, "service.name").unwrap(), "shop api");
        assert_eq!(get(&r, "team").unwrap(), "a,b");
    }

    #[test]
    fn process_resource_has_every_attribute() {
        let r = process_resource(&proc(None, None), &Node::named("node-1"));
        assert_eq!(get(&r, "service.instance.id").unwrap(), "node-1:4242");
        assert_eq!(
            r.get(&Key::from_static_str("process.pid")),
            Some(Value::I64(4242))
        );
        assert_eq!(get(&r, "process.executable.name").unwrap(), "python3.12");
        assert_eq!(
            get(&r, "process.executable.path").unwrap(),
            "/usr/bin/python3.12"
        );
        assert_eq!(get(&r, "process.runtime.name").unwrap(), "cpython");
        assert_eq!(get(&r, "host.name").unwrap(), "node-1");
        assert_eq!(get(&r, "telemetry.sdk.name").unwrap(), "opentelemetry");
        assert_eq!(get(&r, "telemetry.sdk.language").unwrap(), "rust");
        assert!(!get(&r, "telemetry.sdk.version").unwrap().is_empty());
        assert_eq!(get(&r, "telemetry.distro.name").unwrap(), "tapir");
        assert_eq!(
            get(&r, "telemetry.distro.version").unwrap(),
            env!("CARGO_PKG_VERSION")
        );
    }

    #[test]
    fn process_attributes_override_defaults_but_not_the_service_name_rule() {
        let r = process_resource(
            &proc(Some("svc"), Some("service.instance.id=abc,host.name=vm")),
            &Node::named("node-1"),
        );
        assert_eq!(get(&r, "service.instance.id").unwrap(), "abc");
        assert_eq!(get(&r, "host.name").unwrap(), "vm");
        assert_eq!(get(&r, "service.name").unwrap(), "svc");
    }

    #[test]
    fn container_and_pod_ids_are_on_the_resource() {
        let mut p = proc(None, Some("k8s.pod.uid=from-the-process"));
        p.container = crate::container::ContainerIds {
            container_id: Some("c".repeat(64)),
            pod_uid: Some("0b7e54f2-2f1c-4c5e-9a5d-0e1f2a3b4c5d".into()),
        };
        let r = process_resource(&p, &Node::named("h"));
        assert_eq!(get(&r, "container.id").unwrap(), "c".repeat(64));
        // The process's own attributes win, as for every default.
        assert_eq!(get(&r, "k8s.pod.uid").unwrap(), "from-the-process");
        let r = process_resource(&proc(None, None), &Node::named("h"));
        assert!(get(&r, "container.id").is_none() && get(&r, "k8s.pod.uid").is_none());
    }

    #[test]
    fn the_agents_attributes_describe_the_node_of_every_process() {
        let node = Node::new(
            "pod-tapir-x1".into(),
            Some(
                "host.name=node-7,k8s.node.name=node-7,k8s.cluster.name=prod,\
                 service.name=tapir-ds,service.version=9,process.pid=1,telemetry.sdk.name=x",
            ),
        );
        assert_eq!(node.host_name, "node-7");
        assert_eq!(
            node.attrs,
            [
                ("k8s.node.name".to_string(), "node-7".to_string()),
                ("k8s.cluster.name".to_string(), "prod".to_string()),
            ]
        );
        let r = process_resource(&proc(None, Some("k8s.cluster.name=mine")), &node);
        assert_eq!(get(&r, "host.name").unwrap(), "node-7");
        assert_eq!(get(&r, "service.instance.id").unwrap(), "node-7:4242");
        assert_eq!(get(&r, "k8s.node.name").unwrap(), "node-7");
        // The process's own attributes win; the agent's service.* and process.* never apply.
        assert_eq!(get(&r, "k8s.cluster.name").unwrap(), "mine");
        assert_eq!(get(&r, "service.name").unwrap(), "python3.12");
        assert_eq!(
            r.get(&Key::from_static_str("process.pid")),
            Some(Value::I64(4242))
        );
        assert!(get(&r, "service.version").is_none());
        assert_eq!(get(&r, "telemetry.sdk.name").unwrap(), "opentelemetry");
    }

    #[test]
    fn runtimes() {
        for (exe, rt) in [
            ("python3", Some("cpython")),
            ("python3.11", Some("cpython")),
            ("python", Some("cpython")),
            ("node", Some("nodejs")),
            ("java", Some("java")),
            ("ruby", Some("ruby")),
            ("ruby3.2", Some("ruby")),
            ("php-fpm8.2", Some("php")),
            ("php", Some("php")),
            ("dotnet", Some("dotnet")),
            ("nginx", None),
            ("curl", None),
            ("pythonista", None),
            ("", None),
        ] {
            assert_eq!(runtime_name(exe), rt, "{exe}");
        }
        let r = process_resource(
            &ProcessInfo {
                pid: 1,
                exe_name: "nginx".into(),
                ..Default::default()
            },
            &Node::named("h"),
        );
        assert_eq!(get(&r, "process.runtime.name"), None);
    }

    #[test]
    fn agent_resource_is_tapir() {
        let r = agent_resource("h", Some("service.name=nope,k8s.cluster.name=prod"));
        assert_eq!(resource_service_name(&r), "tapir");
        assert_eq!(get(&r, "k8s.cluster.name").unwrap(), "prod");
        assert_eq!(get(&r, "telemetry.distro.name").unwrap(), "tapir");
    }
}
