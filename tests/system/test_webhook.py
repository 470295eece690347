"""Every row of the SPEC 4.3 webhook table, against gunicorn (2 workers) and real PostgreSQL."""
from __future__ import annotations

import concurrent.futures
import time
import uuid

import requests

from tests.support import metric, parse_metrics, rows, webhook


def _trace_count(service, instance: str = "bot") -> int:
    return rows(service.database_url, "SELECT count(*) FROM message_trace WHERE instance_name = %s",
                 (instance,))[0][0]


def _rejected(service, reason: str) -> float:
    return metric(parse_metrics(service.metrics_text()), "omni_webhook_rejected_total", reason=reason)


def test_accepted_writes_trace_before_answering(service):
    token = uuid.uuid4().hex
    r = service.send("bot", f"accepted {token}")
    assert r.status_code == 202
    body = r.json()
    assert set(body) == {"status", "trace_id", "instance"} and body["status"] == "accepted"
    # The row must already be committed when the 202 arrives.
    found = rows(service.database_url,
                 "SELECT status, user_id, message_content FROM message_trace WHERE trace_id = %s",
                 (body["trace_id"],))
    assert found and found[0][0] in ("processing", "completed")
    assert found[0][1] == "whatsapp:+5515551234567"
    assert found[0][2] == f"accepted {token}"
    trace = service.wait_final(body["trace_id"])
    assert trace["status"] == "completed"
    assert trace["response_content"] == f"Echo: accepted {token}"
    assert any(s["text"] == f"Echo: accepted {token}" and s["number"] == "5515551234567"
               for s in service.sandbox.sent())


def test_extended_text_message_is_accepted(service):
    r = requests.post(f"{service.url}/webhook/evolution/bot",
                      json=webhook("bot", "extended hi", extended=True), timeout=10)
    assert r.status_code == 202
    assert service.wait_final(r.json()["trace_id"])["message_content"] == "extended hi"


def test_duplicate_delivery_is_processed_once(service):
    mid = "3EB0" + uuid.uuid4().hex[:16].upper()
    token = uuid.uuid4().hex
    first = service.send("bot", f"dup {token}", message_id=mid)
    assert first.status_code == 202
    service.wait_final(first.json()["trace_id"])
    again = service.send("bot", f"dup {token}", message_id=mid)
    assert again.status_code == 200
    assert again.json() == {"status": "duplicate", "trace_id": first.json()["trace_id"]}
    assert sum(1 for s in service.sandbox.sent() if s["text"] == f"Echo: dup {token}") == 1


def test_duplicate_storm_one_trace_one_reply(service):
    """The same webhook 50 times at once, spread over both workers: one trace, one reply."""
    mid = "3EB0" + uuid.uuid4().hex[:16].upper()
    token = uuid.uuid4().hex
    body = webhook("bot", f"storm {token}", message_id=mid)

    def post(_):
        return requests.post(f"{service.url}/webhook/evolution/bot", json=body, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(25) as pool:
        answers = list(pool.map(post, range(50)))
    codes = sorted(a.status_code for a in answers)
    assert codes.count(202) == 1 and codes.count(200) == 49, codes
    trace_ids = {a.json()["trace_id"] for a in answers}
    assert len(trace_ids) == 1
    service.wait_final(trace_ids.pop())
    assert rows(service.database_url, "SELECT count(*) FROM message_trace WHERE message_id = %s",
                 (mid,))[0][0] == 1
    assert sum(1 for s in service.sandbox.sent() if s["text"] == f"Echo: storm {token}") == 1


def test_ignored_events_write_no_trace(service):
    before = _trace_count(service)
    cases = [
        webhook("bot", "x", event="connection.update"),
        webhook("bot", "sent by me", from_me=True),
    ]
    no_text = webhook("bot", "x")
    no_text["data"]["message"] = {"imageMessage": {"url": "http://x"}}
    cases.append(no_text)
    group = webhook("bot", "group hi")
    group["data"]["key"]["remoteJid"] = "120363025246125486@g.us"
    cases.append(group)
    for body in cases:
        r = requests.post(f"{service.url}/webhook/evolution/bot", json=body, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ignored" and r.json()["reason"]
    assert _trace_count(service) == before


def test_unknown_and_disabled_instance_404_counted(service):
    before = _rejected(service, "unknown_instance")
    r = service.send("no-such-instance", "hi")
    assert r.status_code == 404 and "error" in r.json()
    assert _rejected(service, "unknown_instance") == before + 1
    service.ensure_instance("sleepy", service.sandbox.url, enabled=False)
    before = _rejected(service, "disabled_instance")
    assert service.send("sleepy", "hi").status_code == 404
    assert _rejected(service, "disabled_instance") == before + 1
    assert _trace_count(service, "sleepy") == 0


def test_webhook_secret(service):
    secret = "hook-secret-" + uuid.uuid4().hex
    service.ensure_instance("guarded", service.sandbox.url, webhook_secret=secret)
    auth = lambda: metric(parse_metrics(service.metrics_text()), "omni_auth_failures_total")  # noqa: E731
    before = auth()
    assert service.send("guarded", "no secret").status_code == 401
    assert service.send("guarded", "bad", headers={"x-webhook-secret": "wrong-secret"}).status_code == 401
    assert auth() == before + 2
    ok = service.send("guarded", "with header", headers={"x-webhook-secret": secret})
    assert ok.status_code == 202
    r = requests.post(f"{service.url}/webhook/evolution/guarded?token={secret}",
                      json=webhook("guarded", "with token"), timeout=10)
    assert r.status_code == 202
    assert _trace_count(service, "guarded") == 2
    # The secret travelled in a query string: it must not reach any log line.
    service.wait_final(r.json()["trace_id"])
    assert secret not in service.log_path.read_text()


def test_malformed_bodies_400_naming_the_problem(service):
    url = f"{service.url}/webhook/evolution/bot"
    r = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = requests.post(url, json=[1, 2], timeout=10)
    assert r.status_code == 400
    body = webhook("bot", "x")
    del body["data"]["key"]["id"]
    r = requests.post(url, json=body, timeout=10)
    assert r.status_code == 400 and "data.key.id" in r.json()["error"]
    body = webhook("bot", "x")
    body["data"]["key"]["remoteJid"] = 42
    r = requests.post(url, json=body, timeout=10)
    assert r.status_code == 400 and "remoteJid" in r.json()["error"]
    r = requests.post(url, data=b"event=x", headers={"Content-Type": "text/plain"}, timeout=10)
    assert r.status_code == 415
    r = requests.post(url, data=b"\xff\xfe\xfa", headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400


def test_oversize_body_413(service):
    body = webhook("bot", "x" * (1024 * 1024 + 10))
    before = _rejected(service, "too_large")
    r = requests.post(f"{service.url}/webhook/evolution/bot", json=body, timeout=30)
    assert r.status_code == 413 and "error" in r.json()
    assert _rejected(service, "too_large") == before + 1


def test_overloaded_503_with_retry_after(make_service):
    svc = make_service({"AUTOMAGIK_OMNI_MAX_IN_FLIGHT": "2"}, workers=1)
    svc.ensure_instance("busy", svc.sandbox.url)
    held = [svc.send("busy", f"#delay=2000 hold {i}") for i in range(2)]
    assert [r.status_code for r in held] == [202, 202]
    r = svc.send("busy", "one too many")
    assert r.status_code == 503 and r.headers["Retry-After"].isdigit()
    for h in held:
        assert svc.wait_final(h.json()["trace_id"])["status"] == "completed"
    assert svc.send("busy", "room again").status_code == 202


def test_full_worker_holds_a_webhook_until_a_slot_frees(make_service):
    """Backpressure before 503: within AUTOMAGIK_OMNI_OVERLOAD_WAIT_S a freed slot is taken."""
    svc = make_service({"AUTOMAGIK_OMNI_MAX_IN_FLIGHT": "1", "AUTOMAGIK_OMNI_OVERLOAD_WAIT_S": "10"},
                       workers=1)
    svc.ensure_instance("queue", svc.sandbox.url)
    held = svc.send("queue", "#delay=1500 holding the only slot")
    assert held.status_code == 202
    t0 = time.monotonic()
    waited = svc.send("queue", "waits for it")
    assert waited.status_code == 202, waited.text
    assert time.monotonic() - t0 >= 0.5  # it really waited for the first to finish
    assert svc.wait_final(held.json()["trace_id"])["status"] == "completed"
    assert svc.wait_final(waited.json()["trace_id"])["status"] == "completed"


def test_database_down_503_then_recovers(stoppable):
    """PostgreSQL stopped: 503 + Retry-After and /health degraded; back: accepted again."""
    cluster, svc = stoppable
    svc.ensure_instance("fragile", svc.sandbox.url)
    assert svc.send("fragile", "before").status_code == 202
    cluster.stop()
    # Instances are cached for a few seconds; a new name forces a database lookup too.
    for name in ("fragile", "never-seen"):
        r = svc.send(name, "during outage")
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) > 0
    health = requests.get(svc.url + "/health", timeout=10)
    assert health.status_code == 503
    assert health.json()["status"] == "degraded"
    assert health.json()["checks"]["database"].startswith("error")
    cluster.start()
    svc_ok = None
    for _ in range(100):
        svc_ok = svc.send("fragile", "after")
        if svc_ok.status_code == 202:
            break
    assert svc_ok.status_code == 202
    assert svc.wait_final(svc_ok.json()["trace_id"])["status"] == "completed"
    assert requests.get(svc.url + "/health", timeout=10).json()["status"] == "ok"


def test_nul_in_text_is_stored_as_replacement_and_spoils_no_batch(make_service):
    """PostgreSQL text cannot hold NUL. A message (and the agent's echo of it) carrying one is
    accepted, processed and stored with U+FFFD; webhooks written in the same batch are not
    refused and their final states are not lost. A NUL in data.key.id is a 400."""
    svc = make_service()
    svc.ensure_instance("nul", svc.sandbox.url)
    texts = ["hi\x00there"] + [f"plain {i}" for i in range(15)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda t: requests.post(f"{svc.url}/webhook/evolution/nul",
                                                        json=webhook("nul", t), timeout=10), texts))
    assert [a.status_code for a in answers] == [202] * 16, [a.text for a in answers]
    traces = [svc.wait_final(a.json()["trace_id"]) for a in answers]
    assert all(t["status"] == "completed" for t in traces), [t["status"] for t in traces]
    assert traces[0]["message_content"] == "hi\ufffdthere"
    assert traces[0]["response_content"].endswith("hi\ufffdthere")
    assert [t["message_content"] for t in traces[1:]] == texts[1:]
    body = webhook("nul", "hello")
    body["data"]["key"]["id"] = "3EB0\x00X"
    r = requests.post(f"{svc.url}/webhook/evolution/nul", json=body, timeout=10)
    assert r.status_code == 400 and "data.key.id" in r.json()["error"]


def test_slow_commit_503_then_redelivery_processed_exactly_once(make_service):
    """The trace table is locked for 12.5 s while a webhook arrives: its wait for the commit
    (10 s) ends in 503, the row commits once the lock goes. Redelivered afterwards (to
    whichever worker), the message is processed exactly once: one reply, a final trace, and
    `duplicate` names the trace that was processed."""
    import psycopg2

    svc = make_service()
    svc.ensure_instance("slowdb", svc.sandbox.url)
    token = uuid.uuid4().hex
    text = f"slow commit {token}"
    message_id = "SLOW" + token[:16].upper()
    locker = psycopg2.connect(svc.database_url)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE message_trace IN ACCESS EXCLUSIVE MODE")
        locked_at = time.monotonic()
        first = svc.send("slowdb", text, message_id=message_id)
        assert first.status_code == 503 and first.headers["Retry-After"], first.text
        time.sleep(max(0.0, 12.5 - (time.monotonic() - locked_at)))
    finally:
        locker.rollback()
        locker.close()
    answers = [svc.send("slowdb", text, message_id=message_id) for _ in range(4)]
    assert all(a.status_code in (200, 202) for a in answers), [a.text for a in answers]
    trace_ids = {a.json()["trace_id"] for a in answers}
    stored = rows(svc.database_url, "SELECT trace_id::text FROM message_trace WHERE message_id = %s",
                  (message_id,))
    assert len(stored) == 1 and trace_ids == {stored[0][0]}, (trace_ids, stored)
    assert sum(a.json()["status"] == "accepted" for a in answers) <= 1
    trace = svc.wait_final(stored[0][0], timeout=20)
    assert trace["status"] == "completed", trace
    time.sleep(1.0)  # a second reply, if any, would have arrived by now
    replies = [s for s in svc.sandbox.sent() if s["text"] == f"Echo: {text}"]
    assert len(replies) == 1, replies
