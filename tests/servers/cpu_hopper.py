"""An HTTP/1.1 server whose one thread reads every request on one CPU and writes the
response on another, moving itself in between (sched_setaffinity migrates the caller at
once): each request's record goes into one CPU's event ring and its response's into the
other's, so the agent sees the pair in order only if it merges the rings by time.

Usage: cpu_hopper.py PORT READ_CPU WRITE_CPU. Serves connections one after the other;
every request gets a 200 with a 2-byte body.
"""
import os
import socket
import sys

port, read_cpu, write_cpu = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"

listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", port))
listener.listen(16)
while True:
    conn, _ = listener.accept()
    pending = b""
    while True:
        os.sched_setaffinity(0, {read_cpu})
        chunk = conn.recv(65536)
        if not chunk:
            break
        pending += chunk
        os.sched_setaffinity(0, {write_cpu})
        # Requests without bodies: one response per complete head.
        while b"\r\n\r\n" in pending:
            _, pending = pending.split(b"\r\n\r\n", 1)
            conn.sendall(RESPONSE)
    conn.close()
