"""A real OTLP receiver for the end-to-end tests: OTLP/gRPC and OTLP/HTTP (protobuf or JSON).

Built on the official `opentelemetry-proto` messages and `grpcio`, so whatever it accepts a
real collector accepts too. Everything received is kept (thread-safe) and offered flat:

    r = OtlpReceiver(grpc_port=0, http_port=0)   # 0: pick free ports; None: don't serve it
    r.start()                                    # can be called later than construction
    r.grpc_endpoint, r.http_endpoint             # "http://127.0.0.1:PORT"
    r.wait_spans(lambda s: s["kind"] == "SERVER", n=3, timeout=30)
    r.spans(), r.metrics(), r.requests, r.clear(), r.stop()

Standalone: `python3 otlp_receiver.py --grpc-port N --http-port M [--print]` prints
`listening` on stdout once both ports accept connections (and, with --print, one JSON line
per span and metric point received).
"""
import argparse
import base64
import gzip
import http.server
import json
import signal
import ssl
import socket
import sys
import threading
import time
import zlib
from concurrent import futures

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

SPAN_KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
STATUS_CODES = {
    trace_pb2.Status.STATUS_CODE_UNSET: "UNSET",
    trace_pb2.Status.STATUS_CODE_OK: "OK",
    trace_pb2.Status.STATUS_CODE_ERROR: "ERROR",
}
TEMPORALITIES = {
    metrics_pb2.AGGREGATION_TEMPORALITY_UNSPECIFIED: "UNSPECIFIED",
    metrics_pb2.AGGREGATION_TEMPORALITY_DELTA: "DELTA",
    metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE: "CUMULATIVE",
}

# (request message, response message) per OTLP/HTTP path
HTTP_SIGNALS = {
    "/v1/traces": ("traces", trace_service_pb2.ExportTraceServiceRequest, trace_service_pb2.ExportTraceServiceResponse),
    "/v1/metrics": (
        "metrics",
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
    ),
    "/v1/logs": ("logs", logs_service_pb2.ExportLogsServiceRequest, logs_service_pb2.ExportLogsServiceResponse),
}


# ---------------------------------------------------------------------------------------------
# Flattening of OTLP messages into plain dicts


def any_value(v):
    """An AnyValue as the Python value it holds (arrays as lists, kvlists as dicts)."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, which)


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def flatten_traces(req, protocol):
    out = []
    for rs in req.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                out.append(
                    {
                        "name": s.name,
                        "kind": SPAN_KINDS.get(s.kind, str(s.kind)),
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "start_time_unix_nano": s.start_time_unix_nano,
                        "end_time_unix_nano": s.end_time_unix_nano,
                        "status_code": STATUS_CODES.get(s.status.code, str(s.status.code)),
                        "status_message": s.status.message,
                        "attributes": attributes(s.attributes),
                        "events": [{"name": e.name, "attributes": attributes(e.attributes)} for e in s.events],
                        "links": len(s.links),
                        "flags": s.flags,
                        "trace_state": s.trace_state,
                        "resource": resource,
                        "resource_schema_url": rs.schema_url,
                        "scope": ss.scope.name,
                        "scope_version": ss.scope.version,
                        "scope_schema_url": ss.schema_url,
                        "protocol": protocol,
                    }
                )
    return out


def _number(p):
    which = p.WhichOneof("value")
    return getattr(p, which) if which else None


def flatten_metrics(req, protocol):
    out = []
    for rm in req.resource_metrics:
        resource = attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                kind = m.WhichOneof("data")
                base = {
                    "name": m.name,
                    "unit": m.unit,
                    "description": m.description,
                    "type": kind,
                    "resource": resource,
                    "scope": sm.scope.name,
                    "protocol": protocol,
                }
                data = getattr(m, kind) if kind else None
                temporality = TEMPORALITIES.get(getattr(data, "aggregation_temporality", 0), "UNSPECIFIED")
                for p in data.data_points if data is not None else ():
                    d = dict(
                        base,
                        attributes=attributes(p.attributes),
                        start_time_unix_nano=p.start_time_unix_nano,
                        time_unix_nano=p.time_unix_nano,
                        temporality=temporality,
                    )
                    if kind in ("gauge", "sum"):
                        d["value"] = _number(p)
                        if kind == "sum":
                            d["is_monotonic"] = data.is_monotonic
                    elif kind == "histogram":
                        d.update(
                            count=p.count,
                            sum=p.sum if p.HasField("sum") else None,
                            min=p.min if p.HasField("min") else None,
                            max=p.max if p.HasField("max") else None,
                            bucket_counts=list(p.bucket_counts),
                            explicit_bounds=list(p.explicit_bounds),
                        )
                    elif kind == "exponential_histogram":
                        d.update(count=p.count, sum=p.sum if p.HasField("sum") else None, scale=p.scale)
                    elif kind == "summary":
                        d.update(count=p.count, sum=p.sum)
                    out.append(d)
    return out


def count_log_records(req):
    return sum(len(sl.log_records) for rl in req.resource_logs for sl in rl.scope_logs)


# OTLP/JSON differs from proto3 JSON in one way that matters here: trace and span ids are
# hex strings, not base64.
_ID_KEYS = {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}


def _hex_ids_to_base64(obj):
    if isinstance(obj, dict):
        return {
            k: (base64.b64encode(bytes.fromhex(v)).decode() if k in _ID_KEYS and isinstance(v, str) else _hex_ids_to_base64(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_hex_ids_to_base64(x) for x in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# The receiver


class OtlpReceiver:
    def __init__(self, grpc_port=0, http_port=0, host="127.0.0.1", on_data=None, tls=None):
        """grpc_port/http_port: a port, 0 for a free one chosen at start(), None to not serve.
        tls: (cert_pem_path, key_pem_path) to serve both protocols over TLS only."""
        self.host = host
        self.tls = tls
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.on_data = on_data  # optional callback(kind, list_of_flat_dicts), for --print
        self._cv = threading.Condition()
        self._spans = []
        self._metrics = []
        self._logs = 0
        self.requests = {"grpc": 0, "http": 0}
        self.requests_by_signal = {}
        self.http_headers = []  # headers of every OTLP/HTTP request, lower-cased names
        self.grpc_metadata = []  # metadata of every OTLP/gRPC call
        self.errors = []  # undecodable payloads etc.: tests can assert this stays empty
        self._grpc_server = None
        self._http_server = None
        self._http_thread = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self):
        if self.grpc_port is not None:
            self._start_grpc()
        if self.http_port is not None:
            self._start_http()
        return self

    def stop(self):
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=None).wait(10)
            self._grpc_server = None
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_thread.join(10)
            self._http_server = None
        with self._cv:
            self._cv.notify_all()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def scheme(self):
        return "https" if self.tls else "http"

    @property
    def grpc_endpoint(self):
        return f"{self.scheme}://{self.host}:{self.grpc_port}"

    @property
    def http_endpoint(self):
        return f"{self.scheme}://{self.host}:{self.http_port}"

    def endpoint(self, protocol):
        """The endpoint for an OTLP protocol name: "grpc" or "http/protobuf" (or "http/json")."""
        return self.grpc_endpoint if protocol == "grpc" else self.http_endpoint

    def _start_grpc(self):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_MetricsService(self), server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_LogsService(self), server)
        addr = f"{self.host}:{self.grpc_port}"
        if self.tls:
            cert, key = (open(f, "rb").read() for f in self.tls)
            port = server.add_secure_port(addr, grpc.ssl_server_credentials([(key, cert)]))
        else:
            port = server.add_insecure_port(addr)
        if port == 0:
            raise OSError(f"cannot bind OTLP/gRPC on {self.host}:{self.grpc_port}")
        self.grpc_port = port
        server.start()
        self._grpc_server = server

    def _start_http(self):
        receiver = self

        class Handler(_HttpHandler):
            pass

        Handler.receiver = receiver
        cls = http.server.ThreadingHTTPServer
        if ":" in self.host:
            cls = type("V6Server", (http.server.ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        srv = cls((self.host, self.http_port), Handler)
        srv.daemon_threads = True
        if self.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        self.http_port = srv.server_address[1]
        self._http_server = srv
        self._http_thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._http_thread.start()

    # -- storing -----------------------------------------------------------------------------

    def _record(self, protocol, signal, req):
        if signal == "traces":
            items = flatten_traces(req, protocol)
        elif signal == "metrics":
            items = flatten_metrics(req, protocol)
        else:
            items = None
        with self._cv:
            self.requests[protocol] += 1
            key = (protocol, signal)
            self.requests_by_signal[key] = self.requests_by_signal.get(key, 0) + 1
            if signal == "traces":
                self._spans.extend(items)
            elif signal == "metrics":
                self._metrics.extend(items)
            else:
                self._logs += count_log_records(req)
            self._cv.notify_all()
        if self.on_data and items:
            self.on_data(signal, items)

    def _grpc_call(self, context):
        with self._cv:
            self.grpc_metadata.append({k.lower(): v for k, v in context.invocation_metadata()})

    def _error(self, msg):
        with self._cv:
            self.errors.append(msg)
            self._cv.notify_all()

    # -- reading -----------------------------------------------------------------------------

    def spans(self, pred=None):
        with self._cv:
            return [s for s in self._spans if pred is None or pred(s)]

    def metrics(self, pred=None):
        """Every data point received, flattened (cumulative points repeat at every export)."""
        with self._cv:
            return [m for m in self._metrics if pred is None or pred(m)]

    def log_records(self):
        with self._cv:
            return self._logs

    def clear(self):
        with self._cv:
            self._spans.clear()
            self._metrics.clear()
            self._logs = 0
            self.requests = {"grpc": 0, "http": 0}
            self.requests_by_signal.clear()
            self.http_headers.clear()
            self.grpc_metadata.clear()
            self.errors.clear()

    def wait_until(self, check, timeout=30.0, what="data"):
        """Block (on the condition variable, woken by every export) until check(self) is
        truthy; return its value. On timeout raise AssertionError describing what arrived."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                got = check(self)
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    what = what() if callable(what) else what
                    raise AssertionError(f"no {what} within {timeout}s; received so far: {self.summary()}")
                self._cv.wait(left)

    def wait_spans(self, pred=None, n=1, timeout=30.0):
        """Block until at least n spans matching pred arrived; return all matching spans."""

        def check(r):
            got = r.spans(pred)
            return got if len(got) >= n else None

        return self.wait_until(check, timeout, what=f"{n} matching span(s)")

    def wait_metrics(self, pred=None, timeout=30.0, what="matching metric points"):
        """Block until at least one metric point matches pred; return all matching points."""
        return self.wait_until(lambda r: r.metrics(pred), timeout, what=what)

    def summary(self):
        with self._cv:
            names = {}
            for s in self._spans:
                k = (s["kind"], s["name"], s["resource"].get("service.name"))
                names[k] = names.get(k, 0) + 1
            mnames = sorted({m["name"] for m in self._metrics})
            return (
                f"requests={self.requests} spans={len(self._spans)} {names} "
                f"metric points={len(self._metrics)} {mnames} logs={self._logs} errors={self.errors}"
            )

    # -- metric helpers ----------------------------------------------------------------------

    def latest_points(self, name, pred=None):
        """The current value of every stream of metric `name`: for cumulative streams the
        newest point per (resource, scope, attributes); delta points are summed up
        (count, sum, bucket_counts, value) per stream."""
        streams = {}
        for p in self.metrics(lambda m: m["name"] == name and (pred is None or pred(m))):
            key = (_freeze(p["resource"]), p["scope"], _freeze(p["attributes"]))
            prev = streams.get(key)
            if prev is None:
                streams[key] = dict(p)
            elif p["temporality"] == "DELTA":
                acc = prev
                for f in ("count", "sum", "value"):
                    if acc.get(f) is not None and p.get(f) is not None:
                        acc[f] += p[f]
                if "bucket_counts" in p:
                    acc["bucket_counts"] = [a + b for a, b in zip(acc["bucket_counts"], p["bucket_counts"])]
                acc["time_unix_nano"] = max(acc["time_unix_nano"], p["time_unix_nano"])
            elif p["time_unix_nano"] >= prev["time_unix_nano"]:
                streams[key] = dict(p)
        return list(streams.values())


def _freeze(d):
    return tuple(sorted((k, json.dumps(v, sort_keys=True, default=repr)) for k, v in d.items()))


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, r):
        self.r = r

    def Export(self, request, context):
        self.r._grpc_call(context)
        self.r._record("grpc", "traces", request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, r):
        self.r = r

    def Export(self, request, context):
        self.r._grpc_call(context)
        self.r._record("grpc", "metrics", request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class _LogsService(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, r):
        self.r = r

    def Export(self, request, context):
        self.r._grpc_call(context)
        self.r._record("grpc", "logs", request)
        return logs_service_pb2.ExportLogsServiceResponse()


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    receiver = None  # set per server

    def log_message(self, *args):
        pass

    def _reply(self, code, body, ctype):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_POST(self):
        r = self.receiver
        body = self._read_body()
        path = self.path.split("?")[0]
        with r._cv:
            r.http_headers.append({k.lower(): v for k, v in self.headers.items()})
        if path not in HTTP_SIGNALS:
            return self._reply(404, b"unknown OTLP path\n", "text/plain")
        signal, req_cls, resp_cls = HTTP_SIGNALS[path]
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding not in ("identity", ""):
                raise ValueError(f"unsupported Content-Encoding {encoding}")
        except Exception as e:  # noqa: BLE001 - any bad payload is a 400
            r._error(f"http {path}: {e}")
            return self._reply(400, f"bad body: {e}\n".encode(), "text/plain")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        is_json = ctype == "application/json"
        if ctype not in ("application/x-protobuf", "application/json"):
            r._error(f"http {path}: unsupported Content-Type {ctype!r}")
            return self._reply(415, b"unsupported content type\n", "text/plain")
        req = req_cls()
        try:
            if is_json:
                json_format.ParseDict(_hex_ids_to_base64(json.loads(body)), req, ignore_unknown_fields=True)
            else:
                req.ParseFromString(body)
        except (DecodeError, json_format.ParseError, ValueError) as e:
            r._error(f"http {path}: undecodable {ctype}: {e}")
            return self._reply(400, f"undecodable: {e}\n".encode(), "text/plain")
        r._record("http", signal, req)
        if is_json:
            return self._reply(200, b"{}", "application/json")
        return self._reply(200, resp_cls().SerializeToString(), "application/x-protobuf")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grpc-port", type=int, default=4317)
    ap.add_argument("--http-port", type=int, default=4318)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--print", action="store_true", help="print every span and metric point as a JSON line")
    a = ap.parse_args()
    lock = threading.Lock()

    def show(kind, items):
        with lock:
            for it in items:
                print(json.dumps({"signal": kind, **it}, default=str), flush=True)

    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # explicit: a background job may inherit SIG_IGN
        signal.signal(sig, lambda *_: done.set())
    r = OtlpReceiver(a.grpc_port, a.http_port, a.host, on_data=show if a.print else None).start()
    print("listening", flush=True)
    try:
        while not done.wait(1.0):
            pass
    finally:
        r.stop()


if __name__ == "__main__":
    sys.exit(main())
