"""Issue: foundation. The binary, `tapir doctor`, `tapir run` start-up/shutdown and a
first real observation."""
import re
import socket
import subprocess

from conftest import TAPIR, Agent, free_port, wait_port


def test_help_and_version():
    out = subprocess.run([TAPIR, "--help"], capture_output=True, text=True, check=True).stdout
    for sub in ("run", "watch", "doctor"):
        assert re.search(rf"^\s+{sub}\s", out, re.M), f"--help does not list {sub}:\n{out}"
    v = subprocess.run([TAPIR, "--version"], capture_output=True, text=True, check=True).stdout
    assert re.fullmatch(r"tapir \d+\.\d+\.\d+\n", v), v


def test_doctor_reports_a_working_core_on_this_kernel():
    r = subprocess.run([TAPIR, "doctor"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    table = r.stdout
    for feature in (
        "kernel BTF",
        "tracefs",
        "syscall tracepoints",
        "program type: tracepoint",
        "program type: sock_ops",
        "program type: sk_msg",
        "program type: kprobe/uprobe",
        "map: ring buffer",
        "helper: bpf_loop",
        "cgroup v2",
        "pidfd_getfd",
    ):
        line = next((l for l in table.splitlines() if l.startswith(feature)), None)
        assert line is not None, f"doctor does not report {feature}:\n{table}"
        assert re.search(r"\s(ok|missing|unknown)\s", line), line
    assert "core capture works on this host" in table
    # This kernel has BTF and ring buffers: they must be found, not just listed.
    assert re.search(r"^kernel BTF\s+ok", table, re.M)
    assert re.search(r"^map: ring buffer\s+ok", table, re.M)
    assert re.search(r"^pidfd_getfd\s+ok", table, re.M)
    # This kernel has bpf_loop and bpf_task_pt_regs: the standard programs, all verified.
    assert re.search(r"^embedded eBPF programs\s+ok\s+all \d+ pass.*\(standard build\)", table, re.M)


def test_run_sees_a_real_tcp_connection_and_stops_cleanly():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    agent = Agent("run", env={"RUST_LOG": "info,tapir=debug"})
    try:
        client = socket.create_connection(("127.0.0.1", port))
        conn, peer = server.accept()
        client_port = client.getsockname()[1]
        # The client side: this process connected to the server port.
        agent.wait_for(
            lambda l: "tcp connection opened" in l and f"127.0.0.1:{port}" in l and "Client" in l,
            what="the client-side connection event",
        )
        # The server side: this process accepted it (accept4), seen from the server port.
        line = agent.wait_for(
            lambda l: "tcp connection opened" in l
            and f"local=127.0.0.1:{port}" in l
            and f"remote=127.0.0.1:{client_port}" in l,
            what="the server-side connection event",
        )
        assert "Server" in line, line
        # eBPF-side logs (aya-log) reach the agent's log at debug level.
        agent.wait_for(
            lambda l: "tapir_ebpf" in l and "accepted tcp fd" in l, what="an eBPF-side log line"
        )
        conn.close()
        client.close()
    finally:
        server.close()
        code = agent.stop()
    assert code == 0, "\n".join(agent.err[-20:])
    assert any("shutting down" in l for l in agent.err)


def test_a_second_agent_on_the_host_is_told_and_doctor_says_so():
    """Two agents (a DaemonSet rollout with maxSurge, a `tapir run` by hand next to the
    DaemonSet's) would each report every exchange: the second one says so, `doctor` too,
    and neither says it when it runs alone."""
    port = free_port()
    warning = "another Tapir agent is running on this host"
    first = Agent("run", "--exporter", "none", "--port", str(port))
    try:
        assert not any(warning in l for l in first.err), first.err
        doctor = subprocess.run([TAPIR, "doctor"], capture_output=True, text=True, timeout=120).stdout
        n = int(re.search(r"^no other Tapir agent running\s+missing\s+(\d+) kernel programs", doctor, re.M).group(1))
        assert n >= 20, doctor
        second = Agent("watch", "--port", str(port))
        line = next(l for l in second.err if warning in l)
        assert f"({n} Tapir kernel programs not this agent's are loaded)" in line, line
        assert second.stop() == 0
    finally:
        assert first.stop() == 0
    doctor = subprocess.run([TAPIR, "doctor"], capture_output=True, text=True, timeout=120).stdout
    assert re.search(r"^no other Tapir agent running\s+ok", doctor, re.M), doctor
