"""The metrics module in-process: cached children, the socket gauge."""
from __future__ import annotations


def test_open_connections_gauge_counts_this_processes_sockets():
    import socket

    from app.telemetry.metrics import _count_sockets

    before = _count_sockets()
    a, b = socket.socketpair()
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        assert _count_sockets() == before + 3
    finally:
        for s in (a, b, listener):
            s.close()
    assert _count_sockets() == before


def test_cached_children_are_the_labelled_series():
    from app.telemetry import metrics

    a = metrics.child(metrics.STEP_DURATION, "cache-test", "agent_called", "success")
    assert a is metrics.child(metrics.STEP_DURATION, "cache-test", "agent_called", "success")
    assert a is metrics.STEP_DURATION.labels(instance_name="cache-test", step="agent_called", status="success")
    assert a is not metrics.child(metrics.STEP_DURATION, "cache-test", "agent_called", "failed")
