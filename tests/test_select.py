"""Process selection (`--pid`, `--exe`, `--open-port`, `--exclude-exe`): only the chosen programs are
observed, the choice is made in the kernel (others' connections are never tracked), and it
follows fork() and exec() of processes started after Tapir."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TAPIR, TESTS, Agent, curl, finish, free_port, nginx, watch

PY = sys.executable
# The venv's `python` is a symlink: the process name (comm) is the name it was started by,
# the executable is what the link points to. --exe accepts either.
PY_COMM = Path(PY).name[:15]
PY_EXE = Path(os.path.realpath(PY)).name


def summary(got):
    return sorted((e["kind"], e["url.path"], e["process.pid"]) for e in got)


def test_exe_observes_only_the_named_programs(py_server):
    if PY_COMM == PY_EXE:
        pytest.skip("needs a python started by a name other than its executable's")
    server, port = py_server()

    # curl is started after the agent: the kernel picks it up by name at exec().
    agent = watch(port, exe=["curl"])
    curl("-o", "/dev/null", f"http://127.0.0.1:{port}/by-curl")
    got = finish(agent)
    assert [(e["kind"], e["url.path"]) for e in got] == [("client", "/by-curl")]
    assert got[0]["process.pid"] != server.pid
    # The server's accepted connection was never tracked, not merely filtered out later.
    assert agent.final_count("tapir.connections.opened") == 1, agent.err[-30:]

    # The server was running before the agent: found in /proc by its executable's name,
    # and by its process name.
    for name in (PY_EXE, PY_COMM):
        agent = watch(port, exe=[name])
        curl("-o", "/dev/null", f"http://127.0.0.1:{port}/by-{name}")
        got = finish(agent)
        assert summary(got) == [("server", f"/by-{name}", server.pid)], name

    # Both: both ends of the one request.
    agent = watch(port, exe=["curl", PY_EXE])
    curl("-o", "/dev/null", f"http://127.0.0.1:{port}/both")
    got = finish(agent)
    assert sorted(e["kind"] for e in got) == ["client", "server"]


def test_exe_pattern_picks_up_a_program_started_later(py_server, procs):
    """A glob --exe is matched in userspace: programs running at start through /proc, those
    started later when the kernel queues their exec() (logged for each process picked up)."""
    early, early_port = py_server()
    late_port = free_port()
    agent = watch(early_port, late_port, exe=[PY_EXE[:4] + "*"])
    curl("-o", "/dev/null", f"http://127.0.0.1:{early_port}/early")
    late = procs([PY, TESTS / "servers/pyserver.py", late_port], ready_port=late_port)
    agent.wait_for(lambda l: "--exe pattern" in l and f"pid={late.pid}" in l, what="the late server picked up")
    curl("-o", "/dev/null", f"http://127.0.0.1:{late_port}/late")
    got = finish(agent)
    # Both servers; curl matches no pattern.
    assert summary(got) == [("server", "/early", early.pid), ("server", "/late", late.pid)]


def test_pid_follows_a_fork_made_after_start(procs):
    port = free_port()
    parent = procs([PY, TESTS / "servers/forking.py", port], ready_port=port, stdin=True)
    agent = watch(port, pids=[parent.pid])
    # The worker is forked only now: no /proc scan saw it, only the kernel's fork hook.
    parent.send_line()
    line = parent.wait_for(lambda l: l.startswith("worker "), stream="out", what="a worker")
    worker = int(line.split()[1])
    r = curl(f"http://127.0.0.1:{port}/forked")
    assert r.stdout == f"worker {worker}"
    got = finish(agent)
    assert summary(got) == [("server", "/forked", worker)]


def test_unobserved_callers_are_not_injected(py_server):
    server, port = py_server()
    # Observed caller: its request carries the injected traceparent...
    agent = watch(port, exe=["curl", PY_EXE], inject=True)
    curl("-o", "/dev/null", f"http://127.0.0.1:{port}/observed-caller")
    got = finish(agent)
    (c,) = [e for e in got if e["kind"] == "client"]
    (s,) = [e for e in got if e["kind"] == "server"]
    assert s["parent_span_id"] == c["span_id"] and s["trace_id"] == c["trace_id"]
    assert agent.final_count("tapir.inject.injected") == 1, agent.err[-30:]
    assert agent.final_count("tapir.inject.claimed") == 1, agent.err[-30:]

    # ... an unobserved one's does not: its span would never be exported, and the server's
    # span would point at a parent nobody has. Its connection is not even claimed (claiming
    # and releasing a socket is most of what injection costs a connection).
    agent = watch(port, exe=[PY_EXE], inject=True)
    curl("-o", "/dev/null", f"http://127.0.0.1:{port}/unobserved-caller")
    got = finish(agent)
    assert summary(got) == [("server", "/unobserved-caller", server.pid)]
    assert got[0]["parent_span_id"] is None
    assert agent.final_count("tapir.inject.injected") == 0, agent.err[-30:]
    assert agent.final_count("tapir.inject.not_observed") == 1, agent.err[-30:]
    assert agent.final_count("tapir.inject.claimed") == 0, agent.err[-30:]


def test_left_out_programs_are_not_observed(py_server, procs, tmp_path):
    server, port = py_server()
    # --exclude-exe wins over --exe.
    agent = watch(port, exe=["curl", PY_EXE], exclude=["curl"])
    curl("-o", "/dev/null", f"http://127.0.0.1:{port}/curl-left-out")
    got = finish(agent)
    assert summary(got) == [("server", "/curl-left-out", server.pid)]

    # The default list leaves collectors out: a server started (after the agent, so the
    # kernel judges it at exec) under the name `otelcol` is not observed...
    otelcol = tmp_path / "otelcol"
    otelcol.symlink_to(PY)
    port2 = free_port()
    agent = watch(port2)
    collector = procs([otelcol, TESTS / "servers/pyserver.py", port2], ready_port=port2)
    curl("-o", "/dev/null", f"http://127.0.0.1:{port2}/v1/traces")
    got = finish(agent)
    assert [(e["kind"], e["url.path"]) for e in got] == [("client", "/v1/traces")]

    # ... unless the list is cleared.
    agent = watch(port2, exclude=["none"])
    curl("-o", "/dev/null", f"http://127.0.0.1:{port2}/v1/traces")
    got = finish(agent)
    assert sorted((e["kind"], e["process.pid"] == collector.pid) for e in got) == [
        ("client", False),
        ("server", True),
    ]


def test_pid_stays_observed_across_exec_from_a_thread(procs):
    # exec() from a thread other than the main one: the kernel ends the main thread first
    # (whose exit would drop the process's entry) and the thread takes over the pid.
    port = free_port()
    execer = (
        "import os, sys, threading\n"
        "sys.stdin.readline()\n"
        "argv = [sys.argv[1], sys.argv[2], sys.argv[3]]\n"
        "t = threading.Thread(target=lambda: os.execv(argv[0], argv))\n"
        "t.start()\n"
        "t.join()\n"
    )
    p = procs([PY, "-c", execer, PY, TESTS / "servers/pyserver.py", port], stdin=True)
    agent = watch(port, pids=[p.pid])
    p.send_line()
    p.wait_for(lambda l: "listening" in l, stream="out", what="the exec'd server")
    curl("-o", "/dev/null", f"http://127.0.0.1:{port}/after-exec")
    got = finish(agent)
    assert summary(got) == [("server", "/after-exec", p.pid)]


def test_open_port_observes_the_processes_listening_there(py_server, procs):
    """--open-port chooses processes by the port they listen on, as OBI's open-port does:
    one already listening when the agent starts (found in /proc), one that starts listening
    later (the kernel, at listen()), with its outgoing calls; not the service it calls,
    which listens elsewhere, nor curl."""
    backend, bport = py_server()
    early, eport = py_server()
    fport = free_port()
    agent = Agent(
        "watch", "--json",
        "--port", str(eport), "--port", str(fport), "--port", str(bport),
        "--open-port", f"{eport},{fport}",
    )
    agent.wait_for(lambda l: "--open-port" in l and "processes=1" in l, what="the early server found")
    front = procs(
        [PY, TESTS / "servers/frontend.py", fport, f"http://127.0.0.1:{bport}"], ready_port=fport
    )
    curl("-o", "/dev/null", f"http://127.0.0.1:{eport}/early")
    r = curl(f"http://127.0.0.1:{fport}/via-front")
    assert r.stdout.strip() == "ok"
    got = finish(agent)
    assert summary(got) == [
        ("client", "/via-front", front.pid),
        ("server", "/early", early.pid),
        ("server", "/via-front", front.pid),
    ], got
    # Chosen in the kernel: the backend's and curl's connections were never tracked. The
    # four are the early server's, the frontend's two accepted (the readiness probe's and
    # curl's) and the frontend's call to the backend.
    assert agent.final_count("tapir.kernel.selected_by_open_port") == 1, agent.err[-30:]
    assert agent.final_count("tapir.connections.opened") == 4, agent.err[-30:]


def test_open_port_follows_nginx_workers_forked_after_it_listens(procs, tmp_path):
    """nginx started after the agent: its master listens (chosen at listen()), then forks
    the worker that answers, which inherits the choice."""
    port = free_port()
    agent = Agent("watch", "--json", "--port", str(port), "--open-port", str(port))
    master = nginx(procs, tmp_path, port, "location / { return 200 'from nginx'; }")
    r = curl(f"http://127.0.0.1:{port}/nginx")
    assert r.stdout == "from nginx"
    got = finish(agent)
    assert [(e["kind"], e["url.path"]) for e in got] == [("server", "/nginx")], got
    assert got[0]["process.pid"] != master.pid, "the worker answers, not the master"
    assert agent.final_count("tapir.kernel.selected_by_open_port") == 1, agent.err[-30:]


def test_open_port_follows_node_cluster_workers_forked_before_the_primary_listens(procs):
    """Node's cluster: the primary forks its workers, then listens when they ask it to, and
    hands them the connections it accepts; the workers never listen. The kernel chooses the
    primary at listen(), the agent its children."""
    port = free_port()
    agent = Agent("watch", "--json", "--port", str(port), "--open-port", str(port))
    primary = procs(["node", TESTS / "servers/node_cluster.js", port, "2"], ready_port=port)
    primary.wait_for(lambda l: l.strip() == "listening", stream="out", what="both workers")
    agent.wait_for(
        lambda l: "started listening on an --open-port" in l and f"pid={primary.pid}" in l
        and "children_added=2" in l,
        what="the primary's workers chosen",
    )
    answered = {curl(f"http://127.0.0.1:{port}/w{i}").stdout for i in range(4)}
    got = finish(agent)
    workers = {int(w.split()[1]) for w in answered}
    assert len(workers) == 2 and primary.pid not in workers, answered
    assert [(e["kind"], e["url.path"]) for e in got] == [("server", f"/w{i}") for i in range(4)], got
    assert {e["process.pid"] for e in got} == workers


# The servers below answer every GET with "ok" (one keep-alive response).
OK_HANDLER = """
import http.server, socket, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

"""


# An HTTP server on an MPTCP listening socket, as Go 1.24+ opens by default where the kernel
# allows it (plain TCP clients' connections are accepted as plain TCP sockets).
MPTCP_SERVER = OK_HANDLER + """
class Server(http.server.HTTPServer):
    def __init__(self, addr, handler):
        super().__init__(addr, handler, bind_and_activate=False)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
        self.server_bind()
        self.server_activate()

Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_open_port_chooses_a_server_listening_on_mptcp(procs):
    import socket
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262).close()
    except OSError as e:
        pytest.skip(f"no MPTCP on this kernel: {e}")
    port = free_port()
    agent = Agent("watch", "--json", "--port", str(port), "--open-port", str(port))
    server = procs([PY, "-c", MPTCP_SERVER, port], ready_port=port)
    assert curl(f"http://127.0.0.1:{port}/mptcp").stdout == "ok"
    got = finish(agent)
    assert summary(got) == [("server", "/mptcp", server.pid)], got
    assert agent.final_count("tapir.kernel.selected_by_open_port") == 1, agent.err[-30:]


# A server that listens without bind(): the kernel picks an ephemeral port inside listen(),
# as servers asking for "port 0" without binding do; the port is printed once known.
NO_BIND_SERVER = OK_HANDLER + """
class Server(http.server.HTTPServer):
    def server_bind(self):
        pass

server = Server(None, Handler)
print(server.socket.getsockname()[1], flush=True)
server.serve_forever()
"""


def test_open_port_chooses_a_server_whose_port_listen_picked(procs):
    """No bind() before listen(): the port exists only once listen() returns, so the kernel
    program reads it at the syscall's exit. --open-port covers the ephemeral range."""
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    agent = Agent("watch", "--json", "--open-port", f"{low}-{high}")
    server = procs([PY, "-c", NO_BIND_SERVER])
    port = int(server.wait_for(lambda l: l.strip().isdigit(), stream="out", what="its port"))
    assert int(low) <= port <= int(high), port
    assert curl(f"http://127.0.0.1:{port}/no-bind").stdout == "ok"
    got = [e for e in finish(agent) if e["process.pid"] == server.pid]
    assert summary(got) == [("server", "/no-bind", server.pid)], got
    assert agent.final_count("tapir.kernel.selected_by_open_port") >= 1, agent.err[-30:]


# Listens on the port given, then execs the program given, which serves HTTP on the
# inherited listening socket (as a launcher that binds, then execs its server, does).
SERVE_FD = OK_HANDLER + """
class Server(http.server.HTTPServer):
    def __init__(self, fd, handler):
        super().__init__(None, handler, bind_and_activate=False)
        self.socket = socket.socket(fileno=fd)

print("serving", flush=True)
Server(int(sys.argv[1]), Handler).serve_forever()
"""
LISTEN_THEN_EXEC = f"""
import os, socket, sys
port, program = int(sys.argv[1]), sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(16)
os.set_inheritable(s.fileno(), True)
os.execv(program, [program, "-c", {SERVE_FD!r}, str(s.fileno())])
"""


def test_open_port_listener_stays_chosen_across_exec_into_a_program_not_named(procs, tmp_path):
    """A program named by --exe listens on an --open-port port, then execs a program not
    named, which serves on the inherited socket: chosen by port at listen(), it stays
    chosen (by name alone, the exec would have dropped it)."""
    port = free_port()
    other = tmp_path / "pyserve"  # comm "pyserve": not named
    other.symlink_to(os.path.realpath(PY))
    agent = Agent("watch", "--json", "--port", str(port), "--exe", PY_COMM, "--open-port", str(port))
    server = procs([PY, "-c", LISTEN_THEN_EXEC, port, other])
    server.wait_for(lambda l: l.strip() == "serving", stream="out", what="the exec'd server")
    assert Path(f"/proc/{server.pid}/comm").read_text().strip() == "pyserve"
    assert curl(f"http://127.0.0.1:{port}/after-exec").stdout == "ok"
    got = finish(agent)
    assert summary(got) == [("server", "/after-exec", server.pid)], got
    # Chosen by name first: the listen() changed only the reason, it chose nobody new.
    assert agent.final_count("tapir.kernel.selected_by_open_port") == 0, agent.err[-30:]


def test_open_port_refuses_what_is_not_a_port():
    for bad in ("80-70", "http", "0"):
        r = subprocess.run(
            [TAPIR, "watch", "--open-port", bad], capture_output=True, text=True, timeout=60
        )
        assert r.returncode != 0 and f'--open-port "{bad}"' in r.stderr, (bad, r.stderr)
