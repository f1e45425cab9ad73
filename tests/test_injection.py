"""Issue: propagation, on the wire. `tapir run`/`watch --inject` insert `traceparent`
into outgoing HTTP/1.x requests of unmodified programs, so the downstream service's
SERVER span joins the trace. The request otherwise arrives byte-identical."""
import hashlib
import json
import os
import sys

import pytest

from conftest import TESTS, Agent, cgroup2_mount, curl, finish, free_port, nginx, span_path, watch
from test_propagation import PARENT, TRACE, of

PY = sys.executable


def frontend(procs, downstream, *extra):
    port = free_port()
    p = procs([PY, TESTS / "servers/frontend.py", port, downstream, *extra], ready_port=port)
    return p, port


def node_frontend(procs, bport, *mode):
    """tests/servers/node_frontend.js calling the backend on `bport` (`keepalive`: through a
    one-socket pool); returns the process and its port."""
    port = free_port()
    p = procs(["node", TESTS / "servers/node_frontend.js", port, f"http://127.0.0.1:{bport}", *mode],
              ready_port=port)
    return p, port


def warm(port):
    """A first request teaches the kernel that `port` serves HTTP: connections made to it
    from then on are injected (the very first one is not)."""
    curl("-o", "/dev/null", f"http://127.0.0.1:{port}/warm-up")


def test_two_services_twenty_requests_twenty_joined_traces(py_server, procs):
    backend, bport = py_server()
    front, fport = frontend(procs, f"http://127.0.0.1:{bport}", "--threading")
    agent = watch(fport, bport, inject=True)
    warm(bport)
    n = 20
    for i in range(n):
        curl("-o", "/dev/null", f"http://127.0.0.1:{fport}/order/{i}")
    got = finish(agent)
    fserver = [e for e in of(got, "server", fport) if e["url.path"].startswith("/order/")]
    fclient = [e for e in of(got, "client", bport) if e["process.pid"] == front.pid]
    bserver = [e for e in of(got, "server", bport) if e["url.path"].startswith("/order/")]
    assert len(fserver) == len(fclient) == len(bserver) == n
    traces = set()
    for s, c, b in zip(fserver, fclient, bserver):
        assert s["url.path"] == c["url.path"] == b["url.path"]
        assert c["trace_id"] == s["trace_id"] and c["parent_span_id"] == s["span_id"]
        assert b["trace_id"] == s["trace_id"], "backend joined the frontend's trace"
        assert b["parent_span_id"] == c["span_id"], "backend's parent is the injected span"
        assert b["process.pid"] == backend.pid
        traces.add(s["trace_id"])
    assert len(traces) == n


def test_three_hops_and_an_incoming_traceparent_flow_through(py_server, procs):
    backend, bport = py_server()
    middle, mport = frontend(procs, f"http://127.0.0.1:{bport}", "--threading")
    front, fport = frontend(procs, f"http://127.0.0.1:{mport}")
    agent = watch(fport, mport, bport, inject=True)
    warm(bport)
    curl("-o", "/dev/null", f"http://127.0.0.1:{mport}/warm-up")
    curl("-o", "/dev/null", "-H", f"traceparent: 00-{TRACE}-{PARENT}-01", f"http://127.0.0.1:{fport}/deep")
    got = [e for e in finish(agent) if e["url.path"] == "/deep"]
    ids = [(e["kind"], e["server.port"], e["process.pid"], e["trace_id"], e["span_id"], e["parent_span_id"]) for e in got]
    print("ids:", *ids, sep="\n  ")
    f_srv, = of(got, "server", fport)
    f_cli, = [e for e in of(got, "client", mport) if e["process.pid"] == front.pid]
    m_srv, = of(got, "server", mport)
    m_cli, = of(got, "client", bport)
    b_srv, = of(got, "server", bport)
    assert {e["trace_id"] for e in (f_srv, f_cli, m_srv, m_cli, b_srv)} == {TRACE}
    assert f_srv["parent_span_id"] == PARENT
    assert f_cli["parent_span_id"] == f_srv["span_id"]
    assert m_srv["parent_span_id"] == f_cli["span_id"]
    assert m_cli["parent_span_id"] == m_srv["span_id"]
    assert b_srv["parent_span_id"] == m_cli["span_id"]


def test_backend_sees_exactly_one_traceparent_equal_to_the_client_span(py_server, procs):
    backend, bport = py_server()
    front, fport = frontend(procs, f"http://127.0.0.1:{bport}/echo-headers")
    agent = watch(fport, bport, inject=True)
    warm(bport)
    echoed = curl(f"http://127.0.0.1:{fport}/x").stdout
    tps = [l.split(":", 1)[1].strip() for l in echoed.splitlines() if l.lower().startswith("traceparent:")]
    assert len(tps) == 1, echoed
    got = finish(agent)
    cli, = [e for e in of(got, "client", bport) if e["process.pid"] == front.pid]
    assert tps[0] == f"00-{cli['trace_id']}-{cli['span_id']}-01"


# Runs "$@" as a container does on cgroup v2: in a cgroup namespace of its own, rooted
# at a child cgroup, with its own cgroup2 mount of that subtree, and the host's whole
# hierarchy mounted (as a hostPath) after it, at $3.
OWN_CGROUP_NS = r"""
set -e
cg=$1 sub=$2 host=$3; shift 3
mkdir -p "$host.tmp" "$host"
mount --bind "$cg" "$host.tmp"
echo $$ > "$cg/$sub/cgroup.procs"
exec unshare --cgroup sh -ec '
  cg=$1 host=$2; shift 2
  umount "$cg"; mount -t cgroup2 none "$cg"
  mount --bind "$host.tmp" "$host"; umount "$host.tmp"
  exec "$@"' sh "$cg" "$host" "$@"
"""


def test_injection_from_an_agent_in_its_own_cgroup_namespace(py_server, tmp_path):
    """In a DaemonSet the agent has a cgroup namespace of its own (containerd and Docker on
    cgroup v2): its /sys/fs/cgroup is its own subtree, and sock_ops attached there would see
    only the agent's sockets. It must find the hierarchy's root (the host's mount) and
    inject into requests of processes outside its cgroup."""
    server, port = py_server()
    cg = cgroup2_mount()
    sub = f"tapir-e2e-{tmp_path.name}"
    os.mkdir(f"{cg}/{sub}")
    script = tmp_path / "own_cgroup_ns.sh"
    script.write_text(OWN_CGROUP_NS)
    wrap = ["unshare", "--mount", "--propagation", "private", "sh", str(script), cg, sub, str(tmp_path / "host")]
    try:
        agent = Agent("watch", "--json", "--inject", "--port", str(port), wrap=wrap)
        assert not any("not the root of the cgroup hierarchy" in l for l in agent.err), agent.err
        warm(port)
        echoed = curl(f"http://127.0.0.1:{port}/echo-headers").stdout
        got = finish(agent)
    finally:
        if "agent" in locals() and agent.p.poll() is None:
            agent.stop()
        os.rmdir(f"{cg}/{sub}")
    tps = [l.split(":", 1)[1].strip() for l in echoed.splitlines() if l.lower().startswith("traceparent:")]
    cli = [e for e in of(got, "client", port) if e["url.path"] == "/echo-headers"]
    assert len(cli) == 1 and tps == [f"00-{cli[0]['trace_id']}-{cli[0]['span_id']}-01"], (echoed, cli)


def test_request_bodies_arrive_intact(py_server, procs, tmp_path):
    backend, bport = py_server()
    front, fport = frontend(procs, f"http://127.0.0.1:{bport}")
    agent = watch(fport, bport, inject=True)
    warm(bport)
    for size in (10, 70_000, 1_000_000):
        body = tmp_path / f"body{size}"
        data = bytes((i * 7) % 251 for i in range(size))
        body.write_bytes(data)
        r = curl("--data-binary", f"@{body}", f"http://127.0.0.1:{fport}/upload")
        assert r.stdout == hashlib.sha256(data).hexdigest(), size
    got = finish(agent)
    clients = [e for e in of(got, "client", bport) if e["process.pid"] == front.pid]
    assert [e["http.request.method"] for e in clients] == ["POST"] * 3


def test_no_stall_nginx_proxy_and_node_fetch_4mib_through_injected_connections(py_server, procs, tmp_path):
    backend, bport = py_server("--threading")
    nport = free_port()
    nginx(procs, tmp_path, nport, f"location / {{ proxy_pass http://127.0.0.1:{bport}; proxy_read_timeout 20s; }}")
    agent = Agent("run", "--exporter", "none", "--port", str(bport), "--port", str(nport))
    warm(bport)
    big = 4 * 1024 * 1024
    for i in range(50):
        r = curl("-o", "/dev/null", "-w", "%{http_code} %{size_download}", "--max-time", "20",
                 f"http://127.0.0.1:{nport}/bytes/{big}")
        assert r.stdout == f"200 {big}", (i, r.stdout)
    node = procs(["node", TESTS / "servers/node_fetch.js", f"http://127.0.0.1:{bport}/bytes/{big}", 50, big])
    assert node.wait_exit(timeout=300) == 0, node.err
    assert node.out == ["ok 50"]
    assert agent.stop() == 0
    # The connections really were injected (not a vacuous pass): the counters say so.
    assert (agent.final_count("tapir.inject.injected") or 0) >= 50, agent.err[-30:]


def test_node_service_to_python_backend_continues_the_callers_trace(py_server, procs):
    backend, bport = py_server()
    node, nport = node_frontend(procs, bport)
    agent = watch(nport, bport, inject=True)
    for i in range(5):
        curl("-o", "/dev/null", "-H", f"traceparent: 00-{TRACE}-{PARENT}-01", f"http://127.0.0.1:{nport}/n/{i}")
    got = finish(agent)
    n_srv = [e for e in of(got, "server", nport)]
    n_cli = [e for e in of(got, "client", bport) if e["process.pid"] == node.pid]
    b_srv = of(got, "server", bport)
    assert [e["url.path"] for e in n_srv] == [e["url.path"] for e in b_srv] == [f"/n/{i}" for i in range(5)]
    for s, c, b in zip(n_srv, n_cli, b_srv):
        assert s["trace_id"] == c["trace_id"] == b["trace_id"] == TRACE
        assert s["parent_span_id"] == PARENT
        assert c["parent_span_id"] == s["span_id"]
        assert b["parent_span_id"] == c["span_id"]


def test_traces_over_otlp_two_named_services(otlp, py_server, procs):
    """The issue's main scenario, on the real receiver: 20 requests → 20 traces of
    frontend SERVER → frontend CLIENT → backend SERVER, services named by their own env."""
    import os

    backend, bport = py_server(env={**os.environ, "OTEL_SERVICE_NAME": "backend"})
    fport = free_port()
    procs(
        [PY, TESTS / "servers/frontend.py", fport, f"http://127.0.0.1:{bport}"],
        ready_port=fport,
        env={**os.environ, "OTEL_SERVICE_NAME": "frontend"},
    )
    agent = Agent("run", "--otlp-endpoint", f"http://127.0.0.1:{otlp.grpc_port}", "--otlp-protocol", "grpc",
                  "--port", str(fport), "--port", str(bport))
    for i in range(20):
        curl("-o", "/dev/null", f"http://127.0.0.1:{fport}/t/{i}")
    assert agent.stop() == 0
    spans = [s for s in otlp.spans() if span_path(s).startswith("/t/")]
    by = lambda svc, kind: sorted(
        (s for s in spans if s["resource"]["service.name"] == svc and s["kind"] == kind),
        key=lambda s: s["start_time_unix_nano"],
    )
    f_srv, f_cli, b_srv = by("frontend", "SERVER"), by("frontend", "CLIENT"), by("backend", "SERVER")
    assert len(f_srv) == len(f_cli) == len(b_srv) == 20, (len(f_srv), len(f_cli), len(b_srv))
    assert len({s["trace_id"] for s in f_srv}) == 20
    for s, c, b in zip(f_srv, f_cli, b_srv):
        assert c["trace_id"] == s["trace_id"] == b["trace_id"]
        assert c["parent_span_id"] == s["span_id"]
        assert b["parent_span_id"] == c["span_id"]


def _errors_of_1000_requests(fport):
    """1,000 GETs through the frontend (each makes one downstream call); non-200 count."""
    import http.client

    bad = 0
    for i in range(1000):
        c = http.client.HTTPConnection("127.0.0.1", fport, timeout=10)
        try:
            c.request("GET", f"/e/{i}")
            r = c.getresponse()
            r.read()
            bad += r.status != 200
        except OSError:
            bad += 1
        finally:
            c.close()
    return bad


def test_error_rate_of_1000_requests_equals_the_no_agent_baseline(py_server, procs):
    backend, bport = py_server("--threading")
    front, fport = frontend(procs, f"http://127.0.0.1:{bport}", "--threading")
    baseline = _errors_of_1000_requests(fport)
    agent = Agent("run", "--exporter", "none", "--port", str(fport), "--port", str(bport))
    with_agent = _errors_of_1000_requests(fport)
    assert agent.stop() == 0
    assert with_agent == baseline == 0, (baseline, with_agent)
    assert (agent.final_count("tapir.inject.injected") or 0) >= 1000, agent.err[-30:]


# Kept-alive connections: the kernel injects into the first request after it claims a
# socket and releases the socket once that request is acknowledged; the agent puts an idle
# socket back after each response it has seen (agent/src/rearm.rs). Each test waits for the
# agent to print the exchange of one request before sending the next: that is when the
# socket has been re-armed. Without the re-arming only the first request is injected.


@pytest.mark.parametrize("client_addr,server_bind", [
    ("127.0.0.1", "127.0.0.1"),
    ("::1", "::1"),
    ("::ffff:127.0.0.1", "127.0.0.1"),  # an IPv6 client socket with v4-mapped addresses
])
def test_every_request_of_a_kept_alive_connection_is_injected(py_server, client_addr, server_bind):
    import http.client
    import os

    backend, bport = py_server(bind=server_bind)
    agent = watch(bport, inject=True)
    conn = http.client.HTTPConnection(client_addr, bport, timeout=10)
    n = 6
    for i in range(n):
        conn.request("GET", f"/ka/{i}")
        r = conn.getresponse()
        r.read()
        assert r.status == 200
        assert len(agent.wait_exchanges(2 * (i + 1))) >= 2 * (i + 1), agent.err[-10:]
    local_port = conn.sock.getsockname()[1]
    conn.close()
    got = finish(agent)
    cli = [e for e in of(got, "client", bport) if e["process.pid"] == os.getpid()]
    srv = of(got, "server", bport)
    paths = [f"/ka/{i}" for i in range(n)]
    assert [e["url.path"] for e in cli] == [e["url.path"] for e in srv] == paths
    assert {e["client.port"] for e in srv} == {local_port}, "one connection for all"
    for c, s in zip(cli, srv):
        assert s["trace_id"] == c["trace_id"], s["url.path"]
        assert s["parent_span_id"] == c["span_id"], s["url.path"]
    assert agent.final_count("tapir.inject.injected") == n
    assert agent.final_count("tapir.inject.rearm.done") >= n - 1, agent.err[-40:]


def test_node_keepalive_pool_continues_every_callers_trace(py_server, procs):
    backend, bport = py_server()
    node, nport = node_frontend(procs, bport, "keepalive")
    agent = watch(nport, bport, inject=True)
    n = 5
    for i in range(n):
        curl("-o", "/dev/null", "-H", f"traceparent: 00-{TRACE}-{PARENT}-01", f"http://127.0.0.1:{nport}/k/{i}")
        want = 4 * (i + 1)  # curl's, Node's two, the backend's
        assert len(agent.wait_exchanges(want)) >= want, agent.err[-10:]
    got = finish(agent)
    n_srv = of(got, "server", nport)
    n_cli = [e for e in of(got, "client", bport) if e["process.pid"] == node.pid]
    b_srv = of(got, "server", bport)
    paths = [f"/k/{i}" for i in range(n)]
    assert [e["url.path"] for e in n_srv] == [e["url.path"] for e in b_srv] == paths
    assert len({e["client.port"] for e in b_srv}) == 1, "Node reused one pooled connection"
    for s, c, b in zip(n_srv, n_cli, b_srv):
        assert s["trace_id"] == c["trace_id"] == b["trace_id"] == TRACE, b["url.path"]
        assert c["parent_span_id"] == s["span_id"]
        assert b["parent_span_id"] == c["span_id"], b["url.path"]
    assert agent.final_count("tapir.inject.injected") == n
    assert agent.final_count("tapir.inject.rearm.done") >= n - 1, agent.err[-40:]


@pytest.mark.parametrize("inject", [False, True], ids=["observed", "injected"])
def test_node_opening_a_connection_per_call_keeps_concurrent_traces_apart(py_server, procs, inject):
    """An event loop opens the downstream connection in the turn that read the incoming
    request but writes on it turns later, after reading others: 8 requests at a time
    through Node (`agent: false`). Each CLIENT span is the child of its own request's
    SERVER span, and the backend continues that trace, never a concurrent request's (the
    thread's last request read was the wrong parent for about half of them)."""
    import concurrent.futures
    import http.client
    import secrets

    backend, bport = py_server("--threading")
    node, nport = node_frontend(procs, bport)
    agent = watch(nport, bport, inject=inject)
    callers = {f"/c/{i}": secrets.token_hex(16) for i in range(80)}

    def call(path):
        conn = http.client.HTTPConnection("127.0.0.1", nport, timeout=10)
        conn.request("GET", path, headers={"traceparent": f"00-{callers[path]}-{PARENT}-01"})
        status = conn.getresponse().status
        conn.close()
        return status

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert set(pool.map(call, callers)) == {200}
    got = finish(agent)
    n_srv = {e["url.path"]: e for e in of(got, "server", nport)}
    n_cli = {e["url.path"]: e for e in of(got, "client", bport) if e["process.pid"] == node.pid}
    b_srv = {e["url.path"]: e for e in of(got, "server", bport)}
    assert sorted(n_srv) == sorted(n_cli) == sorted(b_srv) == sorted(callers)
    wrong = [p for p in callers if n_cli[p]["parent_span_id"] != n_srv[p]["span_id"]]
    assert not wrong, f"{len(wrong)} of {len(callers)} CLIENT spans under another request"
    for path, trace in callers.items():
        assert n_srv[path]["trace_id"] == n_cli[path]["trace_id"] == trace, path
        if inject:
            b = b_srv[path]
            assert (b["trace_id"], b["parent_span_id"]) == (trace, n_cli[path]["span_id"]), path
    if inject:
        assert agent.final_count("tapir.inject.injected") == len(callers)


def test_node_pool_reused_10ms_after_each_response_carries_every_callers_trace(py_server, procs):
    """A pooled connection reused soon after its response (here 10 ms, 100 requests/s) is
    injected again: the agent re-arms it between the two, so it must have seen the response
    by then. Once re-armed, each reply wakes the agent, and so does the reply to the first
    request that went without (a late re-arm costs one request, not a run of them); the
    first re-arm comes at the agent's idle drain pace of up to 16 ms (3 in 4 requests went
    without before the wakeups; 1 of 40 with them, 1–8 with two busy loops on the host)."""
    import http.client
    import secrets
    import time

    backend, bport = py_server()
    node, nport = node_frontend(procs, bport, "keepalive")
    agent = watch(nport, bport, inject=True)
    n = 40
    callers = {}
    conn = http.client.HTTPConnection("127.0.0.1", nport, timeout=10)
    for i in range(n):
        trace = secrets.token_hex(16)
        callers[f"/r/{i}"] = trace
        conn.request("GET", f"/r/{i}", headers={"traceparent": f"00-{trace}-{PARENT}-01"})
        assert conn.getresponse().read() is not None
        time.sleep(0.010)  # the traffic's pace, not a wait for the agent
    conn.close()
    got = finish(agent)
    n_cli = {e["url.path"]: e for e in of(got, "client", bport) if e["process.pid"] == node.pid}
    b_srv = {e["url.path"]: e for e in of(got, "server", bport)}
    assert sorted(n_cli) == sorted(b_srv) == sorted(callers)
    assert len({e["client.port"] for e in b_srv.values()}) == 1, "Node reused one pooled connection"
    joined = 0
    for path, trace in callers.items():
        c, b = n_cli[path], b_srv[path]
        assert c["trace_id"] == trace, path
        if b["trace_id"] == trace:
            assert b["parent_span_id"] == c["span_id"], path
            joined += 1
        else:
            # Not injected: the backend starts a trace of its own, never joins another.
            assert "parent_span_id" not in b or not b["parent_span_id"], (path, b)
    assert joined == agent.final_count("tapir.inject.injected"), agent.err[-40:]
    assert joined >= n - 12, (joined, agent.final_count("tapir.inject.rearm.busy"))


def test_no_stall_through_rearmed_nginx_upstream_keepalive_4mib(py_server, procs, tmp_path):
    """nginx reads upstream responses with FIONREAD, which a socket in the sockhash answers
    with 0: a re-armed socket must be out of the sockhash before its response arrives."""
    backend, bport = py_server("--threading")
    nport = free_port()
    nginx(procs, tmp_path, nport,
          "location / { proxy_pass http://tapir_backend; proxy_http_version 1.1; "
          'proxy_set_header Connection ""; proxy_read_timeout 20s; }',
          http_extra=f"upstream tapir_backend {{ server 127.0.0.1:{bport}; keepalive 4; }}")
    agent = watch(nport, bport, inject=True)
    big = 4 * 1024 * 1024
    n = 20
    for i in range(n):
        r = curl("-o", "/dev/null", "-w", "%{http_code} %{size_download}", "--max-time", "20",
                 f"http://127.0.0.1:{nport}/bytes/{big}?i={i}")
        assert r.stdout == f"200 {big}", (i, r.stdout)
        want = 4 * (i + 1)  # curl's, nginx's two, the backend's
        assert len(agent.wait_exchanges(want)) >= want, agent.err[-10:]
    got = finish(agent)

    def by_trace(spans):
        return {e["trace_id"]: e for e in spans}

    c_cli = by_trace(e for e in of(got, "client", nport) if e["process.executable.name"] == "curl")
    n_srv = by_trace(of(got, "server", nport))
    n_cli = by_trace(e for e in of(got, "client", bport) if e["process.executable.name"] == "nginx")
    b_srv = of(got, "server", bport)
    assert len(b_srv) == n and sorted(n_cli) == sorted(n_srv) == sorted(c_cli) == sorted(by_trace(b_srv))
    assert len({e["client.port"] for e in b_srv}) < n, "nginx reused its upstream connections"
    # curl's requests are injected; nginx passes each one's traceparent on, so the backend is
    # curl's child, and nginx's CLIENT span its SERVER span's.
    for b in b_srv:
        t = b["trace_id"]
        assert b["parent_span_id"] == c_cli[t]["span_id"]
        assert n_srv[t]["parent_span_id"] == c_cli[t]["span_id"]
        assert n_cli[t]["parent_span_id"] == n_srv[t]["span_id"]
    assert agent.final_count("tapir.inject.injected") == n
    assert agent.final_count("tapir.inject.rearm.done") >= n - 4, agent.err[-40:]
