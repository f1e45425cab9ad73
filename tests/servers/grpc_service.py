"""An unmodified gRPC service and client (grpcio, plaintext HTTP/2: h2c) for the tests.

    python3 grpc_service.py serve PORT
        serves helloworld.Greeter: SayHello answers b"hi " + the request, Fail aborts
        with UNAVAILABLE, Slow sleeps 0.2 s first, Big answers 100,000 bytes, Meta
        answers with 3,200 bytes of trailing metadata; no protobuf, raw bytes.
    python3 grpc_service.py call PORT METHOD[:TRACEPARENT] ...
        one unary call per argument, in order, on one channel (one connection); prints
        each call's status name ("OK", "UNAVAILABLE", ...).
"""
import sys
import time
from concurrent import futures

import grpc


def serve(port):
    def say_hello(request, context):
        return b"hi " + request

    def fail(request, context):
        context.abort(grpc.StatusCode.UNAVAILABLE, "backend down")

    def slow(request, context):
        time.sleep(0.2)
        return request

    def big(request, context):
        return b"x" * 100_000

    def meta(request, context):
        # Hex digits: HPACK's Huffman code shrinks them little, so the block stays large.
        context.set_trailing_metadata((("x-detail", "0123456789abcdef" * 200),))
        return request

    handler = grpc.method_handlers_generic_handler(
        "helloworld.Greeter",
        {
            "SayHello": grpc.unary_unary_rpc_method_handler(say_hello),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
            "Big": grpc.unary_unary_rpc_method_handler(big),
            "Meta": grpc.unary_unary_rpc_method_handler(meta),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def call(port, calls):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for spec in calls:
            method, _, traceparent = spec.partition(":")
            metadata = [("traceparent", traceparent)] if traceparent else None
            stub = channel.unary_unary(f"/helloworld.Greeter/{method}")
            try:
                stub(b"tapir", metadata=metadata, timeout=10)
                print("OK", flush=True)
            except grpc.RpcError as e:
                print(e.code().name, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        call(int(sys.argv[2]), sys.argv[3:])
