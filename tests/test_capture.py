"""Issue: capture. Every HTTP/1.x exchange of real, unmodified programs is seen exactly
once, with the right process, addresses, status and timing."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TAPIR, TESTS, Agent, curl, finish, free_port, nginx, require, self_signed, self_signed_pem, watch

PY = sys.executable
CLIENT = str(TESTS / "servers/http_client.py")
HOPPER = str(TESTS / "servers/cpu_hopper.py")
# Records the live ring buffer (`cargo xtask build` builds it beside tapir).
REPLAY = str(Path(TAPIR).with_name("tapir-replay"))


def servers_of(exchanges, kind="server"):
    return [e for e in exchanges if e["kind"] == kind]


def check_common(e, *, pid, port, t0, kind="server"):
    assert e["kind"] == kind
    assert e["process.pid"] == pid
    assert e["server.port"] == port
    assert e["server.address"] in ("127.0.0.1", "::1")
    assert isinstance(e["client.port"], int) and e["client.port"] > 0
    assert e["network.protocol.version"] in ("1.0", "1.1")
    now = time.time_ns()
    assert t0 <= e["start_time_unix_nano"] <= now, (t0, e["start_time_unix_nano"], now)
    assert 0 < e["duration_ns"] < 10_000_000_000


REQUESTS = [
    ("/", 200),
    ("/status/404", 404),
    ("/status/500", 500),
    ("/users/42", 200),
    ("/status/201", 201),
    ("/status/503", 503),
]


def request_each_once(port, pid):
    """Sends REQUESTS with curl to a server watched by a fresh agent; returns its SERVER
    exchanges after checking they are exactly REQUESTS, with the common fields right."""
    agent = watch(port)
    t0 = time.time_ns()
    for path, status in REQUESTS:
        r = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}{path}")
        assert int(r.stdout) == status
    got = servers_of(finish(agent))
    assert [(e["url.path"], e["http.response.status_code"]) for e in got] == REQUESTS
    for e in got:
        check_common(e, pid=pid, port=port, t0=t0)
    return got


def test_python_http_server_each_request_exactly_once(py_server):
    server, port = py_server()
    for e in request_each_once(port, server.pid):
        assert e["http.request.method"] == "GET"
        assert e["process.executable.name"].startswith("python")


def test_node_http_server(procs):
    require("node")
    port = free_port()
    server = procs(["node", TESTS / "servers/node_server.js", port], ready_port=port)
    for e in request_each_once(port, server.pid):
        assert e["process.executable.name"] == "node"


def document_root(tmp_path, files):
    """tmp_path/www holding `files` ({name: bytes})."""
    root = tmp_path / "www"
    root.mkdir()
    for name, content in files.items():
        (root / name).write_bytes(content)
    return root


def workers_of(master):
    """The pids of an nginx master's worker processes."""
    return {int(p) for p in open(f"/proc/{master.pid}/task/{master.pid}/children").read().split()}


def test_nginx_static_files_writev_and_sendfile(procs, tmp_path):
    port = free_port()
    root = document_root(tmp_path, {"index.html": b"hello from nginx\n", "big.bin": os.urandom(300_000)})
    master = nginx(procs, tmp_path, port, f"root {root}; location = /boom {{ return 500; }}", "sendfile on;")
    agent = watch(port)
    t0 = time.time_ns()
    expected = [("/index.html", 200), ("/missing", 404), ("/boom", 500), ("/big.bin", 200)]
    for path, status in expected:
        r = curl("-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}{path}")
        assert int(r.stdout) == status
    got = servers_of(finish(agent))
    assert [(e["url.path"], e["http.response.status_code"]) for e in got] == expected
    workers = workers_of(master)
    for e in got:
        assert e["process.pid"] in workers, (e["process.pid"], workers)
        check_common(e, pid=e["process.pid"], port=port, t0=t0)
        assert e["process.executable.name"] == "nginx"
    # sendfile: the body is counted although it never passes through user memory.
    assert got[3]["http.response.body.size"] == 300_000


def test_sendfile_records_carry_only_a_byte_count(procs, tmp_path):
    """The kernel programs report a sendfile() by its byte count alone: nothing is copied
    from the process's memory (the bytes are in a file). Read off the live ring buffer
    with `tapir-replay record`; until session 20 these records carried a second copy of
    the head nginx had just written with writev()."""
    port = free_port()
    root = document_root(tmp_path, {"small.txt": b"hello\n", "big.bin": os.urandom(300_000)})
    master = nginx(procs, tmp_path, port, f"root {root};", "sendfile on;")
    record = procs([REPLAY, "record", "--out", tmp_path / "rec.bin", "--seconds", 120])
    record.wait_for(lambda l: "recording to" in l, timeout=60, what="recording")
    for path in ["/big.bin", "/small.txt"] * 2:
        curl("-o", "/dev/null", f"http://127.0.0.1:{port}{path}")
    assert record.stop(signal.SIGINT) == 0, record.err
    dump = procs([REPLAY, "dump", tmp_path / "rec.bin"])
    assert dump.wait_exit() == 0, dump.err
    workers = workers_of(master)
    calls = [r for r in map(json.loads, dump.out) if r["pid"] in workers]
    heads = [r for r in calls if r["syscall"] == "writev"]
    files = [r for r in calls if r["syscall"] == "sendfile"]
    assert [r["total"] for r in files] == [300_000, 6] * 2, calls
    assert all(r["captured"] == 0 and r["tail"] == 0 and r["direction"] == "egress" for r in files), files
    # The heads went out with writev and were copied whole.
    assert len(heads) == 4 and all(0 < r["captured"] == r["total"] < 400 for r in heads), heads


def test_vectored_calls_sendmsg_writev_recvmsg_readv(py_server, procs):
    """A request written in five pieces (one iovec each) and a response read into two
    buffers, with the status line cut between them: the segments are joined in order."""
    server, port = py_server()
    agent = watch(port)
    n = 6
    client = procs([PY, CLIENT, "vectored", "127.0.0.1", port, n])
    assert client.wait_exit() == 0
    assert client.out == ["200"] * n
    got = finish(agent)
    clients = [e for e in servers_of(got, "client") if e["process.pid"] == client.pid]
    assert [(e["url.path"], e["http.response.status_code"]) for e in clients] == [(f"/v/{i}", 200) for i in range(n)]
    assert [e["url.path"] for e in servers_of(got)] == [f"/v/{i}" for i in range(n)]
    body = [e["http.response.body.size"] for e in servers_of(got)]
    assert [e["http.response.body.size"] for e in clients] == body and all(b > 0 for b in body)


def test_python_urllib_and_curl_clients(py_server, procs):
    server, port = py_server()
    agent = watch(port)
    t0 = time.time_ns()
    client = procs([PY, CLIENT, "urllib", f"http://127.0.0.1:{port}/u/1", f"http://127.0.0.1:{port}/status/404"])
    assert client.wait_exit() == 0
    c = curl("-o", "/dev/null", "-X", "DELETE", f"http://127.0.0.1:{port}/items/7")
    got = finish(agent)
    clients = servers_of(got, "client")
    by_pid = {}
    for e in clients:
        by_pid.setdefault(e["process.pid"], []).append(e)
    urllib_ex = by_pid.pop(client.pid)
    assert [(e["url.path"], e["http.response.status_code"]) for e in urllib_ex] == [("/u/1", 200), ("/status/404", 404)]
    for e in urllib_ex:
        check_common(e, pid=client.pid, port=port, t0=t0, kind="client")
        assert e["process.executable.name"].startswith("python")
    # The remaining client exchange is curl's (its pid is not known to the test).
    assert len(by_pid) == 1
    (curl_ex,) = next(iter(by_pid.values()))
    assert curl_ex["process.executable.name"] == "curl"
    assert (curl_ex["http.request.method"], curl_ex["url.path"]) == ("DELETE", "/items/7")
    assert len(servers_of(got)) == 3


def test_keepalive_100_requests_are_100_exchanges(py_server, procs):
    server, port = py_server()
    agent = watch(port)
    client = procs([PY, CLIENT, "keepalive", "127.0.0.1", port, 100])
    assert client.wait_exit() == 0
    assert client.out.count("200") == 100
    got = finish(agent)
    for kind, pid in (("server", server.pid), ("client", client.pid)):
        ex = servers_of(got, kind)
        assert [e["url.path"] for e in ex] == [f"/ka/{i}" for i in range(100)], kind
        assert {e["process.pid"] for e in ex} == {pid}
        assert len({e["client.port"] for e in ex}) == 1, "one keep-alive connection"


def test_request_read_on_one_cpu_and_answered_on_another_pair_in_order(procs):
    """Each CPU writes to an event ring of its own. The server reads every request on the
    second CPU and writes the response on the first, so each pair is split across two
    rings, the response in the ring drained first: only a merge by time pairs them."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    port = free_port()
    server = procs([PY, HOPPER, port, cpus[1], cpus[0]], ready_port=port)
    agent = watch(port)
    t0 = time.time_ns()
    client = procs([PY, CLIENT, "keepalive", "127.0.0.1", port, 100])
    assert client.wait_exit() == 0
    assert client.out.count("200") == 100
    got = finish(agent)
    expected = [(f"/ka/{i}", 200) for i in range(100)]
    for kind, pid in (("server", server.pid), ("client", client.pid)):
        ex = servers_of(got, kind)
        assert [(e["url.path"], e["http.response.status_code"]) for e in ex] == expected, kind
        for e in ex:
            check_common(e, pid=pid, port=port, t0=t0, kind=kind)
            assert e["http.response.body.size"] == 2
    assert agent.final_count("tapir.events.out_of_order") == 0


def test_pipelined_requests_are_paired_in_order(py_server, procs):
    server, port = py_server()
    agent = watch(port)
    paths = ["/status/200", "/status/404", "/bytes/10", "/status/500"]
    client = procs([PY, CLIENT, "pipeline", "127.0.0.1", port, *paths])
    assert client.wait_exit() == 0
    assert client.out == ["200", "404", "200", "500"]
    got = finish(agent)
    for kind in ("server", "client"):
        ex = servers_of(got, kind)
        assert [(e["url.path"], e["http.response.status_code"]) for e in ex] == list(
            zip(paths, [200, 404, 200, 500])
        ), kind


def test_one_mebibyte_response(py_server):
    server, port = py_server()
    agent = watch(port)
    curl("-o", "/dev/null", f"http://127.0.0.1:{port}/bytes/1048576")
    (e,) = servers_of(finish(agent))
    assert e["http.response.body.size"] == 1048576
    assert e["http.response.status_code"] == 200


def test_bodies_are_measured_not_copied(py_server, tmp_path):
    """A body's bytes stay in the process: the kernel copies heads and a body's first and
    last bytes, so a mebibyte each way costs a few KiB of copies, not the body."""
    server, port = py_server()
    agent = watch(port)
    upload = tmp_path / "upload"
    upload.write_bytes(b"u" * 1048576)
    curl("-o", "/dev/null", f"http://127.0.0.1:{port}/bytes/1048576")
    curl("-o", "/dev/null", f"http://127.0.0.1:{port}/chunked/1048576/16")
    curl("-o", "/dev/null", "--data-binary", f"@{upload}", f"http://127.0.0.1:{port}/upload")
    got = finish(agent)
    for kind in ("server", "client"):
        plain, chunked, post = servers_of(got, kind)
        assert [e["url.path"] for e in (plain, chunked, post)] == [
            "/bytes/1048576", "/chunked/1048576/16", "/upload"], kind
        assert plain["http.response.body.size"] == 1048576, kind
        assert [e["http.response.status_code"] for e in (plain, chunked, post)] == [
            200, 200, 201], kind
        assert post["http.request.body.size"] == 1048576, kind
    # The server writes one chunk per call: its framing is followed exactly.
    assert servers_of(got)[1]["http.response.body.size"] == 1048576
    copied = agent.final_count("tapir.events.payload_bytes")
    # Three mebibytes moved, each seen twice; the heads are a few hundred bytes each.
    assert 0 < copied < 64 * 1024, copied


def test_slow_chunked_response_ends_at_the_last_chunk(py_server):
    server, port = py_server("--chunk-delay", "0.05")
    agent = watch(port)
    t = time.monotonic()
    curl("-o", "/dev/null", f"http://127.0.0.1:{port}/chunked/50000/5")
    elapsed = time.monotonic() - t
    got = finish(agent)
    (e,) = servers_of(got)
    assert e["http.response.body.size"] == 50000
    # 5 chunks 50 ms apart: the exchange lasts until the last one, not the first.
    assert 0.2e9 <= e["duration_ns"] <= elapsed * 1e9
    (c,) = servers_of(got, "client")
    assert c["http.response.status_code"] == 200


def test_connection_opened_before_the_agent_started(py_server, procs):
    server, port = py_server()
    client = procs([PY, CLIENT, "preopened", "127.0.0.1", port], stdin=True)
    client.wait_for(lambda l: l == "first-done", stream="out", what="the first request")
    agent = watch(port)
    client.send_line()
    assert client.wait_exit() == 0
    got = finish(agent)
    (s,) = servers_of(got)
    (c,) = servers_of(got, "client")
    assert s["url.path"] == c["url.path"] == "/after"
    assert s["process.pid"] == server.pid and c["process.pid"] == client.pid
    assert s["server.port"] == c["server.port"] == port
    assert s["client.port"] == c["client.port"]
    assert s["server.address"] == c["server.address"] == "127.0.0.1"


def test_ipv6_loopback(py_server):
    server, port = py_server(bind="::1")
    agent = watch(port)
    curl("-g", "-o", "/dev/null", f"http://[::1]:{port}/v6")
    got = finish(agent)
    (s,) = servers_of(got)
    assert s["server.address"] == "::1" and s["client.address"] == "::1"
    assert s["url.path"] == "/v6"
    (c,) = servers_of(got, "client")
    assert c["server.address"] == "::1" and c["server.port"] == port


def test_https_is_read_through_openssl(py_server, procs, tmp_path):
    """HTTPS served and called with the system's OpenSSL is read as plaintext through the
    libssl probes: Python's ssl module (SSL_read_ex/SSL_write_ex), nginx and curl
    (SSL_read/SSL_write). Each exchange shows once at each end with url.scheme https, on a
    kept-alive connection too (its bodies framed right), and no TLS connection is reported
    unreadable."""
    pem = self_signed_pem(tmp_path)
    py, py_port = py_server("--tls", pem)
    ng_port = free_port()
    # nginx, like Python, takes the key and certificate from one file.
    nginx(procs, tmp_path, ng_port,
          f"ssl_certificate {pem}; ssl_certificate_key {pem}; "
          "location / { return 200 'ok'; } location = /missing { return 404; }",
          listen_extra="ssl")
    agent = watch(py_port, ng_port)
    for i in range(2):
        r = curl("-k", "-o", "/dev/null", "-w", "%{http_code}", f"https://127.0.0.1:{py_port}/secret/{i}")
        assert r.stdout == "200"
    # Three requests on one connection: curl keeps it for URLs of the same host.
    urls = [f"https://127.0.0.1:{ng_port}{p}" for p in ("/a", "/missing", "/c")]
    r = curl("-k", *(["-o", "/dev/null"] * 3), "-w", "%{http_code} %{num_connects}\n", *urls)
    assert r.stdout.split() == ["200", "1", "404", "0", "200", "0"]
    got = finish(agent)
    rows = sorted(
        (e["kind"], e["server.port"], e["url.path"], e["http.response.status_code"], e["url.scheme"])
        for e in got
    )
    expected = [(k, py_port, f"/secret/{i}", 200, "https") for k in ("client", "server") for i in range(2)]
    expected += [
        (k, ng_port, p, s, "https")
        for k in ("client", "server")
        for p, s in (("/a", 200), ("/missing", 404), ("/c", 200))
    ]
    assert rows == sorted(expected), agent.err[-30:]
    assert {e["process.pid"] for e in servers_of(got) if e["server.port"] == py_port} == {py.pid}
    for e in got:
        if e["url.path"] in ("/a", "/c"):
            assert e["http.response.body.size"] == 2, e
    # 3 connections, both ends.
    assert agent.final_count("tapir.connections.tls") == 6, agent.err[-30:]
    assert agent.final_count("tapir.connections.unreadable.tls") == 0
    assert not [l for l in agent.err if "not captured: " in l], agent.err[-30:]


@pytest.mark.parametrize("server_kind", ["asyncio", "node"])
def test_https_through_a_memory_bio_is_read(procs, tmp_path, server_kind):
    """Servers whose OpenSSL decrypts through a memory BIO read and write the socket
    themselves, so no socket call happens inside an SSL call: asyncio's TLS (as uvicorn and
    aiohttp serve HTTPS; the system's libssl) and Node.js's `https` (the official builds
    carry OpenSSL inside the `node` binary, with OpenSSL's internal read and write inlined
    into SSL_read/SSL_write, which are probed instead). The socket a thread read just
    before its SSL_read names the connection, and the SSL*'s writes go where it read. Every
    exchange on two connections (one kept alive for three requests) shows at both ends with
    its status and body size, and no SSL call is left without its socket."""
    pem = self_signed_pem(tmp_path)
    port = free_port()
    if server_kind == "node":
        require("node")
        argv = ["node", TESTS / "servers/node_server.js", port, "--tls", pem]
    else:
        argv = [sys.executable, TESTS / "servers/asyncio_server.py", port, "--tls", pem]
    server = procs(argv, ready_port=port)
    agent = watch(port)
    base = f"https://127.0.0.1:{port}"
    urls = [f"{base}{p}" for p in ("/a", "/status/404", "/bytes/3000")]
    r = curl("-k", *(["-o", "/dev/null"] * 3), "-w", "%{http_code} %{num_connects}\n", *urls)
    assert r.stdout.split() == ["200", "1", "404", "0", "200", "0"]
    assert curl("-k", f"{base}/b").stdout == "ok\n"
    got = finish(agent)
    rows = sorted(
        (e["kind"], e["url.path"], e["http.response.status_code"], e["http.response.body.size"],
         e["url.scheme"])
        for e in got
    )
    expected = [(k, p, s, n, "https") for k in ("client", "server")
                for p, s, n in (("/a", 200, 3), ("/status/404", 404, 11), ("/bytes/3000", 200, 3000),
                                ("/b", 200, 3))]
    assert rows == sorted(expected), agent.err[-30:]
    assert {e["process.pid"] for e in servers_of(got)} == {server.pid}
    assert agent.final_count("tapir.kernel.tls_socket_unknown") == 0, agent.err[-30:]
    assert agent.final_count("tapir.connections.tls") == 4, agent.err[-30:]
    assert agent.final_count("tapir.connections.unreadable.tls") == 0


@pytest.mark.parametrize("client_kind", ["node", "asyncio"])
def test_https_clients_through_a_memory_bio_are_read_from_their_first_request(
        py_server, procs, tmp_path, client_kind):
    """A client whose OpenSSL encrypts into a memory BIO (Node's `https`, asyncio's TLS as
    aiohttp uses it) writes its first request on a new connection before it has read
    anything there, so the SSL_write names no socket: its plaintext is held in the kernel
    until the thread's next write to a TLS socket (the request's ciphertext) names it. Every
    request shows as a CLIENT span, the first on each connection included, with its status
    and body size, and no SSL call is left without its socket."""
    pem = self_signed_pem(tmp_path)
    server, port = py_server("--tls", pem)
    agent = watch(port)
    if client_kind == "node":
        require("node")
        fetch = TESTS / "servers/node_fetch.js"
        url = f"https://127.0.0.1:{port}/bytes/5"
        # Three connections of one request each, then one connection of three requests.
        runs = [(["node", fetch, url, 3, 5], ["ok 3"]),
                (["node", fetch, url, 3, 5, "keepalive"], ["ok 3"])]
        paths, size = ["/bytes/5"] * 6, 5
    else:
        asyncio_client = [sys.executable, TESTS / "servers/http_client.py", "asyncio-tls", "127.0.0.1", port]
        runs = [(asyncio_client + [n], ["200"] * n) for n in (1, 1, 3)]
        paths, size = ["/tls/0", "/tls/0", "/tls/0", "/tls/1", "/tls/2"], 3
    pids = set()
    for argv, out in runs:
        client = procs(argv)
        assert client.wait_exit() == 0, client.err[-10:]
        assert client.out == out, client.err[-10:]
        pids.add(client.pid)
    got = finish(agent)
    rows = sorted((e["kind"], e["url.path"], e["http.response.status_code"],
                   e["http.response.body.size"], e["url.scheme"]) for e in got)
    expected = sorted((k, p, 200, size, "https") for k in ("client", "server") for p in paths)
    assert rows == expected, agent.err[-30:]
    assert {e["process.pid"] for e in servers_of(got, "client")} == pids
    assert {e["process.pid"] for e in servers_of(got)} == {server.pid}
    assert agent.final_count("tapir.kernel.tls_socket_unknown") == 0, agent.err[-30:]


def test_https_bodies_posts_and_trace_context(py_server, tmp_path):
    """Through the libssl probes, in a server started after the agent (the probes are on
    the library file, so later processes are covered): bodies larger than a TLS record
    (16 KiB) keep their sizes, Content-Length and chunked; a POST's body is counted; and an
    incoming traceparent read from the plaintext becomes the server span's parent."""
    pem = self_signed_pem(tmp_path)
    port = free_port()
    agent = watch(port)
    server, port = py_server("--tls", pem, port=port)
    base = f"https://127.0.0.1:{port}"
    assert len(curl("-k", f"{base}/bytes/100000").stdout) == 100000
    assert len(curl("-k", f"{base}/chunked/50000/5").stdout) == 50000
    post = tmp_path / "post.bin"
    post.write_bytes(b"p" * 40000)
    assert curl("-k", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", f"@{post}",
                f"{base}/upload").stdout == "201"
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    curl("-k", "-o", "/dev/null", "-H", f"traceparent: 00-{trace_id}-{parent}-01", f"{base}/traced")
    got = finish(agent)
    by = {(e["kind"], e["url.path"]): e for e in got}
    assert sorted(by) == sorted(
        (k, p) for k in ("client", "server") for p in ("/bytes/100000", "/chunked/50000/5", "/upload", "/traced")
    ), agent.err[-30:]
    for k in ("client", "server"):
        assert by[(k, "/bytes/100000")]["http.response.body.size"] == 100000
        assert by[(k, "/chunked/50000/5")]["http.response.body.size"] == 50000
        assert by[(k, "/upload")]["http.request.body.size"] == 40000
        assert by[(k, "/upload")]["http.response.status_code"] == 201
        assert all(e["url.scheme"] == "https" for e in got)
    traced = by[("server", "/traced")]
    assert (traced["trace_id"], traced["parent_span_id"]) == (trace_id, parent)
    assert by[("server", "/bytes/100000")]["process.pid"] == server.pid
    assert agent.final_count("tapir.connections.tls") == 8  # 4 connections, both ends
    assert agent.final_count("tapir.connections.unreadable.tls") == 0


def test_a_libssl_that_appears_later_is_probed(py_server, tmp_path):
    """A libssl file no process mapped when the agent started (a new container's own copy;
    here a copy loaded through LD_LIBRARY_PATH) is found by the periodic rescan and probed:
    the server using it is then read, as curl on the system's libssl is."""
    pem = self_signed_pem(tmp_path)
    lib = tmp_path / "lib"
    lib.mkdir()
    system = next(p for p in ("/usr/lib/x86_64-linux-gnu/libssl.so.3", "/lib/x86_64-linux-gnu/libssl.so.3")
                  if os.path.exists(p))
    shutil.copy(system, lib / "libssl.so.3")  # another file: another inode
    port = free_port()
    agent = Agent("watch", "--json", "--port", str(port), env={"TAPIR_TLS_RESCAN_SECS": "1"})
    server, port = py_server("--tls", pem, port=port, env={**os.environ, "LD_LIBRARY_PATH": str(lib)})
    with open(f"/proc/{server.pid}/maps") as f:
        assert str(lib / "libssl.so.3") in f.read()
    agent.wait_for(lambda l: "reading TLS through OpenSSL in" in l and "/libssl.so.3 too" in l,
                   what="the rescan probing the copied libssl", timeout=30)
    r = curl("-k", "-o", "/dev/null", "-w", "%{http_code}", f"https://127.0.0.1:{port}/later")
    assert r.stdout == "200"
    got = finish(agent)
    assert sorted((e["kind"], e["url.path"], e["url.scheme"]) for e in got) == [
        ("client", "/later", "https"), ("server", "/later", "https"),
    ], agent.err[-30:]
    assert agent.final_count("tapir.connections.unreadable.tls") == 0


@pytest.mark.parametrize("client", ["curl", "node"])
def test_http2_over_tls_is_read_through_the_probes(procs, tmp_path, client):
    """HTTP/2 inside TLS (nginx with http2; curl picking h2 by ALPN, or Node's http2 client,
    whose OpenSSL writes the preface through a memory BIO before it reads anything) is read
    through the TLS probes: each request is an https exchange of HTTP version 2 at both
    ends, and each connection is counted as TLS read and as HTTP/2. Each client fetches a
    200 KB file between two small requests on its connection: TLS records of 16 KiB, larger
    than what the kernel copies, whose frames it follows, so the request after it is read
    too (for Node, from a frame boundary the kernel guessed after the held first write)."""
    key, cert = self_signed(tmp_path)
    (tmp_path / "big.bin").write_bytes(b"b" * 200_000)
    port = free_port()
    nginx(procs, tmp_path, port,
          f"ssl_certificate {cert}; ssl_certificate_key {key}; location / {{ return 200 'ok'; }}"
          f" location = /big {{ alias {tmp_path}/big.bin; }}",
          listen_extra="ssl http2")
    agent = watch(port)
    expected = [("/h2", 2), ("/big", 200_000), ("/h2", 2)]
    if client == "curl":
        urls = [f"https://127.0.0.1:{port}{path}" for path, _ in expected]
        r = curl("-k", "--http2", *["-o", "/dev/null"] * 3, "-w", "%{http_version}%{num_connects}\n", *urls)
        # One connection: the first transfer made it, the others reused it.
        assert r.stdout.split() == ["21", "20", "20"], r.stdout
    else:
        require("node")
        node = procs(["node", TESTS / "servers/node_h2_client.js", f"https://127.0.0.1:{port}/h2", "/big", "/h2"])
        assert node.wait_exit() == 0, node.err[-10:]
        assert node.out == ["200"] * 3
    got = finish(agent)
    rows = sorted(
        (e["kind"], e["process.executable.name"], e["url.path"], e["url.scheme"],
         e["http.response.status_code"], e["network.protocol.version"], e["http.response.body.size"])
        for e in got
    )
    assert rows == sorted(
        (kind, name, path, "https", 200, "2", size)
        for kind, name in (("client", client), ("server", "nginx"))
        for path, size in expected
    ), (got, agent.err[-30:])
    assert agent.final_count("tapir.connections.tls") == 2, agent.err[-30:]
    assert agent.final_count("tapir.connections.http2") == 2, agent.err[-30:]
    assert agent.final_count("tapir.connections.unreadable.tls") == 0, agent.err[-30:]
    assert agent.final_count("tapir.http.dropped") in (None, 0), agent.err[-30:]
    assert not [l for l in agent.err if "not captured: " in l]


def test_tls_is_counted_and_named_not_captured_without_the_probes(py_server, tmp_path):
    """HTTPS with the TLS probes off (--no-tls) cannot be read: each such connection is
    counted at both ends, each program and port is named once in a warning, and none of
    it becomes an exchange, while plain HTTP beside it still does. (HTTP/2 without TLS is
    read: tests/test_http2.py.)"""
    pem = self_signed_pem(tmp_path)
    tls_server, tls_port = py_server("--tls", pem)
    _, plain_port = py_server()
    agent = watch(tls_port, plain_port, extra=["--no-tls"])
    for i in range(3):
        r = curl("-k", "-o", "/dev/null", "-w", "%{http_code}", f"https://127.0.0.1:{tls_port}/secret/{i}")
        assert r.stdout == "200"
    assert curl(f"http://127.0.0.1:{plain_port}/plain").stdout.strip() == "ok"
    got = finish(agent)
    assert sorted((e["kind"], e["url.path"], e["server.port"]) for e in got) == [
        ("client", "/plain", plain_port),
        ("server", "/plain", plain_port),
    ]
    # Both ends of each of the three HTTPS connections.
    assert agent.final_count("tapir.connections.unreadable.tls") == 6, agent.err[-30:]
    said = [l.split("not captured: ", 1)[1] for l in agent.err if "not captured: " in l]
    expected = [
        rf"python[\d.]* \(pid {tls_server.pid}\) serves TLS on port {tls_port};",
        rf"curl \(pid \d+\) talks TLS to 127\.0\.0\.1:{tls_port};",
    ]
    # Each once: three curl processes to one port are one program and port.
    assert sorted(p for p in expected if any(re.match(p, l) for l in said)) == sorted(expected), said
    assert len(said) == len(expected), said


PEER = str(TESTS / "servers/raw_peer.py")


def run_peer(procs, *args):
    """tests/servers/raw_peer.py ARGS under `tapir watch` of its port: the agent, stopped."""
    port = free_port()
    peer = procs([PY, PEER, args[0], port, *args[1:]], stdin=True)
    peer.wait_for(lambda l: "listening" in l, stream="out", what="the peer listening")
    agent = watch(port)
    peer.send_line()
    assert peer.wait_exit() == 0
    return agent, finish(agent)


def test_other_protocols_are_skipped_from_their_first_bytes(procs):
    """A connection seen from its start whose first bytes no HTTP/1.x message starts with
    (a binary, length-prefixed protocol) is counted once at each end and skipped after;
    one that starts with a method Tapir does not know is not: its next request is seen."""
    agent, got = run_peer(procs, "binary")
    assert got == []
    assert agent.final_count("tapir.connections.other_protocol") == 2, agent.err[-30:]
    assert agent.final_count("tapir.connections.opened") == 2, agent.err[-30:]

    agent, got = run_peer(procs, "methods", "FROB", "GET")
    # FROB (registered nowhere) is not captured; the GET after it is.
    assert sorted((e["kind"], e["url.path"]) for e in got) == [
        ("client", "/get"),
        ("server", "/get"),
    ]
    assert agent.final_count("tapir.connections.other_protocol") == 0, agent.err[-30:]


def test_registered_methods_are_captured_from_the_first_request(procs):
    """Methods of IANA's registry beyond the standard ones (CalDAV's REPORT, QUERY, UPnP's
    SUBSCRIBE) are recognised when they open a connection's traffic."""
    agent, got = run_peer(procs, "methods", "REPORT", "QUERY", "MKCALENDAR", "SUBSCRIBE")
    paths = ["/report", "/query", "/mkcalendar", "/subscribe"]
    for kind in ("server", "client"):
        mine = [e for e in got if e["kind"] == kind]
        assert [e["url.path"] for e in mine] == paths, got
        assert [e["http.request.method"] for e in mine] == ["REPORT", "QUERY", "MKCALENDAR", "SUBSCRIBE"], got
        assert all(e["http.response.status_code"] == 200 for e in mine), got


def test_plain_file_io_is_never_captured(py_server, procs, tmp_path):
    server, port = py_server()
    worker = procs([PY, TESTS / "servers/file_io.py", tmp_path, f"http://127.0.0.1:{port}/real"], stdin=True)
    agent = watch(pids=[worker.pid])
    worker.send_line()
    assert worker.wait_exit() == 0
    got = finish(agent)
    # Only the one real request: none of the HTTP-looking file or pipe traffic.
    assert [(e["kind"], e["url.path"]) for e in got] == [("client", "/real")]


def test_records_lost_to_a_full_ring_never_pair_a_request_with_another_response(procs, tmp_path):
    """A starved agent (here: stopped) loses records when its rings fill. A kept-alive
    connection that lost a response must not pair each later request with the response
    after its own, for the rest of its life: it resumes at its next message. A connection
    opened while the ring is full loses its announcement too, which must be made again
    rather than leave all its data unknown."""
    port = free_port()
    codes = (200, 201, 202, 203, 400, 404, 410, 418, 500, 503)  # http_client.py's
    nginx(procs, tmp_path, port, "".join(f'location /status/{c}/ {{ return {c} "status {c}\\n"; }}\n' for c in codes),
          http_extra="keepalive_requests 1000000;")
    agent = Agent("watch", "--json", "--port", str(port), "--ringbuf-bytes", "65536")
    n, late = 1300, 100_000
    first = procs([PY, CLIENT, "statuses", "127.0.0.1", port, n], stdin=True)
    first.wait_for(lambda l: l.startswith("200 "), stream="out", what="200 requests done")
    os.kill(agent.pid, signal.SIGSTOP)
    try:
        # A 32 KiB ring per CPU holds ~150 records: 1,000 requests overflow it; a second
        # client connects after that.
        first.wait_for(lambda l: l.startswith("1200 "), stream="out", what="1200 requests done")
        second = procs([PY, CLIENT, "statuses", "127.0.0.1", port, 50, late], stdin=True)
        second.wait_for(lambda l: l == "paused", stream="out", what="the second client's requests")
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    first.wait_for(lambda l: l == "paused", stream="out", what="the first requests done")

    def index(e):
        return int(e["url.path"].split("/")[3])

    def seen(lo, hi):
        return {e["kind"] for e in agent.exchanges() if e["url.path"].startswith("/status/") and lo <= index(e) < hi}

    # Both connections are followed again once the agent has caught up: a few more
    # requests at a time on each until both ends of both show (at most 20 rounds).
    for k in range(20):
        for c, start in ((first, n), (second, late + 50)):
            c.send_line("5")
            c.wait_for(lambda l, last=start + 5 * k + 4: l.startswith(f"{last} "), stream="out", what="5 more")
        if seen(n, late) == seen(late + 50, late + 200) == {"server", "client"}:
            break
    for c in (first, second):
        c.send_line("")
        assert c.wait_exit() == 0
    got = finish(agent)
    lost = agent.final_count("tapir.kernel.ringbuf_full")
    assert lost and lost > 0, "the stop did not overflow the ring: the test shows nothing"
    ours = [e for e in got if e["url.path"].startswith("/status/")]
    wrong = [e for e in ours if e["http.response.status_code"] != int(e["url.path"].split("/")[2])]
    assert not wrong, wrong[:5]
    # Capture went on after the loss, on both connections at both ends.
    after = [{e["kind"] for e in ours if lo <= index(e) < hi} for lo, hi in ((n, late), (late + 50, late + 200))]
    assert after == [{"server", "client"}] * 2, (after, agent.err[-14:])
    assert not agent.final_count("tapir.events.unknown_connection"), agent.err[-30:]
