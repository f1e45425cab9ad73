"""The Kubernetes deployment, run as a kubelet would run it.

`deploy/kubernetes/tapir.yaml`'s DaemonSet container is started from the image `cargo
xtask image` writes (target/tapir-image.tar, unpacked here): the image's entrypoint with
the container's args, exactly the env the container would get (downward-API fields filled
in), its volumes mounted where it asks, in a network, mount and cgroup namespace of its
own and the host's pids (`hostPID`), its root the image's. The node's collector is a real
OTLP receiver at the endpoint the manifest names, inside the pod's network namespace (the
"node IP" there is loopback). Nothing of the host's file system but what the manifest
mounts is visible to the agent.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from conftest import ROOT, TAPIR, TESTS, Agent, Proc, cgroup2_mount, curl, span_path

MANIFEST = ROOT / "deploy/kubernetes/tapir.yaml"
IMAGE = Path(os.environ.get("TAPIR_IMAGE", ROOT / "target/tapir-image.tar"))
NODE = "tapir-e2e-node"
# What the downward API would fill in: the node's name, and its IP as the pod's network
# namespace reaches it (the receiver below listens there).
FIELDS = {"spec.nodeName": NODE, "status.hostIP": "127.0.0.1"}


def daemonset_container():
    """(pod spec, the tapir container) of the manifest's DaemonSet."""
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    ds, = [d for d in docs if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    c, = [c for c in pod["containers"] if c["name"] == "tapir"]
    return pod, c


def container_env(c, image_env):
    """The container's environment as the kubelet builds it: the image's, then the spec's
    in order, `$(NAME)` replaced by a variable defined before it (`$$` escapes)."""
    env = dict(kv.split("=", 1) for kv in image_env)
    defined = {}

    def expand(v):
        return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                      lambda m: "$" if m.group(0) == "$$" else defined.get(m.group(1), m.group(0)), v)

    for e in c.get("env", []):
        if "value" in e:
            v = expand(e["value"])
        else:
            v = FIELDS[e["valueFrom"]["fieldRef"]["fieldPath"]]
        env[e["name"]] = defined[e["name"]] = v
    return env


def member(t, name):
    """An archive member by name, with or without the "./" prefix tar may give it."""
    for n in (name, "./" + name):
        try:
            return t.extractfile(n)
        except KeyError:
            pass
    raise KeyError(name)


def unpack_image(archive, rootfs):
    """Unpacks a `docker save` archive's layers into `rootfs`; returns (tag, config),
    checking each layer against its digest in the config, as `docker load` does."""
    with tarfile.open(archive) as t:
        manifest, = json.load(member(t, "manifest.json"))
        config = json.load(member(t, manifest["Config"]))
        digests = config["rootfs"]["diff_ids"]
        assert len(digests) == len(manifest["Layers"])
        rootfs.mkdir()
        for name, digest in zip(manifest["Layers"], digests):
            data = member(t, name).read()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest, name
            layer = rootfs.parent / "layer.tar"
            layer.write_bytes(data)
            subprocess.run(["tar", "-xf", layer, "-C", rootfs], check=True)
            layer.unlink()
    return manifest["RepoTags"][0], config["config"]


# Runs "$@" as the kubelet runs the container: in the pod's cgroup ($4 under the cgroup2
# root $3) and network namespace ($2), a mount and a cgroup namespace of its own, with
# proc (the host's pids), sysfs, its cgroup2 view and /dev mounted into its root ($1), and
# each volume of $5 ("SOURCE TARGET ro|rw" per line) bind-mounted at its target there.
POD = r"""
set -e
root=$1 netns=$2 cg=$3 sub=$4 mounts=$5; shift 5
echo $$ > "$cg/$sub/cgroup.procs"
exec nsenter --net="/run/netns/$netns" unshare --mount --propagation private --cgroup sh -ec '
  root=$1 mounts=$2; shift 2
  mount -t proc proc "$root/proc"
  mount -t sysfs sysfs "$root/sys"
  mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
  mount --rbind /dev "$root/dev"
  while read -r src dst mode; do
    mkdir -p "$root$dst"
    mount --rbind "$src" "$root$dst"
    if [ "$mode" = ro ]; then mount -o remount,bind,ro "$root$dst"; fi
  done < "$mounts"
  exec "$@"' sh "$root" "$mounts" "$@"
"""


def help_env_names():
    """(the environment variables `tapir run --help` documents, the help text)."""
    text = subprocess.run([TAPIR, "run", "--help"], capture_output=True, text=True, check=True).stdout
    return set(re.findall(r"\[env: ([A-Z0-9_]+)=", text)) | set(re.findall(r"^\s+(OTEL_[A-Z_]+)", text, re.M)), text


def test_the_daemonset_asks_for_what_the_agent_needs():
    pod, c = daemonset_container()
    # README "Requirements": host pids, privileged (eBPF, sock_ops, tracefs), the node's
    # cgroup hierarchy for injection.
    assert pod["hostPID"] is True
    assert c["securityContext"]["privileged"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]]["hostPath"]["path"] for m in c["volumeMounts"]}
    assert mounts == {"/host/sys/fs/cgroup": "/sys/fs/cgroup"}
    # Every variable it sets is one Tapir reads (a renamed one would be silently ignored).
    names, text = help_env_names()
    set_vars = {e["name"] for e in c["env"]} - {"NODE_NAME", "HOST_IP", "RUST_LOG"}
    assert set_vars and set_vars <= names, set_vars - names
    # The kubelet's SIGKILL must not cut the flush short.
    timeout = int(re.search(r"--shutdown-timeout <SECONDS>.*?\[default: (\d+)\]", text, re.S).group(1))
    assert pod["terminationGracePeriodSeconds"] >= timeout + 5
    # No CPU limit: a throttled agent loses events; nor too small a request (on a
    # saturated node, 100m lost half of them, 250m 1-5 %: BENCHMARKS.md, session 31).
    assert "cpu" not in c["resources"].get("limits", {})
    cpu = str(c["resources"]["requests"]["cpu"])
    assert (int(cpu[:-1]) if cpu.endswith("m") else float(cpu) * 1000) >= 250, cpu


def test_the_image_runs_the_daemonset_and_exports_to_the_nodes_collector(py_server, tmp_path):
    pod, c = daemonset_container()
    if not IMAGE.exists():
        pytest.fail(f"no image at {IMAGE}: `cargo xtask test` writes it (or `cargo xtask image`)")
    tag, config = unpack_image(IMAGE, tmp_path / "rootfs")
    assert c["image"] == tag, "the manifest must name the image `cargo xtask image` builds"
    assert c.get("imagePullPolicy") == "IfNotPresent", "a loaded image must not be pulled"
    rootfs = tmp_path / "rootfs"
    env = container_env(c, config.get("Env", []))
    endpoint = urlparse(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.hostname == FIELDS["status.hostIP"], endpoint

    server, port = py_server()
    netns = f"tapir-e2e-{os.getpid()}"
    cg = cgroup2_mount()
    sub = f"tapir-e2e-pod-{os.getpid()}"
    volumes = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    mounts = tmp_path / "mounts"
    mounts.write_text("".join(f"{volumes[m['name']]} {m['mountPath']} {'ro' if m.get('readOnly') else 'rw'}\n"
                              for m in c["volumeMounts"]))
    script = tmp_path / "pod.sh"
    script.write_text(POD)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    os.mkdir(f"{cg}/{sub}")
    receiver = agent = None
    try:
        subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
        receiver = Proc(["ip", "netns", "exec", netns, sys.executable, TESTS / "otlp_receiver.py",
                         "--grpc-port", endpoint.port, "--http-port", endpoint.port + 1, "--print"])
        receiver.wait_for(lambda l: l == "listening", stream="out", what="the receiver listening")
        entry = config["Entrypoint"]
        args = c.get("args") or config.get("Cmd", [])
        # Only this test's server and clients (tests never see each other's traffic).
        wrap = ["sh", script, rootfs, netns, cg, sub, mounts,
                "env", "-i", *[f"{k}={v}" for k, v in env.items()], shutil.which("chroot"), rootfs, *entry[:-1]]
        agent = Agent(*args, "--port", str(port), wrap=wrap, bin=entry[-1])
        # It is the image's binary that runs, rooted in the image.
        assert os.readlink(f"/proc/{agent.pid}/root") == str(rootfs)
        assert os.readlink(f"/proc/{agent.pid}/exe") == str(rootfs) + entry[-1]
        curl("-o", "/dev/null", f"http://127.0.0.1:{port}/warm-up")
        echoed = curl(f"http://127.0.0.1:{port}/echo-headers").stdout
        assert agent.stop() == 0, "\n".join(agent.err[-20:])
        receiver.wait_for(lambda l: '"http.server.request.duration"' in l, stream="out",
                          what="RED metrics flushed at exit")
    finally:
        if agent is not None and agent.p.poll() is None:
            agent.stop()
        if receiver is not None:
            receiver.stop()
        subprocess.run(["ip", "netns", "del", netns], check=False)
        os.rmdir(f"{cg}/{sub}")
    err = "\n".join(agent.err)
    assert "not the root of the cgroup hierarchy" not in err, err
    got = [json.loads(l) for l in receiver.out if l.startswith("{")]
    spans = [s for s in got if s["signal"] == "traces" and span_path(s) in ("/warm-up", "/echo-headers")]
    by = {(s["kind"], span_path(s)) for s in spans}
    assert by == {(k, p) for k in ("SERVER", "CLIENT") for p in ("/warm-up", "/echo-headers")}, spans
    assert len(spans) == 4, spans
    for s in spans:
        assert s["resource"]["k8s.node.name"] == NODE and s["resource"]["host.name"] == NODE, s["resource"]
    # Injection works from the pod: sock_ops found the node's cgroup root through the
    # read-only hostPath, and the echoed traceparent is the CLIENT span's.
    cli, = [s for s in spans if s["kind"] == "CLIENT" and span_path(s) == "/echo-headers"]
    tps = [l.split(":", 1)[1].strip() for l in echoed.splitlines() if l.lower().startswith("traceparent:")]
    assert tps == [f"00-{cli['trace_id']}-{cli['span_id']}-01"], (echoed, cli)
    srv, = [s for s in spans if s["kind"] == "SERVER" and span_path(s) == "/echo-headers"]
    assert srv["trace_id"] == cli["trace_id"] and srv["parent_span_id"] == cli["span_id"]
    red = [m for m in got if m["signal"] == "metrics" and m["name"] == "http.server.request.duration"]
    assert red and all(m["resource"]["k8s.node.name"] == NODE for m in red), red
