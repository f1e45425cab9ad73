"""Redis: a real `redis-server` (Debian's) and real, unmodified clients (`redis-cli`,
redis-py). Every command a client sends becomes one CLIENT span named by the command, with
the database conventions' attributes; a command sent while a thread serves an HTTP request
is that request's child; the server's end gives nothing (Redis calls are a client's).

Each test runs its own redis-server on a free port and filters the agent by it (and by its
service's port).
"""
import subprocess
import sys
import time

import pytest

from conftest import TESTS, curl, finish, free_port, require, watch
from test_otlp import TIMEOUT, otel_agent

PY = sys.executable
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture
def redis_server(procs):
    """redis-server on a fresh port, no persistence: returns (proc, port)."""
    require("redis-server")
    port = free_port()
    p = procs(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        ready_port=port,
    )
    return p, port


def cli(port, *args, stdin=None):
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], input=stdin, capture_output=True, check=True, timeout=30
    )


def calls_of(exchanges, pid):
    return [
        (e["db.operation.name"], e["db.response.status_code"], e["error.type"])
        for e in sorted(exchanges, key=lambda e: e["start_time_unix_nano"])
        if e["process.pid"] == pid
    ]


# A client of its own that keeps one connection: the handshake redis-py makes, then a value
# ten times larger than the kernel copies of a call, read back, then a counter.
SESSION = """
import os, sys, redis
r = redis.Redis(host="127.0.0.1", port=int(sys.argv[1]), single_connection_client=True)
big = os.urandom(100_000)
r.set("big", big)
assert r.get("big") == big
r.incr("n")
r.delete("big", "n")
print(os.getpid(), flush=True)
"""


def test_redis_commands_are_client_spans_named_by_the_command(redis_server):
    server, port = redis_server
    agent = watch(port)
    cli(port, "SET", "k", "v")
    assert cli(port, "GET", "k").stdout == b"v\n"
    assert b"not an integer" in cli(port, "INCR", "k").stdout
    assert b"WRONGTYPE" in cli(port, "LPUSH", "k", "x").stdout
    assert b"unknown command" in cli(port, "FROBNICATE", "k").stdout
    session = subprocess.run([PY, "-c", SESSION, str(port)], capture_output=True, check=True, timeout=30)
    session_pid = int(session.stdout)
    got = finish(agent)

    cli_spans = [e for e in got if e["process.executable.name"] == "redis-cli"]
    assert [
        (e["db.operation.name"], e["db.response.status_code"], e["error.type"])
        for e in sorted(cli_spans, key=lambda e: e["start_time_unix_nano"])
    ] == [
        ("SET", None, None),
        ("GET", None, None),
        ("INCR", "ERR", "ERR"),
        ("LPUSH", "WRONGTYPE", "WRONGTYPE"),
        # A command the server did not know: not a name of its own in metrics.
        ("_OTHER", "ERR", "ERR"),
    ]
    # redis-py says who it is first (`CLIENT SETINFO`, which servers before 7.2 refuse),
    # then the session's commands, paired in order on one connection whatever their size.
    session_calls = calls_of(got, session_pid)
    assert [c[0] for c in session_calls[:2]] == ["CLIENT", "CLIENT"], session_calls
    assert session_calls[2:] == [
        ("SET", None, None),
        ("GET", None, None),
        ("INCRBY", None, None),  # redis-py's incr()
        ("DEL", None, None),
    ]
    assert len({e["client.port"] for e in got if e["process.pid"] == session_pid}) == 1
    for e in got:
        assert e["kind"] == "client" and e["db.system.name"] == "redis", e
        assert e["server.port"] == port and e["server.address"] == "127.0.0.1", e
        assert e["parent_span_id"] is None, "no request was being served"
        assert "http.request.method" not in e and "url.path" not in e, e
        assert 0 < e["duration_ns"] < 10e9, e
    assert all(e["process.pid"] != server.pid for e in got), "the server's end gives no spans"
    assert agent.final_count("tapir.connections.redis") == 6
    assert agent.final_count("tapir.http.dropped", "head_truncated") in (None, 0)
    assert agent.final_count("tapir.http.dropped", "unmatched_response") in (None, 0)


def test_redis_calls_made_while_serving_a_request_are_its_children_over_otlp(otlp, redis_server, procs):
    _, rport = redis_server
    port = free_port()
    # Tapir reads a Redis connection from its start: the agent comes first.
    agent = otel_agent(otlp, port, rport)
    app = procs([PY, TESTS / "servers/redis_app.py", str(port), str(rport)], ready_port=port)
    for name in ("ann", "bob"):
        r = curl("-s", "-H", f"traceparent: 00-{TRACE}-{PARENT}-01", f"http://127.0.0.1:{port}/visit/{name}")
        assert r.stdout == "1", r.stdout
    assert curl("-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/fail").stdout == "500"
    assert curl("-s", f"http://127.0.0.1:{port}/batch").stdout == "1"
    is_app = lambda s: s["resource"].get("process.pid") == app.pid  # noqa: E731
    otlp.wait_spans(lambda s: is_app(s) and s["kind"] == "CLIENT", n=16, timeout=TIMEOUT)
    otlp.wait_metrics(lambda m: m["name"] == "db.client.operation.duration", timeout=TIMEOUT)
    finish(agent)

    servers = sorted(
        (s for s in otlp.spans() if is_app(s) and s["kind"] == "SERVER"), key=lambda s: s["start_time_unix_nano"]
    )
    clients = sorted(
        (s for s in otlp.spans() if is_app(s) and s["kind"] == "CLIENT"), key=lambda s: s["start_time_unix_nano"]
    )
    assert [s["attributes"]["url.path"] for s in servers] == ["/visit/ann", "/visit/bob", "/fail", "/batch"]
    # Before it served anything: its connections' handshakes and set-up, roots of their own.
    setup, clients = clients[:7], clients[7:]
    assert [s["name"] for s in setup] == ["CLIENT", "CLIENT", "PING", "SET", "CLIENT", "CLIENT", "PING"], setup
    assert all(s["parent_span_id"] == "" for s in setup), setup
    assert len({s["trace_id"] for s in setup}) == 7
    assert [s["name"] for s in clients] == [
        "INCRBY", "GET", "INCRBY", "GET", "LPUSH", "MULTI", "INCRBY", "EXPIRE", "EXEC",
    ]  # fmt: skip
    # Each command is a child of the request its thread was serving, those of a
    # transaction written at once too.
    owners = [0, 0, 1, 1, 2, 3, 3, 3, 3]
    assert len({c["span_id"] for c in clients}) == len(clients)
    for c, i in zip(clients, owners):
        srv = servers[i]
        assert c["trace_id"] == srv["trace_id"] and c["parent_span_id"] == srv["span_id"], (c, srv)
        assert srv["start_time_unix_nano"] <= c["start_time_unix_nano"] <= c["end_time_unix_nano"]
        assert c["end_time_unix_nano"] <= srv["end_time_unix_nano"]
        a = c["attributes"]
        assert a["db.system.name"] == "redis" and a["db.operation.name"] == c["name"], a
        assert a["server.address"] == "127.0.0.1" and a["server.port"] == rport, a
        assert a["network.peer.address"] == "127.0.0.1" and a["network.peer.port"] == rport, a
        assert "network.protocol.version" not in a and "url.full" not in a, a
    assert servers[0]["trace_id"] == servers[1]["trace_id"] == TRACE, "the callers' trace continues"
    failed = clients[4]
    assert failed["attributes"]["db.response.status_code"] == "WRONGTYPE"
    assert failed["attributes"]["error.type"] == "WRONGTYPE"
    assert failed["status_code"] == "ERROR", failed
    assert all("error.type" not in c["attributes"] and c["status_code"] == "UNSET" for c in clients if c is not failed)

    points = {}
    for p in otlp.latest_points("db.client.operation.duration", lambda p: p["attributes"].get("server.port") == rport):
        a = p["attributes"]
        points[(a["db.operation.name"], a.get("db.response.status_code"), a.get("error.type"))] = p["count"]
        assert a["db.system.name"] == "redis", a
    # The handshakes' four, whether this server knows `CLIENT SETINFO` or not.
    assert sum(n for (op, _, _), n in points.items() if op == "CLIENT") == 4, points
    points = {k: n for k, n in points.items() if k[0] != "CLIENT"}
    assert points == {
        ("PING", None, None): 2,
        ("SET", None, None): 1,
        ("INCRBY", None, None): 3,
        ("GET", None, None): 2,
        ("LPUSH", "WRONGTYPE", "WRONGTYPE"): 1,
        ("MULTI", None, None): 1,
        ("EXPIRE", None, None): 1,
        ("EXEC", None, None): 1,
    }
    assert not otlp.latest_points("http.client.request.duration", lambda p: p["attributes"].get("server.port") == rport)
    # `--port` made the Redis port an injection port: the kernel claimed both of the app's
    # connections, and retired them once they turned out to be Redis (their
    # acknowledgements then stop running its RTT callback).
    assert agent.final_count("tapir.inject.retired") == 2, agent.err[-30:]
