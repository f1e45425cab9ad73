"""A server and its client in one process, over one loopback TCP connection.

Usage: raw_peer.py MODE PORT [METHOD...]
  binary   a length-prefixed binary protocol (as databases and caches speak): 20 frames
           each way
  methods  HTTP/1.1 on one kept-alive connection: a request with each METHOD in turn, to
           /<method in lowercase>; the server answers any method with 200 "ok"
Waits for a line on stdin after listening (so that the agent can start first), then runs
the exchange and prints "done".
"""
import socket
import struct
import sys
import threading


def read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("peer closed")
        data += chunk
    return data


def read_head(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data


def serve(listener, mode):
    conn, _ = listener.accept()
    with conn:
        if mode == "binary":
            for _ in range(20):
                (n,) = struct.unpack(">I", read_exact(conn, 4))
                conn.sendall(struct.pack(">I", n) + read_exact(conn, n))
        else:
            while read_head(conn) is not None:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def main():
    mode, port, methods = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    listener = socket.create_server(("127.0.0.1", port))
    server = threading.Thread(target=serve, args=(listener, mode))
    server.start()
    print("listening", flush=True)
    sys.stdin.readline()
    with socket.create_connection(("127.0.0.1", port)) as c:
        if mode == "binary":
            for i in range(20):
                payload = bytes([0, i, 0xFF]) * 4
                c.sendall(struct.pack(">I", len(payload)) + payload)
                (n,) = struct.unpack(">I", read_exact(c, 4))
                assert read_exact(c, n) == payload
        else:
            for method in methods:
                c.sendall(f"{method} /{method.lower()} HTTP/1.1\r\nHost: peer\r\n\r\n".encode())
                response = b""
                while not response.endswith(b"\r\n\r\nok"):
                    chunk = c.recv(4096)
                    if not chunk:
                        raise EOFError("server closed")
                    response += chunk
    server.join()
    print("done", flush=True)


if __name__ == "__main__":
    main()
