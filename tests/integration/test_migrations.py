"""`python -m app migrate` from an empty database, idempotence, concurrency, and index use
by every filter of the trace list."""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import threading
import time

import psycopg2
import pytest

from tests.support import PYTHON, ROOT

SQL_DIR = ROOT / "sql"


def migrate_cmd(url: str) -> list:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOMAGIK_OMNI_")}
    env["AUTOMAGIK_OMNI_DATABASE_URL"] = url
    return [[PYTHON, "-m", "app", "migrate"], {"cwd": ROOT, "env": env}]


def run_migrate(url: str) -> subprocess.CompletedProcess:
    argv, kw = migrate_cmd(url)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)


def query(url: str, sql: str, params=None) -> list[tuple]:
    conn = psycopg2.connect(url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def declared_indexes(*files: str) -> set[str]:
    names = set()
    for f in files:
        names |= set(re.findall(r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)",
                                (SQL_DIR / f).read_text(), re.I))
    return names


def test_migrate_from_empty_then_again(pg):
    url = pg.create_database()
    files = sorted(p.name for p in SQL_DIR.glob("[0-9][0-9][0-9]_*.sql"))
    assert files[:2] == ["001_schema.sql", "002_trace_indexes.sql"]
    r = run_migrate(url)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"applied": files}
    tables = {t for (t,) in query(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"instance", "message_trace", "schema_migrations"} <= tables
    indexes = {i for (i,) in query(url, "SELECT indexname FROM pg_indexes WHERE tablename = 'message_trace'")}
    want = declared_indexes("002_trace_indexes.sql")
    assert len(want) >= 7, want
    assert want <= indexes, want - indexes
    versions = [v for (v,) in query(url, "SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == files
    # Columns SPEC 6 names, typed well.
    cols = dict(query(url, """SELECT column_name, data_type FROM information_schema.columns
                              WHERE table_name = 'message_trace'"""))
    assert cols["trace_id"] == "uuid" and cols["steps"] == "jsonb"
    assert cols["created_at"] == cols["updated_at"] == "timestamp with time zone"
    assert {"instance_id", "user_id", "message_content", "response_content", "status", "duration_ms",
            "error_message", "failed_step"} <= set(cols)

    r = run_migrate(url)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"applied": []}
    assert [v for (v,) in query(url, "SELECT version FROM schema_migrations ORDER BY version")] == files


def test_concurrent_migrations_on_an_empty_database(pg):
    for _ in range(2):
        url = pg.create_database()
        argv, kw = migrate_cmd(url)
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
                 for _ in range(3)]
        outs = [p.communicate(timeout=60) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err
        applied = [json.loads(out)["applied"] for out, _ in outs]
        files = sorted(p.name for p in SQL_DIR.glob("[0-9][0-9][0-9]_*.sql"))
        # Exactly one of them did the work; the others found nothing to do.
        assert sorted(applied, key=len) == [[]] * (len(procs) - 1) + [files]
        rows = query(url, "SELECT version, count(*) FROM schema_migrations GROUP BY version ORDER BY version")
        assert rows == [(f, 1) for f in files]


def test_migrate_reports_an_unreachable_database(pg):
    r = run_migrate("postgresql://nobody@127.0.0.1:1/none")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and "database" in r.stderr.lower()


def _hold_reader(url: str, seconds: float, started) -> None:
    """A transaction reading message_trace for `seconds` (a long dashboard query)."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM message_trace")
            started.set()
            cur.execute("SELECT pg_sleep(%s)", (seconds,))
        conn.rollback()
    finally:
        conn.close()


def _writer_waits(url: str, stop, waits: list) -> None:
    """What every webhook's insert takes on message_trace, timed, until stop is set."""
    conn = psycopg2.connect(url)
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            with conn.cursor() as cur:
                cur.execute("LOCK TABLE message_trace IN ROW EXCLUSIVE MODE")
            conn.rollback()
            waits.append(time.monotonic() - t0)
            time.sleep(0.05)
    finally:
        conn.close()


def _with_new_migration(tmp_path, body: str):
    sql = tmp_path / "sql"
    sql.mkdir()
    for f in SQL_DIR.glob("[0-9][0-9][0-9]_*.sql"):
        shutil.copy(f, sql / f.name)
    (sql / "999_online_test.sql").write_text(body)
    return sql


def test_a_migration_behind_a_long_reader_never_holds_writers_up(pg, tmp_path):
    """An ALTER TABLE queued behind a 3 s reader would stall every writer queued behind it
    (past the webhook's 10 s commit wait when no lock_timeout bounds it): the runner takes
    its locks in short tries instead, so writers wait at most one try, and applies the
    migration once the reader is done."""
    from app.db import MIGRATION_LOCK_TRY_MS, migrate

    url = pg.create_database()
    migrate(url)
    sql = _with_new_migration(tmp_path, "ALTER TABLE message_trace ADD COLUMN online_test text;")
    started, stop, waits = threading.Event(), threading.Event(), []
    reader = threading.Thread(target=_hold_reader, args=(url, 3.0, started))
    reader.start()
    assert started.wait(10)
    writer = threading.Thread(target=_writer_waits, args=(url, stop, waits))
    writer.start()
    t0 = time.monotonic()
    applied = migrate(url, sql)
    took = time.monotonic() - t0
    stop.set()
    writer.join(10)
    reader.join(10)
    assert applied == ["999_online_test.sql"]
    assert took > 2.0, "the migration did not wait for the reader"
    assert len(waits) > 10 and max(waits) < MIGRATION_LOCK_TRY_MS / 1000 + 0.5, sorted(waits)[-3:]
    assert query(url, "SELECT count(*) FROM information_schema.columns WHERE table_name = "
                      "'message_trace' AND column_name = 'online_test'") == [(1,)]


def test_a_migration_gives_up_when_its_tables_stay_busy(pg, tmp_path, monkeypatch):
    """Past the runner's patience it fails naming the tables, and applies nothing."""
    import app.db
    from app.db import DatabaseError, migrate

    url = pg.create_database()
    migrate(url)
    sql = _with_new_migration(tmp_path, "CREATE TABLE online_first (x int);\n"
                                        "ALTER TABLE message_trace ADD COLUMN online_test text;")
    monkeypatch.setattr(app.db, "MIGRATION_LOCK_PATIENCE_S", 1.0)
    started = threading.Event()
    reader = threading.Thread(target=_hold_reader, args=(url, 4.0, started))
    reader.start()
    assert started.wait(10)
    with pytest.raises(DatabaseError, match="message_trace"):
        migrate(url, sql)
    reader.join(10)
    assert query(url, "SELECT count(*) FROM schema_migrations WHERE version = '999_online_test.sql'") == [(0,)]
    assert query(url, "SELECT to_regclass('online_first')::text") == [(None,)]

# --- index use ---------------------------------------------------------------------------

class RecordingDb:
    """Stands in for app.db.Database in TraceStore: records the statement, runs nothing."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def fetchall(self, sql, params=None):
        self.calls.append((sql, params))
        return []


@pytest.fixture(scope="module")
def big_db(pg):
    """~20,000 synthetic traces with realistic skew, analysed."""
    url = pg.create_database()
    assert run_migrate(url).returncode == 0
    query(url, """
        INSERT INTO message_trace (trace_id, instance_id, instance_name, message_id, user_id, status,
                                   duration_ms, created_at, updated_at, steps, failed_step, error_message)
        SELECT gen_random_uuid(), 1 + i % 5, 'inst-' || (i % 5), 'm' || i,
               'whatsapp:+55' || (1000 + i % 2000),
               CASE WHEN i % 50 = 0 THEN 'failed' WHEN i % 97 = 0 THEN 'error'
                    WHEN i % 211 = 0 THEN 'processing' ELSE 'completed' END,
               CASE WHEN i % 211 = 0 THEN NULL WHEN i % 37 = 0 THEN 10000 + i % 9000
                    ELSE 200 + (i * 7919) % 4000 END,
               now() - make_interval(secs => i * 173), now() - make_interval(secs => i * 173),
               '[]'::jsonb,
               CASE WHEN i % 50 = 0 THEN 'agent_called' WHEN i % 97 = 0 THEN 'evolution_send' END,
               CASE WHEN i % 50 = 0 OR i % 97 = 0 THEN 'upstream said no' END
        FROM generate_series(1, 20000) AS i""")
    query(url, "ANALYZE message_trace")
    return url


def listing_sql(flt_kwargs: dict, after=None) -> tuple[str, dict]:
    from app.traces.store import TraceFilter, TraceStore

    rec = RecordingDb()
    TraceStore(rec).list(TraceFilter(**flt_kwargs), 51, after)
    assert len(rec.calls) == 1
    return rec.calls[0]


def explain(url: str, sql: str, params: dict) -> str:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("EXPLAIN " + sql, params)
            return "\n".join(r[0] for r in cur.fetchall())
    finally:
        conn.close()


def filters(url):
    (user,) = query(url, "SELECT user_id FROM message_trace GROUP BY user_id ORDER BY count(*) DESC LIMIT 1")[0]
    return [
        {"instance_name": "inst-3"},
        {"status": "failed"},
        {"status": "completed"},
        {"status": "processing"},
        {"user_id": user},
        {"failed_step": "agent_called"},
        {"failed_step": "evolution_send"},
        {"min_duration": 10000},
        {"max_duration": 300},
        {"start_date": dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)},
        {"end_date": dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3)},
    ]


def test_every_list_filter_uses_an_index(big_db):
    for kwargs in filters(big_db):
        sql, params = listing_sql(kwargs)
        assert "LIMIT" in sql and params["limit"] == 51
        plan = explain(big_db, sql, params)
        assert "Seq Scan on message_trace" not in plan, f"{kwargs}:\n{plan}"
        assert "Index" in plan, f"{kwargs}:\n{plan}"
        # The statement really returns the filtered rows (the plan is of a working query).
        conn = psycopg2.connect(big_db)
        with conn.cursor() as cur:
            cur.execute(sql, params)
            assert 0 < len(cur.fetchall()) <= 51, kwargs
        conn.close()


def test_every_list_filter_uses_an_index_on_later_pages(big_db):
    import uuid

    (at,) = query(big_db, "SELECT created_at FROM message_trace ORDER BY created_at DESC OFFSET 5000 LIMIT 1")[0]
    after = (at, uuid.UUID(int=0))
    for kwargs in filters(big_db) + [{}]:
        sql, params = listing_sql(kwargs, after)
        plan = explain(big_db, sql, params)
        assert "Seq Scan on message_trace" not in plan, f"{kwargs} after a cursor:\n{plan}"
    assert isinstance(at, dt.datetime)
