"""An unmodified asyncio HTTP/1.1 server over TLS, as uvicorn and aiohttp serve HTTPS:
asyncio's SSL transport reads the socket itself and decrypts through a memory BIO, so
OpenSSL never touches the socket.

Routes: /status/<code> (a short body with that status), /bytes/<n> (n bytes), else 200
"ok\n" (as node_server.js). Keep-alive; requests without bodies only.
Usage: asyncio_server.py PORT --tls PEM. Prints "listening" once the socket accepts.
"""
import argparse
import asyncio
import ssl


def response(path):
    parts = [p for p in path.split("?")[0].split("/") if p]
    code, body = 200, b"ok\n"
    if len(parts) == 2 and parts[0] == "status" and parts[1].isdigit():
        code, body = int(parts[1]), b"status %s\n" % parts[1].encode()
    elif len(parts) == 2 and parts[0] == "bytes" and parts[1].isdigit():
        body = b"x" * int(parts[1])
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (code, len(body)) + body


async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode("latin-1")
            writer.write(response(path))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, IndexError):
        pass
    finally:
        writer.close()


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--tls", metavar="PEM", required=True)
    args = ap.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.tls)
    server = await asyncio.start_server(serve, "127.0.0.1", args.port, ssl=ctx)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
