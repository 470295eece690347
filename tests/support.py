"""Test-only helpers; the process runners themselves live in demo/processes.py."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from demo.processes import (  # noqa: F401 - the runners tests use, from their one home
    API_KEY, PG_BIN, PYTHON, ROOT, PgCluster, Prometheus, Sandbox, Service, free_port, metric,
    migrate, parse_metrics, stop_process, wait_http, webhook)
from demo.processes import query_rows as rows  # noqa: F401


class LocalHTTPServer(ThreadingHTTPServer):
    """A test HTTP server that serves from a thread for the length of a `with` block."""

    def __enter__(self):
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet keep-alive request handler that answers JSON, for the test stubs."""

    protocol_version = "HTTP/1.1"  # keep-alive, like gunicorn

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
