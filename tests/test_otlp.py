"""Issue: OTLP export. `tapir run` turns the exchanges of real, unmodified programs into
OpenTelemetry spans and metrics (stable HTTP semantic conventions) and ships them over
OTLP/gRPC or OTLP/HTTP to a real receiver (tests/otlp_receiver.py, built on the official
opentelemetry-proto messages).

Every test filters the agent by its own ports. On SIGINT the agent flushes everything
pending, so a test stops the agent and then asserts on exactly what arrived; before that it
waits for the data with the receiver's condition variable, so a test that receives nothing
fails with a message saying what did arrive, not with a hang.
"""
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import TESTS, Agent, cgroup2_mount, curl, free_port, nginx, proc_usage, self_signed_pem, span_path, wait_port
from otlp_receiver import OtlpReceiver

PY = sys.executable
CLIENT = str(TESTS / "servers/http_client.py")
SDK_SERVICE = str(TESTS / "servers/sdk_service.py")
PROTOCOLS = ["grpc", "http/protobuf"]
WIRE = {"grpc": "grpc", "http/protobuf": "http"}  # OtlpReceiver's name for each protocol
# The stable HTTP semconv duration buckets (seconds).
BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]
TIMEOUT = 30.0


@pytest.fixture(autouse=True)
def _no_ambient_otel_env(monkeypatch):
    """OTEL_* and TAPIR_* variables of whoever runs the tests must not configure the agent."""
    for k in list(os.environ):
        if k.startswith("OTEL_") or (k.startswith("TAPIR_") and k != "TAPIR_BIN"):
            monkeypatch.delenv(k)


def env_without_otel(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(extra)
    return env


def otel_agent(endpoint, *ports, protocol="grpc", args=(), env=None):
    """`tapir run` exporting to `endpoint` (an OtlpReceiver or a URL), filtered by ports."""
    if isinstance(endpoint, OtlpReceiver):
        endpoint = endpoint.endpoint(protocol)
    argv = ["run", "--exporter", "otlp", "--otlp-protocol", protocol, "--otlp-endpoint", endpoint, *args]
    for p in ports:
        argv += ["--port", str(p)]
    return Agent(*argv, env={"OTEL_METRIC_EXPORT_INTERVAL": "500", **(env or {})})


def finish(agent):
    """Stop the agent: on SIGINT it flushes every pending span and metric, then exits 0."""
    code = agent.stop()
    assert code == 0, f"tapir run exited {code}:\n" + "\n".join(agent.err[-30:])


def get(port, path, expect=None):
    r = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}{path}")
    if expect is not None:
        assert int(r.stdout) == expect, (path, r.stdout)
    return int(r.stdout)


def collapse(path):
    """The route Tapir derives from a path: numeric segments become `*`."""
    path = path.split("?")[0]
    return "/".join("*" if seg.isdigit() else seg for seg in path.split("/"))


def is_server_of(pid):
    return lambda s: s["kind"] == "SERVER" and s["resource"].get("process.pid") == pid


def is_client_of(pid):
    return lambda s: s["kind"] == "CLIENT" and s["resource"].get("process.pid") == pid


def by_start(spans):
    return sorted(spans, key=lambda s: s["start_time_unix_nano"])


def check_ids(s):
    assert re.fullmatch(r"[0-9a-f]{32}", s["trace_id"]) and s["trace_id"] != "0" * 32, s
    assert re.fullmatch(r"[0-9a-f]{16}", s["span_id"]) and s["span_id"] != "0" * 16, s
    assert s["parent_span_id"] == "" or re.fullmatch(r"[0-9a-f]{16}", s["parent_span_id"]), s


def check_parents(servers, clients):
    """The clients (curl, urllib) handle no request: their spans are roots. No test sends a
    traceparent, so a server span is a root too, or (once Tapir injects context on the wire)
    the child of its own client's span, in the same trace."""
    for s, c in zip(servers, clients):
        assert c["parent_span_id"] == "", c
        assert s["parent_span_id"] in ("", c["span_id"]), (s, c)
        if s["parent_span_id"]:
            assert s["trace_id"] == c["trace_id"], (s, c)


def check_times(s, t0, t1):
    assert t0 <= s["start_time_unix_nano"] <= s["end_time_unix_nano"] <= t1, (
        t0,
        s["start_time_unix_nano"],
        s["end_time_unix_nano"],
        t1,
    )


def check_http_span(s, kind, *, method, path, status, t0, t1):
    """What SERVER and CLIENT spans share; 5xx is an error on both sides, 4xx on clients only."""
    a = s["attributes"]
    assert s["kind"] == kind
    assert a["http.request.method"] == method
    assert span_path(s) == path.split("?")[0]
    assert a["http.response.status_code"] == status and type(a["http.response.status_code"]) is int
    assert a["server.address"] == "127.0.0.1"
    assert a["network.protocol.version"] == "1.1"
    if status >= (500 if kind == "SERVER" else 400):
        assert a["error.type"] == str(status)
        assert s["status_code"] == "ERROR"
    else:
        assert "error.type" not in a, a
        assert s["status_code"] == "UNSET"
    check_ids(s)
    check_times(s, t0, t1)


# The conventions' Opt-In attributes (and client.* on a CLIENT, which they do not define):
# not sent by default.
SERVER_OPT_IN = {"client.port", "url.full"}
CLIENT_NOT_SENT = {"url.path", "url.scheme", "client.address", "client.port", "user_agent.original"}


def check_server_span(s, *, port, ua_prefix, **kw):
    check_http_span(s, "SERVER", **kw)
    a = s["attributes"]
    assert a["url.scheme"] == "http"
    assert a["http.route"] == collapse(kw["path"])
    assert s["name"] in (kw["method"], f"{kw['method']} {a['http.route']}"), s["name"]
    assert a["server.port"] == port
    assert a["client.address"] == "127.0.0.1"
    assert a["network.peer.address"] == a["client.address"]
    assert type(a["network.peer.port"]) is int and 0 < a["network.peer.port"] != port
    assert a["user_agent.original"].startswith(ua_prefix), a["user_agent.original"]
    assert not SERVER_OPT_IN & a.keys(), a


def check_client_span(s, *, port, ua_prefix, **kw):
    check_http_span(s, "CLIENT", **kw)
    a = s["attributes"]
    assert not CLIENT_NOT_SENT & a.keys(), a
    assert s["name"] in (kw["method"], f"{kw['method']} {collapse(kw['path'])}"), s["name"]
    assert a["server.port"] == port
    # Required on CLIENT spans; the query never leaves the host.
    assert a["url.full"] == f"http://127.0.0.1:{port}{kw['path'].split('?')[0]}", a["url.full"]
    assert a["network.peer.address"] == "127.0.0.1"
    assert a["network.peer.port"] == port


def assert_nowhere(needle, spans=(), points=()):
    """`needle` (a query-string secret) appears in no span name, attribute or metric point."""
    for s in spans:
        blob = json.dumps([s["name"], s["attributes"]])
        assert needle not in blob, s
    for p in points:
        assert needle not in json.dumps(p["attributes"]), p


def histogram_counts(receiver, name, resource_pred, key):
    """{key(point): count} over the current value of every stream of histogram `name`."""
    out = {}
    for p in receiver.latest_points(name, lambda m: resource_pred(m["resource"])):
        k = key(p)
        out[k] = out.get(k, 0) + p["count"]
    return out


def wait_histogram(receiver, name, resource_pred, key, expected, timeout=TIMEOUT):
    return receiver.wait_until(
        lambda r: histogram_counts(r, name, resource_pred, key) == expected,
        timeout,
        what=lambda: f"{name} counts {expected} (have {histogram_counts(receiver, name, resource_pred, key)})",
    )


def route_status(p):
    return (p["attributes"].get("http.route"), p["attributes"].get("http.response.status_code"))


# Paths sent by curl to pyserver and the status each returns. `?secret=1` must never leave
# the host: no query string in any attribute.
REQUESTS = [
    ("/", 200),
    ("/users/42?secret=1", 200),
    ("/users/7", 200),
    ("/status/404", 404),
    ("/status/500", 500),
    ("/status/503", 503),
    ("/hello/world", 200),
]


# (a) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_spans_one_per_request_with_semconv_attributes(otlp, py_server, protocol):
    server, port = py_server()
    agent = otel_agent(otlp, port, protocol=protocol)
    t0 = time.time_ns()
    for path, status in REQUESTS:
        get(port, path, status)
    n = len(REQUESTS)
    otlp.wait_spans(is_server_of(server.pid), n=n, timeout=TIMEOUT)
    finish(agent)
    t1 = time.time_ns()

    spans = by_start(otlp.spans(is_server_of(server.pid)))
    assert [(s["attributes"]["url.path"], s["attributes"]["http.response.status_code"]) for s in spans] == [
        (p.split("?")[0], st) for p, st in REQUESTS
    ], "exactly one SERVER span per request, in order"
    for s, (path, status) in zip(spans, REQUESTS):
        check_server_span(s, method="GET", path=path, status=status, port=port, ua_prefix="curl/", t0=t0, t1=t1)
    assert len({s["span_id"] for s in spans}) == n
    assert len({s["attributes"]["network.peer.port"] for s in spans}) == n, "curl opens one connection per request"

    # curl's side of the same exchanges: one CLIENT span each, from the curl processes.
    clients = by_start(otlp.spans(lambda s: s["kind"] == "CLIENT"))
    assert [(span_path(s), s["attributes"]["http.response.status_code"]) for s in clients] == [
        (p.split("?")[0], st) for p, st in REQUESTS
    ]
    for s, (path, status) in zip(clients, REQUESTS):
        assert s["resource"]["process.executable.name"] == "curl"
        check_client_span(s, method="GET", path=path, status=status, port=port, ua_prefix="curl/", t0=t0, t1=t1)

    check_parents(spans, clients)
    assert_nowhere("secret", otlp.spans(), otlp.metrics())
    assert {s["protocol"] for s in otlp.spans()} == {WIRE[protocol]}
    other = "http" if WIRE[protocol] == "grpc" else "grpc"
    assert otlp.requests[other] == 0, otlp.requests
    assert otlp.errors == []


# (b) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_client_spans_of_a_python_urllib_client(otlp, py_server, procs, protocol):
    server, port = py_server()
    agent = otel_agent(otlp, port, protocol=protocol)
    requests = [("/orders/1", 200), ("/status/404", 404), ("/status/500", 500), ("/search?secret=1", 200)]
    t0 = time.time_ns()
    client = procs([PY, CLIENT, "urllib", *(f"http://127.0.0.1:{port}{p}" for p, _ in requests)])
    assert client.wait_exit() == 0
    assert client.out == [str(st) for _, st in requests]
    otlp.wait_spans(is_client_of(client.pid), n=len(requests), timeout=TIMEOUT)
    key = lambda p: p["attributes"].get("http.response.status_code")  # noqa: E731
    mine = lambda res: res.get("process.pid") == client.pid  # noqa: E731
    wait_histogram(otlp, "http.client.request.duration", mine, key, {200: 2, 404: 1, 500: 1})
    finish(agent)
    t1 = time.time_ns()

    spans = by_start(otlp.spans(is_client_of(client.pid)))
    assert [(span_path(s), s["attributes"]["http.response.status_code"]) for s in spans] == [
        (p.split("?")[0], st) for p, st in requests
    ], "exactly one CLIENT span per request, in order"
    for s, (path, status) in zip(spans, requests):
        check_client_span(s, method="GET", path=path, status=status, port=port, ua_prefix="Python-urllib/", t0=t0, t1=t1)
        assert s["resource"]["process.executable.name"].startswith("python")
    # The server saw the same exchanges.
    servers = by_start(otlp.spans(is_server_of(server.pid)))
    assert [s["attributes"]["url.path"] for s in servers] == [p.split("?")[0] for p, _ in requests]
    check_parents(servers, spans)
    # Timestamps are taken at syscall exit: the server may read the request before the
    # client's send returns, by as long as the client thread is preempted in between (seen:
    # 2.7 ms on a loaded 2-core CI host). A wrong clock conversion is off by far more.
    slack = 5_000_000
    for c, s in zip(spans, servers):
        assert c["start_time_unix_nano"] <= s["start_time_unix_nano"] + slack, "a client starts before its server"
        assert s["end_time_unix_nano"] <= c["end_time_unix_nano"] + slack, "and ends after it"

    # Client duration histogram: counts per status equal the requests, exact buckets.
    points = otlp.latest_points("http.client.request.duration", lambda m: mine(m["resource"]))
    assert histogram_counts(otlp, "http.client.request.duration", mine, key) == {200: 2, 404: 1, 500: 1}
    for p in points:
        assert p["type"] == "histogram" and p["unit"] == "s"
        assert p["explicit_bounds"] == BOUNDS
        assert sum(p["bucket_counts"]) == p["count"]
        assert p["attributes"]["http.request.method"] == "GET"
        assert p["attributes"]["server.address"] == "127.0.0.1"
        assert p["attributes"]["server.port"] == port
    assert_nowhere("secret", otlp.spans(), otlp.metrics())
    assert otlp.errors == []


# (c) -------------------------------------------------------------------------------------


def test_server_duration_histogram_counts_equal_request_counts(otlp, py_server):
    server, port = py_server()
    agent = otel_agent(otlp, port)
    sent = [f"/users/{i}" for i in range(1, 6)] + ["/status/404"] * 3 + ["/status/500"] * 2 + ["/"]
    expected = {("/users/*", 200): 5, ("/status/*", 404): 3, ("/status/*", 500): 2, ("/", 200): 1}
    for path in sent:
        get(port, path)
    mine = lambda res: res.get("process.pid") == server.pid  # noqa: E731
    wait_histogram(otlp, "http.server.request.duration", mine, route_status, expected)
    otlp.wait_metrics(
        lambda m: m["name"] == "tapir.exchanges" and m["resource"].get("service.name") == "tapir"
        and (m.get("value") or 0) >= len(sent),
        what=f"self metric tapir.exchanges >= {len(sent)}",
    )
    finish(agent)

    # After the final flush: still exactly the request counts (nothing double-counted).
    assert histogram_counts(otlp, "http.server.request.duration", mine, route_status) == expected
    points = otlp.latest_points("http.server.request.duration", lambda m: mine(m["resource"]))
    for p in points:
        a = p["attributes"]
        assert p["type"] == "histogram" and p["unit"] == "s", p
        assert p["explicit_bounds"] == BOUNDS
        assert len(p["bucket_counts"]) == len(BOUNDS) + 1
        assert sum(p["bucket_counts"]) == p["count"]
        assert 0 < p["sum"] < 10 * p["count"]
        assert a["http.request.method"] == "GET"
        assert a["url.scheme"] == "http"
        assert type(a["http.response.status_code"]) is int
        if a["http.response.status_code"] >= 500:
            assert a["error.type"] == str(a["http.response.status_code"])
        else:
            assert "error.type" not in a
        assert p["resource"]["service.name"].startswith("python")
        assert "url.path" not in a, "high-cardinality path must not be a metric attribute"
    assert {p["temporality"] for p in points} <= {"CUMULATIVE", "DELTA"}

    # The agent's own metrics: every name tapir.*, under the agent's own resource.
    own = otlp.metrics(lambda m: m["name"].startswith("tapir."))
    assert own, "no tapir.* self metrics"
    assert {m["resource"].get("service.name") for m in own} == {"tapir"}
    exchanges = otlp.latest_points("tapir.exchanges")
    assert exchanges and max(p["value"] for p in exchanges) >= len(sent)
    assert_own_usage(otlp, agent)
    assert not otlp.metrics(lambda m: m["resource"].get("service.name") == "tapir" and m["name"].startswith("http."))
    assert otlp.errors == []


def assert_own_usage(otlp, agent):
    """The agent's process.* metrics (semantic conventions) under its own resource, against
    what /proc said of it: its last export (at shutdown) comes after the signal and before
    it exits."""
    cpu = {p["attributes"].get("cpu.mode"): p for p in otlp.latest_points("process.cpu.time")}
    assert set(cpu) == {"user", "system"}, cpu
    for p in cpu.values():
        assert p["resource"].get("service.name") == "tapir", p
        assert p["unit"] == "s" and p["is_monotonic"] and type(p["value"]) is float, p
    reported = cpu["user"]["value"] + cpu["system"]["value"]
    # /proc counts in 10 ms ticks.
    low, high = agent.usage_at_stop[0] - 0.02, agent.cpu_at_exit + 0.02
    assert 0 < reported and low <= reported <= high, (reported, low, high)
    for name, unit in [("process.memory.usage", "By"), ("process.memory.virtual", "By"),
                       ("process.thread.count", "{thread}")]:
        (p,) = otlp.latest_points(name)
        assert p["resource"].get("service.name") == "tapir", p
        assert p["unit"] == unit and p["is_monotonic"] is False, p
        assert p["temporality"] == "CUMULATIVE", p
    rss = otlp.latest_points("process.memory.usage")[0]["value"]
    # The ring buffers alone are several MiB; RSS moves by little once the agent runs.
    assert 4 << 20 < rss < 2 * agent.usage_at_stop[1] + (16 << 20), (rss, agent.usage_at_stop)
    assert otlp.latest_points("process.thread.count")[0]["value"] >= 2


# (d) -------------------------------------------------------------------------------------


def test_resource_attributes_come_from_the_observed_process(otlp, py_server):
    named, named_port = py_server(env=env_without_otel(
        OTEL_SERVICE_NAME="shop-backend",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment.name=staging,service.version=1.2.3",
    ))
    plain, plain_port = py_server(env=env_without_otel())
    agent = otel_agent(otlp, named_port, plain_port)
    get(named_port, "/a", 200)
    get(plain_port, "/b", 200)
    otlp.wait_spans(is_server_of(named.pid), n=1, timeout=TIMEOUT)
    otlp.wait_spans(is_server_of(plain.pid), n=1, timeout=TIMEOUT)
    mine = lambda res: res.get("process.pid") == named.pid  # noqa: E731
    wait_histogram(otlp, "http.server.request.duration", mine, route_status, {("/a", 200): 1})
    finish(agent)

    (s_named,) = otlp.spans(is_server_of(named.pid))
    (s_plain,) = otlp.spans(is_server_of(plain.pid))
    for s, proc in ((s_named, named), (s_plain, plain)):
        res = s["resource"]
        assert res["process.pid"] == proc.pid and type(res["process.pid"]) is int
        assert res["process.executable.name"].startswith("python"), res
        assert res["host.name"] == socket.gethostname()
        assert res["telemetry.distro.name"] == "tapir"
        assert isinstance(res.get("service.instance.id"), str) and res["service.instance.id"], res
    assert s_named["resource"]["service.name"] == "shop-backend", "from the process's own OTEL_SERVICE_NAME"
    assert s_named["resource"]["deployment.environment.name"] == "staging", "its OTEL_RESOURCE_ATTRIBUTES"
    assert s_named["resource"]["service.version"] == "1.2.3"
    assert "deployment.environment.name" not in s_plain["resource"]
    assert s_plain["resource"]["service.name"].startswith("python"), s_plain["resource"]
    assert s_named["resource"]["service.instance.id"] != s_plain["resource"]["service.instance.id"]
    # curl: no OTEL_SERVICE_NAME, so its executable name.
    curls = otlp.spans(lambda s: s["kind"] == "CLIENT")
    assert len(curls) == 2 and {s["resource"]["service.name"] for s in curls} == {"curl"}
    # Metrics carry the same resource as the spans of the same process.
    for p in otlp.metrics(lambda m: m["name"].startswith("http.server.") and mine(m["resource"])):
        assert p["resource"]["service.name"] == "shop-backend"
        assert p["resource"]["service.instance.id"] == s_named["resource"]["service.instance.id"]


def test_the_agents_resource_attributes_describe_the_node(otlp, py_server):
    """The agent's own OTEL_RESOURCE_ATTRIBUTES (a DaemonSet's k8s.node.name, cluster…) are
    on every observed process's resource, below the process's own; its host.name replaces
    the kernel's (a pod's host name is the pod's); its service.* stay the agent's."""
    named, named_port = py_server(env=env_without_otel(OTEL_RESOURCE_ATTRIBUTES="k8s.cluster.name=mine"))
    plain, plain_port = py_server(env=env_without_otel())
    node_attrs = "host.name=node-e2e,k8s.node.name=node-e2e,k8s.cluster.name=e2e,service.name=tapir-ds"
    agent = otel_agent(otlp, named_port, plain_port, env={"OTEL_RESOURCE_ATTRIBUTES": node_attrs})
    get(named_port, "/a", 200)
    get(plain_port, "/b", 200)
    otlp.wait_spans(is_server_of(named.pid), n=1, timeout=TIMEOUT)
    otlp.wait_spans(is_server_of(plain.pid), n=1, timeout=TIMEOUT)
    otlp.wait_until(lambda r: r.latest_points("tapir.exchanges"), TIMEOUT, what="the agent's own metrics")
    finish(agent)
    (s_named,) = otlp.spans(is_server_of(named.pid))
    (s_plain,) = otlp.spans(is_server_of(plain.pid))
    for s, proc, cluster in ((s_named, named, "mine"), (s_plain, plain, "e2e")):
        res = s["resource"]
        assert (res["host.name"], res["k8s.node.name"], res["k8s.cluster.name"]) == ("node-e2e", "node-e2e", cluster)
        assert res["service.instance.id"] == f"node-e2e:{proc.pid}"
        assert res["service.name"].startswith("python"), res
    own = otlp.latest_points("tapir.exchanges")[0]["resource"]
    assert (own["service.name"], own["host.name"], own["k8s.cluster.name"]) == ("tapir", "node-e2e", "e2e")


def test_container_and_pod_ids_come_from_the_cgroup(otlp, py_server, tmp_path):
    """A process in a Kubernetes container's cgroup (the systemd driver's layout, made here
    for real) gets container.id and k8s.pod.uid on its resource: what the collector's
    k8sattributes processor needs to add the pod's name, namespace and workload."""
    server, port = py_server()
    cg = cgroup2_mount()
    uid = f"0b7e54f2-2f1c-4c5e-9a5d-{os.getpid():012x}"
    cid = hashlib.sha256(tmp_path.name.encode()).hexdigest()
    top = f"{cg}/tapir-e2e-{tmp_path.name}"
    pod = f"{top}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid.replace('-', '_')}.slice"
    leaf = f"{pod}/cri-containerd-{cid}.scope"
    os.makedirs(leaf)
    try:
        with open(f"{leaf}/cgroup.procs", "w") as f:
            f.write(str(server.pid))
        agent = otel_agent(otlp, port)
        get(port, "/in-a-pod", 200)
        otlp.wait_spans(is_server_of(server.pid), n=1, timeout=TIMEOUT)
        finish(agent)
    finally:
        with open(f"{cg}/cgroup.procs", "w") as f:
            f.write(str(server.pid))
        d = leaf
        while d != cg:
            os.rmdir(d)
            d = os.path.dirname(d)
    (s,) = otlp.spans(is_server_of(server.pid))
    assert (s["resource"].get("container.id"), s["resource"].get("k8s.pod.uid")) == (cid, uid), s["resource"]
    # curl ran outside any container.
    (c,) = otlp.spans(lambda s: s["kind"] == "CLIENT")
    assert "container.id" not in c["resource"] and "k8s.pod.uid" not in c["resource"]


# (e) -------------------------------------------------------------------------------------

GROUND_TRUTH_REQUESTS = [
    "/",
    "/users/1",
    "/users/2",
    "/users/42?secret=1",
    "/status/200",
    "/status/201",
    "/status/204",
    "/status/302",
    "/status/404",
    "/status/418",
    "/status/500",
    "/status/503",
    "/sleep/1",
    "/sleep/5",
    "/sleep/20",
    "/sleep/50",
    "/sleep/120",
    "/hello",
    "/users/3",
    "/status/404",
]


def duration_tolerance_ns(sdk_ns):
    """Tapir measures from the first request byte read to the last response byte written;
    the SDK from the handler's start (headers already parsed) to after its last write. The
    difference is Python's own request parsing and span bookkeeping: sub-millisecond, so
    agree within max(2 ms, 25 %)."""
    return max(2_000_000, sdk_ns // 4)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_ground_truth_against_a_service_instrumented_with_the_opentelemetry_sdk(otlp, procs, protocol, capsys):
    port = free_port()
    # The service exports its spans only when it stops (a batch delay longer than the
    # test), so its exporter thread never competes for the GIL while requests are timed.
    svc = procs(
        [PY, SDK_SERVICE, port, "--otlp-endpoint", otlp.endpoint(protocol), "--protocol", protocol,
         "--batch-delay-ms", "600000"],
        ready_port=port,
        env=env_without_otel(OTEL_SERVICE_NAME="sdk-truth"),
    )
    agent = otel_agent(otlp, port, protocol=protocol)
    for path in GROUND_TRUTH_REQUESTS:
        get(port, path)
    n = len(GROUND_TRUTH_REQUESTS)
    is_sdk = lambda s: s["scope"] == "sdk-truth.manual"  # noqa: E731
    is_tapir = lambda s: is_server_of(svc.pid)(s) and s["resource"].get("telemetry.distro.name") == "tapir"  # noqa: E731
    otlp.wait_spans(is_tapir, n=n, timeout=TIMEOUT)
    finish(agent)
    assert svc.stop(signal.SIGTERM) == 0, "\n".join(svc.err[-20:])  # flushes the SDK's spans
    otlp.wait_spans(is_sdk, n=n, timeout=TIMEOUT)

    sdk = by_start(otlp.spans(is_sdk))
    tapir = by_start(otlp.spans(is_tapir))
    assert len(sdk) == n and len(tapir) == n, (len(sdk), len(tapir))
    for s in sdk + tapir:
        assert s["resource"]["service.name"] == "sdk-truth"
    assert all("telemetry.distro.name" not in s["resource"] for s in sdk)

    # Pair each SDK span with Tapir's span for the same request: same path, in order.
    unmatched = list(tapir)
    rows, fields_ok, dur_ok = [], 0, 0
    for s in sdk:
        t = next((t for t in unmatched if t["attributes"]["url.path"] == s["attributes"]["url.path"]), None)
        assert t is not None, f"no Tapir span for {s['attributes']['url.path']}"
        unmatched.remove(t)
        sa, ta = s["attributes"], t["attributes"]
        same = (
            (t["kind"], ta["http.request.method"], ta["url.path"], ta["http.response.status_code"])
            == (s["kind"], sa["http.request.method"], sa["url.path"], sa["http.response.status_code"])
        )
        sd = s["end_time_unix_nano"] - s["start_time_unix_nano"]
        td = t["end_time_unix_nano"] - t["start_time_unix_nano"]
        close = abs(td - sd) <= duration_tolerance_ns(sd)
        fields_ok += same
        dur_ok += close
        rows.append(
            f"{sa['url.path']:<14} {sa['http.response.status_code']:>4} "
            f"sdk {sd / 1e6:8.3f} ms  tapir {td / 1e6:8.3f} ms  "
            f"start Δ {(t['start_time_unix_nano'] - s['start_time_unix_nano']) / 1e6:+7.3f} ms  "
            f"{'ok' if same else 'FIELDS DIFFER'} {'ok' if close else 'DURATION OFF'}"
        )
        # The attributes both sides can know agree, too.
        for k in ("url.scheme", "server.address", "server.port", "client.address",
                  "network.peer.address", "network.peer.port", "network.protocol.version",
                  "user_agent.original", "error.type"):
            assert ta.get(k) == sa.get(k), (sa["url.path"], k, ta.get(k), sa.get(k))
        assert t["status_code"] == s["status_code"], (sa["url.path"], t["status_code"], s["status_code"])
    field_pct, dur_pct = 100.0 * fields_ok / n, 100.0 * dur_ok / n
    with capsys.disabled():
        print(f"\nground truth ({protocol}): {n} requests, method/path/status/kind match {field_pct:.0f} %, "
              f"duration within max(2 ms, 25 %) {dur_pct:.0f} %")
        print("\n".join("  " + r for r in rows))
    assert field_pct == 100.0, "\n".join(rows)
    assert dur_pct >= 90.0, "\n".join(rows)
    assert_nowhere("secret", tapir)


# (f) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_collector_started_five_seconds_after_the_requests(py_server, protocol):
    server, port = py_server()
    collector_port = free_port()  # nothing listens there yet
    agent = otel_agent(f"http://127.0.0.1:{collector_port}", port, protocol=protocol)
    sent = [("/late/1", 200), ("/status/404", 404), ("/late/2", 200), ("/status/500", 500)]
    for path, status in sent:
        get(port, path, status)
    time.sleep(5)  # the scenario itself: the collector comes up 5 s after the requests
    grpc_port, http_port = (collector_port, None) if protocol == "grpc" else (None, collector_port)
    late = OtlpReceiver(grpc_port=grpc_port, http_port=http_port).start()
    try:
        late.wait_spans(is_server_of(server.pid), n=len(sent), timeout=90)
        mine = lambda res: res.get("process.pid") == server.pid  # noqa: E731
        expected = {("/late/*", 200): 2, ("/status/*", 404): 1, ("/status/*", 500): 1}
        wait_histogram(late, "http.server.request.duration", mine, route_status, expected, timeout=90)
        finish(agent)
        spans = by_start(late.spans(is_server_of(server.pid)))
        assert [(s["attributes"]["url.path"], s["attributes"]["http.response.status_code"]) for s in spans] == sent
        assert len({s["span_id"] for s in spans}) == len(sent), "no duplicates from retries"
        assert late.errors == []
    finally:
        late.stop()


SCHED_OTHER, SCHED_IDLE = 0, 5


def thread_policies(pid):
    """{thread name: [scheduling policy of each thread so named]} of a process (field 41 of
    /proc/PID/task/TID/stat). The export runtime's helper threads share its worker's name."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread just ended
            continue
        out.setdefault(name, []).append(int(fields[38]))
    return out


def wait_policy(agent, name, policy, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if policy in thread_policies(agent.pid).get(name, []):
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} never had policy {policy}: {thread_policies(agent.pid)}")


@pytest.mark.parametrize("normal", [False, True], ids=["yielding", "normal-priority"])
def test_capture_and_export_threads_run_idle_class_unless_told_not_to(otlp, py_server, normal):
    server, port = py_server()
    prom = free_port()
    args = ["--prometheus-port", str(prom)] + (["--normal-priority"] if normal else [])
    agent = otel_agent(otlp, port, args=args)
    get(port, "/", 200)
    otlp.wait_spans(is_server_of(server.pid), n=1, timeout=TIMEOUT)  # both threads at work
    assert "http_server_request_duration_seconds_count{" in scrape(prom)[1]
    p = thread_policies(agent.pid)
    finish(agent)
    # Scrapes never wait behind the services: the endpoint has a normal thread of its own.
    assert p["tapir-metrics"] == [SCHED_OTHER], p
    if normal:
        assert p["tapir-capture"] == [SCHED_OTHER] and set(p["tapir-export"]) == {SCHED_OTHER}, p
        assert "tapir-rescue" not in p, p
    else:
        assert p["tapir-capture"] == [SCHED_IDLE] and SCHED_IDLE in p["tapir-export"], p
        assert p["tapir-rescue"] == [SCHED_OTHER], p


def test_export_thread_back_to_normal_priority_while_the_collector_is_down(py_server):
    """Batches of 3: four batches queued (12 spans) put the idle-class export thread back to
    normal priority; once the collector is up and the queue drained, it yields again."""
    server, port = py_server()
    collector_port = free_port()  # nothing listens there yet
    agent = otel_agent(
        f"http://127.0.0.1:{collector_port}",
        port,
        env={
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "3",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "RUST_LOG": "info,tapir::otel=debug",
        },
    )
    wait_policy(agent, "tapir-export", SCHED_IDLE)
    for i in range(8):  # 16 spans: curl's and the server's
        get(port, f"/down/{i}", 200)
    agent.wait_for(lambda l: "export thread back to normal priority" in l, what="the export thread's rescue")
    assert set(thread_policies(agent.pid)["tapir-export"]) == {SCHED_OTHER}
    late = OtlpReceiver(grpc_port=collector_port, http_port=None).start()
    try:
        late.wait_spans(lambda s: span_path(s).startswith("/down/"), n=16, timeout=90)
        # Each request's two spans leave in a send of their own; the first send at least a
        # second after the rescue puts the thread back to idle.
        for i in range(30):
            get(port, f"/up/{i}", 200)
            late.wait_spans(lambda s: span_path(s).startswith("/up/"), n=2 * (i + 1), timeout=TIMEOUT)
            if SCHED_IDLE in thread_policies(agent.pid)["tapir-export"]:
                break
        else:
            raise AssertionError(f"the export thread stayed at normal priority: {thread_policies(agent.pid)}")
        finish(agent)
        down = late.spans(lambda s: span_path(s).startswith("/down/"))
        assert sorted(span_path(s) for s in down) == sorted(f"/down/{i}" for i in range(8) for _ in "ab")
        assert late.errors == []
    finally:
        late.stop()


# (g) -------------------------------------------------------------------------------------


def test_otel_sdk_disabled_exports_nothing(otlp, py_server):
    server, port = py_server()
    # Control: the same agent without OTEL_SDK_DISABLED exports (so "nothing" below means
    # the variable worked, not that the setup is broken).
    control = otel_agent(otlp, port)
    get(port, "/control", 200)
    otlp.wait_spans(is_server_of(server.pid), n=1, timeout=TIMEOUT)
    finish(control)
    otlp.clear()

    agent = otel_agent(otlp, port, env={"OTEL_SDK_DISABLED": "true"})  # still logs ready
    for i in range(5):
        get(port, f"/disabled/{i}", 200)
    assert agent.p.poll() is None, "the agent keeps running with the SDK disabled"
    finish(agent)  # a flush on exit would export now, if anything were pending
    assert otlp.requests == {"grpc": 0, "http": 0}, otlp.summary()
    assert otlp.spans() == [] and otlp.metrics() == []


# (h) -------------------------------------------------------------------------------------


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        ctype = r.headers.get("Content-Type", "")
        return ctype, r.read().decode()


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text):
    """[(metric name, {label: value}, float value)] of a text exposition."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a valid exposition line: {line!r}"
        out.append((m.group(1), dict(LABEL.findall(m.group(3) or "")), float(m.group(4))))
    return out


def prometheus_counts(samples, family):
    """{(route, status): count} from the `<family>_count` series."""
    out = {}
    for name, labels, value in samples:
        if name == f"{family}_count":
            k = (labels.get("http_route"), int(labels.get("http_response_status_code", 0)))
            out[k] = out.get(k, 0) + int(value)
    return out


def test_prometheus_endpoint(py_server):
    server, port = py_server()
    prom = free_port()
    agent = Agent("run", "--exporter", "none", "--prometheus-port", str(prom), "--port", str(port),
                  env={"OTEL_METRIC_EXPORT_INTERVAL": "500"})
    wait_port(prom)
    sent = ["/items/1", "/items/2", "/items/3", "/status/404", "/status/500"]
    for path in sent:
        get(port, path)
    expected = {("/items/*", 200): 3, ("/status/*", 404): 1, ("/status/*", 500): 1}
    family = "http_server_request_duration_seconds"
    deadline = time.monotonic() + TIMEOUT
    while True:
        ctype, text = scrape(prom)
        samples = parse_prometheus(text)
        if prometheus_counts(samples, family) == expected or time.monotonic() > deadline:
            break
        with agent._cv:  # woken early by agent output; otherwise re-scrape every 0.2 s
            agent._cv.wait(0.2)
    assert ctype.startswith("text/plain"), ctype
    assert prometheus_counts(samples, family) == expected, text
    assert f"# TYPE {family} histogram" in text, text
    # Buckets: cumulative, le = the semconv bounds then +Inf, whose value equals _count.
    for (route, status), count in expected.items():
        series = [
            (labels["le"], v)
            for name, labels, v in samples
            if name == f"{family}_bucket"
            and labels.get("http_route") == route
            and int(labels.get("http_response_status_code", 0)) == status
        ]
        les = [le for le, _ in series]
        assert [float(x) for x in les[:-1]] == BOUNDS and les[-1] == "+Inf", les
        values = [v for _, v in series]
        assert values == sorted(values) and values[-1] == count, series
    # Self metrics are exposed too; the kernel programs' costs only with --ebpf-stats.
    assert any(name.startswith("tapir_exchanges") and v >= len(sent) for name, _, v in samples), text
    assert "tapir_ebpf_program" not in text, text
    # The agent's own usage, by the OpenTelemetry-to-Prometheus naming rules.
    before = proc_usage(agent.pid)[0]
    samples = parse_prometheus(scrape(prom)[1])
    cpu, rss = proc_usage(agent.pid)
    own = {(name, labels.get("cpu_mode")): v for name, labels, v in samples
           if labels.get("service_name") == "tapir" and name.startswith("process_")}
    reported = sum(own[("process_cpu_time_seconds_total", mode)] for mode in ("user", "system"))
    # Read at the scrape, between two readings of /proc (10 ms ticks).
    assert before - 0.02 <= reported <= cpu + 0.02, (reported, before, cpu)
    assert own[("process_cpu_time_seconds_total", "user")] > 0, own
    assert "# TYPE process_memory_usage_bytes gauge" in text, text
    assert 4 << 20 < own[("process_memory_usage_bytes", None)] < 2 * rss + (16 << 20), (own, rss)
    assert own[("process_thread_count", None)] >= 2, own
    finish(agent)


def program_costs(samples):
    """{program: [runs, run time in ns]} from the tapir_ebpf_program_* samples."""
    out = {}
    for name, labels, value in samples:
        for i, family in enumerate(["tapir_ebpf_program_runs_total", "tapir_ebpf_program_run_time_nanoseconds_total"]):
            if name == family:
                out.setdefault(labels["program"], [0, 0])[i] = int(value)
    return out


def test_ebpf_stats_report_what_each_kernel_program_costs(py_server):
    """--ebpf-stats: every loaded program's runs and time, as the kernel counts them, on
    /metrics and in the exit log. The Python server reads each request with recvfrom and
    writes its head and body with two sendto calls, so those programs (shared with read
    and write) ran at least that often (other processes' calls only add to it)."""
    server, port = py_server()
    prom = free_port()
    agent = Agent("run", "--exporter", "none", "--ebpf-stats", "--prometheus-port", str(prom), "--port", str(port))
    wait_port(prom)
    before = program_costs(parse_prometheus(scrape(prom)[1]))
    assert {"tapir_exit_read_buf", "tapir_exit_write_buf", "tapir_sched_exec", "tapir_sock_ops"} <= before.keys(), before
    n = 20
    for i in range(n):
        get(port, f"/items/{i}", expect=200)
    after = program_costs(parse_prometheus(scrape(prom)[1]))
    assert after.keys() == before.keys()
    for program, calls in [("tapir_exit_read_buf", n), ("tapir_exit_write_buf", 2 * n)]:
        runs = after[program][0] - before[program][0]
        ns = after[program][1] - before[program][1]
        assert runs >= calls, (program, runs, after[program])
        # Timed by the kernel: a run takes well under a millisecond, and not nothing.
        assert 0 < ns / runs < 1_000_000, (program, runs, ns)
    for program, (runs, ns) in after.items():
        assert runs >= before[program][0] and ns >= before[program][1], program
    finish(agent)
    logged = [l for l in agent.err if "kernel program cost" in l and 'program="tapir_exit_read_buf"' in l]
    assert len(logged) == 1, agent.err[-30:]
    runs = int(logged[0].split(" runs=")[1].split()[0])
    assert runs >= after["tapir_exit_read_buf"][0], logged


# Standard OTEL_* configuration of the agent itself -------------------------------------


def test_standard_env_configures_endpoint_and_protocol(otlp, py_server):
    server, port = py_server()
    agent = Agent("run", "--port", str(port), env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.http_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    })
    get(port, "/env/1", 200)
    otlp.wait_spans(is_server_of(server.pid), n=1, timeout=TIMEOUT)
    otlp.wait_metrics(lambda m: m["name"] == "http.server.request.duration", what="server duration histogram")
    finish(agent)
    assert {s["protocol"] for s in otlp.spans()} == {"http"}
    assert otlp.requests["grpc"] == 0
    assert otlp.http_headers and all(h.get("content-type") == "application/x-protobuf" for h in otlp.http_headers)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_batch_larger_than_the_collectors_frames_arrives_whole(otlp, procs, tmp_path, protocol):
    """1,000 keep-alive requests to nginx, held back (a 10-minute schedule delay, batches
    of 4,096), go out at shutdown as one request of 2,000 spans, ~0.7 MB: over gRPC that
    is dozens of 16 KiB HTTP/2 frames through the collector's flow-control window, which
    the exporter's connection gathers into a few writes. Every span arrives, once."""
    port = free_port()
    nginx(procs, tmp_path, port, "location / { return 200 'ok'; }", "keepalive_requests 10000;")
    agent = otel_agent(otlp, port, protocol=protocol, env={
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4096",
        "OTEL_BSP_MAX_QUEUE_SIZE": "4096",
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
    })
    client = procs([PY, CLIENT, "keepalive", "127.0.0.1", port, 1000])
    assert client.wait_exit() == 0
    assert client.out.count("200") == 1000
    finish(agent)
    # The collector answered every export: bytes that only went out when the connection
    # closed would arrive too, but their exports would have timed out.
    assert any("telemetry flushed: 2000 spans exported, 0 dropped" in l for l in agent.err), agent.err[-10:]
    failed = [l for l in agent.err if "tapir::otel::export" in l and "failed" in l]
    assert failed == []
    assert otlp.requests_by_signal.get((WIRE[protocol], "traces")) == 1, otlp.summary()
    expected = [f"/ka/{i}" for i in range(1000)]
    servers = otlp.spans(lambda s: s["kind"] == "SERVER")
    for spans in (servers, otlp.spans(is_client_of(client.pid))):
        assert [span_path(s) for s in by_start(spans)] == expected
    assert len(otlp.spans()) == 2000, otlp.summary()


def test_batch_span_processor_variables_set_batch_size_and_delay(otlp, py_server):
    """OTEL_BSP_MAX_EXPORT_BATCH_SIZE=3 with a 10-minute OTEL_BSP_SCHEDULE_DELAY: spans
    still arrive at once, in requests of exactly 3 (full batches go out without waiting)."""
    server, port = py_server()
    agent = otel_agent(otlp, port, env={
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "3",
        "OTEL_BSP_SCHEDULE_DELAY": "600000",
    })
    for i in range(6):
        get(port, f"/bsp/{i}", 200)
    # Six server spans and six curl client spans: four full batches of three.
    otlp.wait_spans(is_server_of(server.pid), n=6, timeout=TIMEOUT)
    otlp.wait_until(lambda r: len(r.spans()) >= 12, timeout=TIMEOUT, what="12 spans")
    assert len(otlp.spans()) == 12, otlp.summary()
    assert otlp.requests_by_signal.get(("grpc", "traces")) == 4, otlp.summary()
    finish(agent)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_headers_from_the_environment_reach_the_collector(otlp, py_server, protocol):
    server, port = py_server()
    agent = otel_agent(otlp, port, protocol=protocol, env={
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=team%20a,Authorization=Bearer%20t0k",
    })
    get(port, "/hdr/1", 200)
    otlp.wait_spans(is_server_of(server.pid), n=1, timeout=TIMEOUT)
    finish(agent)
    seen = otlp.grpc_metadata if protocol == "grpc" else otlp.http_headers
    assert seen, otlp.summary()
    for h in seen:
        assert h.get("x-tenant") == "team a" and h.get("authorization") == "Bearer t0k", h


def test_delta_temporality_counts_each_request_once(otlp, py_server):
    server, port = py_server()
    agent = otel_agent(otlp, port, env={"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta"})

    def points(r):
        return r.metrics(lambda m: m["name"] == "http.server.request.duration"
                         and m["resource"].get("process.pid") == server.pid)

    for _ in range(5):
        get(port, "/delta/1", 200)
    otlp.wait_until(lambda r: sum(p["count"] for p in points(r)) >= 5, timeout=TIMEOUT,
                    what=lambda: f"5 requests in delta points: {points(otlp)}")
    for _ in range(3):
        get(port, "/delta/2", 200)
    finish(agent)  # the last export carries what the earlier ones did not
    got = points(otlp)
    assert {p["temporality"] for p in got} == {"DELTA"}, got
    # Summed over every export: each request exactly once (no cumulative re-sending).
    assert sum(p["count"] for p in got) == 8, got
    assert all(p["start_time_unix_nano"] < p["time_unix_nano"] for p in got), got


def make_test_pki(d):
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl, P-256)."""
    def openssl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=Tapir test CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *ec, "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf")
    return d / "ca.pem", (str(d / "srv.pem"), str(d / "srv.key"))


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_tls_collector_trusted_through_otel_exporter_otlp_certificate(tmp_path, py_server, protocol):
    ca, server_cert = make_test_pki(tmp_path)
    server, port = py_server()
    with OtlpReceiver(grpc_port=0, http_port=0, tls=server_cert) as tls_otlp:
        # Without the CA the collector's certificate is not trusted: nothing is sent (and
        # the agent gives up on its queue after 1 s at shutdown).
        agent = otel_agent(tls_otlp, port, protocol=protocol, args=("--shutdown-timeout", "1"))
        get(port, "/tls/0", 200)
        agent.wait_for(lambda l: "exporting spans to https://" in l and "failed" in l,
                       what="a failed TLS export")
        finish(agent)
        assert tls_otlp.spans() == [], tls_otlp.summary()

        agent = otel_agent(tls_otlp, port, protocol=protocol,
                           env={"OTEL_EXPORTER_OTLP_CERTIFICATE": str(ca)})
        get(port, "/tls/1", 200)
        spans = tls_otlp.wait_spans(is_server_of(server.pid), n=1, timeout=TIMEOUT)
        finish(agent)
        assert [s["attributes"]["url.path"] for s in spans] == ["/tls/1"], spans
        assert {s["protocol"] for s in tls_otlp.spans()} == {"grpc" if protocol == "grpc" else "http"}


def test_known_methods_follow_the_environment(otlp, py_server):
    """OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS replaces the conventions' method list: the
    methods it names are reported as they are, any other (GET too) as _OTHER with the
    original kept, in spans and metrics alike."""
    server, port = py_server()
    agent = otel_agent(otlp, port, env={"OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS": "GET,PROPFIND"})
    url = f"http://127.0.0.1:{port}/dav/"
    # A connection is recognized as HTTP by a standard method; a WebDAV request is seen
    # on a connection that has already carried one (curl reuses it for --next).
    curl("-o", "/dev/null", url + "1", "--next", "-o", "/dev/null", "-X", "PROPFIND", url + "2")
    curl("-o", "/dev/null", "-X", "DELETE", url + "3")
    otlp.wait_spans(is_server_of(server.pid), n=3, timeout=TIMEOUT)
    mine = lambda res: res.get("process.pid") == server.pid  # noqa: E731
    method = lambda p: p["attributes"]["http.request.method"]  # noqa: E731
    wait_histogram(otlp, "http.server.request.duration", mine, method, {"GET": 1, "PROPFIND": 1, "_OTHER": 1})
    finish(agent)
    spans = by_start(otlp.spans(is_server_of(server.pid)))
    got = [(s["name"], s["attributes"]["http.request.method"], s["attributes"].get("http.request.method_original"))
           for s in spans]
    assert got == [
        ("GET /dav/*", "GET", None),
        ("PROPFIND /dav/*", "PROPFIND", None),
        ("HTTP /dav/*", "_OTHER", "DELETE"),
    ], got


def test_webdav_and_purge_requests_are_seen_on_new_connections(otlp, py_server):
    """A connection whose first request is PROPFIND or PURGE is recognized as HTTP by the
    kernel: both ends become spans (methods outside the conventions' list are _OTHER), and
    the injected traceparent links them."""
    server, port = py_server()
    agent = otel_agent(otlp, port)
    get(port, "/warm-up", 200)  # the port is learned as HTTP: later connections are injected
    for method in ("PROPFIND", "PURGE"):
        curl("-o", "/dev/null", "-X", method, f"http://127.0.0.1:{port}/dav/{method}")
    otlp.wait_spans(is_server_of(server.pid), n=3, timeout=TIMEOUT)
    otlp.wait_spans(lambda s: s["kind"] == "CLIENT", n=3, timeout=TIMEOUT)
    finish(agent)
    servers = by_start(otlp.spans(is_server_of(server.pid)))[1:]
    clients = by_start(otlp.spans(lambda s: s["kind"] == "CLIENT"))[1:]
    got = [(s["attributes"]["http.request.method"], s["attributes"]["http.request.method_original"],
            s["attributes"]["url.path"]) for s in servers]
    assert got == [("_OTHER", "PROPFIND", "/dav/PROPFIND"), ("_OTHER", "PURGE", "/dav/PURGE")], got
    assert [span_path(c) for c in clients] == ["/dav/PROPFIND", "/dav/PURGE"]
    for s, c in zip(servers, clients):
        assert (s["trace_id"], s["parent_span_id"]) == (c["trace_id"], c["span_id"]), (s, c)


def test_console_exporter_prints_one_json_span_per_exchange(py_server):
    server, port = py_server()
    agent = Agent("run", "--exporter", "console", "--port", str(port))
    get(port, "/status/503?secret=1", 503)
    agent.wait_for(lambda l: '"SERVER"' in l and '"/status/503"' in l, stream="out", what="the server's span")
    # A CLIENT span has the path in its url.full only.
    agent.wait_for(lambda l: '"CLIENT"' in l and '/status/503"' in l, stream="out", what="curl's span")
    finish(agent)
    lines = [l for l in agent.out if '/status/503"' in l]
    assert all("secret" not in l for l in lines)  # no query string by default
    spans = {s["kind"]: s for s in map(json.loads, lines)}
    assert len(lines) == 2 and set(spans) == {"SERVER", "CLIENT"}, lines
    srv, cli = spans["SERVER"], spans["CLIENT"]
    assert srv["status"] == "ERROR" and srv["attributes"]["http.response.status_code"] == 503  # 5xx
    assert srv["attributes"]["url.path"] == "/status/503"
    assert srv["resource"]["process.pid"] == server.pid
    assert len(srv["trace_id"]) == 32 and len(srv["span_id"]) == 16
    # curl's request carried the injected traceparent: one trace, client → server.
    assert (srv["trace_id"], srv["parent_span_id"]) == (cli["trace_id"], cli["span_id"]), (cli, srv)


def test_traces_endpoint_overrides_the_general_endpoint(otlp, py_server):
    server, port = py_server()
    with OtlpReceiver(grpc_port=None, http_port=0) as traces_only:
        agent = Agent("run", "--port", str(port), env={
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.http_endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": traces_only.http_endpoint + "/v1/traces",
            "OTEL_METRIC_EXPORT_INTERVAL": "500",
        })
        get(port, "/split/1", 200)
        traces_only.wait_spans(is_server_of(server.pid), n=1, timeout=TIMEOUT)
        otlp.wait_metrics(lambda m: m["name"] == "http.server.request.duration", what="server duration histogram")
        finish(agent)
        assert otlp.spans() == [], "traces go to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT only"
        assert traces_only.metrics() == [], "metrics go to OTEL_EXPORTER_OTLP_ENDPOINT"
        assert len(traces_only.spans(is_server_of(server.pid))) == 1


def test_sampler_always_off_drops_spans_but_not_metrics(otlp, py_server):
    server, port = py_server()
    agent = otel_agent(otlp, port, env={"OTEL_TRACES_SAMPLER": "always_off"})
    for i in range(3):
        get(port, f"/unsampled/{i}", 200)
    mine = lambda res: res.get("process.pid") == server.pid  # noqa: E731
    wait_histogram(otlp, "http.server.request.duration", mine, route_status, {("/unsampled/*", 200): 3})
    finish(agent)
    assert otlp.spans() == [], "always_off samples no span"
    assert histogram_counts(otlp, "http.server.request.duration", mine, route_status) == {("/unsampled/*", 200): 3}


def test_route_patterns_name_spans_and_metrics(otlp, py_server):
    server, port = py_server()
    agent = otel_agent(otlp, port, args=["--route", "/users/{id}", "--route", "/files/{path...}"])
    sent = ["/users/42", "/users/abc", "/files/a/b/c.txt", "/orders/17"]
    for path in sent:
        get(port, path, 200)
    otlp.wait_spans(is_server_of(server.pid), n=len(sent), timeout=TIMEOUT)
    mine = lambda res: res.get("process.pid") == server.pid  # noqa: E731
    expected = {("/users/{id}", 200): 2, ("/files/{path...}", 200): 1, ("/orders/*", 200): 1}
    wait_histogram(otlp, "http.server.request.duration", mine, route_status, expected)
    finish(agent)
    spans = by_start(otlp.spans(is_server_of(server.pid)))
    routes = [(s["attributes"]["url.path"], s["attributes"]["http.route"], s["name"]) for s in spans]
    assert routes == [
        ("/users/42", "/users/{id}", "GET /users/{id}"),
        ("/users/abc", "/users/{id}", "GET /users/{id}"),
        ("/files/a/b/c.txt", "/files/{path...}", "GET /files/{path...}"),
        ("/orders/17", "/orders/*", "GET /orders/*"),  # no pattern: the heuristic
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_gzip_compressed_export(otlp, py_server, protocol):
    server, port = py_server()
    agent = otel_agent(otlp, port, protocol=protocol, env={"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"})
    get(port, "/zipped/1", 200)
    otlp.wait_spans(is_server_of(server.pid), n=1, timeout=TIMEOUT)
    mine = lambda res: res.get("process.pid") == server.pid  # noqa: E731
    wait_histogram(otlp, "http.server.request.duration", mine, route_status, {("/zipped/*", 200): 1})
    finish(agent)
    assert otlp.errors == []
    if protocol == "http/protobuf":
        assert otlp.http_headers and all(h.get("content-encoding") == "gzip" for h in otlp.http_headers), otlp.http_headers


def test_https_read_through_openssl_is_exported_as_https(otlp, py_server, tmp_path):
    """HTTPS read through the libssl probes reaches the collector with the scheme the
    conventions ask for: SERVER spans url.scheme https, CLIENT spans url.full https://…,
    both duration histograms url.scheme https; each TLS connection is counted
    (tapir.connections.tls) and none unreadable."""
    pem = self_signed_pem(tmp_path)
    server, port = py_server("--tls", pem)
    agent = otel_agent(otlp, port)
    sent = [("/users/1", 200), ("/status/404", 404)]
    for path, status in sent:
        r = curl("-k", "-o", "/dev/null", "-w", "%{http_code}", f"https://127.0.0.1:{port}{path}")
        assert int(r.stdout) == status
    otlp.wait_spans(is_server_of(server.pid), n=len(sent), timeout=TIMEOUT)
    mine = lambda res: res.get("process.pid") == server.pid  # noqa: E731
    wait_histogram(otlp, "http.server.request.duration", mine, route_status,
                   {("/users/*", 200): 1, ("/status/*", 404): 1})
    finish(agent)

    servers = by_start(otlp.spans(is_server_of(server.pid)))
    clients = by_start(otlp.spans(lambda s: s["kind"] == "CLIENT"))
    assert [(s["attributes"]["url.path"], s["attributes"]["url.scheme"],
             s["attributes"]["http.response.status_code"]) for s in servers] == [
        (p, "https", st) for p, st in sent
    ]
    assert [(c["attributes"]["url.full"], c["attributes"]["http.response.status_code"]) for c in clients] == [
        (f"https://127.0.0.1:{port}{p}", st) for p, st in sent
    ]
    check_parents(servers, clients)
    for name in ("http.server.request.duration", "http.client.request.duration"):
        points = otlp.latest_points(name)
        assert points and {p["attributes"]["url.scheme"] for p in points} == {"https"}, (name, points)
    tls = otlp.latest_points("tapir.connections.tls")
    assert tls and max(p["value"] for p in tls) == 2 * len(sent), tls
    unreadable = otlp.latest_points("tapir.connections.unreadable.tls")
    assert all(p["value"] == 0 for p in unreadable), unreadable
    assert otlp.errors == []
