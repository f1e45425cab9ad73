"""Issue: foundation. The binary, `tapir doctor`, `tapir run` start-up/shutdown and a
first real observation."""
import os
import re
import time
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


SCHED_OTHER, SCHED_IDLE = 0, 5


def thread_policies(pid):
    """{thread name: [scheduling policy of each thread with that name]} of a process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                # Field 41 (policy), counted after the parenthesized name (field 2).
                policy = int(f.read().rsplit(")", 1)[1].split()[38])
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        out.setdefault(name, []).append(policy)
    return out


def test_agent_threads_yield_the_cpu_unless_told_otherwise():
    # Idle class by default: the capture and export threads give way to the observed
    # services; the watchdog that raises them on a busy host stays normal.
    agent = Agent("run", "--exporter", "none", "--port", str(free_port()))
    try:
        deadline = time.monotonic() + 10
        while True:
            p = thread_policies(agent.pid)
            idle = p.get("tapir-capture") == [SCHED_IDLE] and p.get("tapir-export", []) and all(
                x == SCHED_IDLE for x in p["tapir-export"]
            )
            # A busy CI host may have them raised for a moment: wait for the calm.
            if idle or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert idle, p
        assert p.get("tapir-watchdog") == [SCHED_OTHER], p
    finally:
        assert agent.stop() == 0, "\n".join(agent.err[-20:])
    assert any("raised to normal priority" in l for l in agent.err), agent.err[-5:]

    agent = Agent("run", "--exporter", "none", "--port", str(free_port()), "--cpu-priority", "normal")
    try:
        p = thread_policies(agent.pid)
        assert "tapir-watchdog" not in p, p
        assert p.get("tapir-capture") == [SCHED_OTHER], p
        assert p.get("tapir-export") and all(x == SCHED_OTHER for x in p["tapir-export"]), p
    finally:
        assert agent.stop() == 0, "\n".join(agent.err[-20:])
