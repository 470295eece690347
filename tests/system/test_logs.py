"""JSON logs on stdout and pushed to Loki, from real gunicorn workers (SPEC 5)."""
from __future__ import annotations

import json
import re
import time
import uuid

import requests

from app.vocabulary import STEPS
from demo.loki_receiver import LokiReceiver
from tests.support import metric, parse_metrics

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


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








