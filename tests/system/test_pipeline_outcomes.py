"""Each trace status and failed step, through real gunicorn, sandbox and PostgreSQL."""
from __future__ import annotations

import uuid

import psycopg2
import requests

from tests.support import metric, parse_metrics


def _outcome(service, text: str, instance: str = "bot", timeout: float = 30) -> dict:
    r = service.send(instance, text)
    assert r.status_code == 202, r.text
    return service.wait_final(r.json()["trace_id"], timeout=timeout)


def _steps(trace: dict) -> dict:
    return {s["step"]: s for s in trace["steps"]}


def test_completed_has_four_timed_steps(service):
    trace = _outcome(service, "hello")
    assert trace["status"] == "completed"
    assert trace["failed_step"] is None and trace["error_message"] is None
    assert [s["step"] for s in trace["steps"]] == ["webhook_received", "instance_validated",
                                                   "agent_called", "evolution_send"]
    for step in trace["steps"]:
        assert step["status"] == "success"
        assert isinstance(step["duration_ms"], int) and step["duration_ms"] >= 0
        assert step["timestamp"].endswith("Z")
    assert trace["duration_ms"] >= sum(s["duration_ms"] for s in trace["steps"]) - 4


def test_agent_401_is_failed_at_agent_called(service):
    trace = _outcome(service, "#status=401 please")
    assert trace["status"] == "failed"
    assert trace["failed_step"] == "agent_called"
    assert trace["error_message"] == "agent returned 401"
    steps = _steps(trace)
    assert steps["agent_called"]["status"] == "failed"
    assert steps["agent_called"]["error"] == "agent returned 401"
    assert steps["evolution_send"]["status"] == "skipped"


def test_agent_500_is_failed(service):
    trace = _outcome(service, "#status=500 boom")
    assert (trace["status"], trace["failed_step"], trace["error_message"]) == (
        "failed", "agent_called", "agent returned 500")


def test_agent_timeout_is_failed(service, sandbox):
    service.ensure_instance("impatient", sandbox.url, agent_timeout_s=1)
    trace = _outcome(service, "#delay=3000 slow agent", instance="impatient")
    assert trace["status"] == "failed" and trace["failed_step"] == "agent_called"
    assert trace["error_message"] == "agent timed out after 1 s"
    assert 900 <= _steps(trace)["agent_called"]["duration_ms"] < 2500


def test_agent_garbage_is_failed(service):
    trace = _outcome(service, "#garbage")
    assert trace["status"] == "failed" and trace["failed_step"] == "agent_called"
    assert "invalid response" in trace["error_message"]


def test_evolution_500_is_failed_at_evolution_send(service):
    token = uuid.uuid4().hex
    trace = _outcome(service, f"#evo_status=500 {token}")
    assert trace["status"] == "failed"
    assert trace["failed_step"] == "evolution_send"
    assert trace["error_message"] == "evolution returned 500"
    assert _steps(trace)["agent_called"]["status"] == "success"
    assert trace["response_content"] == f"Echo: #evo_status=500 {token}"


def test_agent_unreachable_is_failed(service):
    service.ensure_instance("nowhere", "http://127.0.0.1:9", agent_timeout_s=2)
    trace = _outcome(service, "anyone there?", instance="nowhere")
    assert trace["status"] == "failed" and trace["failed_step"] == "agent_called"
    assert trace["error_message"].startswith("agent unreachable")


def test_streaming_agent_measures_first_chunk(service, sandbox):
    service.ensure_instance("streamer", sandbox.url, agent_stream=True)
    before = metric(parse_metrics(service.metrics_text()), "omni_agent_first_chunk_seconds_count",
                    instance_name="streamer")
    trace = _outcome(service, "#delay=200 stream me", instance="streamer")
    assert trace["status"] == "completed"
    assert trace["response_content"] == "Echo: #delay=200 stream me"
    agent = _steps(trace)["agent_called"]
    assert 150 <= agent["first_chunk_ms"] <= agent["duration_ms"]
    after = metric(parse_metrics(service.metrics_text()), "omni_agent_first_chunk_seconds_count",
                   instance_name="streamer")
    assert after == before + 1


def test_streaming_endless_times_out(service, sandbox):
    service.ensure_instance("endless", sandbox.url, agent_stream=True, agent_timeout_s=1)
    trace = _outcome(service, "#endless", instance="endless")
    assert trace["status"] == "failed" and trace["error_message"] == "agent timed out after 1 s"


def test_slow_message_over_10s(service, sandbox):
    """#delay=10500: completed, slower than 10 s, logged as slow_message, above le=10."""
    service.ensure_instance("patient", sandbox.url, agent_timeout_s=30)
    samples = parse_metrics(service.metrics_text())
    le10 = metric(samples, "omni_message_duration_seconds_bucket", instance_name="patient", le="10.0")
    count = metric(samples, "omni_message_duration_seconds_count", instance_name="patient")
    trace = _outcome(service, "#delay=10500 take your time", instance="patient", timeout=40)
    assert trace["status"] == "completed" and trace["duration_ms"] > 10000
    samples = parse_metrics(service.metrics_text())
    assert metric(samples, "omni_message_duration_seconds_count", instance_name="patient") == count + 1
    assert metric(samples, "omni_message_duration_seconds_bucket", instance_name="patient", le="10.0") == le10
    slow = [line for line in service.log_lines()
            if line.get("event") == "slow_message" and line.get("trace_id") == trace["trace_id"]]
    assert len(slow) == 1 and slow[0]["level"] == "WARNING" and slow[0]["duration_ms"] > 10000


def test_content_not_stored_when_disabled(make_service):
    svc = make_service({"AUTOMAGIK_OMNI_STORE_MESSAGE_CONTENT": "false"}, workers=1)
    svc.ensure_instance("private", svc.sandbox.url)
    trace = _outcome(svc, "my secret diagnosis", instance="private")
    assert trace["status"] == "completed"
    assert trace["message_content"] is None and trace["response_content"] is None
    conn = psycopg2.connect(svc.database_url)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM message_trace WHERE message_content IS NOT NULL "
                    "OR response_content IS NOT NULL")
        assert cur.fetchone()[0] == 0
    conn.close()


def test_tracing_disabled_writes_nothing_and_still_replies(make_service):
    svc = make_service({"AUTOMAGIK_OMNI_ENABLE_TRACING": "false"}, workers=1)
    svc.ensure_instance("untraced", svc.sandbox.url)
    token = uuid.uuid4().hex
    mid = "3EB0" + uuid.uuid4().hex[:16].upper()
    r = svc.send("untraced", f"no trace {token}", message_id=mid)
    assert r.status_code == 202
    assert svc.send("untraced", f"no trace {token}", message_id=mid).json()["status"] == "duplicate"
    for _ in range(100):
        if any(s["text"] == f"Echo: no trace {token}" for s in svc.sandbox.sent()):
            break
        import time

        time.sleep(0.05)
    assert sum(1 for s in svc.sandbox.sent() if s["text"] == f"Echo: no trace {token}") == 1
    conn = psycopg2.connect(svc.database_url)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM message_trace")
        assert cur.fetchone()[0] == 0
    conn.close()
    health = requests.get(svc.url + "/health", timeout=5).json()
    assert health["tracing_enabled"] is False
