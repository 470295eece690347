"""The trace API (SPEC 4.6) against a real PostgreSQL: filters, cursors, one trace,
analytics and deletion, each compared with figures computed independently in Python
from the rows the test inserted itself."""
from __future__ import annotations

import base64
import datetime as dt
import math
import random
import re
import uuid
from collections import Counter
from decimal import Decimal
from urllib.parse import parse_qsl, urlparse

import psycopg2
import psycopg2.extras
import pytest

from app.vocabulary import STEPS
from tests.support import API_KEY, migrate

H = {"x-api-key": API_KEY}
UTC = dt.timezone.utc

INSTANCES = {"alpha": 1, "beta": 2, "gamma": 3}
USERS = [f"whatsapp:+55155500000{i:02d}" for i in range(12)]
TRACE_KEYS = {"trace_id", "instance_id", "instance_name", "user_id", "message_content",
              "response_content", "status", "duration_ms", "created_at", "updated_at",
              "failed_step", "error_message", "steps", "message_type", "remote_jid",
              "platform_timestamp", "reply_message_id", "delivered_at", "read_at",
              "input_tokens", "output_tokens", "cost_usd", "agent_session_id", "synthetic"}
Z_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")

psycopg2.extras.register_uuid()


# --- synthetic data -----------------------------------------------------------------------

def zulu(ts: dt.datetime) -> str:
    """ISO 8601 with a Z, microseconds kept."""
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def make_row(rng: random.Random, created_at: dt.datetime, *, status: str | None = None,
             instance: str | None = None, user: str | None = None,
             duration_ms: int | None = None, failed_step: str | None = None) -> dict:
    """One message_trace row (as a dict of column values) with 4 plausible steps."""
    status = status or rng.choices(["completed", "failed", "error", "processing"], [60, 20, 10, 10])[0]
    instance = instance or rng.choice(sorted(INSTANCES))
    user = user or rng.choice(USERS[: 4 + INSTANCES[instance] * 2])
    durations = [rng.randint(1, 30), rng.randint(1, 20),
                 int(rng.choice([rng.uniform(50, 4000), rng.uniform(50, 4000), rng.uniform(4000, 20000)])),
                 rng.randint(10, 500)]
    step_status = ["success"] * 4
    error_message = None
    if status == "processing":
        durations[2:] = [None, None]
        steps_n = 2
        failed_step = None
    else:
        steps_n = 4
        if status in ("failed", "error"):
            failed_step = failed_step or rng.choice(
                ["agent_called", "agent_called", "evolution_send"] if status == "failed"
                else ["instance_validated", "agent_called", "evolution_send"])
            idx = STEPS.index(failed_step)
            step_status[idx] = "failed"
            for later in range(idx + 1, 4):
                step_status[later] = "skipped"
                durations[later] = None
            error_message = f"{failed_step} said no"
        else:
            failed_step = None
    if status != "processing" and duration_ms is None:
        duration_ms = sum(d for d in durations if d is not None) + rng.randint(0, 20)
    if status == "processing":
        duration_ms = None
    steps = []
    t = created_at
    for i in range(steps_n):
        entry = {"step": STEPS[i], "status": step_status[i], "duration_ms": durations[i],
                 "timestamp": zulu(t)}
        if step_status[i] == "failed":
            entry["error"] = error_message
        steps.append(entry)
        t = t + dt.timedelta(milliseconds=durations[i] or 0)
    return with_usage({
        "trace_id": uuid.UUID(int=rng.getrandbits(128), version=4),
        "instance_id": INSTANCES[instance], "instance_name": instance,
        "message_id": "MSG" + uuid.UUID(int=rng.getrandbits(128)).hex[:20].upper(),
        "user_id": user, "message_content": f"hello {rng.randint(0, 10**6)}",
        "response_content": None if status != "completed" else "a reply",
        "status": status, "duration_ms": duration_ms, "created_at": created_at,
        "updated_at": created_at + dt.timedelta(milliseconds=duration_ms or 0),
        "steps": steps, "failed_step": failed_step, "error_message": error_message,
    })


PRICES = [(Decimal("3"), Decimal("15")), (Decimal("0.15"), Decimal("0.6")), (Decimal("0.1"), None)]


def with_usage(row: dict) -> dict:
    """The agent's usage and cost on a row whose agent answered, as the pipeline stores them.

    From its own generator seeded by the trace id, so the rows' other values (and the tests
    written around them) stay what they were.
    """
    rng = random.Random(row["trace_id"].int)
    row.update(input_tokens=None, output_tokens=None, cost_usd=None, agent_session_id=None)
    if row["status"] == "processing" or row["failed_step"] not in (None, "evolution_send"):
        return row
    if rng.random() < 0.8:
        row["input_tokens"] = rng.choice([0, rng.randint(1, 4000)])
        row["output_tokens"] = rng.randint(0, 3000)
        row["agent_session_id"] = f"sess-{rng.randint(1, 50)}"
        price_in, price_out = rng.choice(PRICES + [(None, None)])
        if price_in is not None and (price_out is not None or not row["output_tokens"]):
            row["cost_usd"] = (row["input_tokens"] * price_in
                               + row["output_tokens"] * (price_out or 0)) / 1_000_000
    return row


def seed_rows(n: int = 300, seed: int = 7, now: dt.datetime | None = None) -> list[dict]:
    """n rows over 40 days, with ties on created_at and values on every filter boundary."""
    rng = random.Random(seed)
    now = now or dt.datetime.now(UTC)
    rows = []
    for _ in range(n):
        status = rng.choices(["completed", "failed", "error", "processing"], [60, 20, 10, 10])[0]
        if status == "processing":
            # In-flight messages are recent (minutes old at most).
            created = now - dt.timedelta(seconds=rng.uniform(5, 600))
        else:
            created = now - dt.timedelta(days=1) - dt.timedelta(seconds=rng.uniform(0, 39 * 86400))
        rows.append(make_row(rng, created, status=status))
    # Ties: several rows share a created_at exactly (order falls back to trace_id desc).
    for k in range(0, 30, 3):
        rows[k + 1]["created_at"] = rows[k]["created_at"]
        rows[k + 2]["created_at"] = rows[k]["created_at"]
    # Exact boundary durations.
    finished = [r for r in rows if r["status"] != "processing"]
    for r, ms in zip(finished[40:46], (10000, 10000, 5000, 10001, 9999, 0)):
        r["duration_ms"] = ms
    return rows


def insert_rows(url: str, rows: list[dict], *, usage: bool = True) -> None:
    """Insert straight into message_trace with psycopg2 (without usage: a schema before sql/010)."""
    if not usage:
        return insert_rows_without_usage(url, rows)
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        psycopg2.extras.execute_values(
            cur,
            """INSERT INTO message_trace (trace_id, instance_id, instance_name, message_id, user_id,
                   message_content, response_content, status, duration_ms, created_at, updated_at,
                   steps, failed_step, error_message, input_tokens, output_tokens, cost_usd,
                   agent_session_id) VALUES %s""",
            [(r["trace_id"], r["instance_id"], r["instance_name"], r["message_id"], r["user_id"],
              r["message_content"], r["response_content"], r["status"], r["duration_ms"],
              r["created_at"], r["updated_at"], psycopg2.extras.Json(r["steps"]), r["failed_step"],
              r["error_message"], r.get("input_tokens"), r.get("output_tokens"), r.get("cost_usd"),
              r.get("agent_session_id")) for r in rows])
    conn.close()


def insert_rows_without_usage(url: str, rows: list[dict]) -> None:
    """The rows' columns that every schema has; their usage is left unknown."""
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        psycopg2.extras.execute_values(
            cur,
            """INSERT INTO message_trace (trace_id, instance_id, instance_name, message_id, user_id,
                   message_content, response_content, status, duration_ms, created_at, updated_at,
                   steps, failed_step, error_message) VALUES %s""",
            [(r["trace_id"], r["instance_id"], r["instance_name"], r["message_id"], r["user_id"],
              r["message_content"], r["response_content"], r["status"], r["duration_ms"],
              r["created_at"], r["updated_at"], psycopg2.extras.Json(r["steps"]), r["failed_step"],
              r["error_message"]) for r in rows])
    conn.close()


def count_rows(url: str) -> int:
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM message_trace")
        n = cur.fetchone()[0]
    conn.close()
    return n


# --- expectations computed in Python ------------------------------------------------------

def newest_first(rows):
    return sorted(rows, key=lambda r: (r["created_at"], r["trace_id"]), reverse=True)


def expected_list(rows, instance_name=None, status=None, user_id=None, min_duration=None,
                  max_duration=None, start_date=None, end_date=None, failed_step=None):
    out = []
    for r in rows:
        if instance_name is not None and r["instance_name"] != instance_name:
            continue
        if status is not None and r["status"] != status:
            continue
        if user_id is not None and r["user_id"] != user_id:
            continue
        if min_duration is not None and (r["duration_ms"] is None or r["duration_ms"] < min_duration):
            continue
        if max_duration is not None and (r["duration_ms"] is None or r["duration_ms"] > max_duration):
            continue
        if start_date is not None and r["created_at"] < start_date:
            continue
        if end_date is not None and r["created_at"] > end_date:
            continue
        if failed_step is not None and r["failed_step"] != failed_step:
            continue
        out.append(r)
    return newest_first(out)


def percentile_cont(values, p):
    """PostgreSQL's percentile_cont: linear interpolation between the closest ranks."""
    if not values:
        return None
    v = sorted(values)
    pos = p * (len(v) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def rate(part, whole):
    return round(100.0 * part / whole, 2) if whole else 0.0


def trunc(ts: dt.datetime, interval: str) -> dt.datetime:
    ts = ts.astimezone(UTC)
    if interval == "hour":
        return ts.replace(minute=0, second=0, microsecond=0)
    day = ts.replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == "day":
        return day
    if interval == "week":
        return day - dt.timedelta(days=day.weekday())
    return day.replace(day=1)


def expected_usage(rows) -> dict:
    """Tokens and cost summed in Python; None where no row knew them."""
    used = [r for r in rows if r.get("input_tokens") is not None or r.get("output_tokens") is not None]
    costs = [r["cost_usd"] for r in rows if r.get("cost_usd") is not None]
    return {"input_tokens": sum(r["input_tokens"] or 0 for r in used) if used else None,
            "output_tokens": sum(r["output_tokens"] or 0 for r in used) if used else None,
            "cost_usd": sum(costs, Decimal(0)) if costs else None}


def expected_analytics(rows, *, start=None, end=None, instance=None, interval="day", top=10,
                       slow_ms=10000):
    sel = [r for r in rows
           if (start is None or r["created_at"] >= start) and (end is None or r["created_at"] <= end)
           and (instance is None or r["instance_name"] == instance)]
    fin = [r for r in sel if r["status"] != "processing"]
    durs = [r["duration_ms"] for r in fin]
    by_status = Counter(r["status"] for r in sel)
    out = {
        "total": len(sel), "completed": by_status["completed"], "failed": by_status["failed"],
        "error": by_status["error"],
        "success_rate": rate(by_status["completed"], len(fin)),
        "avg_duration_ms": sum(durs) / len(durs) if durs else None,
        "p50_duration_ms": percentile_cont(durs, 0.5),
        "p95_duration_ms": percentile_cont(durs, 0.95),
        "p99_duration_ms": percentile_cont(durs, 0.99),
        "slow_messages": sum(1 for r in sel if r["duration_ms"] is not None and r["duration_ms"] > slow_ms),
    }
    by_inst = []
    for name in {r["instance_name"] for r in sel}:
        mine = [r for r in sel if r["instance_name"] == name]
        mine_fin = [r["duration_ms"] for r in mine if r["status"] != "processing"]
        by_inst.append({"instance_name": name, "total": len(mine),
                        "success_rate": rate(sum(r["status"] == "completed" for r in mine), len(mine_fin)),
                        "avg_duration_ms": sum(mine_fin) / len(mine_fin) if mine_fin else None,
                        **expected_usage(mine)})
    out["by_instance"] = sorted(by_inst, key=lambda d: (-d["total"], d["instance_name"]))
    buckets: dict = {}
    for r in sel:
        b = buckets.setdefault(trunc(r["created_at"], interval), {"total": 0, "failed": 0, "rows": []})
        b["total"] += 1
        b["failed"] += r["status"] in ("failed", "error")
        b["rows"].append(r)
    out["volume"] = [{"bucket": k, "total": v["total"], "failed": v["failed"],
                      "cost_usd": expected_usage(v["rows"])["cost_usd"]} for k, v in sorted(buckets.items())]
    users = Counter(r["user_id"] for r in sel)
    out["top_users"] = [{"user_id": u, "total": n, **expected_usage([r for r in sel if r["user_id"] == u])}
                        for u, n in sorted(users.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    out["usage"] = expected_usage(sel)
    hours = Counter(r["created_at"].astimezone(UTC).hour for r in sel)
    out["peak_hours"] = [{"hour": h, "total": n}
                         for h, n in sorted(hours.items(), key=lambda kv: (-kv[1], kv[0]))]
    total_ms = sum(durs)
    steps = []
    for name in STEPS:
        ms = [s["duration_ms"] for r in fin for s in r["steps"]
              if s["step"] == name and s["duration_ms"] is not None]
        if not ms:
            continue
        steps.append({"step": name, "avg_duration_ms": sum(ms) / len(ms),
                      "p95_duration_ms": percentile_cont(ms, 0.95),
                      "share_of_total": sum(ms) / total_ms if total_ms else None})
    out["steps"] = steps
    return out


def assert_close(got, want, tol, what):
    if want is None:
        assert got is None, f"{what}: {got!r} != None"
    else:
        assert got is not None and abs(got - want) <= tol, f"{what}: {got!r} != {want!r}"


def check_usage(got: dict, want: dict, what: str) -> None:
    """Token sums exactly; cost to the 8 decimals the API shows."""
    assert (got["input_tokens"], got["output_tokens"]) == (want["input_tokens"], want["output_tokens"]), \
        (what, got, want)
    if want["cost_usd"] is None:
        assert got["cost_usd"] is None, (what, got)
    else:
        assert got["cost_usd"] == round(float(want["cost_usd"]), 8), (what, got, want)


def check_analytics(body: dict, want: dict) -> None:
    for key in ("total", "completed", "failed", "error", "slow_messages"):
        assert body[key] == want[key], (key, body[key], want[key])
    assert_close(body["success_rate"], want["success_rate"], 0.006, "success_rate")
    for key in ("avg_duration_ms", "p50_duration_ms", "p95_duration_ms", "p99_duration_ms"):
        assert_close(body[key], want[key], 0.006, key)
    assert [d["instance_name"] for d in body["by_instance"]] == \
        [d["instance_name"] for d in want["by_instance"]]
    for got, exp in zip(body["by_instance"], want["by_instance"]):
        assert set(got) == {"instance_name", "total", "success_rate", "avg_duration_ms",
                            "input_tokens", "output_tokens", "cost_usd"}
        assert got["total"] == exp["total"], got
        check_usage(got, exp, got["instance_name"])
        assert_close(got["success_rate"], exp["success_rate"], 0.006, f"{got['instance_name']} rate")
        assert_close(got["avg_duration_ms"], exp["avg_duration_ms"], 0.006, f"{got['instance_name']} avg")
    assert len(body["volume"]) == len(want["volume"])
    for got, exp in zip(body["volume"], want["volume"]):
        assert set(got) == {"bucket", "total", "failed", "cost_usd"}
        assert got["bucket"].endswith("Z"), got
        assert dt.datetime.fromisoformat(got["bucket"]) == exp["bucket"], (got, exp)
        assert (got["total"], got["failed"]) == (exp["total"], exp["failed"]), (got, exp)
        check_usage({"input_tokens": None, "output_tokens": None, **got},
                    {**exp, "input_tokens": None, "output_tokens": None}, got["bucket"])
    assert [(u["user_id"], u["total"]) for u in body["top_users"]] == \
        [(u["user_id"], u["total"]) for u in want["top_users"]]
    for got, exp in zip(body["top_users"], want["top_users"]):
        assert set(got) == {"user_id", "total", "input_tokens", "output_tokens", "cost_usd"}
        check_usage(got, exp, got["user_id"])
    assert set(body["usage"]) == {"input_tokens", "output_tokens", "cost_usd"}
    check_usage(body["usage"], want["usage"], "usage")
    assert body["peak_hours"] == want["peak_hours"]
    assert [s["step"] for s in body["steps"]] == [s["step"] for s in want["steps"]]
    for got, exp in zip(body["steps"], want["steps"]):
        assert set(got) == {"step", "avg_duration_ms", "p95_duration_ms", "share_of_total"}
        assert_close(got["avg_duration_ms"], exp["avg_duration_ms"], 0.006, got["step"] + " avg")
        assert_close(got["p95_duration_ms"], exp["p95_duration_ms"], 0.006, got["step"] + " p95")
        assert_close(got["share_of_total"], exp["share_of_total"], 0.00006, got["step"] + " share")


# --- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seeded(pg):
    """A migrated database holding 300 synthetic traces (read-only for the tests using it)."""
    url = pg.create_database()
    migrate(url)
    rows = seed_rows()
    insert_rows(url, rows)
    return url, rows


@pytest.fixture()
def client(app_factory, seeded):
    # Tracing off: no periodic sweep or purge may rewrite the seeded rows under the test.
    app = app_factory(seeded[0], enable_tracing=False, trace_retention_days=36500)
    return app.test_client()


@pytest.fixture()
def rows(seeded):
    return seeded[1]


def get_list(client, **params):
    r = client.get("/api/v1/traces", query_string=params, headers=H)
    assert r.status_code == 200, r.get_json()
    return r


def ids(items):
    return [str(x["trace_id"]) for x in items]


# --- list filters ---------------------------------------------------------------------------

def test_default_list_is_newest_first_limit_50(client, rows):
    r = get_list(client)
    assert ids(r.get_json()) == ids(newest_first(rows)[:50])
    assert r.headers["X-Next-Cursor"]


def single_filters(rows):
    """(params for the API, kwargs for expected_list) for each filter alone."""
    some = sorted(rows, key=lambda r: r["created_at"])
    start, end = some[100]["created_at"], some[200]["created_at"]
    return [
        ({"instance_name": "beta"}, {"instance_name": "beta"}),
        ({"instance_name": "nope"}, {"instance_name": "nope"}),
        ({"status": "completed"}, {"status": "completed"}),
        ({"status": "failed"}, {"status": "failed"}),
        ({"status": "error"}, {"status": "error"}),
        ({"status": "processing"}, {"status": "processing"}),
        ({"user_id": USERS[3]}, {"user_id": USERS[3]}),
        ({"min_duration": 10000}, {"min_duration": 10000}),
        ({"min_duration": 0}, {"min_duration": 0}),
        ({"max_duration": 5000}, {"max_duration": 5000}),
        ({"max_duration": 0}, {"max_duration": 0}),
        # Exactly a row's created_at: both ends are inclusive.
        ({"start_date": zulu(start)}, {"start_date": start}),
        ({"end_date": zulu(end)}, {"end_date": end}),
        ({"failed_step": "agent_called"}, {"failed_step": "agent_called"}),
        ({"failed_step": "evolution_send"}, {"failed_step": "evolution_send"}),
        ({"failed_step": "webhook_received"}, {"failed_step": "webhook_received"}),
    ]


def test_each_filter_alone(client, rows):
    nonempty = 0
    for params, kwargs in single_filters(rows):
        want = expected_list(rows, **kwargs)
        got = get_list(client, limit=1000, **params).get_json()
        assert ids(got) == ids(want), params
        nonempty += 0 < len(want) < len(rows)
    assert nonempty >= 12, "the seed is too uniform for the filters to mean anything"


def test_duration_bounds_are_inclusive(client, rows):
    got = get_list(client, min_duration=10000, max_duration=10000, limit=1000).get_json()
    assert len(got) == 2 and all(t["duration_ms"] == 10000 for t in got)
    assert ids(got) == ids(expected_list(rows, min_duration=10000, max_duration=10000))


def test_limit_alone(client, rows):
    for limit in (1, 7, 300, 1000):
        got = get_list(client, limit=limit).get_json()
        assert ids(got) == ids(newest_first(rows)[:limit]), limit


def test_filter_combinations(client, rows):
    some = sorted(rows, key=lambda r: r["created_at"])
    start, end = some[50]["created_at"], some[250]["created_at"]
    combos = [
        {"instance_name": "alpha", "status": "completed"},
        {"instance_name": "gamma", "status": "failed", "failed_step": "agent_called"},
        {"user_id": USERS[2], "status": "completed", "min_duration": 1000},
        {"min_duration": 500, "max_duration": 3000},
        {"start_date": start, "end_date": end, "instance_name": "beta"},
        {"start_date": start, "end_date": end, "status": "error", "max_duration": 20000},
        {"failed_step": "evolution_send", "instance_name": "alpha", "user_id": USERS[1]},
        {"instance_name": "beta", "status": "completed", "user_id": USERS[5], "min_duration": 100,
         "max_duration": 15000, "start_date": start, "end_date": end},
        {"min_duration": 3000, "max_duration": 1000},   # empty by construction
    ]
    nonempty = 0
    for kwargs in combos:
        params = {k: zulu(v) if isinstance(v, dt.datetime) else v for k, v in kwargs.items()}
        want = expected_list(rows, **kwargs)
        nonempty += bool(want)
        assert ids(get_list(client, limit=1000, **params).get_json()) == ids(want), kwargs
        # The same filter under a small limit is the head of the same list.
        assert ids(get_list(client, limit=3, **params).get_json()) == ids(want[:3]), kwargs
    assert nonempty >= 6


def test_dates_accept_plain_dates_and_offsets(client, rows):
    day = (dt.datetime.now(UTC) - dt.timedelta(days=10)).date()
    start = dt.datetime(day.year, day.month, day.day, tzinfo=UTC)
    want = expected_list(rows, start_date=start)
    assert ids(get_list(client, start_date=day.isoformat(), limit=1000).get_json()) == ids(want)
    # The same instant written with a +02:00 offset.
    local = start.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()
    assert ids(get_list(client, start_date=local, limit=1000).get_json()) == ids(want)


@pytest.mark.parametrize("param,value", [
    ("status", "done"), ("status", ""), ("status", "COMPLETED"),
    ("limit", "0"), ("limit", "1001"), ("limit", "-1"), ("limit", "ten"), ("limit", "1.5"),
    ("min_duration", "x"), ("min_duration", "-1"), ("max_duration", "1e3"), ("max_duration", ""),
    ("start_date", "yesterday"), ("start_date", "2024-13-01"), ("end_date", "2024-02-30T00:00:00Z"),
    ("end_date", ""),
    ("cursor", "garbage"), ("cursor", "!!!"), ("cursor", ""),
    ("failed_step", "agent"), ("failed_step", ""),
    ("instance_name", ""), ("user_id", "x" * 300),
])
def test_bad_list_values_are_400_naming_the_parameter(client, param, value):
    r = client.get("/api/v1/traces", query_string={param: value}, headers=H)
    assert r.status_code == 400, (param, value, r.status_code, r.get_data(as_text=True))
    body = r.get_json()
    assert param in body["error"], body
    assert body["detail"]["parameter"] == param


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize("raw", [
    b"[1, 2]", b"null", b'"ab"', b'{"a": 1, "b": 2}', b"[]", b'["2024-01-01T00:00:00Z"]',
    b'["2024-01-01T00:00:00Z", "not-a-uuid"]', b'["not a date", "00000000-0000-0000-0000-000000000000"]',
    b"\xff\xfe\x00", b"[" * 5000,
])
def test_forged_cursors_are_400(client, raw):
    r = client.get("/api/v1/traces", query_string={"cursor": b64(raw)}, headers=H)
    assert r.status_code == 400, (raw[:40], r.status_code, r.get_data(as_text=True)[:200])
    assert r.get_json()["detail"]["parameter"] == "cursor"


# --- pagination -----------------------------------------------------------------------------

def walk(client, params, limit=7, follow_link=False):
    """Every page of a listing; checks the headers on the way."""
    pages = []
    query = {**params, "limit": limit}
    path = "/api/v1/traces"
    for _ in range(1000):
        r = client.get(path, query_string=query, headers=H)
        assert r.status_code == 200, r.get_json()
        page = r.get_json()
        pages.append(page)
        cursor = r.headers.get("X-Next-Cursor")
        link = r.headers.get("Link")
        if cursor is None:
            assert link is None, link
            return pages
        assert len(page) == limit
        m = re.fullmatch(r'<([^>]+)>; rel="next"', link or "")
        assert m, link
        url = urlparse(m.group(1))
        assert url.path == "/api/v1/traces"
        link_args = dict(parse_qsl(url.query))
        assert link_args["cursor"] == cursor
        assert {k: v for k, v in link_args.items() if k != "cursor"} == \
            {k: str(v) for k, v in query.items() if k != "cursor"}
        query = link_args if follow_link else {**query, "cursor": cursor}
    raise AssertionError("pagination never ended")


@pytest.mark.parametrize("kwargs", [{}, {"instance_name": "alpha"}, {"status": "completed", "min_duration": 200},
                                    {"failed_step": "agent_called"}])
def test_walk_every_page(client, rows, kwargs):
    want = expected_list(rows, **kwargs)
    assert len(want) > 14
    pages = walk(client, kwargs, follow_link=bool(kwargs))
    got = [t for page in pages for t in page]
    assert ids(got) == ids(want)                      # same order, no gap
    assert len(set(ids(got))) == len(got)             # no repeat
    assert len(pages) == math.ceil(len(want) / 7) or (len(want) % 7 == 0 and len(pages) == len(want) // 7)
    assert all(len(p) == 7 for p in pages[:-1]) and 1 <= len(pages[-1]) <= 7


def test_no_next_page_when_the_last_page_is_exactly_full(client, rows):
    n = len(expected_list(rows, instance_name="gamma"))
    r = get_list(client, instance_name="gamma", limit=n)
    assert len(r.get_json()) == n
    assert "X-Next-Cursor" not in r.headers and "Link" not in r.headers
    r = get_list(client, instance_name="gamma", limit=n - 1)
    assert r.headers["X-Next-Cursor"] and 'rel="next"' in r.headers["Link"]
    last = get_list(client, instance_name="gamma", limit=n - 1, cursor=r.headers["X-Next-Cursor"])
    assert len(last.get_json()) == 1 and "X-Next-Cursor" not in last.headers and "Link" not in last.headers


def test_ties_on_created_at_are_ordered_by_trace_id_and_paged_without_loss(client, rows):
    tied = Counter(r["created_at"] for r in rows)
    at, n = tied.most_common(1)[0]
    assert n >= 3
    group = [r for r in rows if r["created_at"] == at]
    got = get_list(client, start_date=zulu(at), end_date=zulu(at)).get_json()
    assert ids(got) == [str(t) for t in sorted((r["trace_id"] for r in group), reverse=True)]
    pages = walk(client, {"start_date": zulu(at), "end_date": zulu(at)}, limit=1)
    assert [t["trace_id"] for p in pages for t in p] == ids(got)


def test_pagination_while_newer_rows_arrive(app_factory, pg):
    url = pg.create_database()
    migrate(url)
    now = dt.datetime.now(UTC)
    rng = random.Random(99)
    original = [make_row(rng, now - dt.timedelta(hours=1, seconds=rng.uniform(0, 86400)))
                for _ in range(60)]
    insert_rows(url, original)
    client = app_factory(url, enable_tracing=False, trace_retention_days=36500).test_client()
    seen = []
    cursor = None
    added = 0
    while True:
        r = get_list(client, limit=7, **({"cursor": cursor} if cursor else {}))
        seen += ids(r.get_json())
        # New messages arrive between page fetches, newer than everything listed so far.
        newer = [make_row(rng, dt.datetime.now(UTC) + dt.timedelta(seconds=added + i)) for i in range(3)]
        insert_rows(url, newer)
        added += 3
        cursor = r.headers.get("X-Next-Cursor")
        if cursor is None:
            break
    assert seen == ids(newest_first(original))
    assert count_rows(url) == 60 + added


# --- one trace ------------------------------------------------------------------------------

def test_trace_shape_exactly_as_spec(client, rows):
    for t in get_list(client, limit=1000).get_json():
        assert set(t) == TRACE_KEYS, set(t) ^ TRACE_KEYS
        assert str(uuid.UUID(t["trace_id"])) == t["trace_id"]
        assert isinstance(t["instance_id"], int) and not isinstance(t["instance_id"], bool)
        assert Z_RE.match(t["created_at"]) and Z_RE.match(t["updated_at"]), t
        assert t["status"] in ("processing", "completed", "failed", "error")
        assert [s["step"] for s in t["steps"]] == list(STEPS[:len(t["steps"])])
        for s in t["steps"]:
            assert {"step", "status", "duration_ms", "timestamp"} <= set(s)
            assert s["status"] in ("success", "failed", "skipped")
            assert Z_RE.match(s["timestamp"])
            assert ("error" in s) == (s["status"] == "failed")
        if t["status"] != "processing":
            assert len(t["steps"]) == 4 and isinstance(t["duration_ms"], int)


def test_get_one_trace(client, rows):
    for row in (rows[0], rows[17], next(r for r in rows if r["status"] == "failed")):
        r = client.get(f"/api/v1/traces/{row['trace_id']}", headers=H)
        assert r.status_code == 200
        t = r.get_json()
        assert set(t) == TRACE_KEYS
        for key in ("instance_id", "instance_name", "user_id", "message_content", "response_content",
                    "status", "duration_ms", "steps", "failed_step", "error_message"):
            assert t[key] == row[key], key
        assert t["trace_id"] == str(row["trace_id"])
        assert dt.datetime.fromisoformat(t["created_at"]) == row["created_at"].replace(
            microsecond=row["created_at"].microsecond // 1000 * 1000)
        # The upper-case spelling is the same UUID.
        assert client.get(f"/api/v1/traces/{str(row['trace_id']).upper()}", headers=H).status_code == 200


def test_get_one_trace_404_and_400(client):
    r = client.get(f"/api/v1/traces/{uuid.uuid4()}", headers=H)
    assert r.status_code == 404 and "error" in r.get_json()
    for bad in ("not-a-uuid", "123", "00000000-0000-0000-0000-00000000000g"):
        r = client.get(f"/api/v1/traces/{bad}", headers=H)
        assert r.status_code == 400, bad
        assert r.get_json()["detail"]["parameter"] == "trace_id"


def test_api_key_required(client, seeded):
    before = count_rows(seeded[0])
    tid = seeded[1][0]["trace_id"]
    for headers in ({}, {"x-api-key": "wrong-" + API_KEY}):
        for method, path in (("GET", "/api/v1/traces"), ("GET", f"/api/v1/traces/{tid}"),
                             ("GET", "/api/v1/traces/analytics"),
                             ("DELETE", "/api/v1/traces?older_than_days=0")):
            r = client.open(path, method=method, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            body = r.get_json()
            assert set(body) <= {"error", "detail"} and body["error"]
    assert count_rows(seeded[0]) == before


# --- analytics ------------------------------------------------------------------------------

def get_analytics(client, **params):
    r = client.get("/api/v1/traces/analytics", query_string=params, headers=H)
    assert r.status_code == 200, r.get_json()
    return r.get_json()


def test_analytics_all_traces(client, rows):
    body = get_analytics(client)
    want = expected_analytics(rows)
    check_analytics(body, want)
    # Sanity on the seed itself, so the comparison above is meaningful.
    assert want["slow_messages"] >= 5 and want["total"] == 300 and len(want["volume"]) > 30
    assert body["completed"] + body["failed"] + body["error"] < body["total"]  # some still processing


@pytest.mark.parametrize("interval", ["hour", "day", "week", "month"])
def test_analytics_volume_per_interval(client, rows, interval):
    check_analytics(get_analytics(client, interval=interval), expected_analytics(rows, interval=interval))


def test_analytics_filters(client, rows):
    some = sorted(rows, key=lambda r: r["created_at"])
    start, end = some[60]["created_at"], some[220]["created_at"]
    cases = [
        ({"instance_name": "beta"}, {"instance": "beta"}),
        ({"start_date": zulu(start)}, {"start": start}),
        ({"end_date": zulu(end)}, {"end": end}),
        ({"start_date": zulu(start), "end_date": zulu(end), "instance_name": "alpha", "interval": "week"},
         {"start": start, "end": end, "instance": "alpha", "interval": "week"}),
        ({"top": 3}, {"top": 3}),
        ({"top": 1, "instance_name": "gamma", "interval": "hour"},
         {"top": 1, "instance": "gamma", "interval": "hour"}),
    ]
    for params, kwargs in cases:
        check_analytics(get_analytics(client, **params), expected_analytics(rows, **kwargs))


def test_analytics_of_nothing(client):
    body = get_analytics(client, instance_name="nobody")
    assert body["total"] == 0 and body["success_rate"] == 0
    assert body["avg_duration_ms"] is None and body["p95_duration_ms"] is None
    assert body["by_instance"] == [] and body["volume"] == [] and body["top_users"] == []
    assert body["peak_hours"] == [] and body["steps"] == []


@pytest.mark.parametrize("param,value", [("interval", "year"), ("interval", ""), ("top", "0"),
                                         ("top", "x"), ("start_date", "soon"), ("end_date", "2024-99-01")])
def test_analytics_bad_values(client, param, value):
    r = client.get("/api/v1/traces/analytics", query_string={param: value}, headers=H)
    assert r.status_code == 400, (param, value, r.status_code)
    assert r.get_json()["detail"]["parameter"] == param


# --- delete ---------------------------------------------------------------------------------

def test_delete_dry_run_then_delete(app_factory, pg):
    url = pg.create_database()
    migrate(url)
    now = dt.datetime.now(UTC)
    rng = random.Random(5)
    # Ages k + 0.5 days: a cutoff of whole days is 12 hours away from every row.
    rows = [make_row(rng, now - dt.timedelta(days=k + 0.5), status="completed") for k in range(40)
            for _ in range(2)]
    insert_rows(url, rows)
    client = app_factory(url, enable_tracing=False, trace_retention_days=36500).test_client()

    r = client.delete("/api/v1/traces", query_string={"older_than_days": 20, "dry_run": "true"}, headers=H)
    assert r.status_code == 200 and r.get_json() == {"would_delete": 40}
    assert count_rows(url) == 80
    r = client.delete("/api/v1/traces", query_string={"older_than_days": 20, "dry_run": "false"}, headers=H)
    assert r.status_code == 200 and r.get_json() == {"deleted": 40}
    left = get_list(client, limit=1000).get_json()
    assert ids(left) == ids(newest_first([r for r in rows if r["created_at"] > now - dt.timedelta(days=20)]))
    r = client.delete("/api/v1/traces", query_string={"older_than_days": 20}, headers=H)
    assert r.get_json() == {"deleted": 0}
    r = client.delete("/api/v1/traces", query_string={"older_than_days": 5}, headers=H)
    assert r.get_json() == {"deleted": 30}
    assert count_rows(url) == 10


def test_delete_bad_values(client, seeded):
    before = count_rows(seeded[0])
    for params in ({}, {"dry_run": "true"}, {"older_than_days": "x"}, {"older_than_days": "-1"},
                   {"older_than_days": ""}):
        r = client.delete("/api/v1/traces", query_string=params, headers=H)
        assert r.status_code == 400, params
        assert r.get_json()["detail"]["parameter"] == "older_than_days"
    r = client.delete("/api/v1/traces", query_string={"older_than_days": 1, "dry_run": "maybe"}, headers=H)
    assert r.status_code == 400 and r.get_json()["detail"]["parameter"] == "dry_run"
    assert count_rows(seeded[0]) == before
