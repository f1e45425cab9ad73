"""Ground truth: a small HTTP service instrumented BY HAND with the real OpenTelemetry
Python SDK, the way a developer would do it without any auto-instrumentation.

One SERVER span per request, opened when the handler starts (after http.server has parsed
the request line and headers) and ended after the last response byte was written, with the
stable HTTP semantic-convention attributes. Exported over OTLP to the given endpoint with
resource service.name from OTEL_SERVICE_NAME (the SDK's standard variable; the tests set it
to "sdk-truth") and scope name "sdk-truth.manual".

Routes:
  /status/<code>     that status, small body
  /sleep/<ms>        sleeps that long in the handler, then 200
  /users/<id>        200 (route "/users/{id}")
  /anything-else     200 "ok"
Usage: sdk_service.py PORT --otlp-endpoint URL [--protocol grpc|http/protobuf]
                      [--batch-delay-ms MS]
Prints "listening" on stdout once the socket accepts connections. Spans are batched and
exported every --batch-delay-ms (default 200); SIGTERM/SIGINT flush the spans still pending,
then exit 0. A long delay keeps the exporter thread (and its hold on the GIL) out of the
measured requests: the ground-truth test uses that and stops the service to get its spans.
"""
import argparse
import http.server
import signal
import sys
import threading
import time

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

SCOPE = "sdk-truth.manual"


def route_of(path):
    parts = path.strip("/").split("/")
    if parts[0] == "status" and len(parts) == 2:
        return "/status/{code}"
    if parts[0] == "sleep" and len(parts) == 2:
        return "/sleep/{ms}"
    if parts[0] == "users" and len(parts) == 2:
        return "/users/{id}"
    return None


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    tracer = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        route = route_of(path)
        server_host, server_port = self.server.server_address[:2]
        client_host, client_port = self.client_address[:2]
        attrs = {
            "http.request.method": self.command,
            "url.path": path,
            "url.scheme": "http",
            "server.address": server_host,
            "server.port": server_port,
            "client.address": client_host,
            "network.peer.address": client_host,
            "network.peer.port": client_port,
            "network.protocol.version": self.request_version.split("/")[1],
        }
        if self.headers.get("User-Agent"):
            attrs["user_agent.original"] = self.headers["User-Agent"]
        if route:
            attrs["http.route"] = route
        name = f"{self.command} {route}" if route else self.command
        span = self.tracer.start_span(name, kind=SpanKind.SERVER, attributes=attrs)
        try:
            code, body = self.respond(path)
            span.set_attribute("http.response.status_code", code)
            if code >= 500:
                span.set_attribute("error.type", str(code))
                span.set_status(Status(StatusCode.ERROR))
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            if code in (204, 304) or code < 200:
                body = b""  # these statuses have no body (and no Content-Length)
            else:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)
            self.wfile.flush()
        finally:
            span.end()

    def respond(self, path):
        parts = path.strip("/").split("/")
        if parts[0] == "status" and len(parts) == 2:
            code = int(parts[1])
            return code, f"status {code}\n".encode()
        if parts[0] == "sleep" and len(parts) == 2:
            time.sleep(int(parts[1]) / 1000)
            return 200, b"slept\n"
        return 200, b"ok\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--otlp-endpoint", required=True, help="e.g. http://127.0.0.1:4317")
    ap.add_argument("--protocol", default="grpc", choices=["grpc", "http/protobuf"])
    ap.add_argument("--batch-delay-ms", type=int, default=200)
    a = ap.parse_args()

    if a.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=a.otlp_endpoint, insecure=True)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=a.otlp_endpoint.rstrip("/") + "/v1/traces")
    # Resource.create() reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES like any SDK user.
    provider = TracerProvider(resource=Resource.create({}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=a.batch_delay_ms))
    trace.set_tracer_provider(provider)
    Handler.tracer = trace.get_tracer(SCOPE)

    srv = http.server.HTTPServer((a.bind, a.port), Handler)
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
        threading.Thread(target=srv.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("listening", flush=True)
    srv.serve_forever(poll_interval=0.1)
    srv.server_close()
    provider.shutdown()  # flushes every span still queued
    return 0


if __name__ == "__main__":
    sys.exit(main())
