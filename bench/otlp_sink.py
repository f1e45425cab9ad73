"""A counting OTLP receiver for `cargo xtask bench`.

It is tests/otlp_receiver.py — real gRPC and OTLP/HTTP servers decoding the official
protobuf messages — except that received data is only counted, not flattened and kept:
at benchmark rates the test receiver would store millions of spans and compete for the
CPU it is meant to leave to the measured processes.

    python otlp_sink.py --grpc-port N --http-port M

prints `listening GRPC_PORT HTTP_PORT` once serving; then each line `stats` on stdin is
answered with one JSON line of counters; end of stdin stops it.
"""
import argparse
import json
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from otlp_receiver import OtlpReceiver  # noqa: E402


class CountingReceiver(OtlpReceiver):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.counts = {"spans": 0, "metric_points": 0, "log_records": 0, "exports": 0}
        self.lock = threading.Lock()

    def _record(self, protocol, signal, req):  # overrides the storing of OtlpReceiver
        if signal == "traces":
            key = "spans"
            n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        elif signal == "metrics":
            key = "metric_points"
            n = 0
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        kind = m.WhichOneof("data")
                        if kind:
                            n += len(getattr(m, kind).data_points)
        else:
            key = "log_records"
            n = sum(len(sl.log_records) for rl in req.resource_logs for sl in rl.scope_logs)
        with self.lock:
            self.counts[key] += n
            self.counts["exports"] += 1
            self.requests[protocol] = self.requests.get(protocol, 0) + 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grpc-port", type=int, default=0)
    ap.add_argument("--http-port", type=int, default=0)
    a = ap.parse_args()
    r = CountingReceiver(a.grpc_port, a.http_port, "127.0.0.1").start()
    print(f"listening {r.grpc_port} {r.http_port}", flush=True)
    try:
        for line in sys.stdin:
            if line.strip() == "stats":
                with r.lock:
                    out = dict(r.counts, requests=dict(r.requests), errors=len(r.errors))
                print(json.dumps(out), flush=True)
    finally:
        r.stop()


if __name__ == "__main__":
    main()
