"""GET /api/v1/traces/analytics: the business and bottleneck figures of SPEC 4.6."""
from __future__ import annotations

import datetime as dt

from app.db import Database

INTERVALS = ("hour", "day", "week", "month")

# The filter is shared by every query; values stay parameters.
_WHERE = """WHERE (%(start)s::timestamptz IS NULL OR created_at >= %(start)s)
              AND (%(end)s::timestamptz IS NULL OR created_at <= %(end)s)
              AND (%(instance)s::text IS NULL OR instance_name = %(instance)s)"""

TOTALS = f"""
SELECT count(*) AS total,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'error') AS error,
       count(*) FILTER (WHERE status = 'processing') AS processing,
       avg(duration_ms) FILTER (WHERE status <> 'processing') AS avg_duration_ms,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY duration_ms)
           FILTER (WHERE status <> 'processing') AS pct,
       count(*) FILTER (WHERE duration_ms > %(slow_ms)s) AS slow_messages
FROM message_trace {_WHERE}"""

BY_INSTANCE = f"""
SELECT instance_name, count(*) AS total,
       count(*) FILTER (WHERE status = 'completed') AS completed,
       count(*) FILTER (WHERE status <> 'processing') AS finished,
       avg(duration_ms) FILTER (WHERE status <> 'processing') AS avg_duration_ms
FROM message_trace {_WHERE}
GROUP BY instance_name ORDER BY total DESC, instance_name"""

VOLUME = f"""
SELECT date_trunc(%(interval)s, created_at) AS bucket, count(*) AS total,
       count(*) FILTER (WHERE status IN ('failed', 'error')) AS failed
FROM message_trace {_WHERE}
GROUP BY 1 ORDER BY 1"""

TOP_USERS = f"""
SELECT user_id, count(*) AS total FROM message_trace {_WHERE}
GROUP BY user_id ORDER BY total DESC, user_id LIMIT %(top)s"""

PEAK_HOURS = f"""
SELECT extract(hour FROM created_at)::int AS hour, count(*) AS total
FROM message_trace {_WHERE}
GROUP BY 1 ORDER BY total DESC, hour"""

STEPS = f"""
WITH t AS (SELECT steps, duration_ms FROM message_trace {_WHERE} AND status <> 'processing'),
     s AS (SELECT e->>'step' AS step, (e->>'duration_ms')::numeric AS ms
           FROM t, jsonb_array_elements(t.steps) AS e
           WHERE e->>'duration_ms' IS NOT NULL)
SELECT s.step, avg(s.ms) AS avg_duration_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY s.ms) AS p95_duration_ms,
       sum(s.ms) / NULLIF((SELECT sum(duration_ms) FROM t), 0) AS share_of_total
FROM s GROUP BY s.step"""

STEP_ORDER = ("webhook_received", "instance_validated", "agent_called", "evolution_send")


def _num(value) -> float | None:
    return None if value is None else round(float(value), 2)


def _rate(part: int, total: int) -> float:
    return round(100.0 * part / total, 2) if total else 0.0


def _iso(ts: dt.datetime) -> str:
    return ts.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def compute(db: Database, *, start: dt.datetime | None, end: dt.datetime | None,
            instance: str | None, interval: str, top: int, slow_ms: int) -> dict:
    """Every figure of the analytics answer, from one read-only transaction."""
    params = {"start": start, "end": end, "instance": instance, "interval": interval,
              "top": top, "slow_ms": slow_ms}
    with db.cursor() as cur:
        # One snapshot so the parts add up even while traces arrive.
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        cur.execute(TOTALS, params)
        totals = cur.fetchone()
        cur.execute(BY_INSTANCE, params)
        by_instance = cur.fetchall()
        cur.execute(VOLUME, params)
        volume = cur.fetchall()
        cur.execute(TOP_USERS, params)
        top_users = cur.fetchall()
        cur.execute(PEAK_HOURS, params)
        peak = cur.fetchall()
        cur.execute(STEPS, params)
        steps = {row["step"]: row for row in cur.fetchall()}
    pct = totals["pct"] or [None, None, None]
    total = totals["total"]
    return {
        "total": total, "completed": totals["completed"], "failed": totals["failed"],
        "error": totals["error"], "processing": totals["processing"],
        # Success rate is over finished messages: in-flight ones have no outcome yet.
        "success_rate": _rate(totals["completed"], total - totals["processing"]),
        "avg_duration_ms": _num(totals["avg_duration_ms"]),
        "p50_duration_ms": _num(pct[0]), "p95_duration_ms": _num(pct[1]),
        "p99_duration_ms": _num(pct[2]), "slow_messages": totals["slow_messages"],
        "by_instance": [{"instance_name": r["instance_name"], "total": r["total"],
                         "success_rate": _rate(r["completed"], r["finished"]),
                         "avg_duration_ms": _num(r["avg_duration_ms"])} for r in by_instance],
        "volume": [{"bucket": _iso(r["bucket"]), "total": r["total"], "failed": r["failed"]}
                   for r in volume],
        "top_users": [{"user_id": r["user_id"], "total": r["total"]} for r in top_users],
        "peak_hours": [{"hour": r["hour"], "total": r["total"]} for r in peak],
        "steps": [{"step": name, "avg_duration_ms": _num(steps[name]["avg_duration_ms"]),
                   "p95_duration_ms": _num(steps[name]["p95_duration_ms"]),
                   "share_of_total": None if steps[name]["share_of_total"] is None
                   else round(float(steps[name]["share_of_total"]), 4)}
                  for name in STEP_ORDER if name in steps],
    }
