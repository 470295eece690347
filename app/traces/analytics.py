"""GET /api/v1/traces/analytics: the business and bottleneck figures of SPEC 4.6.

Where the figures come from (sql/006_analytics_rollup.sql):

* Finished rows (completed|failed|error) are counted by PostgreSQL triggers into rollups per
  UTC hour and instance (counts, duration sums, > 10 s counts), log-spaced duration
  histograms per hour and per day (message and per-step durations, exact count and sum per
  ~1 % bucket) and messages per day and user. The triggers see every writer, so the rollups
  are always exactly the aggregate of the committed rows.
* A period [start_date, end_date] is split into the whole UTC hours (days for the histograms
  and top users) strictly inside it, read from the rollups, and the partial hours (days) at
  both ends, read from message_trace itself, as are rows still `processing` (few, found
  through the partial index message_trace_processing). Without dates: the rollups plus the
  processing rows.
* Counts, success rates, averages, volume, peak hours, by_instance, top users, slow messages,
  the agent's tokens and cost (summed in the hourly and per-user rollups too) and the steps'
  averages and shares are therefore exact. A slow threshold other than the
  10 s kept in the rollups is counted from message_trace.
* Percentiles (p50/p95/p99 of the message duration and each step's p95) are exact
  (percentile_cont over the rows) when the period holds at most EXACT_PERCENTILE_MAX finished
  messages; above that they come from the histograms, interpolated inside the bucket, within
  about 1 % of percentile_cont.
* Canary traces (`synthetic`, app/canary.py) are in none of these figures: the rollup
  triggers skip them (sql/011) and every read of message_trace here leaves them out.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from app.db import Database
from app.vocabulary import FINAL_STATUSES, STEPS, iso, sql_list


# Periods with at most this many finished messages get exact percentiles from the rows.
# Exact percentiles read every row of the period (heap fetches plus the steps jsonb): at
# 50,000 rows that alone took ~0.5 s on 1 M traces (bench/traces.py, 2 cores), so the
# threshold is 10,000 (~0.1 s); above it the histograms answer within ~1 %.
EXACT_PERCENTILE_MAX = 10_000
# The slow threshold counted in trace_rollup_hour.slow_n.
ROLLUP_SLOW_MS = 10_000
# Histogram bucket b holds durations ms with floor(ln(1 + ms) / ln(BASE)) = b.
BUCKET_BASE = 1.01
ALL = "*"   # instance_name of the all-instances rows in the histogram and user rollups

_HOUR = dt.timedelta(hours=1)
_DAY = dt.timedelta(days=1)
_FINAL = "status IN " + sql_list(FINAL_STATUSES)


def _num(value) -> float | None:
    return None if value is None else round(float(value), 2)


def _tokens(total, n) -> int | None:
    # None when no message of the set reported usage: unknown, not zero.
    return int(total) if n else None


def _cost(total, n) -> float | None:
    return round(float(total), 8) if n else None


def _usage(d: dict) -> dict:
    return {"input_tokens": _tokens(d["it"], d["un"]), "output_tokens": _tokens(d["ot"], d["un"]),
            "cost_usd": _cost(d["cu"], d["cn"])}


_USAGE_SUMS = ("it", "ot", "un", "cu", "cn")
# The usage sums of a group of message_trace rows, in the rollups' column order.
_RAW_USAGE = """coalesce(sum(input_tokens), 0) AS input_tokens,
                   coalesce(sum(output_tokens), 0) AS output_tokens,
                   count(*) FILTER (WHERE input_tokens IS NOT NULL OR output_tokens IS NOT NULL) AS usage_n,
                   coalesce(sum(cost_usd), 0) AS cost_usd, count(cost_usd) AS cost_n"""
_ROLLUP_USAGE = "input_tokens, output_tokens, usage_n, cost_usd, cost_n"


def _rate(part: int, total: int) -> float:
    return round(100.0 * part / total, 2) if total else 0.0


def _utc(ts: dt.datetime | None) -> dt.datetime | None:
    if ts is None:
        return None
    return ts.replace(tzinfo=dt.UTC) if ts.tzinfo is None else ts.astimezone(dt.UTC)


def _floor(ts: dt.datetime, unit: dt.timedelta) -> dt.datetime:
    if unit == _HOUR:
        return ts.replace(minute=0, second=0, microsecond=0)
    return ts.replace(hour=0, minute=0, second=0, microsecond=0)


def _ceil(ts: dt.datetime, unit: dt.timedelta) -> dt.datetime:
    f = _floor(ts, unit)
    return f if f == ts else f + unit


class _Sql:
    """Builds `created_at` range conditions with named parameters."""

    def __init__(self, params: dict) -> None:
        self.params = params
        self.n = 0

    def bind(self, value) -> str:
        self.n += 1
        name = f"p{self.n}"
        self.params[name] = value
        return f"%({name})s"

    def ranges(self, ranges: list[tuple], col: str = "created_at") -> str:
        """OR of [lo, hi) ranges (hi inclusive when the tuple's third item is True); None = open."""
        parts = []
        for lo, hi, hi_incl in ranges:
            conds = []
            if lo is not None:
                conds.append(f"{col} >= {self.bind(lo)}")
            if hi is not None:
                conds.append(f"{col} {'<=' if hi_incl else '<'} {self.bind(hi)}")
            parts.append("(" + " AND ".join(conds) + ")" if conds else "true")
        return "(" + " OR ".join(parts) + ")" if parts else "false"


def _split(start: dt.datetime | None, end: dt.datetime | None, unit: dt.timedelta):
    """(rollup range [lo, hi) or None, raw ranges) for [start, end] with whole `unit`s inside."""
    lo = None if start is None else _ceil(start, unit)
    hi = None if end is None else _floor(end, unit)
    if lo is not None and hi is not None and lo >= hi:
        return None, [(start, end, True)]
    raw: list[tuple] = []
    if start is not None and lo is not None and start < lo:
        raw.append((start, lo, False))
    if end is not None:
        raw.append((hi, end, True))
    return (lo, hi), raw


def _bucket_value(b: int, n: int, ms_sum: float, k: float) -> float:
    """Estimate of the k-th (0-based, inside the bucket) of n values in bucket b."""
    lo = math.exp(b * math.log(BUCKET_BASE)) - 1
    hi = math.exp((b + 1) * math.log(BUCKET_BASE)) - 1
    mean = ms_sum / n
    # Spread evenly over the bucket's width, centred on the bucket's exact mean.
    est = mean + (hi - lo) * ((k + 0.5) / n - 0.5)
    return min(max(est, lo), hi)


def hist_percentiles(hist: list[tuple[int, int, float]], ps: list[float]) -> list[float | None]:
    """percentile_cont-style percentiles from (bucket, n, ms_sum) rows sorted by bucket."""
    total = sum(n for _, n, _ in hist)
    if total == 0:
        return [None] * len(ps)

    def at_rank(r: int) -> float:
        cum = 0
        for b, n, s in hist:
            if r < cum + n:
                return _bucket_value(b, n, float(s), r - cum)
            cum += n
        b, n, s = hist[-1]
        return _bucket_value(b, n, float(s), n - 1)

    out: list[float | None] = []
    for p in ps:
        pos = p * (total - 1)
        r0, r1 = math.floor(pos), math.ceil(pos)
        v0 = at_rank(r0)
        out.append(v0 if r1 == r0 else v0 + (pos - r0) * (at_rank(r1) - v0))
    return out


@dataclass(frozen=True)
class Period:
    """[start, end] cut into what the rollups answer and the edges read from the rows."""

    start: dt.datetime | None
    end: dt.datetime | None
    hours: tuple | None        # whole UTC hours inside, [lo, hi), from trace_rollup_hour
    raw_h: list[tuple]         # the rest, from message_trace
    days: tuple | None         # whole UTC days inside the hours, from the daily rollups
    hist_hours: list[tuple]    # hours inside `hours` that are no whole day: trace_hist_hour
    raw_users: list[tuple]     # what trace_user_day does not cover, from message_trace


def plan(start: dt.datetime | None, end: dt.datetime | None) -> Period:
    """Where each part of [start, end] is read from."""
    start, end = _utc(start), _utc(end)
    hours, raw_h = _split(start, end, _HOUR)
    days, raw_d = (None, raw_h) if hours is None else _split(hours[0], hours[1], _DAY)
    # Hours inside `hours` that are not whole days: read from trace_hist_hour.
    if hours is None:
        hist_hours: list[tuple] = []
    elif days is None:
        hist_hours = [(hours[0], hours[1], False)]
    else:
        hist_hours = [r for r in raw_d if r[0] != r[1]]
        hist_hours = [(lo, hi, False) for lo, hi, _ in hist_hours]
    # Top users: whole days from trace_user_day, the rest of [start, end] from the rows.
    if days is None:
        raw_users = [(start, end, True)]
    else:
        raw_users = ([(start, days[0], False)] if start is not None and start < days[0] else []) \
            + ([(days[1], end, True)] if end is not None else [])

    return Period(start, end, hours, raw_h, days, hist_hours, raw_users)


@dataclass(frozen=True)
class Queries:
    """The statements of one analytics answer and their named parameters."""

    counts: str
    hist: str
    users: str
    slow: str
    exact: str
    exact_steps: str
    params: dict


def queries(p: Period, *, instance: str | None, interval: str, top: int, slow_ms: int) -> Queries:
    """The SQL of every part of the answer for a period."""
    start, end, hours, raw_h, days = p.start, p.end, p.hours, p.raw_h, p.days
    hist_hours, raw_users = p.hist_hours, p.raw_users
    ikey = instance if instance is not None else ALL
    params: dict = {"instance": instance, "ikey": ikey, "interval": interval, "top": top,
                    "slow_ms": slow_ms}
    q = _Sql(params)
    inst = "(%(instance)s::text IS NULL OR instance_name = %(instance)s)"
    # Rows of message_trace itself: canary traces are no business (the rollups skip them too).
    raw = f"{inst} AND NOT synthetic"
    slow_col = "slow_n" if slow_ms == ROLLUP_SLOW_MS else "0::bigint"

    # --- counts per (hour, instance, status): rollup + raw edges + processing rows ---------
    if hours is None:
        raw_counts = q.ranges(raw_h)
        rollup_counts = ""
    else:
        raw_counts = (f"({q.ranges(raw_h)} OR (status = 'processing' AND "
                      f"{q.ranges([(hours[0], hours[1], False)])}))")
        rollup_counts = f"""
            SELECT hour, instance_name, status, messages, duration_n, duration_sum, {slow_col} AS slow_n,
                   {_ROLLUP_USAGE}
            FROM trace_rollup_hour
            WHERE {inst} AND {q.ranges([(hours[0], hours[1], False)], 'hour')}
            UNION ALL"""
    counts_sql = f"""
        WITH facts AS MATERIALIZED ({rollup_counts}
            SELECT date_trunc('hour', created_at, 'UTC') AS hour, instance_name, status,
                   count(*) AS messages, count(duration_ms) AS duration_n,
                   coalesce(sum(duration_ms), 0) AS duration_sum,
                   count(*) FILTER (WHERE duration_ms > %(slow_ms)s) AS slow_n,
                   {_RAW_USAGE}
            FROM message_trace WHERE {raw} AND {raw_counts}
            GROUP BY 1, 2, 3)
        SELECT 'i' AS part, instance_name, status, NULL::timestamptz AS bucket, NULL::int AS hod,
               sum(messages) AS m, sum(duration_n) AS dn, sum(duration_sum) AS ds, sum(slow_n) AS sn,
               sum(input_tokens) AS it, sum(output_tokens) AS ot, sum(usage_n) AS un,
               sum(cost_usd) AS cu, sum(cost_n) AS cn
        FROM facts GROUP BY instance_name, status
        UNION ALL
        SELECT 'v', NULL, NULL, date_trunc(%(interval)s, hour, 'UTC'), NULL, sum(messages),
               sum(messages) FILTER (WHERE status IN ('failed', 'error')), NULL, NULL,
               NULL, NULL, NULL, sum(cost_usd), sum(cost_n)
        FROM facts GROUP BY 4
        UNION ALL
        SELECT 'p', NULL, NULL, NULL, extract(hour FROM hour AT TIME ZONE 'UTC')::int,
               sum(messages), NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
        FROM facts GROUP BY 5"""

    # --- histograms (message and step durations): day + hour rollups + raw edges ----------
    hist_parts = []
    if days is not None:
        hist_parts.append(f"""SELECT kind, bucket, n, ms_sum FROM trace_hist_day
            WHERE instance_name = %(ikey)s AND {q.ranges([(days[0], days[1], False)], 'day')}""")
    if hist_hours:
        hist_parts.append(f"""SELECT kind, bucket, n, ms_sum FROM trace_hist_hour
            WHERE instance_name = %(ikey)s AND {q.ranges(hist_hours, 'hour')}""")
    hist_parts.append(f"""
        SELECT kind, floor(ln(1 + greatest(ms, 0)::float8) / ln({BUCKET_BASE}))::int AS bucket,
               1 AS n, ms AS ms_sum
        FROM (SELECT 'total'::text AS kind, duration_ms::numeric AS ms FROM r
              WHERE duration_ms IS NOT NULL
              UNION ALL
              SELECT x->>'step', (x->>'duration_ms')::numeric
              FROM r, jsonb_array_elements(CASE jsonb_typeof(r.steps) WHEN 'array' THEN r.steps
                                                ELSE '[]'::jsonb END) AS x
              WHERE x->>'duration_ms' IS NOT NULL AND x->>'step' IS NOT NULL) e""")
    hist_sql = f"""
        WITH r AS (SELECT duration_ms, steps FROM message_trace
                   WHERE {raw} AND {_FINAL} AND {q.ranges(raw_h)})
        SELECT kind, bucket, sum(n) AS n, sum(ms_sum) AS ms_sum
        FROM ({" UNION ALL ".join(hist_parts)}) h
        GROUP BY kind, bucket HAVING sum(n) <> 0 ORDER BY kind, bucket"""

    # --- top users ------------------------------------------------------------------------
    user_parts = []
    raw_user_cond = q.ranges(raw_users)
    if days is not None:
        user_parts.append(f"""SELECT user_id, n, {_ROLLUP_USAGE} FROM trace_user_day
            WHERE instance_name = %(ikey)s AND {q.ranges([(days[0], days[1], False)], 'day')}""")
        raw_user_cond = (f"({raw_user_cond} OR (status = 'processing' AND "
                         f"{q.ranges([(days[0], days[1], False)])}))")
    user_parts.append(f"""SELECT user_id, count(*) AS n, {_RAW_USAGE} FROM message_trace
        WHERE {raw} AND {raw_user_cond} GROUP BY user_id""")
    users_sql = f"""
        SELECT user_id, sum(n) AS total, sum(input_tokens) AS it, sum(output_tokens) AS ot,
               sum(usage_n) AS un, sum(cost_usd) AS cu, sum(cost_n) AS cn
        FROM ({" UNION ALL ".join(user_parts)}) u
        GROUP BY user_id HAVING sum(n) > 0 ORDER BY total DESC, user_id LIMIT %(top)s"""

    whole = q.ranges([(start, end, True)])
    slow_sql = f"""SELECT count(*) AS n FROM message_trace
        WHERE {raw} AND {whole} AND duration_ms > %(slow_ms)s"""
    exact_sql = f"""
        SELECT percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY duration_ms) AS pct
        FROM message_trace WHERE {raw} AND {whole} AND status <> 'processing'"""
    exact_steps_sql = f"""
        SELECT x->>'step' AS step,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY (x->>'duration_ms')::numeric) AS p95
        FROM message_trace, jsonb_array_elements(steps) AS x
        WHERE {raw} AND {whole} AND status <> 'processing' AND x->>'duration_ms' IS NOT NULL
        GROUP BY 1"""

    return Queries(counts_sql, hist_sql, users_sql, slow_sql, exact_sql, exact_steps_sql, params)


@dataclass
class Totals:
    """Counts and sums folded from the per (hour, instance, status) facts."""

    overall: dict
    per_instance: dict[str, dict]
    volume: list
    peak: list


def fold(facts: list[dict]) -> Totals:
    """Sum the count facts overall and per instance; split out volume and peak hours."""
    per_inst: dict[str, dict] = {}
    totals = {"completed": 0, "failed": 0, "error": 0, "processing": 0, "total": 0,
              "dn": 0, "ds": 0, "sn": 0, **dict.fromkeys(_USAGE_SUMS, 0)}
    volume, peak = [], []
    for r in facts:
        if r["part"] == "v":
            if r["m"]:
                volume.append(r)
        elif r["part"] == "p":
            if r["m"]:
                peak.append(r)
        else:
            st, m = r["status"], int(r["m"])
            d = per_inst.setdefault(r["instance_name"], {
                "total": 0, "completed": 0, "finished": 0, "dn": 0, "ds": 0,
                **dict.fromkeys(_USAGE_SUMS, 0)})
            d["total"] += m
            for key in _USAGE_SUMS:
                d[key] += r[key] or 0
                totals[key] += r[key] or 0
            totals["total"] += m
            totals[st] = totals.get(st, 0) + m
            totals["sn"] += int(r["sn"] or 0)
            if st != "processing":
                d["finished"] += m
                d["dn"] += int(r["dn"])
                d["ds"] += int(r["ds"])
                totals["dn"] += int(r["dn"])
                totals["ds"] += int(r["ds"])
            if st == "completed":
                d["completed"] += m
    return Totals(totals, per_inst, volume, peak)


def step_figures(hists: dict[str, list], exact: bool, steps_exact: dict, total_ms: float) -> list[dict]:
    """Each step's average, p95 and share of the total time, in step order."""
    steps = []
    for name in STEPS:
        h = hists.get(name)
        if not h:
            continue
        n = sum(c for _, c, _ in h)
        s = sum(float(x) for _, _, x in h)
        p95 = steps_exact.get(name) if exact else hist_percentiles(h, [0.95])[0]
        steps.append({"step": name, "avg_duration_ms": _num(s / n),
                      "p95_duration_ms": _num(p95),
                      "share_of_total": round(s / total_ms, 4) if total_ms else None})
    return steps


def compute(db: Database, *, start: dt.datetime | None, end: dt.datetime | None,
            instance: str | None, interval: str, top: int, slow_ms: int,
            exact_max: int | None = None) -> dict:
    """Every figure of the analytics answer, from one read-only transaction."""
    exact_max = EXACT_PERCENTILE_MAX if exact_max is None else exact_max
    q = queries(plan(start, end), instance=instance, interval=interval, top=top, slow_ms=slow_ms)
    params = q.params
    with db.cursor() as cur:
        # One snapshot so the parts add up even while traces arrive.
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        cur.execute(q.counts, params)
        facts = cur.fetchall()
        cur.execute(q.hist, params)
        hist_rows = cur.fetchall()
        cur.execute(q.users, params)
        top_users = cur.fetchall()
        slow_messages = None
        if slow_ms != ROLLUP_SLOW_MS:
            cur.execute(q.slow, params)
            slow_messages = cur.fetchone()["n"]
        folded = fold(facts)
        totals = folded.overall
        exact = totals["dn"] <= exact_max
        pct_exact, steps_exact = None, {}
        if exact and totals["dn"]:
            cur.execute(q.exact, params)
            pct_exact = cur.fetchone()["pct"]
            cur.execute(q.exact_steps, params)
            steps_exact = {row["step"]: row["p95"] for row in cur.fetchall()}

    hists: dict[str, list] = {}
    for r in hist_rows:
        hists.setdefault(r["kind"], []).append((r["bucket"], int(r["n"]), r["ms_sum"]))
    if exact:
        pct = pct_exact or [None, None, None]
    else:
        pct = hist_percentiles(hists.get("total", []), [0.5, 0.95, 0.99])
    total_ms = totals["ds"]
    steps = step_figures(hists, exact, steps_exact, total_ms)
    by_instance = sorted(((name, d) for name, d in folded.per_instance.items() if d["total"]),
                         key=lambda kv: (-kv[1]["total"], kv[0]))
    total = totals["total"]
    return {
        "total": total, "completed": totals["completed"], "failed": totals["failed"],
        "error": totals["error"], "processing": totals["processing"],
        # Success rate is over finished messages: in-flight ones have no outcome yet.
        "success_rate": _rate(totals["completed"], total - totals["processing"]),
        "avg_duration_ms": _num(totals["ds"] / totals["dn"]) if totals["dn"] else None,
        "p50_duration_ms": _num(pct[0]), "p95_duration_ms": _num(pct[1]),
        "p99_duration_ms": _num(pct[2]),
        "slow_messages": totals["sn"] if slow_messages is None else slow_messages,
        "by_instance": [{"instance_name": name, "total": d["total"],
                         "success_rate": _rate(d["completed"], d["finished"]),
                         "avg_duration_ms": _num(d["ds"] / d["dn"]) if d["dn"] else None,
                         **_usage(d)}
                        for name, d in by_instance],
        "volume": [{"bucket": iso(r["bucket"], "auto"), "total": int(r["m"]), "failed": int(r["dn"] or 0),
                    "cost_usd": _cost(r["cu"], r["cn"])}
                   for r in sorted(folded.volume, key=lambda r: r["bucket"])],
        "top_users": [{"user_id": r["user_id"], "total": int(r["total"]), **_usage(r)}
                      for r in top_users],
        "peak_hours": [{"hour": r["hod"], "total": int(r["m"])}
                       for r in sorted(folded.peak, key=lambda r: (-int(r["m"]), r["hod"]))],
        "steps": steps,
        "usage": _usage(totals),
    }
