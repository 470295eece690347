"""Prometheus metrics under gunicorn multiprocess mode, scraped for real (SPEC 5)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app.vocabulary import STEPS
from tests.support import metric, parse_metrics


def _send_many(svc, instance: str, n: int, prefix: str = "m") -> list[dict]:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: svc.send(instance, f"{prefix} {i}"), range(n)))
    assert all(a.status_code == 202 for a in answers)
    return [svc.wait_final(a.json()["trace_id"]) for a in answers]


def test_one_scrape_counts_exactly_n_over_two_workers(make_service):
    svc = make_service(workers=2)
    svc.ensure_instance("count", svc.sandbox.url)
    n = 60
    traces = _send_many(svc, "count", n)
    assert all(t["status"] == "completed" for t in traces)
    samples = parse_metrics(svc.metrics_text())
    assert metric(samples, "omni_messages_total", instance_name="count", status="completed") == n
    assert metric(samples, "omni_message_duration_seconds_count", instance_name="count") == n
    for step in STEPS:
        assert metric(samples, "omni_message_step_duration_seconds_count", instance_name="count",
                      step=step, status="success") == n, step
    # Both workers are alive and report their resources (one series per pid).
    pids = {dict(lbl)["pid"] for (name, lbl) in samples if name == "omni_worker_resident_memory_bytes"}
    assert pids == {str(p) for p in svc.worker_pids()}
    assert all(v > 10e6 for (name, _), v in samples.items() if name == "omni_worker_resident_memory_bytes")
    # CPU is one counter over every worker, without a pid label.
    cpu = [lbl for (name, lbl) in samples if name == "omni_worker_cpu_seconds_total"]
    assert cpu == [frozenset()] and samples[("omni_worker_cpu_seconds_total", frozenset())] > 0


def test_worker_cpu_counts_each_process_own_cpu_once(monkeypatch):
    from app.telemetry import metrics

    def counted():
        return metrics.WORKER_CPU._value.get()

    monkeypatch.setattr(metrics, "_cpu_counted", (0, 0.0))
    before = counted()
    metrics.count_cpu(2.0)    # the first sample of a process: all it used so far
    metrics.count_cpu(2.5)
    metrics.count_cpu(2.25)   # never backwards
    assert counted() == pytest.approx(before + 2.5)
    # A forked child carries its parent's figure, but counts from its own zero.
    monkeypatch.setattr(metrics, "_cpu_counted", (os.getpid() + 1, 50.0))
    metrics.count_cpu(0.5)
    assert counted() == pytest.approx(before + 3.0)


def test_known_series_start_at_zero(make_service):
    svc = make_service(workers=1)
    samples = parse_metrics(svc.metrics_text())
    for upstream in ("agent", "evolution", "database", "loki"):
        reason = "connection" if upstream != "database" else "unavailable"
        labels = frozenset({("upstream", upstream), ("reason", reason)})
        assert ("omni_upstream_errors_total", labels) in samples
    assert samples[("omni_log_records_dropped_total", frozenset())] == 0
    assert samples[("omni_cost_budget_usd_per_day", frozenset())] == 0   # no cost alert
    assert metric(samples, "omni_webhook_rejected_total", reason="unknown_instance") == 0
    assert metric(samples, "omni_auth_failures_total", reason="wrong_key") == 0
    # An instance's series appear at 0 as soon as it is used once.
    svc.ensure_instance("fresh", svc.sandbox.url)
    _send_many(svc, "fresh", 1)
    samples = parse_metrics(svc.metrics_text())
    assert ("omni_messages_total", frozenset({("instance_name", "fresh"), ("status", "failed")})) in samples
    assert metric(samples, "omni_messages_total", instance_name="fresh", status="failed") == 0
    # No prices on the instance: its cost series exists and stays 0 while tokens count.
    assert ("omni_agent_cost_usd_total", frozenset({("instance_name", "fresh")})) in samples
    assert metric(samples, "omni_agent_cost_usd_total", instance_name="fresh") == 0
    assert metric(samples, "omni_agent_tokens_total", instance_name="fresh", type="input") > 0


def test_labels_have_no_high_cardinality_values(service, traffic):
    text = service.metrics_text()
    for trace in traffic:
        assert trace["trace_id"] not in text
        assert trace["user_id"] not in text
    assert "5515551234567" not in text


def test_http_histogram_uses_route_templates(service, traffic):
    samples = parse_metrics(service.metrics_text())
    routes = {dict(lbl).get("route") for (name, lbl) in samples
              if name == "omni_http_request_duration_seconds_count"}
    assert "/webhook/evolution/<instance_name>" in routes
    assert "/api/v1/traces/<trace_id>" in routes
    assert not any(r and "bot" in r for r in routes)


def test_worker_restarts_keep_counts_and_do_not_pile_up_files(make_service):
    """max_requests recycles workers; the master folds their files, counts survive."""
    svc = make_service({}, workers=2, start=False)
    svc.env_overrides["GUNICORN_CMD_ARGS"] = "--max-requests 15"
    svc.start()
    svc.ensure_instance("recycle", svc.sandbox.url)
    first_pids = set(svc.worker_pids())
    cpu_before = metric(parse_metrics(svc.metrics_text()), "omni_worker_cpu_seconds_total")
    n = 80
    for chunk in range(4):
        _send_many(svc, "recycle", n // 4, prefix=f"c{chunk}")
    samples = parse_metrics(svc.metrics_text())
    assert metric(samples, "omni_messages_total", instance_name="recycle", status="completed") == n
    assert metric(samples, "omni_message_step_duration_seconds_count", instance_name="recycle",
                  step="agent_called", status="success") == n
    assert not first_pids & set(svc.worker_pids()), "workers were not recycled"
    # Recycled workers' CPU stays counted: the counter never goes back.
    assert metric(samples, "omni_worker_cpu_seconds_total") >= cpu_before > 0
    files = [f for f in os.listdir(svc.metrics_dir) if f.endswith(".db")]
    live = {str(p) for p in svc.worker_pids()}
    stale = [f for f in files if not f.endswith("_archive.db")
             and f.rsplit("_", 1)[-1][:-3] not in live]
    assert stale == [], stale


def test_metrics_disabled_removes_endpoint(make_service):
    svc = make_service({"AUTOMAGIK_OMNI_ENABLE_METRICS": "false"}, workers=1)
    r = requests.get(svc.url + "/metrics", timeout=5)
    assert r.status_code == 404 and r.json()["error"]
    svc.ensure_instance("quiet", svc.sandbox.url)
    assert _send_many(svc, "quiet", 3)[0]["status"] == "completed"
    assert requests.get(svc.url + "/health", timeout=5).json()["metrics_enabled"] is False


def test_real_prometheus_scrapes_and_answers_step_quantiles(prometheus, service):
    """Debian's Prometheus with the project's scrape config and rules, against the live service."""
    # One scrape may time out on a loaded machine; the target must be up again by the next.
    up = prometheus.wait_for('up{job="omni"} == 1')
    assert up and up[0]["value"][1] == "1"
    # The session's Prometheus may have been started minutes ago by another module: without
    # messages in the last minute every rate is 0 and every quantile NaN.
    for a in [service.send("bot", f"quantiles {i}") for i in range(5)]:
        service.wait_final(a.json()["trace_id"])
    for step in STEPS:
        result = prometheus.wait_for(
            'histogram_quantile(0.95, sum by (le) (rate(omni_message_step_duration_seconds_bucket'
            f'{{step="{step}"}}[1m]))) > 0')
        assert float(result[0]["value"][1]) > 0
    slow = prometheus.query('sum(omni_message_duration_seconds_count) - '
                            'sum(omni_message_duration_seconds_bucket{le=~"10|10\\\\.0"})')["result"]
    assert slow and float(slow[0]["value"][1]) >= 1, "the slow message should be above le=10"


def test_multiprocess_mode_without_the_variable_set(make_service):
    """As in compose and `make run`: gunicorn.conf.py sets up the directory itself."""
    port_dir = None
    svc = make_service({"PROMETHEUS_MULTIPROC_DIR": None}, workers=2, start=False)
    port_dir = f"/tmp/omni-metrics-{svc.port}"
    svc.start()
    svc.ensure_instance("plain", svc.sandbox.url)
    _send_many(svc, "plain", 30)
    samples = parse_metrics(svc.metrics_text())
    assert metric(samples, "omni_messages_total", instance_name="plain", status="completed") == 30
    assert any(f.startswith("counter_") for f in os.listdir(port_dir))
