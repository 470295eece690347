"""The canary (app/canary.py, sql/011): the mark, the run's verdict, one run per interval
across gunicorn workers, synthetic traces left out of analytics, rollups and the message
metrics, and the migration on a live database."""
from __future__ import annotations

import datetime as dt
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psycopg2
import pytest

from app import canary
from app.config import ConfigError, Settings
from app.telemetry.recorder import Recorder
from app.traces.store import FinishedTrace, NewTrace, TraceStore
from tests.support import (
    API_KEY, ROOT, JsonHandler, LocalHTTPServer, Prometheus, Sandbox, free_port, metric, migrate,
    parse_metrics, rows)
from tests.integration.test_analytics_rollup import assert_rollups_exact, compute, dense_rows, query
from tests.integration.test_traces_api import check_analytics, expected_analytics, insert_rows

UTC = dt.timezone.utc
P = "AUTOMAGIK_OMNI_"


# --- the mark ----------------------------------------------------------------------------

def test_a_mark_verifies_for_its_instance_and_key():
    mark = canary.sign_mark("canary", API_KEY)
    assert mark.startswith(canary.MARK_PREFIX) and len(mark) <= 128
    assert canary.verify_mark("canary", mark, API_KEY)
    assert canary.sign_mark("canary", API_KEY) != mark, "every run needs its own message id"


@pytest.mark.parametrize("why, instance, key, age", [
    ("another instance", "bot", API_KEY, 0),
    ("another API key", "canary", "some-other-key-42", 0),
    ("older than the maximum age", "canary", API_KEY, canary.MARK_MAX_AGE_S + 5),
    ("too far ahead", "canary", API_KEY, -canary.MARK_MAX_AHEAD_S - 5),
])
def test_a_mark_is_refused(why, instance, key, age):
    now = time.time()
    mark = canary.sign_mark("canary", API_KEY, now=now - age)
    assert not canary.verify_mark(instance, mark, key, now=now), why


@pytest.mark.parametrize("message_id", [
    "3EB0C767D0D7", "CANARY-", "CANARY-1766140200-ABCDEFABCDEF-" + "0" * 32,
    "CANARY-1766140200-abcdefabcdef-" + "A" * 32, "CANARY-17661402-ABCDEFABCDEF-" + "A" * 32,
    "canary-1766140200-ABCDEFABCDEF-" + "A" * 32, "CANARY-1766140200-ABCDEFABCDEF-" + "A" * 33,
])
def test_anything_else_is_no_mark(message_id):
    assert not canary.verify_mark("canary", message_id, API_KEY, now=1766140200)


def test_a_tampered_mark_is_refused():
    mark = canary.sign_mark("canary", API_KEY)
    flipped = mark[:-1] + ("A" if mark[-1] != "A" else "B")
    assert not canary.verify_mark("canary", flipped, API_KEY)
    nonce_changed = mark.split("-")
    nonce_changed[2] = "0" * 12
    assert not canary.verify_mark("canary", "-".join(nonce_changed), API_KEY)


# --- the verdict -------------------------------------------------------------------------

@pytest.mark.parametrize("http_status, trace_status, duration, result", [
    (202, "completed", 0.4, "ok"),
    (202, "completed", 10.0, "ok"),      # at the threshold: not slow (as slow_message)
    (202, "completed", 10.001, "slow"),
    (202, "failed", 0.4, "failed"),
    (202, "error", 0.4, "failed"),
    (202, None, 90.0, "failed"),         # no final status by the deadline
    (404, None, 0.01, "failed"),
    (401, None, 0.01, "failed"),
    (503, None, 0.01, "failed"),
    (None, None, 0.01, "failed"),        # nothing answered
])
def test_classify(http_status, trace_status, duration, result):
    assert canary.classify(http_status, trace_status, duration, 10.0) == result


def test_default_url_reaches_the_own_port():
    assert canary.default_url("0.0.0.0", 8882) == "http://127.0.0.1:8882"
    assert canary.default_url("::", 8882) == "http://127.0.0.1:8882"
    assert canary.default_url("10.0.0.5", 9000) == "http://10.0.0.5:9000"
    assert canary.default_url("::1", 9000) == "http://[::1]:9000"


# --- settings ----------------------------------------------------------------------------

def _settings(**values) -> Settings:
    return Settings.from_env({P + "API_KEY": API_KEY, **{P + k.upper(): v for k, v in values.items()}})


def test_canary_settings():
    s = _settings()
    assert (s.canary_instance, s.canary_interval_s, s.canary_url) == (None, 60.0, None)
    s = _settings(canary_instance="canary", canary_interval_s="30", canary_url="https://omni.example:8443",
                  canary_number="5511999990000")
    assert (s.canary_instance, s.canary_interval_s, s.canary_url, s.canary_number) == \
        ("canary", 30.0, "https://omni.example:8443", "5511999990000")
    assert _settings(canary_instance="").canary_instance is None


@pytest.mark.parametrize("values, variable", [
    ({"canary_interval_s": "0"}, "CANARY_INTERVAL_S"),
    ({"canary_interval_s": "0.5"}, "CANARY_INTERVAL_S"),
    ({"canary_interval_s": "-1"}, "CANARY_INTERVAL_S"),
    ({"canary_interval_s": "soon"}, "CANARY_INTERVAL_S"),
    ({"canary_instance": "Canary!"}, "CANARY_INSTANCE"),
    ({"canary_url": "omni:8882"}, "CANARY_URL"),
    ({"canary_number": "+55 11"}, "CANARY_NUMBER"),
    ({"canary_instance": "canary", "enable_tracing": "false"}, "CANARY_INSTANCE"),
])
def test_bad_canary_settings_name_the_variable(values, variable):
    with pytest.raises(ConfigError) as err:
        _settings(**values)
    assert P + variable in str(err.value)


# --- one run, without servers: fakes for the database, instances and traces ----------------

class _Instances:
    def __init__(self, inst):
        self.inst = inst

    def lookup(self, name):
        return self.inst


class _Traces:
    """The store as the canary uses it: the lease and the trace."""

    def __init__(self, final: dict | None, claim=True, fail=False):
        self.final, self.asked = final, []
        self.claim, self.fail, self.finished = claim, fail, []

    def claim_canary_run(self, interval_s, holder):
        if self.fail:
            raise RuntimeError("database unreachable")
        return 7 if self.claim else None

    def canary_run_done(self, result, trace_id):
        self.finished.append({"result": result, "trace_id": trace_id})

    def get(self, trace_id):
        self.asked.append(trace_id)
        if self.final is None or len(self.asked) < 2:
            return {"status": "processing", "duration_ms": None, "error_message": None}
        return self.final


def _instance(secret=None, timeout=0.2):
    from app.instances import Instance
    return Instance(id=1, name="canary", agent_api_url="http://a", agent_api_key=None, agent_name="default",
                    agent_timeout_s=timeout, agent_stream=False, evolution_url="http://e",
                    evolution_api_key=None, evolution_instance="canary", webhook_secret=secret, enabled=True)


class _Webhook(JsonHandler):
    answer: tuple[int, dict] = (202, {})
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        self._answer(*type(self).answer)


def _run(monkeypatch, *, answer=(202, None), final=None, claim=True, db_fail=False, secret=None,
         slow="10", url=None):
    monkeypatch.setattr(canary, "DEADLINE_MARGIN_S", 0.3)
    trace_id = str(uuid.uuid4())
    status, body = answer
    _Webhook.answer = (status, body if body is not None else {"status": "accepted", "trace_id": trace_id})
    _Webhook.seen = []
    with LocalHTTPServer(("127.0.0.1", 0), _Webhook) as server:
        settings = _settings(canary_instance="canary", canary_interval_s="1", slow_message_seconds=slow,
                             evolution_timeout_s="0.2",
                             canary_url=url or f"http://127.0.0.1:{server.server_address[1]}")
        traces = db = _Traces(final, claim, db_fail)
        runner = canary.Canary(settings, _Instances(_instance(secret)), traces, Recorder(), "host:1")
        before = _samples()
        runner.run_once()
    return _Webhook.seen, db, traces, _delta(before)


def _samples() -> dict:
    from prometheus_client import REGISTRY
    from app.telemetry import metrics
    if metrics.multiprocess_enabled():
        return {}
    return {r: REGISTRY.get_sample_value("omni_canary_runs_total", {"result": r}) or 0
            for r in ("ok", "slow", "failed")}


def _delta(before: dict) -> dict:
    after = _samples()
    return {r: after[r] - before[r] for r in after if after[r] != before[r]}


def test_a_run_posts_an_evolution_webhook_with_the_secret_and_a_valid_mark(monkeypatch):
    seen, db, traces, counted = _run(monkeypatch, secret="hook-secret-123",
                                     final={"status": "completed", "duration_ms": 420, "error_message": None})
    assert len(seen) == 1
    path, headers, body = seen[0]
    assert path == "/webhook/evolution/canary"
    assert headers["x-webhook-secret"] == "hook-secret-123"
    assert body["event"] == "messages.upsert" and body["data"]["key"]["fromMe"] is False
    assert canary.verify_mark("canary", body["data"]["key"]["id"], API_KEY)
    assert body["data"]["key"]["remoteJid"] == "15555550100@s.whatsapp.net"
    assert db.finished[-1]["result"] == "ok" and traces.asked
    if counted or _samples():
        assert counted == {"ok": 1}


@pytest.mark.parametrize("answer, final, slow, result", [
    ((202, None), {"status": "completed", "duration_ms": 420, "error_message": None}, "0.1", "slow"),
    ((202, None), {"status": "failed", "duration_ms": 30, "error_message": "agent returned 500"}, "10", "failed"),
    ((202, None), None, "10", "failed"),                                  # still processing at the deadline
    ((404, {"error": "unknown instance: canary"}), None, "10", "failed"),
    ((401, {"error": "missing or invalid webhook secret"}), None, "10", "failed"),
])
def test_a_run_judges_what_it_sees(monkeypatch, answer, final, slow, result):
    _, db, traces, counted = _run(monkeypatch, answer=answer, final=final, slow=slow)
    assert db.finished[-1]["result"] == result
    if answer[0] != 202:
        assert not traces.asked, "a refused webhook has no trace to follow"
    if counted or _samples():
        assert counted == {result: 1}


def test_nothing_listening_is_a_failed_run_not_an_exception(monkeypatch):
    _, db, _, counted = _run(monkeypatch, url=f"http://127.0.0.1:{free_port()}")
    assert db.finished[-1]["result"] == "failed"


def test_no_claim_no_run_and_a_lost_database_never_raises(monkeypatch):
    seen, db, _, counted = _run(monkeypatch, claim=False)
    assert seen == [] and db.finished == [] and not counted
    seen, db, _, counted = _run(monkeypatch, db_fail=True)
    assert seen == [] and not counted


# --- the real thing: gunicorn with 2 workers, PostgreSQL, the sandbox ----------------------

def _add_instance(url: str, name: str, agent_url: str, evolution_url: str, **fields) -> None:
    cols = {"name": name, "agent_api_url": agent_url, "evolution_url": evolution_url,
            "agent_timeout_s": 5, **fields}
    names = ", ".join(cols)
    values = ", ".join(f"%({k})s" for k in cols)
    query(url, f"INSERT INTO instance ({names}) VALUES ({values})", cols)


def _canary_db(pg, agent_url: str, evolution_url: str) -> str:
    url = pg.create_database()
    migrate(url)
    _add_instance(url, "canary", agent_url, evolution_url)
    return url


def _canary_env(**extra) -> dict:
    return {P + "CANARY_INSTANCE": "canary", P + "CANARY_INTERVAL_S": "1", **extra}


def _runs(svc) -> list[dict]:
    return [line for line in svc.log_lines() if line.get("event") == "canary_run"]


def _wait_runs(svc, n: int, timeout: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _runs(svc)
        if len(found) >= n:
            return found
        time.sleep(0.3)
    raise AssertionError(f"{len(_runs(svc))} canary runs after {timeout} s, wanted {n}")


def _forged_marks() -> list[tuple[str, str]]:
    """(instance, message id) of webhooks that look like canaries and are not."""
    now = time.time()
    good = canary.sign_mark("canary", API_KEY, now)
    return [("canary", good[:-4] + "0000"),                                 # signature edited
            ("canary", canary.sign_mark("canary", "not-the-service-api-key", now)),
            ("bot", good)]                                                  # another instance's mark


def test_canary_runs_once_per_interval_marked_and_left_out(pg, sandbox, make_service):
    url = _canary_db(pg, sandbox.url, sandbox.url)
    _add_instance(url, "bot", sandbox.url, sandbox.url)
    svc = make_service(_canary_env(**{P + "SLOW_MESSAGE_SECONDS": "10"}), database_url=url)
    started = time.monotonic()
    prom = Prometheus(f"127.0.0.1:{svc.port}")
    try:
        # Ordinary traffic in the same window: one message, and three forged canary marks.
        answers = [svc.send("bot", "hello, a real person")]
        answers += [svc.send(name, "pretending to be the canary", message_id=mid)
                    for name, mid in _forged_marks()]
        assert [a.status_code for a in answers] == [202] * 4, [a.text for a in answers]
        normal = [svc.wait_final(a.json()["trace_id"]) for a in answers]
        assert all(t["synthetic"] is False and t["status"] == "completed" for t in normal)

        runs = _wait_runs(svc, 5)
        elapsed = time.monotonic() - started
        numbers = [r["run"] for r in runs]
        assert sorted(numbers) == list(range(1, len(runs) + 1)), f"a run claimed twice or skipped: {numbers}"
        # No more claims than intervals (one per second since the first worker started).
        (claimed,) = rows(url, "SELECT runs FROM canary_lease")[0]
        assert claimed <= elapsed + 2, (claimed, elapsed)
        assert {r["result"] for r in runs} == {"ok"}, runs
        assert all(r["duration_ms"] < 10_000 and r["trace_id"] for r in runs)

        # Each run's trace: marked, complete, open to an operator.
        for r in runs:
            t = svc.api("GET", f"/api/v1/traces/{r['trace_id']}").json()
            assert t["synthetic"] is True and t["instance_name"] == "canary" and t["status"] == "completed", t
        # The interval holds across both workers: consecutive runs are about a second apart.
        created = [c for (c,) in rows(url, "SELECT created_at FROM message_trace WHERE synthetic "
                                           "ORDER BY created_at")]
        gaps = [(b - a).total_seconds() for a, b in zip(created, created[1:])]
        assert gaps and min(gaps) > 0.6, gaps
        holders = {r["holder"] for r in runs}
        assert all(h.split(":")[-1].isdigit() for h in holders)

        # Business figures: the 4 ordinary messages, not one canary.
        analytics = svc.api("GET", "/api/v1/traces/analytics").json()
        assert analytics["total"] == 4, analytics
        assert {i["instance_name"]: i["total"] for i in analytics["by_instance"]} == {"bot": 2, "canary": 2}
        assert [u["user_id"] for u in analytics["top_users"]] == ["whatsapp:+5515551234567"]
        assert rows(url, "SELECT sum(messages) FROM trace_rollup_hour")[0][0] == 4

        logs_before = len(_runs(svc))
        samples = parse_metrics(svc.metrics_text())
        logs_after = len(_runs(svc))
        assert metric(samples, "omni_messages_total") == 4
        assert metric(samples, "omni_messages_total", instance_name="canary") == 2     # the forged ones
        assert metric(samples, "omni_message_duration_seconds_count", instance_name="canary") == 2
        assert metric(samples, "omni_message_step_duration_seconds_count", instance_name="canary",
                      step="agent_called") == 2
        assert metric(samples, "omni_webhook_lag_seconds_count", instance_name="canary") == 2
        assert metric(samples, "omni_agent_tokens_total", instance_name="canary") == \
            sum((t["input_tokens"] or 0) + (t["output_tokens"] or 0) for t in normal if t["instance_name"] == "canary")
        ok = metric(samples, "omni_canary_runs_total", result="ok")
        assert logs_before <= ok <= logs_after, (logs_before, ok, logs_after)
        assert metric(samples, "omni_canary_runs_total", result="failed") == 0
        assert ("omni_canary_runs_total", frozenset({("result", "slow")})) in samples, "seeded at 0"
        assert logs_before <= metric(samples, "omni_canary_duration_seconds_count") <= logs_after
        assert metric(samples, "omni_canary_interval_seconds") == 1
        assert metric(samples, "omni_canary_last_run_timestamp_seconds", result="ok") > time.time() - 30

        rejected = [line for line in svc.log_lines() if line.get("event") == "canary_mark_rejected"]
        assert len(rejected) == 3, rejected
        slow_lines = [line for line in svc.log_lines() if line.get("event") == "slow_message"]
        assert not slow_lines

        _check_canary_panels_and_alert(prom)

        # `make smoke` on this stack: the canary's ok runs go up, the SLO rules are loaded and
        # record (their ratios need traffic Prometheus saw: a message after its first scrapes).
        svc.wait_final(svc.send("bot", "traffic for the SLO rules").json()["trace_id"])
        smoke = subprocess.run([sys.executable, "-m", "demo.smoke", "--omni", svc.url, "--api-key", API_KEY,
                                "--sandbox", sandbox.url, "--prometheus", prom.url, "--timeout", "30"],
                               cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr
        for check in ("canary", "slo-rules"):
            assert any(line.startswith(f"ok   {check}") for line in smoke.stdout.splitlines()), smoke.stdout
    finally:
        prom.stop()


def _check_canary_panels_and_alert(prom) -> None:
    """The Canary row of the SLO dashboard and the alert's query have data from this service."""
    from tests import grafana_queries as gq
    from tests.system.test_stack_config import grafana_rule_as_prometheus

    panels = [q for q in gq.promql_queries() if q.source == "omni-slo.json" and q.panel.startswith("Canary")]
    assert len({q.panel for q in panels}) == 3, [q.panel for q in panels]
    for q in panels:
        prom.wait_for(q.expanded(interval="1m", range_="15m"), timeout=40)
    rule = [r for _, r in gq.alert_rules() if r["uid"] == "omni-canary-failing"][0]
    query = [d for d in rule["data"] if d["datasourceUid"] == gq.PROMETHEUS_UID][0]["model"]["expr"]
    # The query always answers (`or vector(0)`): poll until the ok runs have two samples in
    # the window, which a loaded machine's first scrapes may not have yet.
    deadline = time.monotonic() + 40
    value = 0.0
    while time.monotonic() < deadline and value < 1:
        value = float(prom.wait_for(query, timeout=30)[0]["value"][1])
        if value < 1:
            time.sleep(1)
    assert value >= 1, "successful runs were scraped: the alert's query must read healthy"
    assert not prom.query(grafana_rule_as_prometheus(rule)["expr"])["result"], "the alert would fire"


def test_canary_fails_when_the_agent_is_unreachable(pg, sandbox, make_service):
    nowhere = f"http://127.0.0.1:{free_port()}"
    url = _canary_db(pg, nowhere, sandbox.url)
    svc = make_service(_canary_env(), database_url=url)
    runs = _wait_runs(svc, 2)
    assert {r["result"] for r in runs} == {"failed"}, runs
    assert all(r["status"] == "failed" and "agent" in r["error"] for r in runs), runs
    t = svc.api("GET", f"/api/v1/traces/{runs[0]['trace_id']}").json()
    assert t["synthetic"] is True and t["failed_step"] == "agent_called"
    samples = parse_metrics(svc.metrics_text())
    assert metric(samples, "omni_canary_runs_total", result="failed") >= 2
    assert metric(samples, "omni_canary_runs_total", result="ok") == 0
    # A canary's failure is no user's: neither the messages nor the upstream errors count it.
    assert metric(samples, "omni_messages_total") == 0
    assert metric(samples, "omni_upstream_errors_total", upstream="agent") == 0


def test_canary_is_slow_past_the_slow_threshold(pg, make_service):
    box = Sandbox(SANDBOX_LATENCY_MEDIAN_MS="300", SANDBOX_LATENCY_SIGMA="0")
    try:
        url = _canary_db(pg, box.url, box.url)
        svc = make_service(_canary_env(**{P + "SLOW_MESSAGE_SECONDS": "0.1"}), database_url=url)
        runs = _wait_runs(svc, 2)
        assert {r["result"] for r in runs} == {"slow"}, runs
        assert all(r["duration_ms"] >= 300 for r in runs)
        samples = parse_metrics(svc.metrics_text())
        assert metric(samples, "omni_canary_runs_total", result="slow") >= 2
        # The duration histogram's 0.25 s bucket holds none of them, the 0.5 s one all.
        assert metric(samples, "omni_canary_duration_seconds_bucket", le="0.25") == 0
        assert not [line for line in svc.log_lines() if line.get("event") == "slow_message"]
    finally:
        box.stop()


def test_the_lease_has_exactly_one_claimant_per_run(pg):
    """Workers polling at the same instant: one claims, the others see the run taken."""
    from app.db import Database

    url = pg.create_database()
    migrate(url)
    db = Database(url, size=10)
    store = TraceStore(db)
    try:
        for round_ in range(15):
            query(url, "UPDATE canary_lease SET next_run_at = now() - interval '1 second'")
            barrier = threading.Barrier(8)
            won: list = []

            def poll(i, barrier=barrier, won=won):
                barrier.wait()
                run = store.claim_canary_run(60, f"h:{i}")
                if run is not None:
                    won.append(run)

            threads = [threading.Thread(target=poll, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert won == [round_ + 1], won
        # The next run is due one interval after the last was due: the cadence does not drift
        # with when a worker happened to poll.
        query(url, "UPDATE canary_lease SET next_run_at = now() - interval '10 seconds'")
        (due,) = query(url, "SELECT next_run_at FROM canary_lease")[0]
        store.claim_canary_run(60, "h:1")
        (nxt,) = query(url, "SELECT next_run_at FROM canary_lease")[0]
        assert (nxt - due).total_seconds() == 60
        assert store.claim_canary_run(60, "h:1") is None
        # A lease row deleted by hand comes back with the next claim.
        query(url, "DELETE FROM canary_lease")
        assert store.claim_canary_run(60, "h:1") == 1
    finally:
        db.close()


# --- synthetic rows in the rollups and analytics (no servers) -----------------------------

def _synthetic_rows(n: int, now: dt.datetime, seed: int) -> list[dict]:
    found = dense_rows(n, now, seed=seed)
    for r in found:
        r["message_id"] = "S" + r["message_id"]
    return found


def test_synthetic_rows_never_reach_the_rollups_or_analytics(pg):
    url = pg.create_database()
    migrate(url)
    now = dt.datetime.now(UTC)
    real = dense_rows(300, now, seed=3)
    fake = _synthetic_rows(200, now, seed=4)
    insert_rows(url, real + fake)
    # Marking rows synthetic after the fact (final -> final updates) takes them out ...
    query(url, "UPDATE message_trace SET synthetic = true WHERE message_id LIKE 'S%'")
    assert_rollups_exact(url)
    # ... and the writer's path (inserted processing, finished in a later batch) never adds them.
    conn = psycopg2.connect(url)
    conn.autocommit = True
    rng = random.Random(5)
    new = [NewTrace(uuid.uuid4(), 1, "alpha", f"canary-{i}", "whatsapp:+15555550100", "hi",
                    now - dt.timedelta(minutes=i), [], "h:1", synthetic=True) for i in range(20)]
    with conn.cursor() as cur:
        TraceStore.write_batch(cur, new, [])
        TraceStore.finish(cur, [FinishedTrace(r.trace_id, rng.choice(["completed", "failed"]), 400 + i, "ok",
                                              [{"step": "agent_called", "status": "success",
                                                "duration_ms": 300, "timestamp": None}], None, None)
                                for i, r in enumerate(new)])
    conn.close()
    assert_rollups_exact(url)
    assert rows(url, "SELECT count(*) FROM message_trace WHERE synthetic")[0][0] == 220
    # Deletes of synthetic rows (retention, by hand) subtract nothing.
    query(url, "DELETE FROM message_trace WHERE message_id LIKE 'canary-1%'")
    assert_rollups_exact(url)

    periods = [(None, None), (now - dt.timedelta(days=2, minutes=17), now - dt.timedelta(hours=5)),
               (now - dt.timedelta(minutes=50), None)]
    for start, end in periods:
        want = expected_analytics(real, start=start, end=end)
        check_analytics(compute(url, start=start, end=end), want)
        # Percentiles from the histograms (above EXACT_PERCENTILE_MAX): within about 1 %.
        got = compute(url, start=start, end=end, exact_max=0)
        assert [got[k] for k in ("total", "completed", "failed", "error")] == \
            [want[k] for k in ("total", "completed", "failed", "error")]
        for key in ("p50_duration_ms", "p95_duration_ms", "p99_duration_ms"):
            assert got[key] == (None if want[key] is None else pytest.approx(want[key], rel=0.015)), key
    # Unmarking puts a row back: the filter is the mark, nothing else.
    query(url, "UPDATE message_trace SET synthetic = false WHERE message_id LIKE 'S%'")
    assert_rollups_exact(url)
    assert compute(url)["total"] == len(real) + len(fake)


# --- the migration -----------------------------------------------------------------------

def test_migration_from_an_empty_database(pg):
    url = pg.create_database()
    migrate(url)
    col = rows(url, """SELECT data_type, is_nullable, column_default FROM information_schema.columns
                       WHERE table_name = 'message_trace' AND column_name = 'synthetic'""")
    assert col == [("boolean", "NO", "false")]
    assert rows(url, "SELECT runs, holder FROM canary_lease") == [(0, None)]
    src = rows(url, "SELECT prosrc FROM pg_proc WHERE proname = 'trace_rollup_trigger'")[0][0]
    finals = src.count("status IN ('completed', 'failed', 'error')")
    assert finals > 0 and src.count("status IN ('completed', 'failed', 'error') AND NOT synthetic") == finals


def test_migration_applies_to_a_live_database_with_rows(pg, monkeypatch):
    import app.db
    from app.db import migrate as run_migrate

    url = pg.create_database()
    before = Path(tempfile.mkdtemp())
    try:
        for p in sorted((ROOT / "sql").glob("0[01][0-9]_*.sql")):
            if p.name < "011":
                shutil.copy(p, before)
        run_migrate(url, before)
    finally:
        shutil.rmtree(before)
    real = dense_rows(300, dt.datetime.now(UTC), seed=9)
    insert_rows(url, real)
    (node,) = rows(url, "SELECT pg_relation_filenode('message_trace')")[0]

    # A long transaction holding a lock on message_trace: the runner gives up (here after
    # 1 s of short tries) instead of queueing every writer behind it, and can be run again.
    monkeypatch.setattr(app.db, "MIGRATION_LOCK_PATIENCE_S", 1.0)
    holder = psycopg2.connect(url)
    with holder.cursor() as cur:
        cur.execute("SELECT count(*) FROM message_trace")
    t0 = time.monotonic()
    with pytest.raises(Exception, match="stayed in use by another transaction"):
        run_migrate(url)
    assert time.monotonic() - t0 < 20
    holder.close()

    assert run_migrate(url) == ["011_canary.sql"]
    assert rows(url, "SELECT pg_relation_filenode('message_trace')")[0][0] == node, "table rewritten"
    assert rows(url, "SELECT count(*), bool_or(synthetic) FROM message_trace") == [(300, False)]
    assert_rollups_exact(url)
    assert compute(url)["total"] == 300
