"""A small, unmodified-by-Tapir Python HTTP server used as an observed service.

Routes:
  /status/<code>          empty-ish body with that status
  /bytes/<n>              n bytes of body (Content-Length)
  /chunked/<n>/<pieces>   n bytes in <pieces> chunks, flushed separately (slow when --chunk-delay)
  /echo-headers           body = the request headers it received (for injection tests)
  /anything-else          200 "ok"
Usage: pyserver.py PORT [--bind ADDR] [--http10] [--threading] [--chunk-delay SECONDS]
                   [--tls PEM]   (HTTPS with the key and certificate in PEM)
Prints "listening" on stdout once the socket accepts connections.
"""
import argparse
import http.server
import socket
import ssl
import sys
import time


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    chunk_delay = 0.0

    def log_message(self, *args):  # keep test output quiet
        pass

    def _body(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drain_request_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self):
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[0] == "status" and len(parts) > 1:
            code = int(parts[1])
            return self._body(code, f"status {code}\n".encode())
        if parts[0] == "bytes" and len(parts) > 1:
            return self._body(200, b"x" * int(parts[1]), "application/octet-stream")
        if parts[0] == "chunked" and len(parts) > 2:
            total, pieces = int(parts[1]), int(parts[2])
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            size = max(1, total // pieces)
            sent = 0
            while sent < total:
                n = min(size, total - sent)
                self.wfile.write(b"%x\r\n" % n + b"y" * n + b"\r\n")
                self.wfile.flush()
                sent += n
                if self.chunk_delay:
                    time.sleep(self.chunk_delay)
            self.wfile.write(b"0\r\n\r\n")
            return
        if parts[0] == "echo-headers":
            return self._body(200, str(self.headers).encode())
        return self._body(200, b"ok\n")

    do_HEAD = do_GET
    do_DELETE = do_GET

    def do_POST(self):
        body = self._drain_request_body()
        import hashlib

        return self._body(201, hashlib.sha256(body).hexdigest().encode())

    do_PUT = do_POST


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--http10", action="store_true")
    ap.add_argument("--threading", action="store_true")
    ap.add_argument("--chunk-delay", type=float, default=0.0)
    ap.add_argument("--tls", metavar="PEM")
    a = ap.parse_args()
    if a.http10:
        Handler.protocol_version = "HTTP/1.0"
    Handler.chunk_delay = a.chunk_delay
    cls = http.server.ThreadingHTTPServer if a.threading else http.server.HTTPServer
    if ":" in a.bind:
        cls.address_family = socket.AF_INET6
    srv = cls((a.bind, a.port), Handler)
    if a.tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(a.tls)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    print("listening", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
