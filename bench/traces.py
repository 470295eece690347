"""Trace-store figures: 1M generated traces, the list API, analytics and retention."""
from __future__ import annotations

import concurrent.futures
import datetime as dt
import statistics
import threading
import time

import psycopg2
import requests

from bench.load import body_template

INSTANCES = 20
USERS = 10_000
DAY_MS = 86_400_000

# One statement, evenly spaced created_at over `days` + 1 days ending at %(end)s (the oldest
# day is past a 30-day retention), 20 instances, 10,000 users (skewed), 5% failed, 0.2% error,
# 2% slower than 10 s, four steps in each trace's jsonb like the pipeline writes them.
GENERATE = """
INSERT INTO message_trace (trace_id, instance_id, instance_name, message_id, user_id,
    message_content, response_content, status, duration_ms, created_at, updated_at, steps,
    failed_step, error_message, owner)
SELECT gen_random_uuid(), inst, 'inst-' || lpad(inst::text, 2, '0'), 'gen-' || i,
       'whatsapp:+5511900' || lpad(u::text, 6, '0'),
       'What can you do? I need help with my order #' || i,
       CASE WHEN st = 'completed' THEN 'Echo: What can you do? I need help with my order #' || i END,
       st, dur, ts, ts + dur * interval '1 millisecond',
       jsonb_build_array(
         jsonb_build_object('step', 'webhook_received', 'status', 'success', 'duration_ms', 2,
                            'timestamp', ts),
         jsonb_build_object('step', 'instance_validated', 'status', 'success', 'duration_ms', 1,
                            'timestamp', ts),
         CASE WHEN st = 'completed' OR fstep = 'evolution_send'
              THEN jsonb_build_object('step', 'agent_called', 'status', 'success',
                                      'duration_ms', dur - evo - 3, 'timestamp', ts)
              ELSE jsonb_build_object('step', 'agent_called', 'status', 'failed',
                                      'duration_ms', dur - 3, 'timestamp', ts, 'error', err) END,
         CASE WHEN st = 'completed'
              THEN jsonb_build_object('step', 'evolution_send', 'status', 'success',
                                      'duration_ms', evo, 'timestamp', ts)
              WHEN fstep = 'evolution_send'
              THEN jsonb_build_object('step', 'evolution_send', 'status', 'failed',
                                      'duration_ms', evo, 'timestamp', ts, 'error', err)
              ELSE jsonb_build_object('step', 'evolution_send', 'status', 'skipped',
                                      'duration_ms', null, 'timestamp', null) END),
       fstep, err, 'bench:0'
FROM (
  SELECT i, inst, u, st, dur, evo, ts,
         CASE st WHEN 'failed' THEN (CASE WHEN r3 < 0.8 THEN 'agent_called' ELSE 'evolution_send' END)
                 WHEN 'error' THEN 'agent_called' END AS fstep,
         CASE st WHEN 'failed' THEN (CASE WHEN r3 < 0.8 THEN 'agent returned 500' ELSE 'evolution returned 500' END)
                 WHEN 'error' THEN 'interrupted: service shutting down before the message finished' END AS err
  FROM (
    SELECT i, 1 + floor(random() * %(instances)s)::int AS inst,
           floor(%(users)s * random() ^ 2)::int AS u,
           CASE WHEN r < 0.05 THEN 'failed' WHEN r < 0.052 THEN 'error' ELSE 'completed' END AS st,
           CASE WHEN r2 < 0.02 THEN 10001 + floor(random() * 20000)::int
                ELSE least(9999, greatest(60, floor(4000 * exp(0.35 * sqrt(-2 * ln(1 - random()))
                                                               * cos(2 * pi() * random())))::int)) END AS dur,
           20 + floor(random() * 60)::int AS evo, r3,
           %(end)s::timestamptz - (%(span_ms)s::bigint * i / %(total)s) * interval '1 millisecond' AS ts
    FROM (SELECT i, random() AS r, random() AS r2, random() AS r3
          FROM generate_series(%(first)s, %(last)s) AS i) AS g
  ) AS a
) AS b
"""


def _generate_part(database_url: str, first: int, last: int, total: int, days: int,
                   end: dt.datetime) -> None:
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT setseed(%(seed)s)", {"seed": 0.42 if first == 1 else 0.24})
            cur.execute(GENERATE, {"instances": INSTANCES, "users": USERS, "total": total,
                                   "first": first, "last": last, "span_ms": (days + 1) * DAY_MS,
                                   "end": end})
    finally:
        conn.close()


def worst_purge_end(now: dt.datetime) -> dt.datetime:
    """The latest 23:59 UTC at or before now.

    Data ending there puts the 30-day cutoff at 23:59, the costliest time of day for a purge:
    the day's 23 whole hours go through the per-user rollup and the partial hour is 59 minutes
    long (sql/006). A cutoff just after midnight costs a third of that.
    """
    end = now.astimezone(dt.timezone.utc).replace(hour=23, minute=59, second=0, microsecond=0)
    return end if end <= now else end - dt.timedelta(days=1)


def generate(database_url: str, per_30_days: int, days: int = 30, end: dt.datetime | None = None) -> dict:
    """Insert per_30_days traces per 30 days over days + 1 days up to end (default now); the
    indexes are rebuilt after."""
    end = end or dt.datetime.now(dt.timezone.utc)
    total = per_30_days * (days + 1) // days
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    t0 = time.monotonic()
    with conn.cursor() as cur:
        cur.execute("SET maintenance_work_mem = '256MB'")
        # Same indexes as the migrations define, dropped during the bulk load and rebuilt.
        cur.execute("""SELECT indexname, indexdef FROM pg_indexes
                       WHERE tablename = 'message_trace' AND indexname <> 'message_trace_pkey'
                         AND indexdef NOT LIKE 'CREATE UNIQUE%%'""")
        indexes = cur.fetchall()
        for name, _ in indexes:
            cur.execute(f'DROP INDEX "{name}"')
        # Two halves of the time range on two connections at once: the rows are built in
        # SQL (one core each) and their rollup keys (hours) do not overlap.
        halves = [(1, total // 2), (total // 2 + 1, total)]
        with concurrent.futures.ThreadPoolExecutor(len(halves)) as pool:
            list(pool.map(lambda h: _generate_part(database_url, h[0], h[1], total, days, end), halves))
        for _, definition in indexes:
            cur.execute(definition)
        # As a month of traffic leaves the database: statistics current (autovacuum's job) and
        # the load written out. Measured right after a 1.1 GB bulk load instead, the purge
        # took ~1.15 s against ~0.85 s, planned on empty-table estimates of the rollups and
        # sharing the disk with the checkpoint writing the load back.
        for table in ("message_trace", "trace_rollup_hour", "trace_hist_hour", "trace_hist_day",
                      "trace_user_day"):
            cur.execute(f"VACUUM ANALYZE {table}")
        cur.execute("CHECKPOINT")
        cur.execute("SELECT pg_total_relation_size('message_trace')")
        size = cur.fetchone()[0]
        cur.execute("""INSERT INTO instance (name, agent_api_url, evolution_url)
                       SELECT 'inst-' || lpad(n::text, 2, '0'), 'http://127.0.0.1:9', 'http://127.0.0.1:9'
                       FROM generate_series(1, %(n)s) n ON CONFLICT (name) DO NOTHING""",
                    {"n": INSTANCES})
    conn.close()
    return {"rows": total, "rows_per_30_days": per_30_days, "end": end.isoformat(),
            "seconds": round(time.monotonic() - t0, 1),
            "table_mb": round(size / 2**20, 1)}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))]


def _variants(now: dt.datetime) -> list[tuple[str, dict]]:
    """Every SPEC 4.6 filter alone, then combinations (values rotate per request)."""
    day = dt.timedelta(days=1)
    iso = lambda t: t.isoformat()  # noqa: E731
    return [
        ("no filter", {}),
        ("instance_name", {"instance_name": "{inst}"}),
        ("status=failed", {"status": "failed"}),
        ("status=completed", {"status": "completed"}),
        ("user_id", {"user_id": "{user}"}),
        ("min_duration=10000 (slow)", {"min_duration": "10000"}),
        ("max_duration=1000", {"max_duration": "1000"}),
        ("start_date (last 24 h)", {"start_date": iso(now - day)}),
        ("end_date (older than 15 days)", {"end_date": iso(now - 15 * day)}),
        ("failed_step=agent_called", {"failed_step": "agent_called"}),
        ("instance + status=failed", {"instance_name": "{inst}", "status": "failed"}),
        ("instance + user_id", {"instance_name": "{inst}", "user_id": "{user}"}),
        ("user_id + status=failed", {"user_id": "{user}", "status": "failed"}),
        ("instance + min_duration=10000", {"instance_name": "{inst}", "min_duration": "10000"}),
        ("instance + duration 3000..5000", {"instance_name": "{inst}", "min_duration": "3000",
                                            "max_duration": "5000"}),
        ("start..end (one day, 10 days ago)", {"start_date": iso(now - 11 * day),
                                               "end_date": iso(now - 10 * day)}),
        ("instance + start..end", {"instance_name": "{inst}", "start_date": iso(now - 11 * day),
                                   "end_date": iso(now - 10 * day)}),
        ("status=failed + failed_step=evolution_send + instance",
         {"status": "failed", "failed_step": "evolution_send", "instance_name": "{inst}"}),
        ("every filter", {"instance_name": "{inst}", "status": "completed", "min_duration": "1000",
                          "max_duration": "9000", "start_date": iso(now - 20 * day),
                          "end_date": iso(now - day)}),
        ("every filter incl. user_id", {"instance_name": "{inst}", "status": "completed",
                                        "user_id": "{user}", "min_duration": "100",
                                        "max_duration": "9000", "start_date": iso(now - 29 * day),
                                        "end_date": iso(now)}),
        ("every filter, no match (slow failed_step at evolution)",
         {"instance_name": "{inst}", "status": "failed", "failed_step": "evolution_send",
          "min_duration": "25000", "start_date": iso(now - 30 * day), "end_date": iso(now)}),
    ]


def api_latency(base_url: str, api_key: str, first_samples: int, walks: int, pages: int,
                now: dt.datetime) -> dict:
    """p50/p99 of first pages and of cursor pages (up to `pages` deep) per filter variant;
    `now` is the end of the generated data."""
    sess = requests.Session()
    sess.headers["x-api-key"] = api_key
    results = []
    n = 0
    for name, template in _variants(now):
        first, deep, deepest, rows = [], [], 0, 0
        for k in range(first_samples + walks):
            n += 1
            params = {key: v.format(inst=f"inst-{1 + n % INSTANCES:02d}",
                                    user=f"whatsapp:+5511900{(n * 37) % 200:06d}")
                      for key, v in template.items()}
            url = base_url + "/api/v1/traces"
            t0 = time.perf_counter()
            r = sess.get(url, params=params)
            first.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            rows = max(rows, len(r.json()))
            if k < first_samples:
                continue
            page = 1
            while page < pages and "X-Next-Cursor" in r.headers:
                t0 = time.perf_counter()
                r = sess.get(url, params={**params, "cursor": r.headers["X-Next-Cursor"]})
                deep.append((time.perf_counter() - t0) * 1000)
                r.raise_for_status()
                page += 1
            deepest = max(deepest, page)
        results.append({
            "variant": name, "params": template,
            "first_p50_ms": round(statistics.median(first), 2), "first_p99_ms": round(_pct(first, 0.99), 2),
            "deep_p99_ms": round(_pct(deep, 0.99), 2) if deep else None,
            "deepest_page": deepest, "first_page_rows": rows})
    sess.close()
    worst = max(max(v["first_p99_ms"], v["deep_p99_ms"] or 0) for v in results)
    return {"variants": results, "worst_p99_ms": round(worst, 2)}


def analytics_latency(base_url: str, api_key: str, repeats: int, now: dt.datetime) -> dict:
    """GET /api/v1/traces/analytics over the 30 days before `now` (all instances, and one)."""
    sess = requests.Session()
    sess.headers["x-api-key"] = api_key
    cases = {"30 days, all instances": {"start_date": (now - dt.timedelta(days=30)).isoformat(),
                                        "end_date": now.isoformat()},
             "30 days, one instance": {"start_date": (now - dt.timedelta(days=30)).isoformat(),
                                       "end_date": now.isoformat(), "instance_name": "inst-07"},
             "last 24 h, hourly": {"start_date": (now - dt.timedelta(days=1)).isoformat(),
                                   "end_date": now.isoformat(), "interval": "hour"}}
    out = {}
    for name, params in cases.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = sess.get(base_url + "/api/v1/traces/analytics", params=params, timeout=120)
            times.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
        body = r.json()
        out[name] = {"median_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1),
                     "total": body["total"]}
    sess.close()
    return out


def retention(service, instance: str, database_url: str, cutoff: dt.datetime) -> dict:
    """Purge everything before cutoff (one expired day) while webhooks keep inserting; both timed.

    The purge is TraceStore.delete_older_than, what `DELETE /api/v1/traces` and the hourly
    purge run, called here with an explicit cutoff: the API's is now minus whole days, so its
    cost would depend on the hour the bench runs (worst_purge_end).
    """
    from app.db import Database
    from app.traces.store import TraceStore

    stop = threading.Event()
    samples: list[tuple[float, float, int]] = []
    template = body_template(instance)
    url = f"{service.url}/webhook/evolution/{instance}"

    def loop() -> None:
        sess = requests.Session()
        i = 0
        while not stop.is_set():
            i += 1
            body = template.replace("__MSGID__", f"3EB0ret{i:09d}").replace("__DIGITS__", "5511988887777")
            t0 = time.perf_counter()
            r = sess.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
            samples.append((t0, (time.perf_counter() - t0) * 1000, r.status_code))
            time.sleep(0.01)
        sess.close()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    store = TraceStore(Database(database_url, size=1))
    store.count_older_than(cutoff)  # opens the connection and warms the index path
    time.sleep(2.0)
    t0 = time.perf_counter()
    deleted = store.delete_older_than(cutoff, exclusive=False)
    t1 = time.perf_counter()
    store.db.close()
    time.sleep(1.0)
    stop.set()
    thread.join(10)
    during = [ms for t, ms, _ in samples if t0 - 0.05 <= t <= t1]
    before = [ms for t, ms, _ in samples if t < t0]
    return {"deleted": deleted, "cutoff": cutoff.isoformat(), "purge_ms": round((t1 - t0) * 1000, 1),
            "inserts_during_purge": len(during),
            "insert_max_ms_during_purge": round(max(during), 1) if during else None,
            "insert_p50_ms_before": round(statistics.median(before), 1) if before else None,
            "insert_errors": sum(1 for _, _, s in samples if s != 202)}
