"""PostgreSQL access: a small blocking pool, query helpers and the migration runner.

This is the only module that imports psycopg2; everything else speaks SQL with
%(name)s parameters through the helpers here and sees DatabaseUnavailable on outages.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import random
import re
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import psycopg2
import psycopg2.extensions
import psycopg2.extras

log = logging.getLogger("omni.db")

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
# Any constant works; it only has to be the same for every process running migrations.
MIGRATION_LOCK_ID = 72_011_001
# An ALTER TABLE queued behind a long transaction (a dashboard query, a report) holds up
# every writer queued behind it until it gets its lock: webhooks would stall, and past the
# commit wait be refused. So the runner first takes the tables the pending migrations alter,
# giving up each try after MIGRATION_LOCK_TRY_MS (a writer waits at most that long) and
# trying again until MIGRATION_LOCK_PATIENCE_S.
MIGRATION_LOCK_TRY_MS = 200
MIGRATION_LOCK_PATIENCE_S = 120.0
_ALTERED = re.compile(r"\bALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?"
                      r"([A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)?)", re.IGNORECASE)

psycopg2.extras.register_uuid()


class DatabaseUnavailable(Exception):
    """The database cannot be reached or the connection broke."""


class DatabaseError(Exception):
    """The database answered with an error (constraint, bad SQL, timeout)."""


class RowRejected(DatabaseError):
    """The database refused the values of a row (a data or integrity error): the same
    statement fails again however often it is retried."""


class UniqueViolation(RowRejected):
    """An INSERT or UPDATE hit a unique constraint."""


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) and not isinstance(
        exc, psycopg2.errors.QueryCanceled
    ):
        return DatabaseUnavailable(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if isinstance(exc, psycopg2.errors.UniqueViolation):
        return UniqueViolation(str(exc).strip())
    if isinstance(exc, (psycopg2.DataError, psycopg2.IntegrityError)):
        return RowRejected(str(exc).strip())
    return DatabaseError(str(exc).strip())


class Database:
    """A bounded pool of connections; callers block (briefly) when all are in use."""

    def __init__(self, url: str, *, size: int = 8, connect_timeout: int = 3,
                 statement_timeout_ms: int = 15000, application_name: str = "omni") -> None:
        self.url = url
        self._size = size
        self._idle: "queue.LifoQueue[psycopg2.extensions.connection]" = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._kwargs = {
            "connect_timeout": connect_timeout,
            "application_name": application_name,
            # Keepalives detect a dead server on idle pooled connections.
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
            "options": f"-c statement_timeout={statement_timeout_ms} -c timezone=UTC",
        }

    def _connect(self) -> psycopg2.extensions.connection:
        try:
            return psycopg2.connect(self.url, **self._kwargs)
        except psycopg2.Error as exc:
            raise _translate(exc) from None

    @contextlib.contextmanager
    def connection(self, *, wait: float = 10.0) -> Iterator[psycopg2.extensions.connection]:
        """Borrow a connection; commit on success, roll back on error, discard if broken."""
        if not self._slots.acquire(timeout=wait):
            raise DatabaseUnavailable("connection pool exhausted")
        conn = None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            try:
                yield conn
                conn.commit()
            except psycopg2.Error as exc:
                self._discard_or_rollback(conn)
                conn = None if conn.closed else conn
                raise _translate(exc) from None
            except BaseException:
                self._discard_or_rollback(conn)
                conn = None if conn.closed else conn
                raise
        finally:
            if conn is not None and not conn.closed:
                self._idle.put(conn)
            self._slots.release()

    @staticmethod
    def _discard_or_rollback(conn: psycopg2.extensions.connection) -> None:
        try:
            conn.rollback()
        except psycopg2.Error:
            conn.close()

    @contextlib.contextmanager
    def cursor(self, *, dict_rows: bool = True, autocommit: bool = False) -> Iterator[Any]:
        """A cursor in its own transaction (dict rows by default).

        With autocommit every statement is its own transaction: no BEGIN and COMMIT round
        trips, for callers whose work is one statement (the trace writer's batches).
        """
        factory = psycopg2.extras.RealDictCursor if dict_rows else None
        with self.connection() as conn:
            if autocommit:
                conn.autocommit = True
            try:
                with conn.cursor(cursor_factory=factory) as cur:
                    yield cur
            finally:
                if autocommit and not conn.closed:
                    conn.autocommit = False

    def fetchall(self, sql: str, params: Any = None) -> list[dict]:
        """Rows of a query as dicts."""
        with self.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())

    def fetchone(self, sql: str, params: Any = None) -> dict | None:
        """The first row of a query as a dict, or None."""
        with self.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    def execute(self, sql: str, params: Any = None) -> int:
        """Run a statement; return the number of rows it touched."""
        with self.cursor() as cur:
            cur.execute(sql, params)
            return cur.rowcount

    def ping(self) -> None:
        """Raise DatabaseUnavailable unless the server answers."""
        self.fetchone("SELECT 1 AS ok")

    def close(self) -> None:
        """Close idle connections (in-use ones close when returned after this)."""
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


def execute_values(cur: Any, sql: str, rows: Sequence[Sequence[Any]], *, template: str | None = None,
                   fetch: bool = False, page_size: int = 1000) -> list:
    """Many rows in one statement (the `VALUES %s` of `sql` is expanded)."""
    return psycopg2.extras.execute_values(cur, sql, rows, template=template, fetch=fetch,
                                          page_size=page_size) or []


def connect_once(url: str, *, connect_timeout: int = 3) -> psycopg2.extensions.connection:
    """A single autocommit connection outside any pool (CLI, gunicorn master hooks)."""
    try:
        conn = psycopg2.connect(url, connect_timeout=connect_timeout, application_name="omni-admin",
                                options="-c timezone=UTC")
    except psycopg2.Error as exc:
        raise _translate(exc) from None
    conn.autocommit = True
    return conn


def migration_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    """The numbered migration files, in order."""
    files = sorted(p for p in sql_dir.glob("[0-9][0-9][0-9]_*.sql"))
    numbers = [p.name[:3] for p in files]
    if len(set(numbers)) != len(numbers):
        raise RuntimeError(f"two migrations share a number in {sql_dir}")
    return files


def altered_tables(scripts: list[str]) -> list[str]:
    """Tables named by ALTER TABLE in the scripts (comments skipped), in order of appearance."""
    names: list[str] = []
    for script in scripts:
        for name in _ALTERED.findall(re.sub(r"--[^\n]*", "", script)):
            if name.lower() not in names:
                names.append(name.lower())
    return names


def _lock_altered_tables(cur: Any, scripts: list[str]) -> None:
    """Hold ACCESS EXCLUSIVE on the existing tables the scripts alter, for the transaction.

    Taken in the order the scripts name them (writers take message_trace before the rollups
    its triggers write), each try bounded so writers never queue long behind it.
    """
    tables = []
    for name in altered_tables(scripts):
        cur.execute("SELECT to_regclass(%(n)s)::text", {"n": name})
        found = cur.fetchone()[0]
        if found is not None:
            tables.append(found)
    if not tables:
        return
    deadline = time.monotonic() + MIGRATION_LOCK_PATIENCE_S
    tries = 0
    while True:
        tries += 1
        cur.execute("SAVEPOINT omni_migration_locks")
        try:
            cur.execute(f"SET LOCAL lock_timeout = '{MIGRATION_LOCK_TRY_MS}ms'")
            # Names come from to_regclass, already quoted where needed.
            cur.execute(f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")
        except psycopg2.errors.LockNotAvailable:
            cur.execute("ROLLBACK TO SAVEPOINT omni_migration_locks")
            if time.monotonic() > deadline:
                raise DatabaseError(
                    f"migrations not applied: {', '.join(tables)} stayed in use by another "
                    f"transaction for {MIGRATION_LOCK_PATIENCE_S:g} s ({tries} tries); run "
                    "`python -m app migrate` again once it has ended") from None
            time.sleep(random.uniform(0.3, 0.7))
            continue
        cur.execute("RELEASE SAVEPOINT omni_migration_locks")
        # The migrations' own statements run with the timeouts they set themselves.
        cur.execute("SET LOCAL lock_timeout TO DEFAULT")
        if tries > 1:
            log.info("migration locks taken", extra={"event": "migration_locks", "tables": tables,
                                                     "tries": tries})
        return


def migrate(url: str, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply pending migrations in one transaction under an advisory lock; return what ran."""
    conn = connect_once(url, connect_timeout=10)
    conn.autocommit = False
    applied: list[str] = []
    try:
        with conn.cursor() as cur:
            # Serialises concurrent runs: the second waits, then finds nothing left to do.
            cur.execute("SELECT pg_advisory_xact_lock(%(id)s)", {"id": MIGRATION_LOCK_ID})
            cur.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                               version text PRIMARY KEY,
                               applied_at timestamptz NOT NULL DEFAULT now())""")
            cur.execute("SELECT version FROM schema_migrations")
            done = {row[0] for row in cur.fetchall()}
            pending = [path for path in migration_files(sql_dir) if path.name not in done]
            _lock_altered_tables(cur, [path.read_text() for path in pending])
            for path in pending:
                cur.execute(path.read_text())
                cur.execute("INSERT INTO schema_migrations (version) VALUES (%(v)s)", {"v": path.name})
                applied.append(path.name)
        conn.commit()
    except psycopg2.Error as exc:
        conn.rollback()
        raise _translate(exc) from None
    finally:
        conn.close()
    return applied
