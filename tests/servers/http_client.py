"""An unmodified Python HTTP client (urllib / http.client) used as an observed client.

Usage:
  http_client.py urllib URL...            one urllib request per URL (new connection each)
  http_client.py keepalive HOST PORT N    N GETs /ka/<i> on one http.client connection
  http_client.py statuses HOST PORT N [F] N GETs /status/<code>/<i> on one connection, i from
                                          F (0), the codes cycling through 200..503; prints
                                          "<i> <status>", then "paused"; then, per line K read
                                          on stdin, K more on the same connection (an empty
                                          line ends)
  http_client.py pipeline HOST PORT P...  all request lines written in one send(), then read
  http_client.py preopened HOST PORT      GET /before, print "first-done", wait for a line on
                                          stdin, then GET /after on the same connection
  http_client.py vectored HOST PORT N     N GETs /v/<i> on one connection, each request
                                          written in 5 pieces by one sendmsg (even i) or
                                          writev (odd i), the response read by recvmsg_into
                                          (even) or readv (odd) into a 7-byte and a larger
                                          buffer
  http_client.py asyncio-tls HOST PORT N  N GETs /tls/<i> on one HTTPS connection opened by
                                          asyncio (its TLS is OpenSSL through a memory BIO,
                                          as aiohttp's); any certificate is accepted
Prints one "status" per response.
"""
import asyncio
import http.client
import os
import socket
import ssl
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
    elif mode == "statuses":
        host, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        codes = [200, 201, 202, 203, 400, 404, 410, 418, 500, 503]
        c = http.client.HTTPConnection(host, port)
        i = int(sys.argv[5]) if len(sys.argv) > 5 else 0

        def send(k):
            nonlocal i
            for _ in range(k):
                c.request("GET", f"/status/{codes[i % len(codes)]}/{i}")
                r = c.getresponse()
                r.read()
                print(i, r.status, flush=True)
                i += 1

        send(n)
        print("paused", flush=True)
        for line in sys.stdin:
            if not line.strip():
                break
            send(int(line))
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
    elif mode == "vectored":
        host, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        s = socket.create_connection((host, port))
        for i in range(n):
            head = f"GET /v/{i} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode()
            cuts = [0, 5, 11, 20, 33, len(head)]
            pieces = [head[a:b] for a, b in zip(cuts, cuts[1:])]
            sent = s.sendmsg(pieces) if i % 2 == 0 else os.writev(s.fileno(), pieces)
            assert sent == len(head), sent
            data = b""
            while True:
                bufs = [bytearray(7), bytearray(4096)]
                if i % 2 == 0:
                    got = s.recvmsg_into(bufs)[0]
                else:
                    got = os.readv(s.fileno(), bufs)
                assert got > 0, "connection closed early"
                data += bytes(bufs[0] + bufs[1])[:got]
                head_end = data.find(b"\r\n\r\n")
                if head_end < 0:
                    continue
                length = 0
                for line in data[:head_end].split(b"\r\n")[1:]:
                    name, _, value = line.decode().partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if len(data) >= head_end + 4 + length:
                    break
            print(int(data.split()[1]), flush=True)
        s.close()
    elif mode == "asyncio-tls":
        asyncio.run(asyncio_tls(sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))


async def asyncio_tls(host, port, n):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx)
    for i in range(n):
        writer.write(f"GET /tls/{i} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        print(status, flush=True)
    writer.close()
    await writer.wait_closed()


if __name__ == "__main__":
    main()
