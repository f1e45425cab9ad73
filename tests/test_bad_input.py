"""Bad input on observed connections: garbage, a 1 MiB header, a peer that dies in the
middle of an exchange. The agent counts each case once, under its reason, at both ends
alike; never stalls or stops; goes on capturing; and the service answers exactly as it
does without the agent."""
import sys

import pytest

from conftest import TESTS, Agent, finish, free_port, watch

PY = sys.executable
PEER = TESTS / "servers/bad_peer.py"
REASONS = ("malformed", "too_many_headers", "head_too_large", "head_truncated",
           "unmatched_response", "no_response", "pipeline_overflow", "capture_gap")


def run_peer(procs, mode, *args, agent_args=None, port=None, agent=None):
    """tests/servers/bad_peer.py MODE under `tapir watch --json` of its port with
    `agent_args` (None: no agent), or under `agent`, which is left running. Returns (the
    peer's lines, the agent, the exchanges of the agent it stopped)."""
    port = port or free_port()
    peer = procs([PY, PEER, mode, port, *args], stdin=True)
    peer.wait_for(lambda line: line == "listening", stream="out", what="the peer listening")
    stop = agent is None and agent_args is not None
    if stop:
        agent = watch(port, extra=agent_args)
    peer.send_line()
    assert peer.wait_exit() == 0, peer.err
    assert peer.out[-1] == "done", peer.out
    return peer.out[1:-1], agent, (finish(agent) if stop else [])


def drops(agent):
    """The agent's final `tapir.http.dropped` counts, by reason (zeros left out)."""
    counts = {reason: agent.final_count("tapir.http.dropped", reason) for reason in REASONS}
    return {reason: n for reason, n in counts.items() if n}


def seen(got):
    return sorted((e["kind"], e["url.path"], e["http.response.status_code"]) for e in got)


def test_garbage_is_counted_once_at_each_end_and_capture_goes_on(procs):
    n = 40
    baseline, _, _ = run_peer(procs, "garbage", 7, n)
    out, agent, got = run_peer(procs, "garbage", 7, n, agent_args=[])
    # The server refused every connection's bytes, with the agent as without it.
    assert out == baseline
    kinds = [line.split()[0] for line in out[:n]]
    assert [line.split()[1] for line in out[:n]] == ["400"] * n, out
    assert out[n:] == ["200 /after"]
    # Heads a lenient parser still reads (a line without colon is skipped, as many servers
    # do) are exchanges like any other: the 400 is what the client got.
    lenient = kinds.count("field_without_colon")
    assert seen(got) == sorted(
        [("client", "/g", 400), ("server", "/g", 400)] * lenient
        + [("client", "/after", 200), ("server", "/after", 200)]
    ), got
    # Everything else is malformed at both ends, counted once: the server's refusal is
    # not counted again as a response without request.
    assert drops(agent) == {"malformed": 2 * (n - lenient)}, agent.err[-40:]


@pytest.mark.parametrize("inject", [False, True], ids=["observed", "injecting"])
def test_a_mebibyte_header_is_reported_at_both_ends_and_arrives_intact(procs, inject):
    size = 1 << 20
    port = free_port()
    agent_args = ["--inject", "--inject-port", str(port)] if inject else []
    out, agent, got = run_peer(procs, "bighead", size, agent_args=agent_args, port=port)
    # The server got the head that was sent, byte for byte, plus the traceparent line the
    # agent inserts when it injects.
    assert out == [f"200 /bigrequest intact traceparents={int(inject)}", "200 /small1",
                   "200 /bigresponse", "200 /small2", "200 /after"]
    paths = ["/bigrequest", "/small1", "/bigresponse", "/small2", "/after"]
    assert seen(got) == sorted((kind, p, 200) for p in paths for kind in ("client", "server")), got
    # Each of the two long heads was kept only in part, at each end.
    assert drops(agent) == {"head_truncated": 4}, agent.err[-40:]
    if inject:
        # The server's span of the long request continues the client's.
        client, server = (next(e for e in got if e["kind"] == k and e["url.path"] == "/bigrequest")
                          for k in ("client", "server"))
        assert (server["trace_id"], server["parent_span_id"]) == (client["trace_id"], client["span_id"])


@pytest.mark.parametrize("role, failed, unanswered", [
    # Half a request head is no exchange: counted at the server's end only (the client's
    # end is a child that shares the socket, which the agent met in use, mid-message).
    ("client", [], 1),
    # A request the server died on, and one whose response it cut short, fail at both
    # ends: spans (and RED metrics) with error.type, ended when the connection did.
    ("server", [("/die", None, "connection_closed")], 0),
    ("server_mid_body", [("/halfbody", 200, "response_incomplete")], 0),
], ids=["client", "server", "server_mid_body"])
def test_a_peer_that_dies_mid_exchange_is_reported_and_capture_goes_on(procs, role, failed, unanswered):
    port = free_port()
    agent = watch(port)
    out, _, _ = run_peer(procs, "dies", role, port=port, agent=agent)
    assert out[0] == "200 /before"
    assert out[1:] == ([] if role == "client" else ["closed"]), out
    # A new server on the same port, and a request to it.
    out, _, _ = run_peer(procs, "garbage", 7, 0, port=port, agent=agent)
    assert out == ["200 /after"]
    got = finish(agent)
    outcomes = sorted((e["kind"], e["url.path"], e["http.response.status_code"], e.get("error.type")) for e in got)
    want = [(kind, path, 200, None) for path in ("/before", "/after") for kind in ("client", "server")]
    want += [(kind, *f) for f in failed for kind in ("client", "server")]
    assert outcomes == sorted(want, key=str), got
    assert drops(agent) == ({"no_response": unanswered} if unanswered else {}), agent.err[-40:]


def test_a_request_a_server_died_on_reaches_the_collector_as_an_error(procs, otlp):
    """The same failed exchange over OTLP: both ends' spans with error.type and an error
    status, and the RED histograms counting it as an error without a status code."""
    port = free_port()
    argv = ["run", "--exporter", "otlp", "--otlp-protocol", "grpc",
            "--otlp-endpoint", otlp.endpoint("grpc"), "--port", str(port)]
    agent = Agent(*argv, env={"OTEL_METRIC_EXPORT_INTERVAL": "500"})
    out, _, _ = run_peer(procs, "dies", "server", port=port, agent=agent)
    assert out == ["200 /before", "closed"]
    assert agent.stop() == 0, agent.err[-30:]

    def outcome(s):
        a = s["attributes"]
        path = a.get("url.path") or a.get("url.full", "").split(f":{port}", 1)[-1]
        return (s["kind"], path, a.get("http.response.status_code"), a.get("error.type"), s["status_code"])

    spans = sorted(outcome(s) for s in otlp.spans(lambda s: s["attributes"].get("server.port") == port))
    assert spans == sorted([
        (kind, "/before", 200, None, "UNSET") for kind in ("CLIENT", "SERVER")
    ] + [(kind, "/die", None, "connection_closed", "ERROR") for kind in ("CLIENT", "SERVER")]), spans
    # This receiver is the test's own: every histogram point is this agent's.
    for name in ("http.server.request.duration", "http.client.request.duration"):
        counts = sorted(
            ((p["attributes"].get("http.route"), p["attributes"].get("http.response.status_code"),
              p["attributes"].get("error.type"), p["count"]) for p in otlp.latest_points(name)),
            key=str,
        )
        assert counts == [("/before", 200, None, 1), ("/die", None, "connection_closed", 1)], (name, counts)
