"""LokiHandler against a strict Loki push receiver over real HTTP on 127.0.0.1."""
from __future__ import annotations

import gzip
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request

import pytest

from app.telemetry.logs import OmniJsonFormatter
from app.telemetry.loki import LokiHandler

try:
    from demo.loki_receiver import LokiReceiver
except ImportError:  # tests/ run as a rootdir-less directory
    from loki_receiver import LokiReceiver

LABELS = {"service": "omni", "env": "test"}
FAST = dict(flush_interval=0.1, backoff_base=0.01, backoff_max=0.05, timeout=2.0)


class Counters:
    """Collects on_drop / on_error callbacks thread-safely."""

    def __init__(self):
        self.dropped = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def on_drop(self, n):
        with self._lock:
            self.dropped += n

    def on_error(self, reason):
        with self._lock:
            self.errors.append(reason)


@pytest.fixture
def rx():
    receiver = LokiReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def make_logger(rx):
    """Build (logger, handler, counters) wired to the receiver; closes handlers afterwards."""
    made = []

    def make(**kwargs):
        counters = Counters()
        opts = {**FAST, "on_drop": counters.on_drop, "on_error": counters.on_error, **kwargs}
        handler = LokiHandler(rx.url, LABELS, **opts)
        handler.setFormatter(OmniJsonFormatter())
        logger = logging.getLogger(f"test.loki.{len(made)}.{id(handler)}")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        made.append((logger, handler))
        return logger, handler, counters

    yield make
    for logger, handler in made:
        logger.removeHandler(handler)
        handler.close()


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def push(rx, body, *, content_type="application/json", gzipped=False, path="/loki/api/v1/push"):
    """Raw push to the receiver; returns the HTTP status."""
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    headers = {"Content-Type": content_type}
    if gzipped:
        data = gzip.compress(data)
        headers["Content-Encoding"] = "gzip"
    req = urllib.request.Request(rx.url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


# ---------------------------------------------------------------- delivery and format


def test_every_record_arrives_once_with_labels_and_trace_metadata(rx, make_logger):
    logger, handler, counters = make_logger()
    for i in range(60):
        level = (logging.INFO, logging.WARNING, logging.ERROR)[i % 3]
        extra = {"trace_id": f"trace-{i}"} if i % 2 == 0 else {}
        logger.log(level, "msg %d", i, extra=extra)
    assert handler.flush(5)

    assert rx.errors == []
    assert rx.duplicates == 0
    assert len(rx.entries) == 60
    assert sorted(line["message"] for line in rx.lines()) == sorted(f"msg {i}" for i in range(60))
    for labels, ts, line, meta in rx.entries:
        parsed = json.loads(line)
        assert labels == {"service": "omni", "env": "test", "level": parsed["level"].lower()}
        i = int(parsed["message"].split()[1])
        assert meta == ({"trace_id": f"trace-{i}"} if i % 2 == 0 else {})
        assert "trace_id" not in labels
        assert abs(ts - time.time_ns()) < 60 * 10**9
    assert {p["encoding"] for p in rx.pushes} == {"gzip"}
    assert {p["content_type"] for p in rx.pushes} == {"application/json"}
    assert handler.sent == 60 and handler.dropped == 0 and handler.pending == 0
    assert counters.dropped == 0 and counters.errors == []
    assert handler.status() == "ok"


def test_equal_and_unordered_timestamps_become_strictly_increasing(rx, make_logger):
    _, handler, _ = make_logger(flush_interval=5)
    base = time.time()
    for i, offset in enumerate([0.003, 0.001, 0.001, 0.001, 0.002, 0.0]):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, f"r{i}", None, None)
        record.created = base + offset
        handler.handle(record)
    assert handler.flush(5)
    # A second batch whose records are older than the first must still be accepted.
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "late", None, None)
    record.created = base - 1
    handler.handle(record)
    assert handler.flush(5)

    assert rx.errors == []
    stamps = [ts for _, ts, _, _ in rx.entries]
    assert len(stamps) == 7
    assert all(b > a for a, b in zip(stamps, stamps[1:]))
    assert [line["message"] for line in rx.lines()][0] == "r5"


def test_batching_by_count_and_lone_record_latency(rx, make_logger):
    logger, handler, _ = make_logger(batch_size=500, flush_interval=0.3)
    for i in range(1000):
        logger.info("bulk %d", i)
    assert rx.wait_for(1000, timeout=5)
    assert rx.requests <= 4
    assert rx.errors == []

    before = rx.requests
    start = time.monotonic()
    logger.info("lone")
    assert rx.wait_for(1001, timeout=3)  # without flush(): the timer ships it
    assert time.monotonic() - start < 0.3 + 0.5
    assert rx.requests == before + 1


def test_batching_by_bytes(rx, make_logger):
    logger, handler, _ = make_logger(batch_bytes=20_000, flush_interval=5)
    for i in range(100):
        logger.info("x" * 1000 + str(i))
    assert handler.flush(5)
    assert len(rx.entries) == 100 and rx.errors == []
    assert rx.requests >= 5  # ~100 KB in ≤20 KB pushes


def test_oversized_line_is_dropped_not_pushed(rx, make_logger):
    logger, handler, counters = make_logger()
    logger.info("y" * 300_000)
    logger.info("small")
    assert handler.flush(5)
    assert [line["message"] for line in rx.lines()] == ["small"]
    assert counters.dropped == 1 and rx.errors == []


# ---------------------------------------------------------------- failures and retries


def test_500_then_ok_is_delivered_once_after_retry(rx, make_logger):
    logger, handler, counters = make_logger(max_retries=50, backoff_base=0.05, backoff_max=0.1)
    rx.set_mode("500")
    for i in range(20):
        logger.info("retry %d", i)
    handler._wake.set()
    assert wait_until(lambda: rx.requests >= 2)
    assert handler.status().startswith("error: HTTP 500")
    rx.set_mode("ok")
    assert handler.flush(5)

    assert sorted(line["message"] for line in rx.lines()) == sorted(f"retry {i}" for i in range(20))
    assert rx.duplicates == 0 and rx.errors == []
    assert "http_5xx" in counters.errors and counters.dropped == 0
    assert handler.status() == "ok"


def test_429_retry_after_is_honoured(rx, make_logger):
    logger, handler, counters = make_logger(max_retries=10)
    rx.set_mode("429")
    logger.info("limited")
    handler._wake.set()
    assert wait_until(lambda: rx.requests >= 1)
    rx.set_mode("ok")
    assert rx.wait_for(1, timeout=5)

    first_429 = next(p["time"] for p in rx.pushes if p["status"] == 429)
    first_ok = next(p["time"] for p in rx.pushes if p["status"] == 204)
    # backoff alone would retry after ~0.01 s; Retry-After: 1 holds it back for a second
    assert first_ok - first_429 >= 0.9
    assert "http_4xx" in counters.errors
    assert len(rx.entries) == 1 and rx.errors == []


def test_400_is_dropped_without_retry(rx, make_logger):
    logger, handler, counters = make_logger(max_retries=5)
    rx.set_mode("400")
    for i in range(3):
        logger.info("rejected %d", i)
    assert handler.flush(5)
    assert rx.requests == 1
    assert counters.dropped == 3 and handler.dropped == 3
    assert counters.errors == ["http_4xx"]
    assert handler.status().startswith("error: HTTP 400")


def test_receiver_down_emit_never_waits_bounded_counted_then_resumes(rx, make_logger):
    logger, handler, counters = make_logger(queue_size=1000, batch_size=100, max_retries=3)
    rx.down()
    max_pending = 0
    for i in range(10_000):
        logger.info("down %d", i)
        if i % 100 == 0:
            max_pending = max(max_pending, handler.pending)
    # emit() never waits for room: with the queue full it drops (and counts) the record,
    # so the caller is not held up by a Loki that is down. (Speed is measured by the bench.)
    assert max_pending <= 1000 and handler.pending <= 1000
    assert counters.dropped >= 9000
    assert wait_until(lambda: "connection" in counters.errors)
    assert handler.status().startswith("error: connection")

    rx.up()
    assert handler.flush(10)  # the backlog still held in the bounded queue goes out first
    logger.info("back")
    assert handler.flush(10)
    assert "back" in [line["message"] for line in rx.lines()]
    assert rx.errors == [] and rx.duplicates == 0
    # every emitted record is either delivered or counted as dropped, never both
    assert handler.sent + handler.dropped == 10_001
    assert counters.dropped == handler.dropped
    assert len(rx.entries) == handler.sent
    assert handler.status() == "ok"


def test_slow_receiver_never_holds_up_emit(rx, make_logger):
    logger, handler, counters = make_logger(timeout=0.5, max_retries=1, queue_size=2000)
    rx.set_mode("slow", delay=5.0)
    logger.info("first")
    handler._wake.set()
    time.sleep(0.2)  # the shipper is now stuck inside a slow push
    start = time.perf_counter()
    for i in range(5000):
        logger.info("slow %d", i)
    # Emits that waited for the shipper would wait out a 0.5 s push per batch of them, tens of
    # seconds for 5000; the bound leaves room for a loaded machine (the bench measures speed).
    assert time.perf_counter() - start < 5.0
    assert handler.pending <= 2000
    assert wait_until(lambda: "timeout" in counters.errors, timeout=3)
    rx.set_mode("ok")
    assert handler.flush(10)
    assert rx.errors == []


def test_close_flushes_and_is_idempotent(rx, make_logger):
    logger, handler, counters = make_logger(flush_interval=30)
    for i in range(5):
        logger.info("closing %d", i)
    handler.close()
    assert len(rx.entries) == 5
    handler.close()
    assert handler.flush() is True
    logger.info("after close")  # dropped and counted, never raises
    assert counters.dropped == 1 and len(rx.entries) == 5
    assert handler._thread is not None and not handler._thread.is_alive()


def test_emit_never_raises_on_bad_formatter_or_callbacks(rx, make_logger):
    def boom(_):
        raise RuntimeError("callback broke")

    logger, handler, _ = make_logger(on_drop=boom, on_error=boom, queue_size=1)

    class Broken(logging.Formatter):
        def format(self, record):
            raise ValueError("nope")

    handler.setFormatter(Broken())
    logger.info("a")  # format error -> dropped; on_drop raises but is contained
    assert handler.dropped == 1


def test_fork_child_restarts_shipper_and_does_not_resend_parent_queue(rx, make_logger):
    # Parent and child share one stream (no per-process label), so their pushes interleave
    # in time: like real Loki's default unordered_writes, accept that here.
    rx.unordered = True
    logger, handler, _ = make_logger(flush_interval=30)
    logger.info("parent-before-fork")  # queued, thread started in the parent
    pid = os.fork()
    if pid == 0:  # child: must ship its own record through its own thread
        code = 1
        try:
            logger.info("from-child")
            code = 0 if handler.flush(5) and handler.sent == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert handler.flush(5)
    messages = sorted(line["message"] for line in rx.lines())
    assert messages == ["from-child", "parent-before-fork"]
    assert rx.errors == [] and rx.duplicates == 0


def test_invalid_labels_rejected_at_construction(rx):
    with pytest.raises(ValueError):
        LokiHandler(rx.url, {"bad-name": "x"})
    with pytest.raises(ValueError):
        LokiHandler(rx.url, {"__name__": "x"})
    with pytest.raises(ValueError):
        LokiHandler("loki:3100", LABELS)


# ---------------------------------------------------------------- the receiver is strict


def good_stream(ts=None, **labels):
    ts = ts or [str(time.time_ns())]
    return {"stream": labels or {"service": "omni"}, "values": [[t, "line"] for t in ts]}


@pytest.mark.parametrize("body, why", [
    ({}, "missing streams"),
    ({"streams": {"a": 1}}, "streams not a list"),
    ({"streams": [{"stream": {}, "values": [["1", "x"]]}]}, "empty labels"),
    ({"streams": [good_stream(**{"bad-name": "x"})]}, "bad label name"),
    ({"streams": [good_stream(**{"__name__": "x"})]}, "reserved label name"),
    ({"streams": [good_stream(**{f"l{i}": "v" for i in range(16)})]}, "too many labels"),
    ({"streams": [{"stream": {"a": "b"}, "values": [[123, "x"]]}]}, "numeric timestamp"),
    ({"streams": [{"stream": {"a": "b"}, "values": [["1.5", "x"]]}]}, "non-integer timestamp"),
    ({"streams": [{"stream": {"a": "b"}, "values": [["1", "x", {"k": 1}]]}]}, "non-string metadata"),
    ({"streams": [{"stream": {"a": "b"}, "values": [["1", "x", {}, "extra"]]}]}, "4 elements"),
    ({"streams": [{"stream": {"a": "b"}, "values": [["1", 7]]}]}, "line not a string"),
    ({"streams": [good_stream(ts=["2000000000000000000", "1000000000000000000"])]}, "unordered"),
    ({"streams": [good_stream(ts=[str(time.time_ns() + 3600 * 10**9)])]}, "future"),
    ({"streams": [{"stream": {"a": "b"}, "values": [["1", "z" * 300_000]]}]}, "line too long"),
])
def test_receiver_rejects_bad_pushes(rx, body, why):
    assert push(rx, body, gzipped=True) == 400, why
    assert len(rx.errors) == 1 and rx.entries == []


def test_receiver_rejects_wrong_content_type_path_and_method(rx):
    body = {"streams": [good_stream()]}
    assert push(rx, body, content_type="application/x-protobuf") == 400
    assert push(rx, body, path="/api/prom/push") == 404
    req = urllib.request.Request(rx.url + "/loki/api/v1/push", method="GET")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=5)
    assert exc.value.code == 405
    assert len(rx.errors) == 3 and rx.entries == []


def test_receiver_rejects_entries_older_than_accepted_ones_in_same_stream(rx):
    now = time.time_ns()
    assert push(rx, {"streams": [good_stream(ts=[str(now)])]}) == 204
    assert push(rx, {"streams": [good_stream(ts=[str(now - 1000)])]}) == 400
    # another stream has its own clock
    assert push(rx, {"streams": [good_stream(ts=[str(now - 1000)], service="other")]}) == 204
    assert len(rx.errors) == 1 and len(rx.entries) == 2


def test_receiver_accepts_plain_and_gzip_json_with_metadata(rx):
    now = time.time_ns()
    body = {"streams": [{"stream": {"service": "omni", "level": "info"},
                         "values": [[str(now), '{"a": 1}', {"trace_id": "t1"}],
                                    [str(now + 1), '{"a": 2}']]}]}
    assert push(rx, body) == 204
    body["streams"][0]["values"] = [[str(now + 2), '{"a": 3}']]
    assert push(rx, body, gzipped=True) == 204
    assert rx.errors == []
    assert [m for _, _, _, m in rx.entries] == [{"trace_id": "t1"}, {}, {}]
    assert rx.lines() == [{"a": 1}, {"a": 2}, {"a": 3}]
