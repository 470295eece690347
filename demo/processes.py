"""Local processes without Docker: a throwaway PostgreSQL cluster and process helpers.

Used by `make run` (demo/native.py), the test suite and the benchmarks.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psycopg2

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None,
              ok=(200,)) -> None:
    """Poll url until it answers one of ok (fail early if proc died)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (OSError, ValueError) as exc:
            status, last = None, exc
        if status in ok:
            return
        if status is not None:
            last = status
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout} s (last: {last})")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Signal a process we started (by PID) and wait for it; SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class PgCluster:
    """A throwaway PostgreSQL 15 cluster on a free port (run as user postgres when root)."""

    def __init__(self, fsync: bool = False) -> None:
        initdb = PG_BIN / "initdb"
        if not initdb.exists():
            raise RuntimeError(f"PostgreSQL 15 server binaries not found in {PG_BIN}: "
                               "apt-get install postgresql-15 (or set PG_BIN)")
        self.dir = Path(tempfile.mkdtemp(prefix="omni-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.fsync = fsync
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run([str(initdb), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                   "--no-sync", "-E", "UTF8", "--locale=C"])
        self.start()

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--"] + argv
        return subprocess.run(argv, check=check, capture_output=True, text=True)

    @property
    def url(self) -> str:
        """Superuser URL of the maintenance database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def db_url(self, name: str, user: str = "postgres", password: str | None = None) -> str:
        """URL of a database on this cluster."""
        cred = user if password is None else f"{user}:{password}"
        return f"postgresql://{cred}@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        """Start (or restart) the server and wait until it accepts connections."""
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                f"-c max_connections=300 -c shared_buffers=128MB")
        if not self.fsync:
            # Test data is disposable; skipping fsync keeps the suite fast.
            opts += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"),
                   "-o", opts, "-w", "-t", "30", "start"])

    def stop(self, mode: str = "fast") -> None:
        """Stop the server."""
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"], check=False)

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its superuser URL."""
        return create_database(self.url, name)

    def destroy(self) -> None:
        """Stop and delete everything."""
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def create_database(admin_url: str, name: str | None = None) -> str:
    """CREATE DATABASE on the server of admin_url; returns the new database's URL."""
    from urllib.parse import urlparse, urlunparse

    name = name or "t_" + uuid.uuid4().hex[:12]
    conn = psycopg2.connect(admin_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        # Identifiers cannot be parameters; the name is ours (t_ + hex) or the caller's literal.
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return urlunparse(urlparse(admin_url)._replace(path="/" + name))
