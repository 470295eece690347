"""What the bench starts: PostgreSQL, sandboxes, omni services, the bare reference, Loki.

Reuses tests.support (PgCluster, Sandbox, Service, migrate); everything is stopped by PID.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from demo.processes import (PYTHON, ROOT, PgCluster, Sandbox, Service, free_port, migrate,
                           stop_process, wait_http)

TELEMETRY_OFF = {"AUTOMAGIK_OMNI_ENABLE_TRACING": "false", "AUTOMAGIK_OMNI_ENABLE_METRICS": "false",
                 "AUTOMAGIK_OMNI_ENABLE_DETAILED_LOGGING": "false"}
# Each telemetry layer alone on top of TELEMETRY_OFF, for the cost-by-layer table; the Loki
# push is measured with the detailed lines it ships (the receiver's URL is added at run time).
LAYERS = {"tracing": {"AUTOMAGIK_OMNI_ENABLE_TRACING": "true"},
          "metrics": {"AUTOMAGIK_OMNI_ENABLE_METRICS": "true"},
          "detailed logs": {"AUTOMAGIK_OMNI_ENABLE_DETAILED_LOGGING": "true"},
          "detailed logs + loki": {"AUTOMAGIK_OMNI_ENABLE_DETAILED_LOGGING": "true", "loki": "yes"}}
# SPEC 3 defaults (tests.support.Service uses 8 threads); the bare endpoint gets the same.
WORKERS, THREADS = 2, 16


class Pg:
    """PgCluster with fsync (realistic commits) and a helper for the postmaster's processes."""

    def __init__(self) -> None:
        self.cluster = PgCluster(fsync=True)

    def new_db(self) -> str:
        url = self.cluster.create_database()
        migrate(url)
        return url

    def processes(self) -> list[psutil.Process]:
        pid = int((self.cluster.data / "postmaster.pid").read_text().split()[0])
        master = psutil.Process(pid)
        return [master] + master.children(recursive=True)

    def version(self) -> str:
        import psycopg2

        conn = psycopg2.connect(self.cluster.url)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version")
                return cur.fetchone()[0]
        finally:
            conn.close()

    def destroy(self) -> None:
        self.cluster.destroy()


def omni(database_url: str, env: dict | None = None) -> Service:
    """A started omni service (gunicorn, 2 workers, 16 threads)."""
    svc = Service(database_url, {"AUTOMAGIK_OMNI_THREADS": str(THREADS), **(env or {})},
                  workers=WORKERS)
    return svc.start()


class Bare:
    """The reference: gunicorn + Flask parsing the same body, same worker model."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [str(Path(PYTHON).parent / "gunicorn"), "-k", "gthread", "-w", str(WORKERS),
             "--threads", str(THREADS), "-b", f"127.0.0.1:{self.port}", "--keep-alive", "5",
             "--log-level", "warning", "bench.bare_app:app"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(self.url + "/health", proc=self.proc)

    def stop(self) -> None:
        stop_process(self.proc)


class Loki:
    """bench.loki_proc (a tests.loki_receiver.LokiReceiver) in its own process."""

    def __init__(self) -> None:
        self.stats_path = tempfile.mktemp(prefix="omni-bench-loki-", suffix=".json")
        self.proc = subprocess.Popen([PYTHON, "-m", "bench.loki_proc", self.stats_path], cwd=ROOT,
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        self.url = f"http://127.0.0.1:{self.port}"

    def stats(self) -> dict:
        try:
            with open(self.stats_path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return {"entries": 0, "errors": 0, "pushes": 0, "requests": 0}

    def stop(self) -> None:
        stop_process(self.proc)
        if os.path.exists(self.stats_path):
            os.remove(self.stats_path)


def sandbox(median_ms: int = 0) -> Sandbox:
    """The demo sandbox with the given agent median latency."""
    return Sandbox(SANDBOX_LATENCY_MEDIAN_MS=str(median_ms), SANDBOX_LOG_LEVEL="WARNING")


def tree(pid: int) -> list[psutil.Process]:
    """A process and its descendants."""
    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.Error:
        return []


class CpuMeter:
    """CPU seconds (user+system) used by named process groups between start() and stop()."""

    def __init__(self, groups: dict) -> None:
        self.groups = groups  # name -> callable returning the list of processes
        self._start: dict[str, dict[int, float]] = {}

    @staticmethod
    def _times(procs) -> dict[int, float]:
        out = {}
        for p in procs:
            try:
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def start(self) -> None:
        self._start = {name: self._times(get()) for name, get in self.groups.items()}
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        out = {}
        for name, get in self.groups.items():
            end = self._times(get())
            begin = self._start.get(name, {})
            out[name] = sum(v - begin.get(pid, 0.0) for pid, v in end.items())
        return out


def self_process() -> list[psutil.Process]:
    return [psutil.Process()]
