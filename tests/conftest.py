"""Shared fixtures for Tapir's end-to-end tests.

These tests run the real `tapir` binary as root against real, unmodified programs on
loopback. Each test filters the agent by its own ports, so tests never see each other's
traffic. Readiness is always a signal (a log line, a socket accepting), never a sleep.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
TAPIR = os.environ.get("TAPIR_BIN", str(ROOT / "target/release/tapir"))
IN_CI = os.environ.get("CI") == "true"


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        reason = "end-to-end tests load eBPF programs and need root"
        if IN_CI:
            raise pytest.UsageError(reason + " (CI=true: a skip would be a failure)")
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))


def free_port(family=socket.AF_INET, addr="127.0.0.1"):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def wait_port(port, addr="127.0.0.1", timeout=15.0):
    """Wait until something accepts connections on addr:port."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((addr, port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {addr}:{port} after {timeout}s")


class Proc:
    """A child process whose stdout/stderr lines are collected by reader threads."""

    def __init__(self, argv, env=None, cwd=None, stdin=False):
        self.argv = [str(a) for a in argv]
        self.p = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            text=True,
            errors="replace",
        )
        self.out, self.err = [], []
        self._cv = threading.Condition()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.p.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.p.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def pid(self):
        return self.p.pid

    def send_line(self, line=""):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def wait_exit(self, timeout=60):
        code = self.p.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code

    def _pump(self, stream, sink):
        for line in stream:
            with self._cv:
                sink.append(line.rstrip("\n"))
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, pred, stream="err", timeout=30.0, what="line"):
        """Block until a collected line satisfies pred (or the process dies)."""
        sink = self.err if stream == "err" else self.out
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in sink:
                    if pred(line):
                        return line
                if self.p.poll() is not None and not any(t.is_alive() for t in self._threads):
                    raise AssertionError(
                        f"{self.argv[0]} exited ({self.p.returncode}) before {what}:\n"
                        + "\n".join(self.err[-30:])
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {what} within {timeout}s; stderr:\n" + "\n".join(self.err[-30:]))
                self._cv.wait(min(left, 0.2))

    def stop(self, sig=signal.SIGINT, timeout=30.0):
        if self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError(f"{self.argv} did not stop within {timeout}s after {sig}")
        for t in self._threads:
            t.join(5)
        return self.p.returncode


_LIVE_AGENTS = []


class Agent(Proc):
    """`tapir <args>`, started and waited for until it logs that it is ready."""

    def __init__(self, *args, env=None, wrap=(), bin=TAPIR):
        """`wrap`: a command that runs the agent (its last arguments), e.g. in namespaces;
        `bin`: the agent's path as `wrap` sees it (inside a container's root, say)."""
        e = dict(os.environ)
        e.setdefault("RUST_LOG", "info")
        if env:
            e.update(env)
        super().__init__([*wrap, bin, *args], env=e)
        _LIVE_AGENTS.append(self)
        self.wait_for(lambda l: "ready" in l, what="the agent's ready line", timeout=120)


    def stop(self, sig=signal.SIGINT, timeout=30.0):
        """Also records `usage_at_stop` (CPU seconds, resident bytes, from /proc, just before
        the signal) and `cpu_at_exit` (CPU seconds once it has exited, read off the zombie
        before it is reaped): brackets for what the agent reports of itself."""
        if self.p.poll() is None:
            self.usage_at_stop = proc_usage(self.pid)
            self.p.send_signal(sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                st = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                if st is not None:
                    self.cpu_at_exit = proc_usage(self.pid)[0]
                    break
                time.sleep(0.02)
        return super().stop(sig, timeout)

    def exchanges(self):
        """Parsed `watch --json` records printed so far."""
        out = []
        for line in self.out:
            line = line.strip()
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def final_count(self, name, reason=None):
        """A counter from the agent's "final count" lines on exit (None if not printed);
        `reason`: the count of that reason of a counter kept by reason."""
        for line in reversed(self.err):
            if "final count" in line and f'counter="{name}"' in line and (
                reason is None or f'reason="{reason}"' in line
            ):
                return int(line.rsplit("value=", 1)[1].split()[0])
        return None

    def wait_exchanges(self, n, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.exchanges()) >= n:
                return self.exchanges()
            with self._cv:
                self._cv.wait(0.2)
        return self.exchanges()


def proc_usage(pid):
    """(CPU seconds, resident bytes) of a process from /proc (CPU in clock ticks of 10 ms;
    a zombie keeps its CPU times and has no memory)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/statm") as f:
        resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, resident


def watch(*ports, pids=(), exe=(), exclude=(), inject=False, extra=()):
    """`tapir watch --json` limited to these ports/pids (tests never see each other)."""
    args = ["watch", "--json"] + (["--inject"] if inject else []) + list(extra)
    for p in ports:
        args += ["--port", str(p)]
    for p in pids:
        args += ["--pid", str(p)]
    for name in exe:
        args += ["--exe", name]
    for name in exclude:
        args += ["--exclude-exe", name]
    return Agent(*args)


def finish(agent):
    """Stop the agent (it drains the ring buffer on SIGINT) and return every exchange."""
    assert agent.stop() == 0, "\n".join(agent.err[-20:])
    return agent.exchanges()


@pytest.fixture
def procs():
    """Start helper processes; all are stopped at the end of the test."""
    started = []

    def start(argv, ready_port=None, ready_addr="127.0.0.1", **kw):
        p = Proc(argv, **kw)
        started.append(p)
        if ready_port is not None:
            wait_port(ready_port, ready_addr)
        return p

    yield start
    for p in reversed(started):
        if p.p.poll() is None:
            p.stop(signal.SIGTERM, timeout=10)


@pytest.fixture
def py_server(procs):
    """Start tests/servers/pyserver.py on a fresh port: returns (proc, port)."""

    def start(*extra, bind="127.0.0.1", env=None, port=None):
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        port = port or free_port(family, bind)
        p = procs(
            [sys.executable, TESTS / "servers/pyserver.py", port, "--bind", bind, *extra],
            ready_port=port,
            ready_addr=bind,
            env=env,
        )
        return p, port

    return start


def nginx(procs, tmp_path, port, server_body, http_extra="", listen_extra=""):
    """Start an unmodified nginx (one worker, running as root so it can read tmp_path) with
    one server block listening on 127.0.0.1:port (`listen_extra`: e.g. `ssl`); returns the
    master process."""
    conf = tmp_path / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""
        user root;
        worker_processes 1;
        pid {tmp_path}/nginx.pid;
        error_log {tmp_path}/error.log;
        events {{ worker_connections 64; }}
        http {{
            access_log off;
            {http_extra}
            client_body_temp_path {tmp_path}/body;
            proxy_temp_path {tmp_path}/proxy;
            fastcgi_temp_path {tmp_path}/fcgi;
            uwsgi_temp_path {tmp_path}/uwsgi;
            scgi_temp_path {tmp_path}/scgi;
            server {{
                listen 127.0.0.1:{port} {listen_extra};
                {server_body}
            }}
        }}
    """))
    return procs(["nginx", "-c", conf, "-g", "daemon off;"], ready_port=port)


def self_signed(tmp_path):
    """A self-signed key and certificate for localhost (openssl): (key path, cert path)."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-days", "1", "-keyout", key, "-out", cert],
        check=True, capture_output=True, timeout=60,
    )
    return key, cert


def self_signed_pem(tmp_path):
    """The same key and certificate in one PEM file, as Python's and Node's servers take it."""
    key, cert = self_signed(tmp_path)
    pem = tmp_path / "tls.pem"
    pem.write_bytes(key.read_bytes() + cert.read_bytes())
    return pem


def cgroup2_mount():
    """Where the cgroup v2 hierarchy is mounted (skips the test without one)."""
    for line in open("/proc/self/mountinfo"):
        pre, _, post = line.partition(" - ")
        if post.split()[0] == "cgroup2":
            return pre.split()[4]
    pytest.skip("no cgroup v2 mount")


def span_path(s):
    """An OTLP span's request path: a SERVER's url.path, a CLIENT's from its url.full (the
    conventions give CLIENT spans no url.path)."""
    a = s["attributes"]
    if "url.path" in a:
        return a["url.path"]
    rest = a["url.full"].split("://", 1)[1]
    return "/" + rest.split("/", 1)[1] if "/" in rest else ""


def curl(*args, check=True):
    r = subprocess.run(["curl", "-sS", *map(str, args)], capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise AssertionError(f"curl {args} failed: {r.stderr}")
    return r


def have(cmd):
    return shutil.which(cmd) is not None


def require(cmd):
    """Fails (not skips) the test without `cmd`: the machine image or `cargo xtask test`
    provides every program the tests run, so a missing one is a broken set-up."""
    if not have(cmd):
        pytest.fail(f"{cmd} is not installed (it is part of this machine image)")


@pytest.fixture
def otlp():
    """A real OTLP receiver (tests/otlp_receiver.py) on free gRPC and HTTP ports."""
    from otlp_receiver import OtlpReceiver  # needs the test requirements (grpcio, opentelemetry-proto)

    r = OtlpReceiver(grpc_port=0, http_port=0).start()
    yield r
    r.stop()


@pytest.fixture(autouse=True)
def _stop_leftover_agents():
    """An agent left running by a failed test would slow every later one down."""
    yield
    while _LIVE_AGENTS:
        a = _LIVE_AGENTS.pop()
        if a.p.poll() is None:
            a.p.kill()
            a.p.wait()
