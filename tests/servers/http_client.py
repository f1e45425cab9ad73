"""An unmodified Python HTTP client (urllib / http.client) used as an observed client.

Usage:
  http_client.py urllib URL...            one urllib request per URL (new connection each)
  http_client.py keepalive HOST PORT N    N GETs /ka/<i> on one http.client connection
  http_client.py pipeline HOST PORT P...  all request lines written in one send(), then read
  http_client.py preopened HOST PORT      GET /before, print "first-done", wait for a line on
                                          stdin, then GET /after on the same connection
Prints one "status" per response.
"""
import http.client
import socket
import sys
import urllib.request


def main():
    mode = sys.argv[1]
    if mode == "urllib":
        for url in sys.argv[2:]:
            try:
                with urllib.request.urlopen(url) as r:
                    r.read()
                    print(r.status, flush=True)
            except urllib.error.HTTPError as e:
                e.read()
                print(e.code, flush=True)
    elif mode == "keepalive":
        host, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        c = http.client.HTTPConnection(host, port)
        for i in range(n):
            c.request("GET", f"/ka/{i}")
            r = c.getresponse()
            r.read()
            print(r.status, flush=True)
        c.close()
    elif mode == "pipeline":
        host, port, paths = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
        s = socket.create_connection((host, port))
        reqs = b"".join(f"GET {p} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() for p in paths)
        s.sendall(reqs)
        f = s.makefile("rb")
        for _ in paths:
            status = int(f.readline().split()[1])
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            f.read(length)
            print(status, flush=True)
        s.close()
    elif mode == "preopened":
        host, port = sys.argv[2], int(sys.argv[3])
        c = http.client.HTTPConnection(host, port)
        c.request("GET", "/before")
        r = c.getresponse()
        r.read()
        print("first-done", flush=True)
        sys.stdin.readline()
        c.request("GET", "/after")
        r = c.getresponse()
        r.read()
        print(r.status, flush=True)
        c.close()


if __name__ == "__main__":
    main()
