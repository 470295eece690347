"""Every Grafana query against the real backends.

Uses these fixtures of tests/conftest.py:
  * database_url        superuser libpq URL of a throwaway PostgreSQL, all sql/ migrations
                        applied and the grafana_reader role created
  * grafana_reader_url  the same database as the read-only role grafana_reader
  * traffic             the live service has processed completed, failed and slow messages
  * prometheus_url      a real Prometheus that scraped that service, with prometheus/rules loaded

Each SQL query of the dashboards runs as grafana_reader with its variables interpolated and
Grafana's macros expanded as Grafana does (tests/grafana_queries.py), with the values a
dashboard offers and with hostile ones; each PromQL query of the dashboards and alert rules
runs against Prometheus.
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
import urllib.parse
import urllib.request

import psycopg2
import pytest

from tests import grafana_queries as gq



def _connect(url: str):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


def _one_trace_id(database_url: str) -> str:
    with _connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT trace_id FROM message_trace ORDER BY created_at DESC LIMIT 1")
        row = cur.fetchone()
    assert row, "the traffic fixture left no trace row"
    return str(row[0])


# ------------------------------------------------------------------ SQL
SQL_QUERIES = gq.sql_queries()


@pytest.mark.parametrize("query", SQL_QUERIES, ids=[f"{q.source}:{q.panel}" for q in SQL_QUERIES])
def test_sql_query_runs_as_grafana_reader(query, traffic, database_url, grafana_reader_url):
    variants = [{}, {"trace_id": _one_trace_id(database_url), "min_duration_ms": "10000",
                     "status": "failed", "bucket": "week"}]
    with _connect(grafana_reader_url) as conn:
        for values in variants:
            with conn.cursor() as cur:
                cur.execute(query.expanded(values=values))
                cur.fetchall()


def test_trace_detail_finds_the_trace(traffic, database_url, grafana_reader_url):
    trace_id = _one_trace_id(database_url)
    steps = [q for q in SQL_QUERIES if q.source == "omni-trace-detail.json" and q.panel == "Steps"][0]
    with _connect(grafana_reader_url) as conn, conn.cursor() as cur:
        cur.execute(steps.expanded(values={"trace_id": trace_id}))
        names = [row[1] for row in cur.fetchall()]
    assert names and names[0] == "webhook_received"


def test_traces_dashboard_sees_traffic(traffic, grafana_reader_url):
    count = [q for q in SQL_QUERIES if q.source == "omni-traces.json" and q.panel == "Messages"][0]
    with _connect(grafana_reader_url) as conn, conn.cursor() as cur:
        cur.execute(count.expanded())
        assert cur.fetchone()[0] > 0


def _outcome(cur, sql: str):
    """("rows", rows) or ("error", SQLSTATE): what the panel would show."""
    try:
        cur.execute(sql)
        return "rows", cur.fetchall()
    except psycopg2.Error as exc:
        # `with connection` holds a transaction even in autocommit mode: end the failed one
        cur.connection.rollback()
        return "error", exc.pgcode


def _value_variables(query) -> list[str]:
    return sorted({name for name, *_ in gq.variable_references(query.text)
                   if query.variables.get(name, {}).get("type") in gq.VALUE_VARIABLE_TYPES})


def test_hostile_values_select_no_more_than_a_missing_value(traffic, grafana_reader_url):
    """Any value of any variable (textbox, query, custom: a crafted URL sets them all) gives
    what a value matching nothing gives: the query still runs and shows no other row."""
    until = datetime.now(timezone.utc) + timedelta(minutes=1)
    checked = 0
    with _connect(grafana_reader_url) as conn, conn.cursor() as cur:
        for query in SQL_QUERIES:
            for name in _value_variables(query):
                var = query.variables[name]

                def run(*values, var=var, query=query, name=name):
                    value = list(values) if var.get("multi") else values[0]
                    return _outcome(cur, query.expanded(values={name: value}, time_to=until))

                missing = run("no-such-value")
                # date_trunc refuses an unknown unit: the same refusal for every bad bucket
                assert missing[0] == "rows" or (name == "bucket" and missing == ("error", "22023")), \
                    (query.panel, name, missing)
                for hostile in gq.HOSTILE_VALUES:
                    if hostile == var.get("allValue"):
                        continue  # Grafana reads the custom all value in a URL as All
                    assert run(hostile) == missing, f"{query.source}/{query.panel}: {name}={hostile!r}"
                    if var.get("multi"):
                        assert run("bot", hostile) == run("bot"), f"{query.panel}: {name}=[bot, {hostile!r}]"
                    checked += 1
    assert checked >= 25 * len(gq.HOSTILE_VALUES)


def test_traces_filters_select_what_they_name(traffic, grafana_reader_url):
    [table] = [q for q in SQL_QUERIES if q.source == "omni-traces.json"
               and q.panel == "Messages (filtered: status, minimum duration)"]
    until = datetime.now(timezone.utc) + timedelta(minutes=1)

    def rows(**values):
        with _connect(grafana_reader_url) as conn, conn.cursor() as cur:
            cur.execute(table.expanded(values=values, time_to=until))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    everything = rows()
    assert {r["instance_name"] for r in everything} >= {"bot", "patient"}
    assert {r["status"] for r in everything} >= {"completed", "failed"}
    assert {r["instance_name"] for r in rows(instance_name="patient")} == {"patient"}
    failed = rows(status="failed")
    assert failed and {r["status"] for r in failed} == {"failed"}
    slow = rows(min_duration_ms="10000")
    assert slow and all(r["duration_ms"] >= 10000 for r in slow)
    assert rows(min_duration_ms="") == everything            # an empty box: no minimum
    assert rows(min_duration_ms="10 s") == rows(min_duration_ms="-1") == []
    # The Overview's multi-value variable: a list of instances.
    [by_type] = [q for q in SQL_QUERIES if q.source == "omni-overview.json"]
    with _connect(grafana_reader_url) as conn, conn.cursor() as cur:
        counts = {}
        for value in (gq.ALL, ["bot"], ["patient"], ["bot", "patient"]):
            cur.execute(by_type.expanded(values={"instance_name": value}, time_to=until))
            counts[str(value)] = sum(n for _, n in cur.fetchall())
    assert counts["['bot', 'patient']"] == counts["['bot']"] + counts["['patient']"] > 0
    assert counts[gq.ALL] >= counts["['bot', 'patient']"]


@pytest.mark.parametrize("statement", [
    "INSERT INTO message_trace (trace_id, instance_id, instance_name, message_id, user_id, status, created_at, updated_at) "
    "VALUES (gen_random_uuid(), 1, 'x', 'x', 'x', 'completed', now(), now())",
    "UPDATE message_trace SET status = 'error'",
    "DELETE FROM message_trace",
    "SELECT message_content FROM message_trace LIMIT 1",
    "SELECT response_content FROM message_trace LIMIT 1",
    "SELECT * FROM message_trace LIMIT 1",
    "SELECT * FROM instance",
    "CREATE TABLE grafana_was_here (a int)",
])
def test_grafana_reader_cannot(statement, grafana_reader_url):
    with _connect(grafana_reader_url) as conn, conn.cursor() as cur:
        # Also without the role's read-only default: the privileges alone must refuse.
        cur.execute("SET default_transaction_read_only = off")
        with pytest.raises(psycopg2.Error):
            cur.execute(statement)


# ------------------------------------------------------------------ PromQL
PROMQL_QUERIES = gq.promql_queries()


def _prom_query(prometheus_url: str, expr: str) -> dict:
    data = urllib.parse.urlencode({"query": expr, "time": f"{time.time():.3f}"}).encode()
    req = urllib.request.Request(prometheus_url.rstrip("/") + "/api/v1/query", data=data, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.parametrize("query", PROMQL_QUERIES, ids=[f"{q.source}:{q.panel}:{q.ref_id}" for q in PROMQL_QUERIES])
def test_promql_query_runs(query, traffic, prometheus_url):
    _prom_query(prometheus_url, query.expanded(interval="1m", range_="15m"))


KEY_PANELS = {
    # (dashboard, panel title): what must return data once traffic was scraped.
    ("omni-overview.json", "Messages per second by status"),
    ("omni-overview.json", "Success rate (last 5 m)"),
    ("omni-overview.json", "Per-step latency p95 (the bottleneck)"),
    ("omni-overview.json", "End-to-end latency p50 / p95 / p99"),
    # The sandbox agent reports usage: tokens flow with the traffic.
    ("omni-overview.json", "Agent tokens per second by type"),
}


@pytest.mark.parametrize("key", sorted(KEY_PANELS), ids=[k[1] for k in sorted(KEY_PANELS)])
def test_key_panels_return_data(key, traffic, prometheus_url):
    queries = [q for q in PROMQL_QUERIES if (q.source, q.panel) == key]
    assert queries, f"panel {key} not found"
    # Recording rules need an evaluation after the scrape: wait up to a minute.
    deadline = time.time() + 60
    while True:
        results = [_prom_query(prometheus_url, q.expanded())["result"] for q in queries]
        if any(results):
            return
        if time.time() > deadline:
            pytest.fail(f"{key[1]}: no data from {[q.expanded() for q in queries]}")
        time.sleep(3)


def test_cost_panels_see_priced_traffic(service, sandbox, grafana_reader_url):
    service.ensure_instance("dash-priced", sandbox.url, input_cost_per_mtok=3, output_cost_per_mtok=15)
    answers = [service.send("dash-priced", f"what does message {i} cost?", digits=f"5515559000{i:03d}")
               for i in range(3)]
    traces = [service.wait_final(a.json()["trace_id"]) for a in answers]
    want = sum(t["cost_usd"] for t in traces)
    assert want > 0
    panels = {q.panel: q for q in SQL_QUERIES if q.source == "omni-traces.json"}
    # The time range ends a minute ahead: the macros drop sub-second precision.
    args = {"values": {"instance_name": "dash-priced"},
            "time_to": datetime.now(timezone.utc) + timedelta(minutes=1)}
    with _connect(grafana_reader_url) as conn, conn.cursor() as cur:
        cur.execute(panels["Agent cost"].expanded(**args))
        assert float(cur.fetchone()[0]) == pytest.approx(want, rel=1e-9)
        cur.execute(panels["Most expensive users"].expanded(**args))
        users = cur.fetchall()
        assert len(users) == 3 and users[0][4] >= users[-1][4]
        cur.execute(panels["Agent tokens"].expanded(**args))
        assert cur.fetchone() == (sum(t["input_tokens"] for t in traces), sum(t["output_tokens"] for t in traces))


SLO_KEY_PANELS = {
    # (dashboard, panel title): SLO panels on the fast recording rules, which have data once
    # traffic was scraped (the 1 d..30 d ones are evaluated every 5 minutes).
    ("omni-slo.json", "Availability burn rate by window"),
    ("omni-slo.json", "Latency burn rate by window"),
    ("omni-slo.json", "Availability error ratio"),
    ("omni-slo.json", "Availability objective"),
    # Seeded at 0 in every worker, canary or not (tests/test_canary.py scrapes real runs).
    ("omni-slo.json", "Canary runs by result"),
}


@pytest.mark.parametrize("key", sorted(SLO_KEY_PANELS), ids=[k[1] for k in sorted(SLO_KEY_PANELS)])
def test_slo_panels_return_data(key, traffic, prometheus_url):
    test_key_panels_return_data(key, traffic, prometheus_url)
