"""SQL for the message_trace table: writes, filtered keyset listing, analytics, retention."""
from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from app.db import Database, execute_values
from app.traces import analytics

PURGE_LOCK_ID = 72_011_002
PURGE_LOCK_WAIT_MS = 600_000

TRACE_COLUMNS = """trace_id, instance_id, instance_name, user_id, message_content, response_content,
    status, duration_ms, created_at, updated_at, steps, failed_step, error_message,
    message_type, remote_jid, platform_timestamp, reply_message_id, rc.delivered_at, rc.read_at,
    input_tokens, output_tokens, cost_usd::float8 AS cost_usd, agent_session_id, synthetic"""
# Receipts live in message_reply (sql/009); one primary-key probe per trace shown.
TRACE_FROM = """message_trace LEFT JOIN LATERAL (
        SELECT r.delivered_at, r.read_at FROM message_reply r
        WHERE r.instance_id = message_trace.instance_id
          AND r.reply_message_id = message_trace.reply_message_id) rc ON true"""


# A batch travels as one jsonb array of positional rows, not as VALUES literals: one
# json.dumps instead of adapting ten parameters per row (30 -> 9 us a message in the worker,
# bench/), and a short statement for PostgreSQL to parse whatever the batch size.
_FINISH_SQL = """UPDATE message_trace t SET status = v.r->>1, duration_ms = (v.r->>2)::int,
        response_content = v.r->>3, steps = v.r->4, failed_step = v.r->>5,
        error_message = v.r->>6, updated_at = (v.r->>7)::timestamptz, reply_message_id = v.r->>8,
        input_tokens = (v.r->>11)::int, output_tokens = (v.r->>12)::int,
        cost_usd = (v.r->>13)::numeric, agent_session_id = v.r->>14
    FROM jsonb_array_elements(%(fin)s::jsonb) AS v(r)
    WHERE t.trace_id = (v.r->>0)::uuid AND t.status = 'processing'"""
# A reply's row is written with its final state; receipts that came first are already there.
_REPLY_SQL = """INSERT INTO message_reply AS m (instance_id, reply_message_id, trace_id, sent_at)
    SELECT (r->>9)::int, r->>8, (r->>0)::uuid, (r->>10)::timestamptz
    FROM jsonb_array_elements(%(fin)s::jsonb) AS r WHERE r->>8 IS NOT NULL
    ON CONFLICT (instance_id, reply_message_id) DO UPDATE
        SET trace_id = EXCLUDED.trace_id, sent_at = EXCLUDED.sent_at"""
_INSERT_SQL = """INSERT INTO message_trace (trace_id, instance_id, instance_name, message_id,
        user_id, message_content, status, created_at, updated_at, steps, owner,
        message_type, remote_jid, platform_timestamp, synthetic)
    SELECT (r->>0)::uuid, (r->>1)::int, r->>2, r->>3, r->>4, r->>5, 'processing',
           (r->>6)::timestamptz, (r->>6)::timestamptz, r->7, r->>8,
           r->>9, r->>10, (r->>11)::timestamptz, coalesce((r->>12)::boolean, false)
    FROM jsonb_array_elements(%(new)s::jsonb) AS r
    ON CONFLICT (instance_id, message_id) DO NOTHING
    RETURNING instance_id, message_id, trace_id"""
_FINISH_ONLY_SQL = "WITH rep AS (" + _REPLY_SQL + ") " + _FINISH_SQL
_FINISH_AND_INSERT_SQL = ("WITH rep AS (" + _REPLY_SQL + "), fin AS (" + _FINISH_SQL
                          + " RETURNING 1), ins AS (" + _INSERT_SQL
                          + ") SELECT instance_id, message_id, trace_id FROM ins")
# Receipts of one batch, merged per reply: the earliest time of each kind wins, and a read
# receipt implies delivery (WhatsApp may send READ alone).
RECEIPTS_SQL = """WITH v AS (
        SELECT (r->>0)::int AS instance_id, r->>1 AS reply_message_id,
               min((r->>3)::timestamptz) FILTER (WHERE r->>2 = 'delivered') AS delivered_at,
               min((r->>3)::timestamptz) FILTER (WHERE r->>2 = 'read') AS read_at
        FROM jsonb_array_elements(%(rec)s::jsonb) AS r GROUP BY 1, 2)
    INSERT INTO message_reply AS m (instance_id, reply_message_id, delivered_at, read_at)
    SELECT instance_id, reply_message_id, COALESCE(delivered_at, read_at), read_at FROM v
    ON CONFLICT (instance_id, reply_message_id) DO UPDATE
        SET delivered_at = LEAST(m.delivered_at, EXCLUDED.delivered_at),
            read_at = LEAST(m.read_at, EXCLUDED.read_at)
    RETURNING instance_id, reply_message_id, trace_id, sent_at, delivered_at, read_at"""
_DELETE_REPLIES_SQL = """DELETE FROM message_reply WHERE ctid = ANY (ARRAY(
    SELECT ctid FROM message_reply WHERE created_at < %(cutoff)s LIMIT %(batch)s))"""
_PROCESSING_OWNERS_SQL = """SELECT DISTINCT owner FROM message_trace
    WHERE status = 'processing' AND owner LIKE %(h)s"""
# The canary's one-row lease (sql/011): one claimant per interval across every worker and
# replica, no lock held between statements.
_CANARY_CLAIM_SQL = """
INSERT INTO canary_lease AS l (id, next_run_at, runs, holder, claimed_at)
VALUES (true, now() + make_interval(secs => %(interval)s), 1, %(holder)s, now())
ON CONFLICT (id) DO UPDATE SET
    next_run_at = CASE WHEN l.next_run_at + make_interval(secs => %(interval)s) > now()
                       THEN l.next_run_at + make_interval(secs => %(interval)s)
                       ELSE now() + make_interval(secs => %(interval)s) END,
    runs = l.runs + 1, holder = EXCLUDED.holder, claimed_at = now()
WHERE l.next_run_at <= now()
RETURNING runs"""
_CANARY_DONE_SQL = """UPDATE canary_lease SET last_result = %(result)s, last_trace_id = %(trace_id)s,
    finished_at = now() WHERE id"""
REPLIES_SQL = """SELECT instance_id, reply_message_id, trace_id, sent_at, delivered_at, read_at
    FROM message_reply
    WHERE (instance_id, reply_message_id) IN (
        SELECT (r->>0)::int, r->>1 FROM jsonb_array_elements(%(keys)s::jsonb) AS r)"""


def rows_json(rows: list) -> str:
    """JSON text of rows for a jsonb parameter; NUL characters become U+FFFD.

    PostgreSQL text and jsonb cannot hold NUL. Left in, an agent reply or upstream error
    carrying one would fail its whole batch: every webhook of that batch would get 503 and
    the other final states of the batch would be lost.
    """
    text = json.dumps(rows, separators=(",", ":"))
    if "\\u0000" in text:
        text = json.dumps(_without_nul(rows), separators=(",", ":"))
    return text


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    if isinstance(value, dict):
        return {k: _without_nul(v) for k, v in value.items()}
    return value


@dataclass
class NewTrace:
    """A trace row as the webhook writes it, before processing."""

    trace_id: uuid.UUID
    instance_id: int
    instance_name: str
    message_id: str
    user_id: str
    message_content: str | None
    created_at: dt.datetime
    steps: list[dict]
    owner: str
    message_type: str | None = None
    remote_jid: str | None = None
    platform_timestamp: dt.datetime | None = None
    synthetic: bool = False  # a canary's message (app/canary.py)


@dataclass
class FinishedTrace:
    """The final state of a trace."""

    trace_id: uuid.UUID
    status: str
    duration_ms: int
    response_content: str | None
    steps: list[dict]
    failed_step: str | None
    error_message: str | None
    updated_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    instance_id: int | None = None
    reply_message_id: str | None = None
    sent_at: dt.datetime | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: Decimal | None = None
    agent_session_id: str | None = None


@dataclass
class ReceiptRow:
    """A delivery or read receipt of a reply, as the webhook hands it to the writer."""

    instance_id: int
    instance_name: str
    reply_message_id: str
    status: str  # delivered | read
    at: dt.datetime


@dataclass(frozen=True)
class TraceFilter:
    """The validated filters of GET /api/v1/traces."""

    instance_name: str | None = None
    status: str | None = None
    user_id: str | None = None
    min_duration: int | None = None
    max_duration: int | None = None
    start_date: dt.datetime | None = None
    end_date: dt.datetime | None = None
    failed_step: str | None = None
    message_type: str | None = None


# Each filter is a fixed SQL fragment with a named parameter; values never enter the text.
_FILTER_SQL = {
    "instance_name": "instance_name = %(instance_name)s",
    "status": "status = %(status)s",
    "user_id": "user_id = %(user_id)s",
    "min_duration": "duration_ms >= %(min_duration)s",
    "max_duration": "duration_ms <= %(max_duration)s",
    "start_date": "created_at >= %(start_date)s",
    "end_date": "created_at <= %(end_date)s",
    "failed_step": "failed_step = %(failed_step)s",
    "message_type": "message_type = %(message_type)s",
}


def _where(flt: TraceFilter, extra: list[str] | None = None) -> tuple[str, dict]:
    params = {k: v for k, v in flt.__dict__.items() if v is not None}
    clauses = [_FILTER_SQL[k] for k in params] + (extra or [])
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


class TraceStore:
    """Reads and writes message_trace."""

    def __init__(self, db: Database) -> None:
        self.db = db

    # --- writes (called by the writer thread with its own cursor) -------------------------

    @staticmethod
    def write_batch(cur: Any, rows: list[NewTrace], finished: list[FinishedTrace]
                    ) -> dict[tuple[int, str], tuple[uuid.UUID, bool]]:
        """Insert new rows and write final states in one statement (one round trip, one
        transaction on an autocommit cursor); map each new row's (instance_id, message_id) to
        (trace_id, inserted?), duplicates included.

        Final states only ever concern rows committed by earlier batches (a message is
        processed after its 202), so the UPDATE and the INSERT never meet on a row.
        Final rows already finalised (e.g. by a sweep) are left alone.
        """
        params = {}
        if finished:
            params["fin"] = rows_json([
                [str(r.trace_id), r.status, r.duration_ms, r.response_content, r.steps,
                 r.failed_step, r.error_message, r.updated_at.isoformat(), r.reply_message_id,
                 r.instance_id, r.sent_at.isoformat() if r.sent_at else None, r.input_tokens,
                 r.output_tokens, None if r.cost_usd is None else str(r.cost_usd),
                 r.agent_session_id] for r in finished])
        if rows:
            params["new"] = rows_json([
                [str(r.trace_id), r.instance_id, r.instance_name, r.message_id, r.user_id,
                 r.message_content, r.created_at.isoformat(), r.steps, r.owner, r.message_type,
                 r.remote_jid, r.platform_timestamp.isoformat() if r.platform_timestamp else None,
                 r.synthetic]
                for r in rows])
        if not params:
            return {}
        if len(params) == 2:
            # Data-modifying CTEs: both in one statement, so in one transaction.
            cur.execute(_FINISH_AND_INSERT_SQL, params)
        else:
            cur.execute(_FINISH_ONLY_SQL if finished else _INSERT_SQL, params)
        if not rows:
            return {}
        result = {(row[0], row[1]): (row[2], True) for row in cur.fetchall()}
        missing = {(r.instance_id, r.message_id) for r in rows} - result.keys()
        if missing:
            existing = execute_values(
                cur,
                """SELECT t.instance_id, t.message_id, t.trace_id FROM message_trace t
                   JOIN (VALUES %s) AS k(instance_id, message_id)
                     ON t.instance_id = k.instance_id AND t.message_id = k.message_id""",
                sorted(missing), template="(%s::int, %s::text)", fetch=True)
            result.update({(row[0], row[1]): (row[2], False) for row in existing})
        return result

    @staticmethod
    def finish(cur: Any, rows: list[FinishedTrace]) -> None:
        """Write final states; rows already finalised (e.g. by a sweep) are left alone."""
        TraceStore.write_batch(cur, [], rows)

    @staticmethod
    def write_receipts(cur: Any, receipts: list[ReceiptRow]) -> list[tuple]:
        """Merge receipts into their replies' rows; return (instance_id, reply id, trace_id,
        sent_at, delivered_at, read_at) of every row touched (trace_id None: not known yet)."""
        cur.execute(RECEIPTS_SQL, {"rec": rows_json([
            [r.instance_id, r.reply_message_id, r.status, r.at.isoformat()] for r in receipts])})
        return cur.fetchall()

    @staticmethod
    def replies(cur: Any, keys: list[tuple[int, str]]) -> list[tuple]:
        """The rows of these (instance_id, reply id) keys, in write_receipts' shape."""
        cur.execute(REPLIES_SQL, {"keys": rows_json([list(k) for k in keys])})
        return cur.fetchall()

    # --- recovery ------------------------------------------------------------------------

    def abandon_owned(self, owner_like: str, reason: str, keep_owner: str | None = None) -> int:
        """Mark unfinished rows of dead workers (owner pattern) as error."""
        return self.db.execute(
            """UPDATE message_trace SET status = 'error', error_message = %(reason)s,
                   failed_step = COALESCE(failed_step, 'agent_called'),
                   duration_ms = GREATEST(0, (EXTRACT(EPOCH FROM now() - created_at) * 1000)::int),
                   updated_at = now()
               WHERE status = 'processing' AND owner LIKE %(owner)s
                 AND (%(keep)s::text IS NULL OR owner <> %(keep)s)""",
            {"reason": reason, "owner": owner_like, "keep": keep_owner})

    def sweep_stale(self, extra_seconds: float) -> int:
        """Mark rows still processing long after their agent timeout could allow as error."""
        return self.db.execute(
            """UPDATE message_trace t SET status = 'error', updated_at = now(),
                   failed_step = 'agent_called',
                   duration_ms = GREATEST(0, (EXTRACT(EPOCH FROM now() - t.created_at) * 1000)::int),
                   error_message = 'abandoned: no final status within the agent timeout; '
                                   || 'the worker processing it was lost'
               FROM (SELECT m.trace_id FROM message_trace m
                     LEFT JOIN instance i ON i.id = m.instance_id
                     WHERE m.status = 'processing'
                       AND m.created_at < now() - make_interval(
                           secs => COALESCE(i.agent_timeout_s, 600) + %(extra)s)
                     LIMIT 10000) stale
               WHERE t.trace_id = stale.trace_id AND t.status = 'processing'""",
            {"extra": extra_seconds})

    def processing_owners(self, host: str) -> list[str]:
        """The owners (host:pid) on this host that still have rows processing."""
        return [row["owner"] for row in self.db.fetchall(_PROCESSING_OWNERS_SQL, {"h": host + ":%"})]

    def claim_canary_run(self, interval_s: float, holder: str) -> int | None:
        """The number of the canary run this caller claimed, or None when none is due."""
        row = self.db.fetchone(_CANARY_CLAIM_SQL, {"interval": interval_s, "holder": holder})
        return None if row is None else int(row["runs"])

    def canary_run_done(self, result: str, trace_id: str | None) -> None:
        """Record the last canary run's result on the lease row, for operators."""
        self.db.execute(_CANARY_DONE_SQL, {"result": result, "trace_id": trace_id})

    # --- reads ---------------------------------------------------------------------------

    def analytics(self, **query: Any) -> dict:
        """The analytics answer (app/traces/analytics.py) over the rollups and the rows."""
        return analytics.compute(self.db, **query)

    def get(self, trace_id: uuid.UUID) -> dict | None:
        """One trace by id."""
        return self.db.fetchone(f"SELECT {TRACE_COLUMNS} FROM {TRACE_FROM} WHERE trace_id = %(id)s",
                                {"id": trace_id})

    def list(self, flt: TraceFilter, limit: int,
             after: tuple[dt.datetime, uuid.UUID] | None = None) -> list[dict]:
        """Newest first; `after` is the (created_at, trace_id) of the previous page's last row."""
        extra = ["(created_at, trace_id) < (%(after_at)s, %(after_id)s)"] if after else []
        where, params = _where(flt, extra)
        if after:
            params.update(after_at=after[0], after_id=after[1])
        params["limit"] = limit
        return self.db.fetchall(
            f"SELECT {TRACE_COLUMNS} FROM {TRACE_FROM}{where}"
            " ORDER BY created_at DESC, trace_id DESC LIMIT %(limit)s", params)

    def count_older_than(self, cutoff: dt.datetime) -> int:
        """How many traces a purge with this cutoff would delete."""
        row = self.db.fetchone("SELECT count(*) AS n FROM message_trace WHERE created_at < %(cutoff)s",
                               {"cutoff": cutoff})
        return int(row["n"]) if row else 0

    def delete_older_than(self, cutoff: dt.datetime, batch: int = 5000, *,
                          exclusive: bool = True) -> int | None:
        """Delete traces created before cutoff in bounded batches, each a short transaction.

        Whole expired UTC hours go first in purge mode (sql/006: the rollups drop those hours
        at once instead of subtracting row by row), then the rows of the last partial hour
        through the ordinary triggers.

        Every purge holds the purge advisory lock (a session lock) throughout: two purges at
        once would both subtract the same expired hours from the daily rollups, and their
        batches deadlock on each other's rows. With exclusive (the periodic purge) None is
        returned at once when another process holds it; otherwise (the API, the CLI) the
        purge waits for it.
        """
        whole_hours = cutoff.astimezone(dt.timezone.utc).replace(minute=0, second=0, microsecond=0)
        total = 0
        with self.db.connection() as conn, conn.cursor() as cur:
            if exclusive:
                cur.execute("SELECT pg_try_advisory_lock(%(id)s)", {"id": PURGE_LOCK_ID})
                got = cur.fetchone()[0]
                conn.commit()
                if not got:
                    return None
            else:
                # A periodic purge of a large backlog may hold it for minutes; the lock wait
                # alone may outlast the pool's statement timeout.
                cur.execute("SET LOCAL statement_timeout = %(ms)s", {"ms": PURGE_LOCK_WAIT_MS})
                cur.execute("SELECT pg_advisory_lock(%(id)s)", {"id": PURGE_LOCK_ID})
                conn.commit()
            try:
                total += self._delete_batches(conn, cur, whole_hours, batch,
                                              purge_day=whole_hours.replace(hour=0))
                cur.execute("SELECT trace_rollup_forget_before(%(cutoff)s)", {"cutoff": whole_hours})
                conn.commit()
                total += self._delete_batches(conn, cur, cutoff, batch)
                self._delete_replies(conn, cur, cutoff, batch)
                return total
            finally:
                if not conn.closed:
                    conn.rollback()
                    cur.execute("SELECT pg_advisory_unlock(%(id)s)", {"id": PURGE_LOCK_ID})

    @staticmethod
    def _delete_replies(conn: Any, cur: Any, cutoff: dt.datetime, batch: int) -> None:
        # Replies and receipts expire with the traces they belong to (and unknown receipts
        # with them); no trigger and no rollup here, so plain bounded batches.
        while True:
            cur.execute(_DELETE_REPLIES_SQL, {"cutoff": cutoff, "batch": batch})
            n = cur.rowcount
            conn.commit()
            if n < batch:
                return

    @staticmethod
    def _delete_batches(conn: Any, cur: Any, cutoff: dt.datetime, batch: int, *,
                        purge_day: dt.datetime | None = None) -> int:
        total = 0
        while True:
            if purge_day is not None:
                # set_config(..., true) is SET LOCAL with a parameter (sql/006, purge mode).
                cur.execute("SELECT set_config('omni.rollup_purge', %(day)s, true)",
                            {"day": purge_day.isoformat()})
            # A batch is the key range up to the batch-th oldest (created_at, trace_id): one
            # range scan of message_trace_created. `trace_id IN (SELECT ... LIMIT batch)` cost a
            # primary-key probe per row, ~100 ms of a 1 s day purge (bench/traces.py).
            cur.execute("""SELECT created_at, trace_id FROM message_trace WHERE created_at < %(cutoff)s
                           ORDER BY created_at, trace_id OFFSET %(skip)s LIMIT 1""",
                        {"cutoff": cutoff, "skip": batch - 1})
            edge = cur.fetchone()
            if edge is None:
                cur.execute("DELETE FROM message_trace WHERE created_at < %(cutoff)s", {"cutoff": cutoff})
            else:
                cur.execute("DELETE FROM message_trace WHERE (created_at, trace_id) <= (%(at)s, %(id)s)",
                            {"at": edge[0], "id": edge[1]})
            n = cur.rowcount
            # Commit per batch: row locks are held only for one batch at a time.
            conn.commit()
            total += n
            if edge is None:
                return total
