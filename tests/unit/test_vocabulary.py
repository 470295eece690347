"""The vocabulary is the one source of steps, statuses and reasons: everything else agrees."""
from __future__ import annotations

import json

from app import vocabulary as v
from app.pipeline import flow
from app.traces import analytics
from tests.support import ROOT

OPENAPI = json.loads((ROOT / "app" / "openapi.json").read_text())


def _schema(name: str) -> dict:
    return OPENAPI["components"]["schemas"][name]


def _param(path: str, name: str) -> dict:
    for param in OPENAPI["paths"][path]["get"]["parameters"]:
        param = _resolve(param)
        if param["name"] == name:
            return param["schema"]
    raise AssertionError(f"{path} has no parameter {name}")


def _resolve(node: dict) -> dict:
    ref = node.get("$ref")
    if ref is None:
        return node
    target = OPENAPI
    for part in ref.lstrip("#/").split("/"):
        target = target[part]
    return target


def test_openapi_enums_are_the_vocabulary():
    assert _schema("Step")["properties"]["step"]["enum"] == list(v.STEPS)
    assert _schema("Step")["properties"]["status"]["enum"] == list(v.STEP_STATUSES)
    assert _schema("Trace")["properties"]["status"]["enum"] == list(v.TRACE_STATUSES)
    assert _schema("Trace")["properties"]["failed_step"]["enum"] == [*v.STEPS, None]
    assert _schema("Analytics")["properties"]["steps"]["items"]["properties"]["step"]["enum"] == list(v.STEPS)
    assert _schema("WebhookIgnored")["properties"]["reason"]["enum"] == list(v.IGNORE_REASONS)
    assert _schema("WebhookReceipt")["properties"]["receipt"]["enum"] == list(v.RECEIPT_STATUSES)
    assert _param("/api/v1/traces", "status")["enum"] == list(v.TRACE_STATUSES)
    assert _param("/api/v1/traces", "failed_step")["enum"] == list(v.STEPS)
    assert _param("/api/v1/traces/analytics", "interval")["enum"] == list(v.ANALYTICS_INTERVALS)


def test_the_flow_runs_the_vocabulary_steps_after_the_intake():
    assert v.INTAKE_STEPS + tuple(step.name for step in flow.STEPS) == v.STEPS
    assert {step.upstream for step in flow.STEPS} <= set(v.UPSTREAM_REASONS)


def test_analytics_reports_every_step_in_order():
    hists = {name: [(10, 1, 5.0)] for name in reversed(v.STEPS)}
    figures = analytics.step_figures(hists, exact=False, steps_exact={}, total_ms=20.0)
    assert [f["step"] for f in figures] == list(v.STEPS)


def test_words_are_unique_and_final_statuses_follow_processing():
    for words in (v.STEPS, v.STEP_STATUSES, v.TRACE_STATUSES, v.IGNORE_REASONS, v.REJECT_REASONS,
                  v.AUTH_REASONS, *v.UPSTREAM_REASONS.values()):
        assert len(set(words)) == len(words), words
    assert v.TRACE_STATUSES[0] == "processing" and v.FINAL_STATUSES == v.TRACE_STATUSES[1:]
    assert set(v.STEP_OUTCOMES) <= set(v.STEP_STATUSES)
    assert v.sql_list(v.FINAL_STATUSES) == "('completed', 'failed', 'error')"


def test_iso_is_rfc3339_utc_with_a_z():
    import datetime as dt

    ts = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert v.iso(ts) == "2026-01-02T01:04:05.678Z"
    assert v.iso(ts.replace(microsecond=0), "auto") == "2026-01-02T01:04:05Z"
