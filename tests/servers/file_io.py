"""Plain file I/O that happens to contain HTTP-looking bytes; must never be captured.
Then one real HTTP request, so a test can tell "filtered" from "captured nothing".
Usage: file_io.py DIR URL. Waits for a line on stdin before starting."""
import os
import sys
import urllib.request

sys.stdin.readline()
path = os.path.join(sys.argv[1], "fake-http.txt")
req = b"GET /from-a-file HTTP/1.1\r\nHost: x\r\n\r\n"
resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
for _ in range(20):
    with open(path, "wb") as f:
        f.write(req)
        f.write(resp)
    with open(path, "rb") as f:
        f.read()
r, w = os.pipe()
os.write(w, req)
os.read(r, 4096)
with urllib.request.urlopen(sys.argv[2]) as r:
    r.read()
print("done", flush=True)
