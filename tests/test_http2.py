"""HTTP/2 without TLS (h2c) and gRPC: real, unmodified programs — a grpcio service and
client, Node's `http2` server, curl with `--http2-prior-knowledge` — observed by the
agent at both ends of each connection, exported to a real OTLP receiver.

Every test filters the agent by its own ports, stops the agent (which flushes what is
pending) and then asserts on exactly what arrived.
"""
import re
import sys
import time

from conftest import TESTS, curl, finish, free_port, require, watch
from test_otlp import check_ids, check_times, histogram_counts, otel_agent, wait_histogram
from test_otlp import finish as finish_run

PY = sys.executable
GRPC = str(TESTS / "servers/grpc_service.py")
TIMEOUT = 30.0


def grpc_server(procs):
    port = free_port()
    server = procs([PY, GRPC, "serve", str(port)], ready_port=port)
    return server, port


def traceparent(i):
    return f"00-{i:032x}-{i:016x}-01"


def is_rpc(pid, kind):
    return lambda s: s["kind"] == kind and s["resource"].get("process.pid") == pid


def test_grpc_calls_become_rpc_spans_and_metrics_at_both_ends(otlp, procs):
    server, port = grpc_server(procs)
    agent = otel_agent(otlp, port)
    # The caller's own context on each call, as an instrumented caller sends it.
    calls = [f"SayHello:{traceparent(i)}" for i in range(1, 6)]
    calls += [f"Fail:{traceparent(6)}", f"Nope:{traceparent(7)}", "Slow"]
    t0 = time.time_ns()
    client = procs([PY, GRPC, "call", str(port), *calls])
    assert client.wait_exit() == 0, client.err
    assert client.out == ["OK"] * 5 + ["UNAVAILABLE", "UNIMPLEMENTED", "OK"]
    n = len(calls)
    otlp.wait_spans(is_rpc(server.pid, "SERVER"), n=n, timeout=TIMEOUT)
    otlp.wait_spans(is_rpc(client.pid, "CLIENT"), n=n, timeout=TIMEOUT)
    mine = lambda res: res.get("process.pid") == server.pid  # noqa: E731
    key = lambda p: (p["attributes"]["rpc.method"], p["attributes"].get("rpc.response.status_code"))  # noqa: E731
    expected_points = {
        ("helloworld.Greeter/SayHello", "OK"): 5,
        ("helloworld.Greeter/Fail", "UNAVAILABLE"): 1,
        ("_OTHER", "UNIMPLEMENTED"): 1,
        ("helloworld.Greeter/Slow", "OK"): 1,
    }
    wait_histogram(otlp, "rpc.server.call.duration", mine, key, expected_points)
    finish_run(agent)
    t1 = time.time_ns()

    by_start = lambda spans: sorted(spans, key=lambda s: s["start_time_unix_nano"])  # noqa: E731
    servers = by_start(otlp.spans(is_rpc(server.pid, "SERVER")))
    clients = by_start(otlp.spans(is_rpc(client.pid, "CLIENT")))
    assert len(servers) == len(clients) == n, (servers, clients)
    expect = [("helloworld.Greeter/SayHello", "OK")] * 5 + [
        ("helloworld.Greeter/Fail", "UNAVAILABLE"),
        ("_OTHER", "UNIMPLEMENTED"),
        ("helloworld.Greeter/Slow", "OK"),
    ]
    for spans, kind in [(servers, "SERVER"), (clients, "CLIENT")]:
        got = [(s["attributes"]["rpc.method"], s["attributes"]["rpc.response.status_code"]) for s in spans]
        assert got == expect, kind
        for s, (method, status) in zip(spans, expect):
            a = s["attributes"]
            assert s["name"] == method
            assert a["rpc.system.name"] == "grpc"
            assert a["server.address"] == "127.0.0.1" and a["server.port"] == port
            assert a["network.protocol.version"] == "2"
            assert not {k for k in a if k.startswith("http.") or k.startswith("url.")}, a
            check_ids(s)
            check_times(s, t0, t1)
        # A caller's mistake (the method it named does not exist) is the server's success;
        # UNAVAILABLE and UNIMPLEMENTED are errors at both ends.
        errors = [(s["attributes"].get("error.type"), s["status_code"]) for s in spans]
        assert errors == [(None, "UNSET")] * 5 + [("UNAVAILABLE", "ERROR"), ("UNIMPLEMENTED", "ERROR"), (None, "UNSET")]
    assert servers[6]["attributes"]["rpc.method_original"] == "helloworld.Greeter/Nope"
    # The slow call lasted its 0.2 s at both ends.
    for s in (servers[7], clients[7]):
        assert 0.2e9 <= s["end_time_unix_nano"] - s["start_time_unix_nano"] < 5e9, s
    # Trace context: the caller's traceparent names the CLIENT span (its own ids), and the
    # SERVER span is its child in the same trace; the call without one starts a trace.
    for i, (s, c) in enumerate(zip(servers[:7], clients[:7]), start=1):
        assert (c["trace_id"], c["span_id"]) == (f"{i:032x}", f"{i:016x}"), c
        assert (s["trace_id"], s["parent_span_id"]) == (c["trace_id"], c["span_id"]), s
        assert s["span_id"] != c["span_id"]
    assert servers[7]["parent_span_id"] == "" and clients[7]["parent_span_id"] == ""
    assert servers[7]["trace_id"] != clients[7]["trace_id"] or servers[7]["span_id"] != clients[7]["span_id"]
    # One connection for all calls; both ends counted as HTTP/2 read.
    assert len({c["attributes"]["network.peer.port"] for c in clients}) == 1
    assert agent.final_count("tapir.connections.http2") == 2, agent.err[-30:]
    assert agent.final_count("tapir.connections.unreadable.http2") in (None, 0)
    # Metrics: RPC durations at both ends, none as HTTP.
    client_of = lambda res: res.get("process.pid") == client.pid  # noqa: E731
    assert histogram_counts(otlp, "rpc.client.call.duration", client_of, key) == expected_points
    for name in ["http.server.request.duration", "http.client.request.duration"]:
        assert histogram_counts(otlp, name, lambda r: r.get("process.pid") in (server.pid, client.pid), key) == {}
    for p in otlp.latest_points("rpc.server.call.duration", lambda m: mine(m["resource"])):
        assert p["unit"] == "s" and p["attributes"]["rpc.system.name"] == "grpc"
        assert ("error.type" in p["attributes"]) == (p["attributes"]["rpc.response.status_code"] != "OK")
    assert otlp.errors == []


NODE_H2C = """
const http2 = require("http2");
const server = http2.createServer();
server.on("stream", (stream, headers) => {
  const status = Number(headers[":path"].split("/")[2] || 200);
  stream.respond({ ":status": status, "content-type": "text/plain" });
  stream.end("x".repeat(100));
});
server.listen(Number(process.argv[2]), "127.0.0.1", () => console.log("ready"));
"""


def test_h2c_requests_from_curl_to_node_are_http_exchanges(procs, tmp_path):
    require("node")
    script = tmp_path / "h2c.js"
    script.write_text(NODE_H2C)
    port = free_port()
    node = procs(["node", str(script), str(port)], ready_port=port)
    agent = watch(port)
    paths = ["/status/200?secret=1", "/status/404", "/status/503"]
    for p in paths:
        r = curl("--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
                 f"http://127.0.0.1:{port}{p}", check=False)
        assert r.stdout.split() == [p.split("/")[2].split("?")[0], "2"], r.stdout
    got = finish(agent)
    rows = sorted(
        (e["kind"], e["url.path"], e["http.response.status_code"], e["network.protocol.version"],
         e["http.request.method"], e["http.response.body.size"])
        for e in got
    )
    assert rows == sorted(
        (kind, f"/status/{st}", st, "2", "GET", 100)
        for kind in ("client", "server")
        for st in (200, 404, 503)
    ), got
    servers = [e for e in got if e["kind"] == "server"]
    assert {e["process.pid"] for e in servers} == {node.pid}
    assert all("rpc.method" not in e for e in got)
    assert not any("secret" in str(e) for e in got)
    assert agent.final_count("tapir.connections.http2") == 6, agent.err[-30:]


def test_responses_larger_than_the_capture_are_read_at_both_ends(procs):
    """A 100 KB gRPC response is written at once (headers, body in 16 KiB DATA frames,
    trailers: one call) and read in large pieces: its trailers lie far beyond what the
    kernel copies of the call. The kernel walks the frames and copies their headers and
    header blocks, not the body, so every call of the connection is read at both ends,
    with its status, and nothing is dropped."""
    server, port = grpc_server(procs)
    agent = watch(port)
    client = procs([PY, GRPC, "call", str(port), "SayHello", "Big", "SayHello", "Big", "Fail"])
    assert client.wait_exit() == 0, client.err
    assert client.out == ["OK"] * 4 + ["UNAVAILABLE"]
    got = finish(agent)
    hello, big, fail = (f"helloworld.Greeter/{m}" for m in ("SayHello", "Big", "Fail"))
    for kind, pid in (("server", server.pid), ("client", client.pid)):
        mine = sorted((e for e in got if e["kind"] == kind and e["process.pid"] == pid),
                      key=lambda e: e["start_time_unix_nano"])
        assert [(e["rpc.method"], e["rpc.response.status_code"]) for e in mine] == [
            (hello, "OK"), (big, "OK"), (hello, "OK"), (big, "OK"), (fail, "UNAVAILABLE"),
        ], got
        # Every DATA frame counted: gRPC's 5-byte message prefix and the 100,000 bytes.
        assert [e["http.response.body.size"] for e in mine if e["rpc.method"] == big] == [100_005] * 2, mine
    assert agent.final_count("tapir.connections.http2_given_up") == 0, agent.err[-30:]
    assert agent.final_count("tapir.http.dropped", "head_truncated") == 0, agent.err[-30:]
    assert agent.final_count("tapir.connections.http2") == 2, agent.err[-30:]


def test_a_header_block_larger_than_the_capture_gives_its_connection_up_and_says_so(procs):
    """With `--capture-bytes 1024`, a response whose trailers carry 3 KB of metadata has a
    header block the kernel does not copy whole, so the connection's header state cannot
    be followed. Tapir drops that call and counts it, never decodes later headers against a
    wrong table, and reads the next connection again."""
    server, port = grpc_server(procs)
    agent = watch(port, extra=("--capture-bytes", "1024"))
    first = procs([PY, GRPC, "call", str(port), "SayHello", "Meta", "SayHello"])
    assert first.wait_exit() == 0, first.err
    second = procs([PY, GRPC, "call", str(port), "SayHello"])
    assert second.wait_exit() == 0, second.err
    assert first.out == ["OK"] * 3 and second.out == ["OK"]
    got = finish(agent)
    hello = "helloworld.Greeter/SayHello"
    of = lambda kind, pid: [e["rpc.method"] for e in got if e["kind"] == kind and e["process.pid"] == pid]  # noqa: E731
    # Both ends of the first connection end with its first call; both ends of the next
    # connection are read again.
    assert sorted(of("server", server.pid)) == [hello, hello], got
    assert of("client", first.pid) == [hello], got
    assert of("client", second.pid) == [hello], got
    # The connection and its call in flight, at each end; said once per end, with why.
    assert agent.final_count("tapir.http.dropped", "head_truncated") == 4, agent.err[-30:]
    assert agent.final_count("tapir.connections.http2_given_up") == 2, agent.err[-30:]
    said = [l.split("not captured: ", 1)[1] for l in agent.err if "not captured: " in l]
    pattern = rf"python[\d.]* \(pid {server.pid}\) serves HTTP/2 on port {port}; a header block lay beyond"
    assert any(re.match(pattern, l) for l in said), said
    assert all(e["rpc.response.status_code"] == "OK" for e in got)
