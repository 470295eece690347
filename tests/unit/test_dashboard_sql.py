"""Dashboard SQL leaves the canary's synthetic traces out of every business figure."""
from __future__ import annotations

import json

import pytest

from tests.support import ROOT

# One trace shown by id: a canary trace opened from the trace API is shown like any other.
BY_ID = {"omni-trace-detail.json"}


def _sql_targets():
    for path in sorted((ROOT / "grafana" / "dashboards").glob("*.json")):
        if path.name in BY_ID:
            continue
        stack = list(json.loads(path.read_text()).get("panels", []))
        while stack:
            panel = stack.pop()
            stack.extend(panel.get("panels", []))
            for target in panel.get("targets", []):
                sql = target.get("rawSql")
                if sql and "message_trace" in sql:
                    yield pytest.param(sql, id=f"{path.stem}/{panel.get('title')}")


@pytest.mark.parametrize("sql", list(_sql_targets()))
def test_every_business_query_over_traces_excludes_synthetic(sql):
    assert "NOT synthetic" in sql or "NOT t.synthetic" in sql, sql


def test_there_are_business_queries_to_check():
    assert len(list(_sql_targets())) >= 20
