"""Trace retention: `python -m app purge-traces`, the Runtime's periodic purge and its lock."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import threading
import uuid

import psycopg2
import psycopg2.extras
import pytest

from app.pipeline import chores
from tests.support import PYTHON, ROOT, migrate

UTC = dt.timezone.utc
psycopg2.extras.register_uuid()


def insert_aged(url: str, ages_days: list[float], instance: str = "bot") -> list[uuid.UUID]:
    """One completed trace per age (in days before now); returns their ids."""
    now = dt.datetime.now(UTC)
    ids = [uuid.uuid4() for _ in ages_days]
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        psycopg2.extras.execute_values(
            cur,
            """INSERT INTO message_trace (trace_id, instance_id, instance_name, message_id, user_id,
                   status, duration_ms, created_at, updated_at, steps) VALUES %s""",
            [(tid, 1, instance, "M" + tid.hex, "whatsapp:+5511999990000", "completed", 100,
              now - dt.timedelta(days=age), now - dt.timedelta(days=age),
              psycopg2.extras.Json([])) for tid, age in zip(ids, ages_days)])
    conn.close()
    return ids


def remaining(url: str) -> set[uuid.UUID]:
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT trace_id FROM message_trace")
        out = {row[0] for row in cur.fetchall()}
    conn.close()
    return out


def purge_cli(url: str, *args: str, retention: str | None = "30", timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOMAGIK_OMNI_")}
    env["AUTOMAGIK_OMNI_DATABASE_URL"] = url
    if retention is not None:
        env["AUTOMAGIK_OMNI_TRACE_RETENTION_DAYS"] = retention
    return subprocess.run([PYTHON, "-m", "app", "purge-traces", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def db(pg):
    url = pg.create_database()
    migrate(url)
    return url


def test_cli_deletes_only_expired_in_batches(db):
    # 50 expired rows (31..80 days old) and 20 kept ones (0.5..29.5 days old).
    expired = insert_aged(db, [31 + i for i in range(50)])
    kept = insert_aged(db, [0.5 + i * 1.5 for i in range(20)])
    r = purge_cli(db, "--batch", "7")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"deleted": 50, "older_than_days": 30}
    assert remaining(db) == set(kept)
    assert not set(expired) & remaining(db)
    # Nothing left to do: a second run deletes nothing.
    r = purge_cli(db, "--batch", "7")
    assert r.returncode == 0 and json.loads(r.stdout)["deleted"] == 0


def test_cli_retention_comes_from_the_environment(db):
    insert_aged(db, [1.5, 3.5, 6.5, 9.5])
    r = purge_cli(db, retention="5")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"deleted": 2, "older_than_days": 5}
    assert len(remaining(db)) == 2
    # --days overrides the environment.
    r = purge_cli(db, "--days", "2", retention="5")
    assert json.loads(r.stdout) == {"deleted": 1, "older_than_days": 2}
    assert len(remaining(db)) == 1


def test_cli_dry_run_deletes_nothing(db):
    insert_aged(db, [40, 45, 50, 2])
    before = remaining(db)
    r = purge_cli(db, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"would_delete": 3, "older_than_days": 30}
    assert remaining(db) == before


@pytest.fixture(scope="module")
def bad_args_db(pg):
    """Shared by the refusals below: none of them may delete anything."""
    url = pg.create_database()
    migrate(url)
    insert_aged(url, [40, 1])
    return url


@pytest.mark.parametrize("args,env_days", [(["--batch", "0"], "30"), (["--batch", "-5"], "30"),
                                           (["--days", "-1"], "30"), ([], "0"), ([], "soon")])
def test_cli_bad_arguments_fail_cleanly(bad_args_db, args, env_days):
    r = purge_cli(bad_args_db, *args, retention=env_days, timeout=30)
    assert r.returncode != 0, (args, env_days, r.stdout)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(remaining(bad_args_db)) == 2


def test_cli_unreachable_database_is_a_clean_error(pg):
    r = purge_cli("postgresql://nobody@127.0.0.1:1/none")
    assert r.returncode == 1
    assert "database error" in r.stderr and "Traceback" not in r.stderr


def test_runtime_purge_deletes_expired_rows(app_factory, db):
    expired = insert_aged(db, [8, 9, 10, 30])
    kept = insert_aged(db, [0.1, 3, 6.5])
    app = app_factory(db, enable_tracing=False, trace_retention_days=7)
    rt = app.extensions["omni"]
    purge = chores.purger(rt.traces, rt.settings)  # the worker's hourly chore
    purge()
    assert remaining(db) == set(kept)
    assert not set(expired) & remaining(db)
    purge()  # idempotent
    assert remaining(db) == set(kept)


def test_concurrent_purges_never_both_hold_the_lock(app_factory, db):
    n_expired = 120
    insert_aged(db, [31 + (i % 50) + i / 1000 for i in range(n_expired)])
    kept = insert_aged(db, [1, 2, 3])
    apps = [app_factory(db, enable_tracing=False) for _ in range(2)]
    cutoff = dt.datetime.now(UTC) - dt.timedelta(days=30)
    barrier = threading.Barrier(2)
    results: list = [None, None]
    errors: list = []

    def run(i: int) -> None:
        try:
            barrier.wait(10)
            results[i] = apps[i].extensions["omni"].traces.delete_older_than(cutoff, batch=5)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    deleted = sum(r or 0 for r in results)
    assert deleted == n_expired, results
    assert remaining(db) == set(kept)
    assert any(r is not None for r in results)


def test_exclusive_purge_yields_to_a_lock_holder(db):
    """While another session holds the purge lock, an exclusive purge deletes nothing and an
    explicit one waits for it."""
    from app.db import Database
    from app.traces.store import PURGE_LOCK_ID, TraceStore

    insert_aged(db, [40, 41])
    holder = psycopg2.connect(db)
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (PURGE_LOCK_ID,))
        store = TraceStore(Database(db, size=1))
        cutoff = dt.datetime.now(UTC) - dt.timedelta(days=30)
        assert store.delete_older_than(cutoff) is None
        assert len(remaining(db)) == 2
        # The non-exclusive form (the API's explicit DELETE, the CLI) waits for it, past the
        # pool's statement timeout if need be, then purges.
        store.db.close()
        store = TraceStore(Database(db, size=1, statement_timeout_ms=500))
        done: list = []
        waiter = threading.Thread(target=lambda: done.append(
            store.delete_older_than(cutoff, exclusive=False)))
        waiter.start()
        waiter.join(1.5)
        assert waiter.is_alive() and not done and len(remaining(db)) == 2
        holder.close()
        waiter.join(30)
        assert done == [2] and not remaining(db)
        store.db.close()
    finally:
        holder.close()


def test_purge_batches_hold_at_most_batch_rows_even_with_tied_timestamps(db):
    """Each delete statement of a purge removes at most `batch` rows, also when many rows
    share one created_at (a bulk load), and the purge removes exactly the expired ones."""
    from app.db import Database
    from app.traces.store import TraceStore

    now = dt.datetime.now(UTC)
    tied = now - dt.timedelta(days=40)
    conn = psycopg2.connect(db)
    with conn, conn.cursor() as cur:
        psycopg2.extras.execute_values(
            cur,
            """INSERT INTO message_trace (trace_id, instance_id, instance_name, message_id, user_id,
                   status, duration_ms, created_at, updated_at, steps) VALUES %s""",
            [(uuid.uuid4(), 1, "bot", f"tie-{i}", "whatsapp:+5511999990000", "completed", 100,
              tied, tied, psycopg2.extras.Json([])) for i in range(23)])
        # Records the row count of every DELETE statement on message_trace.
        cur.execute("""CREATE TABLE deleted_per_statement (n bigint);
                       CREATE FUNCTION count_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
                       BEGIN INSERT INTO deleted_per_statement SELECT count(*) FROM gone; RETURN NULL; END $$;
                       CREATE TRIGGER count_deleted AFTER DELETE ON message_trace REFERENCING OLD TABLE AS gone
                           FOR EACH STATEMENT EXECUTE FUNCTION count_deleted();""")
    conn.close()
    insert_aged(db, [31.5, 32, 33, 35])  # more expired rows, one in a partial hour maybe
    kept = insert_aged(db, [29, 1])
    store = TraceStore(Database(db, size=1))
    assert store.delete_older_than(now - dt.timedelta(days=30), batch=5) == 27
    store.db.close()
    assert remaining(db) == set(kept)
    conn = psycopg2.connect(db)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT n FROM deleted_per_statement")
        counts = [n for (n,) in cur.fetchall()]
    conn.close()
    assert sum(counts) == 27 and max(counts) <= 5, counts


def test_concurrent_purges_of_every_kind_keep_the_rollups_exact(db):
    """Explicit purges (the API's DELETE, the CLI) and periodic ones run at once, pass after
    pass with the cutoff moving through partial days: every expired row is deleted once and
    the rollups equal a recomputation from the rows left (two subtractions of the same hourly
    rollups would count those hours twice)."""
    from app.db import Database
    from app.traces.store import TraceStore
    from tests.integration.test_analytics_rollup import assert_rollups_exact, dense_rows
    from tests.integration.test_traces_api import insert_rows

    now = dt.datetime.now(UTC)
    insert_rows(db, dense_rows(3000, now, seed=23, days=4.0))
    assert_rollups_exact(db)
    kinds = [False, False, False, True, True]  # exclusive: the periodic purge's try-lock
    stores = [TraceStore(Database(db, size=1)) for _ in kinds]
    try:
        for days in (3.6, 3.1, 2.55, 2.2, 1.45):
            cutoff = now - dt.timedelta(days=days)
            conn = psycopg2.connect(db)
            with conn, conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM message_trace WHERE created_at < %s", (cutoff,))
                expected = cur.fetchone()[0]
            conn.close()
            barrier = threading.Barrier(len(kinds))
            results: list = [None] * len(kinds)
            errors: list = []

            def run(i: int, barrier=barrier, results=results, cutoff=cutoff, errors=errors) -> None:
                try:
                    barrier.wait(10)
                    results[i] = stores[i].delete_older_than(cutoff, batch=200, exclusive=kinds[i])
                except Exception as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(kinds))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors
            assert sum(r or 0 for r in results) == expected, (days, results, expected)
            assert all(results[i] is not None for i, exclusive in enumerate(kinds) if not exclusive)
            assert_rollups_exact(db)
    finally:
        for store in stores:
            store.db.close()
