"""Real Evolution API 2.2-2.3 traffic: the fixture corpus in tests/fixtures/evolution.

Each fixture is one shape Evolution sends (built from its source and from payloads its users
reported), with the answer and trace fields it must produce. The corpus runs twice: against
the parser alone (fast), and against gunicorn (2 workers), PostgreSQL and the sandbox.
"""
from __future__ import annotations

import copy
import json
import time
import uuid

import pytest
import requests

from tests.support import ROOT, metric, parse_metrics, rows

FIXTURES = sorted((ROOT / "tests" / "fixtures" / "evolution").glob("*.json"))
CORPUS = {p.stem: json.loads(p.read_text()) for p in FIXTURES}
TRACE_FIELDS = ("user_id", "message_type", "remote_jid", "message_content", "platform_timestamp")


def _post(service, body, instance="evo", suffix=""):
    return requests.post(f"{service.url}/webhook/evolution/{instance}{suffix}", json=body, timeout=15)


def _fresh(body):
    """The fixture's envelope with a message id of its own (the corpus runs more than once)."""
    body = copy.deepcopy(body)
    data = body.get("data")
    if isinstance(data, dict) and isinstance(data.get("key"), dict) and "id" in data["key"]:
        data["key"]["id"] = "3EB0" + uuid.uuid4().hex[:16].upper()
    return body


def _sent_to(service, text: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [s for s in service.sandbox.sent() if s.get("text") == text and s.get("instance") == "evo"]
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"nothing sent with text {text!r}")


@pytest.fixture(scope="module")
def evo(service):
    service.ensure_instance("evo", service.sandbox.url)
    return service


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_service_answers_each_shape(evo, name):
    fixture = CORPUS[name]
    expect = fixture["expect"]
    body = _fresh(fixture["webhook"])
    ignored_before = metric(parse_metrics(evo.metrics_text()), "omni_webhook_ignored_total",
                            reason=expect.get("reason") or expect.get("later_ignored") or "event")
    r = _post(evo, body)
    assert r.status_code == expect["http"], r.text
    answer = r.json()
    if expect["http"] == 400:
        assert expect["error_contains"] in answer["error"]
        return
    assert answer["status"] == expect["status"], answer
    if expect["status"] == "ignored":
        assert answer["reason"] == expect["reason"] and answer["detail"]
        after = metric(parse_metrics(evo.metrics_text()), "omni_webhook_ignored_total", reason=expect["reason"])
        assert after == ignored_before + 1
        key = body["data"].get("key", {}) if isinstance(body.get("data"), dict) else {}
        if key.get("id"):
            assert rows(evo.database_url, "SELECT count(*) FROM message_trace WHERE message_id = %s",
                        (key["id"],))[0][0] == 0
        return
    if expect["status"] == "recorded":
        assert answer["receipt"] == expect["receipt"]
        deadline = time.monotonic() + 10
        while metric(parse_metrics(evo.metrics_text()), "omni_webhook_ignored_total",
                     reason=expect["later_ignored"]) < ignored_before + 1:
            assert time.monotonic() < deadline, "an unknown receipt was never counted"
            time.sleep(0.2)
        return
    trace = evo.wait_final(answer["trace_id"])
    assert trace["status"] == "completed", trace
    for field in TRACE_FIELDS:
        if field in expect:
            assert trace[field] == expect[field], (field, trace[field])
    assert trace["remote_jid"] == body["data"]["key"]["remoteJid"]
    assert trace["reply_message_id"], trace
    sent = _sent_to(evo, trace["response_content"])
    if "reply_number" in expect:
        assert sent["number"] == expect["reply_number"]
    assert sent["message_id"] == trace["reply_message_id"]


def test_by_events_urls_are_the_same_endpoint(evo):
    body = _fresh(CORPUS["lid_with_remotejidalt"]["webhook"])
    r = _post(evo, body, suffix="/messages-upsert")
    assert r.status_code == 202, r.text
    assert _post(evo, body, suffix="/messages-upsert").json()["status"] == "duplicate"
    for suffix in ("/messages-update", "/connection-update", "/contacts-update"):
        r = _post(evo, CORPUS["connection_update"]["webhook"], suffix=suffix)
        assert r.status_code == 200 and r.json()["reason"] == "event", r.text
    assert _post(evo, {"event": "messages.upsert"}, suffix="/messages-upsert").status_code == 400
    assert _post(evo, body, instance="nope", suffix="/messages-upsert").status_code == 404


def test_one_person_one_user_id_across_lid_and_phone(evo):
    """A LID seen once with its phone keeps that phone: later LID-only messages (on either
    worker) get the phone user_id, and are still answered at the LID."""
    lid, phone = "1" + uuid.uuid4().int.__str__()[:14], "55119" + uuid.uuid4().int.__str__()[:8]
    first = _fresh(CORPUS["lid_with_remotejidalt"]["webhook"])
    first["data"]["key"].update(remoteJid=f"{lid}@lid", remoteJidAlt=f"{phone}@s.whatsapp.net")
    before = _fresh(CORPUS["lid_only"]["webhook"])
    before["data"]["key"]["remoteJid"] = f"{lid}9@lid"  # another LID: never seen with a phone
    assert evo.wait_final(_post(evo, before).json()["trace_id"])["user_id"] == f"whatsapp:lid:{lid}9"
    assert evo.wait_final(_post(evo, first).json()["trace_id"])["user_id"] == f"whatsapp:+{phone}"
    for _ in range(6):  # both workers: the mapping is in the database, not one worker's memory
        later = _fresh(CORPUS["lid_only"]["webhook"])
        later["data"]["key"]["remoteJid"] = f"{lid}@lid"
        later["data"]["message"] = {"conversation": "again " + uuid.uuid4().hex}
        trace = evo.wait_final(_post(evo, later).json()["trace_id"])
        assert trace["user_id"] == f"whatsapp:+{phone}" and trace["remote_jid"] == f"{lid}@lid"
        assert _sent_to(evo, trace["response_content"])["number"] == f"{lid}@lid"
    r = evo.api("GET", "/api/v1/traces", params={"user_id": f"whatsapp:+{phone}", "limit": 100})
    assert len(r.json()) == 7


def test_message_type_filter(evo):
    body = _fresh(CORPUS["video_caption"]["webhook"])
    trace_id = _post(evo, body).json()["trace_id"]
    evo.wait_final(trace_id)
    r = evo.api("GET", "/api/v1/traces", params={"message_type": "videoMessage", "limit": 1000})
    assert r.status_code == 200 and r.json()
    assert {t["message_type"] for t in r.json()} == {"videoMessage"}
    assert trace_id in {t["trace_id"] for t in r.json()}
    assert evo.api("GET", "/api/v1/traces", params={"message_type": ""}).status_code == 400


def _receipt(key_id: str, status: str) -> dict:
    body = copy.deepcopy(CORPUS["receipt_unknown_reply"]["webhook"])
    body["data"].update(keyId=key_id, status=status)
    return body


def test_receipts_land_on_the_reply_trace_and_are_measured(evo):
    trace = evo.wait_final(_post(evo, _fresh(CORPUS["phone_jid_conversation"]["webhook"])).json()["trace_id"])
    reply_id = trace["reply_message_id"]
    assert trace["delivered_at"] is None and trace["read_at"] is None
    count = lambda status: metric(parse_metrics(evo.metrics_text()),  # noqa: E731
                                  "omni_reply_receipt_seconds_count", instance_name="evo", status=status)
    delivered, read = count("delivered"), count("read")
    r = _post(evo, _receipt(reply_id, "DELIVERY_ACK"), suffix="/messages-update")
    assert r.status_code == 200 and r.json() == {"status": "recorded", "receipt": "delivered"}
    deadline = time.monotonic() + 10
    while (got := evo.api("GET", f"/api/v1/traces/{trace['trace_id']}").json())["delivered_at"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert got["read_at"] is None and got["delivered_at"] >= trace["updated_at"]
    assert _post(evo, _receipt(reply_id, "READ")).json()["receipt"] == "read"
    while (got2 := evo.api("GET", f"/api/v1/traces/{trace['trace_id']}").json())["read_at"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert got2["delivered_at"] == got["delivered_at"] and got2["read_at"] >= got["delivered_at"]
    # The same receipt again (Evolution resends after a reconnect) changes nothing.
    _post(evo, _receipt(reply_id, "DELIVERY_ACK"))
    time.sleep(0.5)
    assert evo.api("GET", f"/api/v1/traces/{trace['trace_id']}").json()["delivered_at"] == got["delivered_at"]
    assert count("delivered") == delivered + 1 and count("read") == read + 1
    assert metric(parse_metrics(evo.metrics_text()), "omni_webhook_lag_seconds_count", instance_name="evo") > 0


def test_sandbox_receipts_round_trip(pg):
    """The demo peer sends DELIVERY_ACK then READ for each reply, like Evolution; the trace
    gets delivered_at, then read_at."""
    from tests.support import Sandbox, Service, migrate

    url = pg.create_database()
    migrate(url)
    svc = Service(url, {})
    box = Sandbox(SANDBOX_WEBHOOK_URL=f"{svc.url}/webhook/evolution", SANDBOX_RECEIPT_DELAY_MS="200",
                  SANDBOX_READ_DELAY_MS="600", SANDBOX_RECEIPT_SHARE="1", SANDBOX_READ_SHARE="1")
    try:
        svc.start()
        svc.ensure_instance("evo", box.url)
        svc.sandbox = box
        body = _fresh(CORPUS["lid_with_remotejidalt"]["webhook"])
        trace_id = _post(svc, body).json()["trace_id"]
        seen = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            t = svc.api("GET", f"/api/v1/traces/{trace_id}").json()
            seen.append((t["delivered_at"], t["read_at"]))
            if t["read_at"]:
                break
            time.sleep(0.05)
        assert t["read_at"] and t["delivered_at"] and t["delivered_at"] < t["read_at"], t
        assert any(d and not r for d, r in seen), "never delivered before read"
        samples = parse_metrics(svc.metrics_text())
        for status in ("delivered", "read"):
            assert metric(samples, "omni_reply_receipt_seconds_count", instance_name="evo", status=status) == 1
    finally:
        svc.stop()
        box.stop()
