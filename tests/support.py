"""Test-only helpers; the process runners themselves live in demo/processes.py."""
from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import psycopg2

from demo.processes import (  # noqa: F401 - the runners tests use, from their one home
    API_KEY, PG_BIN, PYTHON, ROOT, PgCluster, Prometheus, Sandbox, Service, free_port, metric,
    migrate, parse_metrics, stop_process, wait_http, webhook)


def rows(url: str, sql: str, params=None) -> list[tuple]:
    """Run one query on a fresh connection; all its rows."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()



class LocalHTTPServer(ThreadingHTTPServer):
    """A test HTTP server that serves from a thread for the length of a `with` block."""

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
