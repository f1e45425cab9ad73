"""Issue: propagation. Incoming `traceparent` read anywhere in the header block, parent/child
links inside a process, one trace per keep-alive request. These run `watch` without
injection (see test_injection.py for the wire) and check the ids `tapir watch --json`
reports, which are the ones the exporters use."""
import socket
import sys
import time

import pytest

from conftest import TESTS, Agent, curl, finish, free_port, nginx, watch

PY = sys.executable
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


def of(exchanges, kind, port):
    return [e for e in exchanges if e["kind"] == kind and e["server.port"] == port]


def raw_request(port, *parts: bytes):
    """Send one request with exactly these bytes and return the status code. Several parts
    go out as separate segments with a pause between them, so that the server reads each
    on its own (the late-read counter checked by the callers proves it did)."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i, part in enumerate(parts):
            if i:
                time.sleep(0.05)
            s.sendall(part)
        f = s.makefile("rb")
        status = int(f.readline().split()[1])
        length = 0
        while (line := f.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        f.read(length)
        return status


@pytest.mark.parametrize("threading", [False, True], ids=["HTTPServer", "ThreadingHTTPServer"])
def test_outgoing_request_is_child_of_the_request_being_handled(py_server, procs, threading):
    backend, bport = py_server()
    fport = free_port()
    front = procs(
        [PY, TESTS / "servers/frontend.py", fport, f"http://127.0.0.1:{bport}"]
        + (["--threading"] if threading else []),
        ready_port=fport,
    )
    agent = watch(fport, bport)
    n = 20
    for i in range(n):
        curl("-o", "/dev/null", f"http://127.0.0.1:{fport}/item/{i}")
    got = finish(agent)
    fserver = of(got, "server", fport)
    fserver = [e for e in fserver if e["process.pid"] == front.pid]
    fclient = [e for e in of(got, "client", bport) if e["process.pid"] == front.pid]
    assert [e["url.path"] for e in fserver] == [f"/item/{i}" for i in range(n)]
    assert [e["url.path"] for e in fclient] == [f"/item/{i}" for i in range(n)]
    traces = set()
    for s, c in zip(fserver, fclient):
        assert s["trace_id"] and s["span_id"], s
        assert c["trace_id"] == s["trace_id"], (s, c)
        assert c["parent_span_id"] == s["span_id"], (s, c)
        assert c["span_id"] != s["span_id"]
        traces.add(s["trace_id"])
    assert len(traces) == n, "every request its own trace"


def test_incoming_traceparent_is_continued(py_server, procs):
    backend, bport = py_server()
    fport = free_port()
    procs([PY, TESTS / "servers/frontend.py", fport, f"http://127.0.0.1:{bport}"], ready_port=fport)
    agent = watch(fport, bport)
    curl("-o", "/dev/null", "-H", f"traceparent: 00-{TRACE}-{PARENT}-01", f"http://127.0.0.1:{fport}/tp")
    got = finish(agent)
    (curl_span,) = [e for e in of(got, "client", fport) if e["process.executable.name"] == "curl"]
    (server,) = of(got, "server", fport)
    (child,) = of(got, "client", bport)
    # curl sent its own traceparent: its CLIENT span carries exactly those ids.
    assert (curl_span["trace_id"], curl_span["span_id"]) == (TRACE, PARENT)
    assert (server["trace_id"], server["parent_span_id"]) == (TRACE, PARENT)
    assert (child["trace_id"], child["parent_span_id"]) == (TRACE, server["span_id"])


def test_a_proxy_passing_the_callers_traceparent_on_gets_a_client_span_of_its_own(py_server, procs, tmp_path):
    """nginx forwards the caller's `traceparent` unchanged: that span id is the caller's
    CLIENT span, not nginx's. nginx's CLIENT span gets its own id under nginx's SERVER span
    (it used to repeat the caller's id: two spans with one id in the trace), and the
    backend stays the child the header names."""
    backend, bport = py_server()
    nport = free_port()
    nginx(procs, tmp_path, nport, f"location / {{ proxy_pass http://127.0.0.1:{bport}; }}")
    agent = watch(nport, bport)
    curl("-o", "/dev/null", "-H", f"traceparent: 00-{TRACE}-{PARENT}-01", f"http://127.0.0.1:{nport}/fwd")
    got = [e for e in finish(agent) if e["url.path"] == "/fwd"]
    (caller,) = of(got, "client", nport)
    (proxy_in,) = of(got, "server", nport)
    (proxy_out,) = of(got, "client", bport)
    (back,) = of(got, "server", bport)
    assert proxy_out["process.executable.name"] == "nginx"
    assert (caller["trace_id"], caller["span_id"]) == (TRACE, PARENT)
    assert (proxy_in["trace_id"], proxy_in["parent_span_id"]) == (TRACE, PARENT)
    assert (proxy_out["trace_id"], proxy_out["parent_span_id"]) == (TRACE, proxy_in["span_id"])
    assert (back["trace_id"], back["parent_span_id"]) == (TRACE, PARENT)
    span_ids = [e["span_id"] for e in got]
    assert len(set(span_ids)) == 4, span_ids


def test_traceparent_after_3kib_of_headers_and_any_case(py_server):
    server, port = py_server()
    agent = watch(port)
    filler = "".join(f"X-Filler-{i}: {'v' * 90}\r\n" for i in range(34))  # ≈ 3.5 KiB
    assert len(filler) > 3 * 1024
    head = (
        f"GET /late HTTP/1.1\r\nHost: x\r\n{filler}TraceParent: 00-{TRACE}-{PARENT}-01\r\n\r\n"
    ).encode()
    assert raw_request(port, head) == 200
    (s,) = of(finish(agent), "server", port)
    assert s["url.path"] == "/late"
    assert (s["trace_id"], s["parent_span_id"]) == (TRACE, PARENT)


TP = f"traceparent: 00-{TRACE}-{PARENT}-01\r\n".encode()


def test_compat_programs_follow_a_traceparent_in_the_first_2kib(py_server):
    """The programs for kernels without bpf_loop (forced here) scan a head's first 2 KiB:
    a traceparent after 1.6 KiB of headers is followed, one after 3.5 KiB is not (the
    README's requirements say so), where the standard programs follow both (above)."""
    server, port = py_server()
    agent = Agent("watch", "--json", "--port", str(port), env={"TAPIR_EBPF_COMPAT": "1"})
    assert agent.wait_for(lambda l: "using the compat build" in l, what="the compat note")
    for path, lines in (("/near", 16), ("/far", 34)):
        filler = "".join(f"X-Filler-{i}: {'v' * 90}\r\n" for i in range(lines))
        head = f"GET {path} HTTP/1.1\r\nHost: x\r\n{filler}{TP.decode()}\r\n".encode()
        assert raw_request(port, head) == 200
    near, far = of(finish(agent), "server", port)
    assert (near["url.path"], far["url.path"]) == ("/near", "/far")
    assert (near["trace_id"], near["parent_span_id"]) == (TRACE, PARENT)
    assert far["trace_id"] != TRACE and not far.get("parent_span_id"), far


@pytest.mark.parametrize(
    "parts",
    [
        # What a sender's pushed header looks like: the request line, then the header.
        [b"GET /split HTTP/1.1\r\n", TP + b"Host: x\r\n\r\n"],
        [b"GET /split HTTP/1.1\r\nHost: x\r\n", b"Accept: */*\r\n" + TP + b"\r\n"],
        [b"GET /split HTTP/1.1\r\n", b"Host: x\r\n", b"Accept: */*\r\n", TP + b"\r\n"],
    ],
    ids=["after-request-line", "mid-headers", "fourth-read"],
)
def test_traceparent_in_a_later_read_of_the_head_is_continued(py_server, procs, parts):
    backend, bport = py_server()
    fport = free_port()
    procs([PY, TESTS / "servers/frontend.py", fport, f"http://127.0.0.1:{bport}"], ready_port=fport)
    agent = watch(fport, bport)
    assert raw_request(fport, *parts) == 200
    got = finish(agent)
    (server,) = of(got, "server", fport)
    (child,) = of(got, "client", bport)
    assert server["url.path"] == "/split"
    assert (server["trace_id"], server["parent_span_id"]) == (TRACE, PARENT)
    # The thread's context was corrected too: the downstream call continues the trace.
    assert (child["trace_id"], child["parent_span_id"]) == (TRACE, server["span_id"])
    assert agent.final_count("tapir.kernel.traceparent_in_later_read") == 1, agent.err[-30:]


def test_late_traceparent_goes_to_its_own_request_on_an_event_loop(py_server, procs):
    """Node reads A's request line, then all of B (whose downstream call keeps B open),
    then the rest of A's head with the traceparent: A gets the parent, B keeps its own."""
    backend, bport = py_server("--threading", "--chunk-delay", "0.2")
    nport = free_port()
    procs(["node", TESTS / "servers/node_frontend.js", nport, f"http://127.0.0.1:{bport}"], ready_port=nport)
    agent = watch(nport)
    a = socket.create_connection(("127.0.0.1", nport))
    b = socket.create_connection(("127.0.0.1", nport))
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a.sendall(b"GET /a HTTP/1.1\r\n")
    time.sleep(0.05)
    b.sendall(b"GET /chunked/10/5 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.05)
    a.sendall(TP + b"Host: x\r\n\r\n")
    for s in (a, b):
        assert int(s.makefile("rb").readline().split()[1]) == 200
        s.close()
    got = {e["url.path"]: e for e in of(finish(agent), "server", nport)}
    assert set(got) == {"/a", "/chunked/10/5"}, got
    assert (got["/a"]["trace_id"], got["/a"]["parent_span_id"]) == (TRACE, PARENT)
    assert got["/chunked/10/5"]["trace_id"] != TRACE and got["/chunked/10/5"]["parent_span_id"] is None
    assert agent.final_count("tapir.kernel.traceparent_in_later_read") == 1, agent.err[-30:]


@pytest.mark.parametrize(
    "split,head_extra",
    [(False, b""), (True, b""), (True, f"traceparent: ff-{TRACE}-{PARENT}-01\r\n".encode())],
    ids=["one-read", "body-in-second-read", "invalid-header-then-body"],
)
def test_traceparent_lines_in_a_body_are_not_a_parent(py_server, split, head_extra):
    server, port = py_server()
    agent = watch(port)
    body = b"x\r\n" + TP
    head = b"POST /body HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n" % (head_extra, len(body))
    assert raw_request(port, *([head, body] if split else [head + body])) == 201
    (s,) = of(finish(agent), "server", port)
    assert s["url.path"] == "/body"
    assert s["trace_id"] != TRACE and s["parent_span_id"] is None
    assert agent.final_count("tapir.kernel.traceparent_in_later_read") == 0


@pytest.mark.parametrize(
    "value",
    [
        f"ff-{TRACE}-{PARENT}-01",  # version ff is invalid
        f"00-{'0' * 32}-{PARENT}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE.upper()}-{PARENT}-01",  # uppercase hex
        f"00-{TRACE}-{PARENT}",  # too short
        f"00-{TRACE}-{PARENT}-01-extra",  # version 00 has no extra fields
        f"00-{TRACE[:-1]}x-{PARENT}-01",  # not hex
    ],
)
def test_malformed_traceparent_is_ignored(py_server, value):
    server, port = py_server()
    agent = watch(port)
    assert raw_request(port, f"GET /bad HTTP/1.1\r\nHost: x\r\ntraceparent: {value}\r\n\r\n".encode()) == 200
    (s,) = of(finish(agent), "server", port)
    assert s["trace_id"] != TRACE and s["trace_id"] != "0" * 32
    assert s["parent_span_id"] is None


def test_keepalive_requests_each_get_their_own_trace(py_server, procs):
    server, port = py_server()
    agent = watch(port)
    client = procs([PY, TESTS / "servers/http_client.py", "keepalive", "127.0.0.1", port, 10])
    assert client.wait_exit() == 0
    got = of(finish(agent), "server", port)
    assert len(got) == 10
    assert len({e["trace_id"] for e in got}) == 10
    assert all(e["parent_span_id"] is None for e in got)
