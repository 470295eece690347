"""The JSON log format, redaction and the stdout handler, in-process."""
from __future__ import annotations

import json
import re
import time
import uuid

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")

import datetime as dt  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402

from app.telemetry.logs import OmniJsonFormatter, Redactor, StdoutHandler, rfc3339  # noqa: E402


def test_rfc3339_matches_datetime_formatting():
    rng = random.Random(7)
    for ts in [0.0, 1.0005, 1764086399.999, 1764086400.0] + [rng.uniform(0, 2e9) for _ in range(2000)]:
        expected = dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        got = rfc3339(ts)
        # Float rounding may put the millisecond one off from datetime's own rounding.
        assert got[:20] == expected[:20] or abs(int(got[20:23]) - int(expected[20:23])) <= 1, (ts, got, expected)
        assert RFC3339_UTC.match(got)


def test_formatter_keeps_extras_of_any_type_and_exceptions():
    record = logging.LogRecord("omni.x", logging.ERROR, __file__, 1, "hello %s", ("there",), None)
    record.__dict__.update(event="custom", trace_id=uuid.UUID(int=5), when=dt.datetime(2026, 1, 2, 3, 4, 5),
                           raw=b"bytes\xff", nested={"a": [1, None]}, error=None)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = json.loads(OmniJsonFormatter().format(record))
    assert list(line)[:5] == ["timestamp", "level", "logger", "message", "event"]
    assert line["message"] == "hello there" and line["event"] == "custom" and line["level"] == "ERROR"
    assert line["trace_id"] == str(uuid.UUID(int=5)) and line["when"] == "2026-01-02T03:04:05"
    assert line["raw"] == "bytes\ufffd" and line["nested"] == {"a": [1, None]} and line["error"] is None
    assert "ValueError: boom" in line["exc_info"]
    for internal in ("args", "msg", "exc_text", "_omni_line", "levelno", "pathname"):
        assert internal not in line


def test_redactor_replaces_every_secret_longest_first():
    red = Redactor()
    red.add("short", "topsecret", "topsecret-and-more", None, "")
    line = red('{"a": "topsecret-and-more", "b": "xx topsecret yy", "c": "short", "u": "/x?token=abc&y=1"}')
    assert "topsecret" not in line and "more" not in line
    assert '"c": "short"' in line  # under 6 characters: not registered
    assert "token=****&y=1" in line


def test_stdout_handler_writes_every_line_once_in_order_per_thread():
    out = io.StringIO()
    handler = StdoutHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"test.stdout.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def emit(n: int) -> None:
        for i in range(2000):
            logger.info("t%d %d", n, i)

    threads = [threading.Thread(target=emit, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    handler.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 16000
    for n in range(8):
        assert [int(x.split()[1]) for x in lines if x.startswith(f"t{n} ")] == list(range(2000))


def test_stdout_handler_writes_in_the_background_without_flush():
    out = io.StringIO()
    handler = StdoutHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "later", None, None)
    handler.handle(record)
    assert out.getvalue() == ""  # queued, not written by the caller
    deadline = time.monotonic() + 5
    while not out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert out.getvalue() == "later\n"
    handler.close()


def test_stdout_handler_bounds_memory_and_counts_drops(monkeypatch):
    class Stuck(io.StringIO):
        def write(self, s):  # a log collector that stopped reading
            gate.wait()
            return super().write(s)

    gate = threading.Event()
    dropped = []
    monkeypatch.setattr(StdoutHandler, "MAX_BUFFERED", 50)
    out = Stuck()
    handler = StdoutHandler(out, on_drop=dropped.append)
    handler.setFormatter(logging.Formatter("%(message)s"))
    t0 = time.monotonic()
    for i in range(500):
        handler.handle(logging.LogRecord("x", logging.INFO, __file__, 1, str(i), None, None))
    assert time.monotonic() - t0 < 2, "emit blocked on a stuck stdout"
    assert len(handler._buf) <= 50 and sum(dropped) >= 400
    gate.set()
    handler.close()


def test_forked_child_does_not_repeat_the_parents_unwritten_lines(tmp_path):
    path = tmp_path / "out.txt"
    with open(path, "w") as fh:
        handler = StdoutHandler(fh)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.FLUSH_INTERVAL_S = 60  # nothing written by the thread during the test
        handler.handle(logging.LogRecord("x", logging.INFO, __file__, 1, "parent", None, None))
        pid = os.fork()
        if pid == 0:  # child: its own line only, then exit without atexit handlers
            handler.handle(logging.LogRecord("x", logging.INFO, __file__, 1, "child", None, None))
            handler.flush()
            os._exit(0)
        os.waitpid(pid, 0)
        handler.close()
    assert sorted(path.read_text().splitlines()) == ["child", "parent"]
