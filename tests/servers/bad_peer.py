"""Bad input on loopback HTTP/1.1 connections: a server process and its clients.

Usage: bad_peer.py MODE PORT [ARGS...]
  garbage SEED N   N connections, each sending one kind of bytes that start like a request
                   but that no strict parser accepts (GARBAGE, in turn, seeded); prints
                   `KIND STATUS` for each
  bighead SIZE     one kept-alive connection: a request with a header of SIZE bytes (the
                   server answers with a digest of the head it got: printed `… intact`
                   when it is the one sent, apart from an added traceparent line), a small
                   request, one whose response has a header of SIZE bytes, a small one
  dies ROLE        after a whole exchange on a connection, ROLE dies (SIGKILL) in the
                   middle of the next: `client` (half a request head written), `server`
                   (request read, not answered) or `server_mid_body` (response cut short)
Then, except after `dies`, one plain request (/after) on a connection of its own.
The server answers a head it can parse with 200 and the path as body (keep-alive),
anything else with 400, closing. Waits for a line on stdin once listening (so that the
agent can start first); prints one line per exchange and "done".
"""
import hashlib
import os
import random
import signal
import socket
import sys
import threading

BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def ok(path, extra=b""):
    body = path.encode()
    return b"HTTP/1.1 200 OK\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


def read_head(sock, buf, limit=4 << 20):
    """(head, rest) once buf holds a whole head; (None, buf) at EOF or past limit."""
    while b"\r\n\r\n" not in buf:
        if len(buf) > limit:
            return None, buf
        chunk = sock.recv(65536)
        if not chunk:
            return None, buf
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head, rest


def parse_path(head):
    """The path of a plain `GET /x HTTP/1.1` head with well-formed fields, else None."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or not parts[1].startswith(b"/") or parts[2] != b"HTTP/1.1":
        return None
    for line in lines[1:]:
        name, sep, _ = line.partition(b":")
        if not sep or not name or not all(c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-" for c in name):
            return None
    try:
        return parts[1].decode("ascii")
    except UnicodeDecodeError:
        return None


def serve_conn(conn, arg):
    buf = b""
    with conn:
        while True:
            head, buf = read_head(conn, buf)
            if head is None:
                return
            path = parse_path(head)
            if path is None:
                conn.sendall(BAD)
                return
            if path == "/die":
                os.kill(os.getpid(), signal.SIGKILL)
            if path == "/bigrequest":
                # What arrived, apart from a traceparent line the agent may have added.
                lines = head.split(b"\r\n")
                others = [line for line in lines if not line.lower().startswith(b"traceparent:")]
                digest = hashlib.sha256(b"\r\n".join(others)).hexdigest()[:16]
                conn.sendall(ok(f"{path} {digest} traceparents={len(lines) - len(others)}"))
            elif path == "/bigresponse":
                conn.sendall(ok(path, b"X-Big: " + b"b" * int(arg) + b"\r\n"))
            elif path == "/halfbody":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                conn.sendall(ok(path))


def serve(listener, arg):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_conn, args=(conn, arg), daemon=True).start()


def exchange(c, request, buf=b""):
    """Sends a request and reads one response (head and Content-Length body)."""
    c.sendall(request)
    head, buf = read_head(c, buf)
    if head is None:
        return "closed", buf
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buf) < length:
        chunk = c.recv(65536)
        if not chunk:
            return "closed", buf
        buf += chunk
    status = head.split(b" ")[1].decode()
    return status + " " + buf[:length].decode(errors="replace"), buf[length:]


def get(path, host=b"peer"):
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"


# Each kind starts like a request (a method: the kernel hands it to the agent) and ends a
# head; the random parts never hold a line end.
def _text(r, alphabet, lo, hi):
    return bytes(r.choice(alphabet) for _ in range(r.randint(lo, hi)))


GARBAGE = {
    "nul_in_field": lambda r: b"GET /g HTTP/1.1\r\nHost: peer\r\nX-\x00" + _text(r, range(0x20, 0x7F), 1, 64) + b": v\r\n\r\n",
    "field_without_colon": lambda r: b"GET /g HTTP/1.1\r\nno colon " + _text(r, b"abcdef ", 1, 200) + b"\r\n\r\n",
    "bad_version": lambda r: b"GET /g HTTP/" + _text(r, b"0123456789.x", 4, 9) + b"x\r\nHost: peer\r\n\r\n",
    "binary_after_method": lambda r: b"POST " + _text(r, range(0x80, 0x100), 1, 4000) + b"\r\n\r\n",
}


def main():
    mode, port, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    arg = args[0] if args else "0"
    listener = socket.create_server(("127.0.0.1", port))
    # The server is a process of its own, so that either side can die alone.
    server = os.fork()
    if server == 0:
        serve(listener, arg)
    listener.close()
    print("listening", flush=True)
    sys.stdin.readline()
    addr = ("127.0.0.1", port)
    if mode == "garbage":
        r = random.Random(int(args[0]))
        kinds = sorted(GARBAGE)
        for i in range(int(args[1])):
            kind = kinds[i % len(kinds)]
            with socket.create_connection(addr) as c:
                status, _ = exchange(c, GARBAGE[kind](r))
                print(kind, status, flush=True)
    elif mode == "bighead":
        big_head = b"GET /bigrequest HTTP/1.1\r\nHost: peer\r\nX-Big: " + b"a" * int(arg)
        sent = hashlib.sha256(big_head).hexdigest()[:16]
        with socket.create_connection(addr) as c:
            status, buf = exchange(c, big_head + b"\r\n\r\n")
            print(status.replace(sent, "intact"), flush=True)
            for path in ("/small1", "/bigresponse", "/small2"):
                status, buf = exchange(c, get(path), buf)
                print(status, flush=True)
    elif mode == "dies":
        with socket.create_connection(addr) as c:
            status, buf = exchange(c, get("/before"))
            print(status, flush=True)
            if arg == "client":
                # A child that shares the socket writes half a head and dies.
                client = os.fork()
                if client == 0:
                    c.sendall(b"GET /half HTTP/1.1\r\nHo")
                    os.kill(os.getpid(), signal.SIGKILL)
                os.waitpid(client, 0)
            else:
                status, _ = exchange(c, get("/die" if arg == "server" else "/halfbody"), buf)
                print(status, flush=True)
    if mode != "dies":
        with socket.create_connection(addr) as c:
            status, _ = exchange(c, get("/after"))
            print(status, flush=True)
    os.kill(server, signal.SIGKILL)
    os.waitpid(server, 0)
    print("done", flush=True)


if __name__ == "__main__":
    main()
