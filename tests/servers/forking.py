"""A server whose requests are answered by a process forked on demand (like nginx or
gunicorn workers), to check that Tapir follows fork().

Usage: forking.py PORT
Binds 127.0.0.1:PORT and prints "listening"; on each line read from stdin forks one
worker that answers every request on the shared socket, printing "worker <pid>".
"""
import http.server
import os
import signal
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = f"worker {os.getpid()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main():
    server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    workers = []

    def stop(*_):
        for w in workers:
            os.kill(w, signal.SIGKILL)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("listening", flush=True)
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            server.serve_forever()
            os._exit(0)
        workers.append(pid)
        print(f"worker {pid}", flush=True)
    stop()


if __name__ == "__main__":
    main()
