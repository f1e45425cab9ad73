"""Kernels users run: the agent loads, captures and propagates on the stock kernels of
Debian 11 (5.10 LTS, also Amazon Linux 2's series; no bpf_loop, so the compat programs),
Debian 12 (6.1 LTS, also Amazon Linux 2023's series) and Debian 13 / bookworm-backports
(6.12), booted under qemu with a small userland (tests/kernels/boot.sh). The host runs a
newer kernel whose verifier accepts what older ones refuse (e.g. more than 512 bytes of
stack across a program's calls), so only a real older kernel shows that Tapir runs there.
"""
import json
import re
import subprocess

import pytest

from conftest import ROOT, TAPIR, TESTS

KERNELS = [
    "bullseye/linux-image-cloud-amd64",  # Debian 11: 5.10 LTS, no bpf_loop
    "linux-image-cloud-amd64",  # Debian 12: 6.1 LTS
    "linux-image-6.12-cloud-amd64",  # Debian 13 and bookworm-backports: 6.12 LTS
]
GIVEN_TRACE = "0af7651916cd43dd8448eb211c80319c"
GIVEN_PARENT = "b7ad6b7169203331"


def sections(log):
    """guest.sh's output: `=== name` lines, each with the lines that follow it."""
    out, name = {}, None
    for line in log.splitlines():
        if line.startswith("=== "):
            name = line[4:]
            out.setdefault(name, [])
        elif name is not None:
            out[name].append(line)
    return out


def shown(secs, keep):
    """The sections whose name `keep` accepts, as guest.sh printed them."""
    return "".join(f"=== {h}\n" + "".join(l + "\n" for l in ls) for h, ls in secs.items() if keep(h))


@pytest.mark.parametrize("package", KERNELS)
def test_agent_runs_on_an_older_kernel(package):
    out = ROOT / "target/kernels" / package
    boot = subprocess.run(
        ["bash", str(TESTS / "kernels/boot.sh"), package, TAPIR, str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert boot.returncode == 0, boot.stderr[-6000:]
    log = (out / "guest.log").read_text(errors="replace")
    s = sections(log)
    heads = [l[4:] for l in log.splitlines() if l.startswith("=== ")]
    # guest.sh's bounded waits: where a process that did not finish was stuck.
    stuck = shown(s, lambda h: "still running" in h)
    kernel = next(h for h in heads if h.startswith("kernel "))
    assert not kernel.endswith(".18"), kernel  # really the older kernel
    assert "doctor exit 0" in heads, stuck + "\n".join(s.get("doctor", []))
    assert any("core capture works" in l for l in s["doctor"]), "\n".join(s["doctor"])
    agent_log = "\n".join(s.get("agent log", []))
    assert any(h.startswith("ready after") for h in heads), stuck + agent_log[-4000:]
    curls = [h for h in heads if h.startswith("curl ")]
    failed = shown(s, lambda h: h == "curl 000")
    assert curls == ["curl 200", "curl 404", "curl 200"], failed + stuck + agent_log[-4000:]
    assert "agent exit 0" in heads, stuck + agent_log[-4000:]
    # Kernels before 5.17 get the compat build of the programs, and are told so.
    compat = tuple(int(x) for x in re.findall(r"\d+", kernel)[:2]) < (5, 17)
    assert ("using the compat build" in agent_log) == compat, agent_log[-4000:]

    spans = [json.loads(l) for l in s["spans"] if l.startswith("{")]
    by = {(sp["kind"], sp["attributes"].get("url.path") or
           re.sub(r"^http://[^/]+", "", sp["attributes"].get("url.full", ""))): sp
          for sp in spans}
    assert sorted(by) == sorted(
        (k, p) for k in ("SERVER", "CLIENT") for p in ("/hostname", "/missing", "/hosts")
    ), sorted(by)
    for path, status in (("/hostname", 200), ("/missing", 404), ("/hosts", 200)):
        server, client = by[("SERVER", path)], by[("CLIENT", path)]
        assert server["attributes"]["http.response.status_code"] == status
        assert client["attributes"]["http.response.status_code"] == status
        assert server["resource"]["process.executable.name"].startswith("python3")
        assert client["resource"]["process.executable.name"] == "curl"
        # Injected by sock_ops + sk_msg, or carried by curl: one trace across both ends.
        assert server["trace_id"] == client["trace_id"], path
        assert server["parent_span_id"] == client["span_id"], path
    assert by[("SERVER", "/hosts")]["trace_id"] == GIVEN_TRACE
    assert by[("SERVER", "/hosts")]["parent_span_id"] == GIVEN_PARENT
    for counter in ("tapir.kernel.ringbuf_full", "tapir.events.malformed"):
        assert f'counter="{counter}" value=0' in agent_log, counter
