"""Issue: propagation, on the wire. `tapir run`/`watch --inject` insert `traceparent`
into outgoing HTTP/1.x requests of unmodified programs, so the downstream service's
SERVER span joins the trace. The request otherwise arrives byte-identical."""
import hashlib
import json
import sys
import textwrap

from conftest import TESTS, Agent, curl, free_port
from test_propagation import PARENT, TRACE, finish, of

PY = sys.executable


def watch_inject(*ports):
    args = ["watch", "--json", "--inject"]
    for p in ports:
        args += ["--port", str(p)]
    return Agent(*args)


def frontend(procs, downstream, *extra):
    port = free_port()
    p = procs([PY, TESTS / "servers/frontend.py", port, downstream, *extra], ready_port=port)
    return p, port


def warm(port):
    """A first request teaches the kernel that `port` serves HTTP: connections made to it
    from then on are injected (the very first one is not)."""
    curl("-o", "/dev/null", f"http://127.0.0.1:{port}/warm-up")


def test_two_services_twenty_requests_twenty_joined_traces(py_server, procs):
    backend, bport = py_server()
    front, fport = frontend(procs, f"http://127.0.0.1:{bport}", "--threading")
    agent = watch_inject(fport, bport)
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
    agent = watch_inject(fport, mport, bport)
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
    agent = watch_inject(fport, bport)
    warm(bport)
    echoed = curl(f"http://127.0.0.1:{fport}/x").stdout
    tps = [l.split(":", 1)[1].strip() for l in echoed.splitlines() if l.lower().startswith("traceparent:")]
    assert len(tps) == 1, echoed
    got = finish(agent)
    cli, = [e for e in of(got, "client", bport) if e["process.pid"] == front.pid]
    assert tps[0] == f"00-{cli['trace_id']}-{cli['span_id']}-01"


def test_request_bodies_arrive_intact(py_server, procs, tmp_path):
    backend, bport = py_server()
    front, fport = frontend(procs, f"http://127.0.0.1:{bport}")
    agent = watch_inject(fport, bport)
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
    conf = tmp_path / "nginx.conf"
    conf.write_text(textwrap.dedent(f"""
        user root;
        worker_processes 1;
        pid {tmp_path}/nginx.pid;
        error_log {tmp_path}/error.log;
        events {{ worker_connections 64; }}
        http {{
            access_log off;
            client_body_temp_path {tmp_path}/body;
            proxy_temp_path {tmp_path}/proxy;
            fastcgi_temp_path {tmp_path}/fcgi;
            uwsgi_temp_path {tmp_path}/uwsgi;
            scgi_temp_path {tmp_path}/scgi;
            server {{
                listen 127.0.0.1:{nport};
                location / {{ proxy_pass http://127.0.0.1:{bport}; proxy_read_timeout 20s; }}
            }}
        }}
    """))
    procs(["nginx", "-c", conf, "-g", "daemon off;"], ready_port=nport)
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
    injected = [l for l in agent.err if "tapir.inject.injected" in l]
    assert injected and int(injected[-1].rsplit("value=", 1)[1].split()[0]) >= 50, agent.err[-30:]
