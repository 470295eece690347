"""JSON logs on stdout and pushed to Loki, from real gunicorn workers (SPEC 5, issue 3)."""
from __future__ import annotations

import json
import re
import time
import uuid

import requests

from demo.loki_receiver import LokiReceiver
from tests.support import metric, parse_metrics

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
STEPS = ("webhook_received", "instance_validated", "agent_called", "evolution_send")


def _final(svc, instance: str, text: str, **kw) -> dict:
    r = svc.send(instance, text, **kw)
    assert r.status_code == 202, r.text
    return svc.wait_final(r.json()["trace_id"])


def test_every_line_is_json_with_the_spec_fields(service, traffic):
    lines = service.log_lines()
    assert lines and not [line for line in lines if "raw" in line], "non-JSON output on stdout"
    for line in lines:
        assert RFC3339_UTC.match(line["timestamp"]), line
        assert line["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        assert line["logger"] and isinstance(line["message"], str) and line["event"]
    loggers = {line["logger"] for line in lines}
    assert {"gunicorn.error", "gunicorn.access", "omni.pipeline"} <= loggers


def test_detailed_logging_one_line_per_step(service):
    trace = _final(service, "bot", "detailed please")
    mine = [line for line in service.log_lines() if line.get("trace_id") == trace["trace_id"]]
    steps = [line for line in mine if line["event"] == "step_completed"]
    assert [line["step"] for line in steps] == list(STEPS)
    for line in steps:
        assert line["instance"] == "bot" and line["user_id"] == "whatsapp:+5515551234567"
        assert line["status"] == "success" and isinstance(line["duration_ms"], int)
    final = [line for line in mine if line["event"] == "message_completed"]
    assert len(final) == 1 and final[0]["duration_ms"] == trace["duration_ms"]


def test_failed_message_logs_where_and_why(service):
    trace = _final(service, "bot", "#status=401 nope")
    line = [x for x in service.log_lines()
            if x.get("trace_id") == trace["trace_id"] and x["event"] == "message_failed"][0]
    assert line["level"] == "WARNING"
    assert line["step"] == "agent_called" and line["error"] == "agent returned 401"


def test_without_detailed_logging_one_line_per_message(make_service):
    svc = make_service({"AUTOMAGIK_OMNI_ENABLE_DETAILED_LOGGING": "false"}, workers=1)
    svc.ensure_instance("terse", svc.sandbox.url)
    trace = _final(svc, "terse", "short log")
    mine = [x for x in svc.log_lines()
            if x.get("trace_id") == trace["trace_id"] and x["event"] != "api_access"]
    assert [x["event"] for x in mine] == ["message_completed"]


def test_log_level_warning_hides_info(make_service):
    svc = make_service({"AUTOMAGIK_OMNI_LOG_LEVEL": "WARNING"}, workers=1)
    svc.ensure_instance("warn", svc.sandbox.url)
    ok = _final(svc, "warn", "fine")
    bad = _final(svc, "warn", "#status=500 broken")
    lines = svc.log_lines()
    assert not [x for x in lines if x.get("level") in ("DEBUG", "INFO") and x.get("logger", "").startswith("omni")]
    assert not [x for x in lines if x.get("trace_id") == ok["trace_id"] and x["event"] != "api_access"
                and x["level"] != "INFO"]
    assert [x for x in lines if x.get("trace_id") == bad["trace_id"] and x["event"] == "message_failed"]


def test_message_text_only_when_allowed(make_service):
    token = "personal-" + uuid.uuid4().hex
    quiet = make_service({}, workers=1)
    quiet.ensure_instance("pii", quiet.sandbox.url)
    _final(quiet, "pii", f"my data {token}")
    assert token not in quiet.log_path.read_text()
    loud = make_service({"AUTOMAGIK_OMNI_LOG_MESSAGE_CONTENT": "true"}, workers=1)
    loud.ensure_instance("pii", loud.sandbox.url)
    trace = _final(loud, "pii", f"my data {token}")
    line = [x for x in loud.log_lines()
            if x.get("trace_id") == trace["trace_id"] and x["event"] == "message_completed"][0]
    assert line["message_content"] == f"my data {token}"


def test_no_secret_in_any_log_line_at_debug(make_service):
    secrets = {"agent": "agent-secret-" + uuid.uuid4().hex, "evo": "evo-secret-" + uuid.uuid4().hex,
               "hook": "hook-secret-" + uuid.uuid4().hex}
    svc = make_service({"AUTOMAGIK_OMNI_LOG_LEVEL": "DEBUG"}, workers=2)
    svc.ensure_instance("vault", svc.sandbox.url, agent_api_key=secrets["agent"],
                        evolution_api_key=secrets["evo"], webhook_secret=secrets["hook"])
    _final(svc, "vault", "with header", headers={"x-webhook-secret": secrets["hook"]})
    r = requests.post(f"{svc.url}/webhook/evolution/vault?token={secrets['hook']}",
                      json={"event": "connection.update"}, timeout=10)
    assert r.status_code == 200
    svc.send("vault", "wrong secret", headers={"x-webhook-secret": "not-the-" + secrets["hook"]})
    requests.get(f"{svc.url}/api/v1/traces", headers={"x-api-key": "wrong-" + svc.api_key}, timeout=10)
    svc.api("GET", "/api/v1/instances")
    svc.stop()
    text = svc.log_path.read_text()
    levels = {json.loads(line).get("level") for line in text.splitlines() if line.startswith("{")}
    assert levels & {"DEBUG", "INFO"}
    for name, secret in {**secrets, "api": svc.api_key}.items():
        assert secret not in text, f"{name} secret leaked into the logs"


def test_loki_receives_every_line_once_with_the_right_labels(make_service):
    with LokiReceiver(unordered=True) as loki:
        svc = make_service({"AUTOMAGIK_OMNI_LOKI_URL": loki.url, "AUTOMAGIK_OMNI_ENV": "test"},
                           workers=2)
        svc.ensure_instance("shipped", svc.sandbox.url)
        traces = [_final(svc, "shipped", f"ship {i}") for i in range(10)]
        assert requests.get(svc.url + "/health", timeout=5).json()["checks"]["loki"] == "ok"
        svc.stop()  # workers flush their queues on the way out
        assert loki.errors == []
        for labels, *_ in loki.entries:
            assert set(labels) == {"service", "level", "env"}
            assert labels["service"] == "omni" and labels["env"] == "test"
        from collections import Counter

        # Records from worker processes are pushed; the master's own lines are not.
        printed = Counter(json.dumps(x) for x in svc.log_lines() if "raw" not in x)
        pushed = Counter()
        for labels, _ts, line, meta in loki.entries:
            parsed = json.loads(line)
            assert labels["level"] == parsed["level"].lower()
            if "trace_id" in parsed:
                assert meta == {"trace_id": parsed["trace_id"]}
            pushed[json.dumps(parsed)] += 1
        # Every pushed line was printed at least as often (identical lines can happen twice).
        assert all(printed[line] >= n for line, n in pushed.items())
        for trace in traces:
            mine = {line: n for line, n in printed.items() if json.loads(line).get("trace_id") == trace["trace_id"]}
            assert len(mine) >= 5
            for line, n in mine.items():
                assert pushed[line] == n, f"printed {n}x, pushed {pushed[line]}x: {line}"


def test_loki_failures_counted_and_delivery_resumes(make_service):
    with LokiReceiver(unordered=True) as loki:
        loki.set_mode("500")
        svc = make_service({"AUTOMAGIK_OMNI_LOKI_URL": loki.url}, workers=1)
        svc.ensure_instance("flaky", svc.sandbox.url)
        first = _final(svc, "flaky", "while loki fails")
        assert first["status"] == "completed"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            errors = metric(parse_metrics(svc.metrics_text()), "omni_upstream_errors_total", upstream="loki")
            if errors > 0:
                break
            time.sleep(0.2)
        assert errors > 0
        health = requests.get(svc.url + "/health", timeout=5).json()
        assert health["checks"]["loki"].startswith("error")
        loki.set_mode("ok")
        later = _final(svc, "flaky", "after loki is back")
        deadline = time.monotonic() + 40
        delivered = False
        while time.monotonic() < deadline and not delivered:
            delivered = any(json.loads(line).get("trace_id") == later["trace_id"] for _, _, line, _ in loki.entries)
            time.sleep(0.2)
        assert delivered, "delivery did not resume after Loki recovered"


# --- unit tests of the formatter and the stdout handler ------------------------------------

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
