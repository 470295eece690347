"""First end-to-end check: a message through gunicorn, sandbox and PostgreSQL."""


def test_message_completes(service):
    r = service.send("bot", "hello there")
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "accepted" and body["instance"] == "bot"
    trace = service.wait_final(body["trace_id"])
    assert trace["status"] == "completed", trace
    assert [s["step"] for s in trace["steps"]] == ["webhook_received", "instance_validated",
                                                   "agent_called", "evolution_send"]
