"""A thread-per-request HTTP service that keeps its state in Redis (redis-py), unmodified
by Tapir: its Redis commands should become CLIENT spans under the request being served.

Routes:
  /visit/<name>   INCR visits:<name> (INCRBY on the wire), then GET it: 200, the count
  /fail           LPUSH on a string key: Redis answers WRONGTYPE, the service 500
  /batch          a transaction in one write (MULTI, INCRBY, EXPIRE, EXEC) on a pooled
                  connection
Usage: redis_app.py PORT REDIS_PORT
Connects both its connections (each says who it is: redis-py's CLIENT SETINFO, then PING)
before it listens.
"""
import http.server
import sys

import redis


def main():
    port, redis_port = int(sys.argv[1]), int(sys.argv[2])
    db = redis.Redis(host="127.0.0.1", port=redis_port, single_connection_client=True)
    db.ping()
    db.set("a-string", "x")
    pool = redis.Redis(host="127.0.0.1", port=redis_port)
    pool.ping()  # its one connection, idle in the pool for /batch

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            code, body = 200, b""
            if self.path.startswith("/visit/"):
                key = "visits:" + self.path.rsplit("/", 1)[1]
                db.incr(key)
                body = db.get(key)
            elif self.path == "/batch":
                with pool.pipeline(transaction=True) as pipe:
                    pipe.incr("batches")
                    pipe.expire("batches", 60)
                    body = str(pipe.execute()[0]).encode()
            elif self.path == "/fail":
                try:
                    db.lpush("a-string", "y")
                except redis.ResponseError as e:
                    code, body = 500, str(e).encode()
            else:
                code = 404
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    # One thread at a time: the client connection is shared.
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
