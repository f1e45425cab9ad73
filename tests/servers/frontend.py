"""An unmodified Python service that calls another HTTP service for every request.

Usage: frontend.py PORT DOWNSTREAM_URL [--threading] [--client urllib|httpclient]
GET /<path> → GET DOWNSTREAM_URL/<path>; answers with the downstream's status and body.
POST bodies are forwarded. Prints "listening" once it accepts connections.
"""
import argparse
import http.client
import http.server
import urllib.error
import urllib.parse
import urllib.request


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    downstream = ""
    client = "urllib"

    def log_message(self, *args):
        pass

    def _forward(self, method):
        body = None
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            body = self.rfile.read(n)
        url = self.downstream + self.path
        if self.client == "httpclient":
            u = urllib.parse.urlsplit(url)
            c = http.client.HTTPConnection(u.hostname, u.port)
            c.request(method, u.path or "/", body=body)
            r = c.getresponse()
            status, data = r.status, r.read()
            c.close()
        else:
            req = urllib.request.Request(url, data=body, method=method)
            try:
                with urllib.request.urlopen(req) as r:
                    status, data = r.status, r.read()
            except urllib.error.HTTPError as e:
                status, data = e.code, e.read()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._forward("GET")

    def do_POST(self):
        self._forward("POST")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("downstream")
    ap.add_argument("--threading", action="store_true")
    ap.add_argument("--client", default="urllib")
    a = ap.parse_args()
    Handler.downstream = a.downstream.rstrip("/")
    Handler.client = a.client
    cls = http.server.ThreadingHTTPServer if a.threading else http.server.HTTPServer
    srv = cls(("127.0.0.1", a.port), Handler)
    print("listening", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
