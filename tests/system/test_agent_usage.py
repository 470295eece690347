"""The agent's tokens and their cost, end to end: the real service (2 gunicorn workers), the
sandbox agent in both modes and PostgreSQL; trace fields, analytics and metrics checked
against sums computed here."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest

from app.instances import CACHE_TTL
from tests.support import metric, parse_metrics, rows

DIGITS = "5515551234567"


def tokens(text: str) -> int:
    """The sandbox agent's deterministic token count (demo/sandbox.py)."""
    return max(1, len(text) // 4)


def expected_tokens(text: str) -> tuple[int, int]:
    return tokens(text), tokens(f"Echo: {text}")


def run(service, instance: str, text: str, **kw) -> dict:
    r = service.send(instance, text, **kw)
    assert r.status_code == 202, r.text
    return service.wait_final(r.json()["trace_id"])


def cost(inp: int, out: int, price_in: str, price_out: str) -> float:
    return float((inp * Decimal(price_in) + out * Decimal(price_out)) / 1_000_000)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("form", ["request", "prompt", "input"])
def test_each_usage_form_lands_on_the_trace(service, sandbox, form, stream):
    name = f"usage-{form}-{'s' if stream else 'j'}"
    service.ensure_instance(name, sandbox.url, agent_stream=stream)
    text = f"how many tokens is this message, agent? #usage={form}"
    t = run(service, name, text)
    assert t["status"] == "completed", t
    assert (t["input_tokens"], t["output_tokens"]) == expected_tokens(text)
    assert t["agent_session_id"] == f"{name}_{DIGITS}"
    assert t["cost_usd"] is None   # no prices on the instance


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_no_usage_is_null_never_zero(service, sandbox, stream):
    name = f"usage-none-{'s' if stream else 'j'}"
    service.ensure_instance(name, sandbox.url, agent_stream=stream, input_cost_per_mtok=3,
                            output_cost_per_mtok=15)
    t = run(service, name, "no usage here #usage=none")
    assert t["status"] == "completed", t
    assert (t["input_tokens"], t["output_tokens"], t["cost_usd"]) == (None, None, None)
    body = service.api("GET", "/api/v1/traces/analytics", params={"instance_name": name}).json()
    assert body["usage"] == {"input_tokens": None, "output_tokens": None, "cost_usd": None}


def test_failed_agent_has_no_usage_but_a_failed_send_keeps_it(service, sandbox):
    service.ensure_instance("usage-fail", sandbox.url, input_cost_per_mtok=2, output_cost_per_mtok=8)
    t = run(service, "usage-fail", "#status=500 no answer")
    assert t["status"] == "failed" and t["input_tokens"] is None and t["cost_usd"] is None
    text = "#evo_status=500 answered but not delivered"
    t = run(service, "usage-fail", text)
    assert t["status"] == "failed" and t["failed_step"] == "evolution_send", t
    inp, out = expected_tokens(text)
    assert (t["input_tokens"], t["output_tokens"]) == (inp, out)
    assert t["cost_usd"] == pytest.approx(cost(inp, out, "2", "8"), rel=1e-12)


def test_cost_uses_the_prices_in_force_when_the_message_ran(service, sandbox):
    name = "usage-priced"
    inst = service.ensure_instance(name, sandbox.url, agent_stream=True, input_cost_per_mtok=3,
                                   output_cost_per_mtok=15)
    assert (inst["input_cost_per_mtok"], inst["output_cost_per_mtok"]) == (3, 15)
    text = "price me at three and fifteen dollars per million tokens"
    first = run(service, name, text)
    inp, out = expected_tokens(text)
    assert first["cost_usd"] == pytest.approx(cost(inp, out, "3", "15"), rel=1e-12)

    r = service.api("PATCH", f"/api/v1/instances/{name}",
                    json={"input_cost_per_mtok": 0.15, "output_cost_per_mtok": 0.6})
    assert r.status_code == 200, r.text
    time.sleep(CACHE_TTL + 0.5)   # every worker has reloaded the instance
    second = run(service, name, text)
    assert second["cost_usd"] == pytest.approx(cost(inp, out, "0.15", "0.6"), rel=1e-12)
    # History is not rewritten.
    assert service.api("GET", f"/api/v1/traces/{first['trace_id']}").json()["cost_usd"] == first["cost_usd"]

    r = service.api("PATCH", f"/api/v1/instances/{name}",
                    json={"input_cost_per_mtok": None, "output_cost_per_mtok": None})
    assert r.status_code == 200 and r.json()["input_cost_per_mtok"] is None
    time.sleep(CACHE_TTL + 0.5)
    third = run(service, name, text)
    assert (third["input_tokens"], third["cost_usd"]) == (inp, None)
    body = service.api("GET", "/api/v1/traces/analytics", params={"instance_name": name}).json()
    assert body["usage"]["input_tokens"] == 3 * inp and body["usage"]["output_tokens"] == 3 * out
    assert body["usage"]["cost_usd"] == pytest.approx(first["cost_usd"] + second["cost_usd"], abs=1e-8)


def test_analytics_and_metrics_sum_n_messages_over_two_workers(service, sandbox):
    name = "usage-count"
    service.ensure_instance(name, sandbox.url, input_cost_per_mtok=1.25, output_cost_per_mtok=10)
    texts = [f"message {i} " + "x" * (i * 7 % 90) + (" #usage=prompt" if i % 3 == 0 else "")
             for i in range(40)]
    users = [f"55155500{i % 5:05d}" for i in range(len(texts))]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda tu: service.send(name, tu[0], digits=tu[1]), zip(texts, users)))
    assert all(a.status_code == 202 for a in answers)
    traces = [service.wait_final(a.json()["trace_id"]) for a in answers]
    assert all(t["status"] == "completed" for t in traces)
    want_in = sum(expected_tokens(t)[0] for t in texts)
    want_out = sum(expected_tokens(t)[1] for t in texts)
    want_cost = sum((Decimal(expected_tokens(t)[0]) * Decimal("1.25") + expected_tokens(t)[1] * 10)
                    / 1_000_000 for t in texts)
    assert sum(t["input_tokens"] for t in traces) == want_in
    assert sum(t["cost_usd"] for t in traces) == pytest.approx(float(want_cost), rel=1e-9)

    body = service.api("GET", "/api/v1/traces/analytics", params={"instance_name": name, "top": 100}).json()
    assert body["usage"]["input_tokens"] == want_in and body["usage"]["output_tokens"] == want_out
    assert body["usage"]["cost_usd"] == round(float(want_cost), 8)
    (entry,) = body["by_instance"]
    assert (entry["input_tokens"], entry["output_tokens"]) == (want_in, want_out)
    assert sum(v["cost_usd"] for v in body["volume"]) == pytest.approx(float(want_cost), abs=1e-7)
    for user in body["top_users"]:
        mine = [t for t, u in zip(texts, users) if f"whatsapp:+{u}" == user["user_id"]]
        assert user["total"] == len(mine)
        assert user["input_tokens"] == sum(expected_tokens(t)[0] for t in mine)
        assert user["output_tokens"] == sum(expected_tokens(t)[1] for t in mine)

    # Both workers took part, and one scrape sums them.
    owners = rows(service.database_url, "SELECT count(DISTINCT owner) FROM message_trace "
                                        "WHERE instance_name = %(n)s", {"n": name})[0][0]
    assert owners == 2
    samples = parse_metrics(service.metrics_text())
    assert metric(samples, "omni_agent_tokens_total", instance_name=name, type="input") == want_in
    assert metric(samples, "omni_agent_tokens_total", instance_name=name, type="output") == want_out
    assert metric(samples, "omni_agent_cost_usd_total", instance_name=name) == pytest.approx(float(want_cost),
                                                                                        rel=1e-9)


def test_cost_alert_budget_is_exported_for_the_alert(make_service):
    svc = make_service({"AUTOMAGIK_OMNI_COST_ALERT_USD_PER_DAY": "42.5"}, workers=2)
    samples = parse_metrics(svc.metrics_text())
    # One value however many workers report it (multiprocess mode "max").
    assert samples[("omni_cost_budget_usd_per_day", frozenset())] == 42.5
