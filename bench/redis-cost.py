#!/usr/bin/env python3
"""What Tapir costs a Redis client and server (session 36; context for BENCHMARKS.md, not
part of `cargo xtask bench`). Needs root, redis-server and redis-benchmark (Debian's
redis-server and redis-tools), and `cargo xtask build` (target/release/tapir and
tapir-otlp-sink).

redis-server pinned to CPU 0, `redis-benchmark -c 16 -t get` (no pipelining) pinned to
CPU 1; ROUNDS pairs of baseline (no agent) and agent (`tapir run --port PORT`, every span
exported over OTLP/gRPC to tapir-otlp-sink), alternating which goes first. Per command:
the server's CPU (/proc/PID/schedstat, which includes the eBPF programs run in its
syscalls), the client's (user + system from wait4), the agent's (/proc/PID/stat, after the
last export), and throughput; then the medians over the pairs of the differences and the
ratio. Then one run with `--ebpf-stats --exe redis-benchmark --exporter none`: the
kernel's own count of the programs' time (the server left out).

Usage: bench/redis-cost.py [COMMANDS_PER_RUN] [ROUNDS]
"""
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target/release")
PORT = 16390
N = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def sched_ns(pid):
    return int(open(f"/proc/{pid}/schedstat").read().split()[0])


def agent(*args):
    p = subprocess.Popen([f"{BIN}/tapir", "run", "--port", str(PORT), *args], stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "ready" in line:
            return p
    raise SystemExit("the agent did not start")


def benchmark():
    """Runs redis-benchmark; returns (requests/s, its CPU seconds)."""
    before = os.times()
    b = subprocess.run(["taskset", "-c", "1", "redis-benchmark", "-p", str(PORT), "-c", "16", "-n", str(N),
                        "-t", "get", "-q"], capture_output=True, text=True, check=True)
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return float(re.search(r"([\d.]+) requests per second", b.stdout).group(1)), cpu


server = subprocess.Popen(["taskset", "-c", "0", "redis-server", "--port", str(PORT), "--save", "",
                           "--appendonly", "no"], stdout=subprocess.DEVNULL)
sink = subprocess.Popen([f"{BIN}/tapir-otlp-sink"], stdout=subprocess.PIPE, text=True)
try:
    grpc_port = re.search(r"(\d+)", sink.stdout.readline()).group(1)
    time.sleep(0.5)
    runs = {"base": [], "agent": []}
    for r in range(ROUNDS):
        for mode in (["base", "agent"] if r % 2 == 0 else ["agent", "base"]):
            a = agent("--otlp-protocol", "grpc", "--otlp-endpoint", f"http://127.0.0.1:{grpc_port}") if mode == "agent" else None
            a0 = cpu_s(a.pid) if a else 0
            s0 = sched_ns(server.pid)
            rps, client = benchmark()
            row = {"rps": rps, "server_us": (sched_ns(server.pid) - s0) / 1e3 / N, "client_us": client * 1e6 / N}
            if a:
                time.sleep(1.5)  # the last export batch goes out
                row["agent_us"] = (cpu_s(a.pid) - a0) * 1e6 / N
                a.send_signal(2)
                a.wait(timeout=30)
            runs[mode].append(row)
            print(mode, {k: round(v, 3) for k, v in row.items()}, flush=True)
    pairs = list(zip(runs["base"], runs["agent"]))
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"per command, medians over {ROUNDS} pairs: server {med([b['server_us'] for b, _ in pairs]):.2f} µs "
          f"+{med([a['server_us'] - b['server_us'] for b, a in pairs]):.2f}; "
          f"client {med([b['client_us'] for b, _ in pairs]):.2f} µs "
          f"+{med([a['client_us'] - b['client_us'] for b, a in pairs]):.2f}; "
          f"agent {med([a['agent_us'] for _, a in pairs]):.2f} µs; "
          f"throughput {100 * med([a['rps'] / b['rps'] for b, a in pairs]):.1f} %")
    a = agent("--exe", "redis-benchmark", "--exporter", "none", "--ebpf-stats")
    benchmark()
    a.send_signal(2)
    _, err = a.communicate(timeout=30)
    for line in err.splitlines():
        m = re.search(r'program="(\w+)" runs=(\d+) run_time_ns=(\d+)', line)
        if m and int(m.group(2)) > 1000:
            print(f"{m.group(1)}: {int(m.group(2)) / N:.2f} runs and {int(m.group(3)) / N:.0f} ns per command "
                  f"({int(m.group(3)) / int(m.group(2)):.0f} ns per run)")
finally:
    server.terminate()
    sink.terminate()
