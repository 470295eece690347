"""Real local processes without Docker: PostgreSQL, the sandbox, gunicorn, Prometheus.

One place for the runners `make run` (demo/native.py), the benchmarks and the tests use.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import requests

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


def query_rows(url: str, sql: str, params=None) -> list[tuple]:
    """Every row of one query, on a fresh connection (tests and benches, not the service)."""
    conn = psycopg2.connect(url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


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


ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
API_KEY = "test-api-key-0123456789"


def migrate(url: str) -> None:
    """Apply the project's migrations with the real CLI."""
    env = {**os.environ, "AUTOMAGIK_OMNI_DATABASE_URL": url}
    subprocess.run([PYTHON, "-m", "app", "migrate"], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True)


class Sandbox:
    """demo.sandbox as a real process on a free port."""

    def __init__(self, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tempfile.mktemp(prefix="omni-sandbox-", suffix=".log"), "w+")
        self.proc = subprocess.Popen([PYTHON, "-m", "demo.sandbox", "--port", str(self.port)],
                                     cwd=ROOT, env={**os.environ, **env},
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/health", proc=self.proc)

    def sent(self) -> list[dict]:
        """What the Evolution side received, newest first."""
        return requests.get(self.url + "/sent", timeout=5).json()

    def stop(self) -> None:
        """Stop it."""
        stop_process(self.proc)
        self.log.close()


@dataclass
class Service:
    """The omni service under gunicorn (real workers), with its environment and output."""

    database_url: str
    env_overrides: dict = field(default_factory=dict)
    workers: int = 2
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path = field(default_factory=lambda: Path(tempfile.mktemp(prefix="omni-gunicorn-",
                                                                       suffix=".log")))
    metrics_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="omni-metrics-")))

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str:
        """The x-api-key in force."""
        return self.env()["AUTOMAGIK_OMNI_API_KEY"]

    def env(self) -> dict:
        """The process environment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOMAGIK_OMNI_")}
        env.update({
            "AUTOMAGIK_OMNI_API_KEY": API_KEY,
            "AUTOMAGIK_OMNI_DATABASE_URL": self.database_url,
            "AUTOMAGIK_OMNI_HOST": "127.0.0.1",
            "AUTOMAGIK_OMNI_PORT": str(self.port),
            "AUTOMAGIK_OMNI_WORKERS": str(self.workers),
            "AUTOMAGIK_OMNI_THREADS": "8",
            "AUTOMAGIK_OMNI_SHUTDOWN_GRACE_S": "5",
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),
        })
        env.update(self.env_overrides)
        return {k: v for k, v in env.items() if v is not None}

    def start(self, wait: bool = True) -> "Service":
        """Start gunicorn and wait for /health."""
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [str(Path(PYTHON).parent / "gunicorn"), "-c", "app/gunicorn.conf.py", "app:create_app()"],
            cwd=ROOT, env=self.env(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait:
            wait_http(self.url + "/health", proc=self.proc, timeout=40)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop gunicorn (graceful with SIGTERM)."""
        return stop_process(self.proc, sig, timeout=60) if self.proc else 0

    def worker_pids(self) -> list[int]:
        """PIDs of the live gunicorn workers."""
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children()]

    def log_lines(self) -> list[dict]:
        """Every JSON line the service printed (non-JSON lines are returned as {'raw': line})."""
        # Workers write stdout in batches every StdoutHandler.FLUSH_INTERVAL_S (0.1 s).
        time.sleep(0.25)
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    # --- API helpers ---------------------------------------------------------------------

    def api(self, method: str, path: str, **kw) -> requests.Response:
        """A call with the API key."""
        headers = {"x-api-key": self.api_key, **kw.pop("headers", {})}
        return requests.request(method, self.url + path, headers=headers, timeout=30, **kw)

    def ensure_instance(self, name: str, sandbox_url: str, **fields) -> dict:
        """Create the instance if missing (or replace its settings)."""
        body = {"name": name, "agent_api_url": sandbox_url, "evolution_url": sandbox_url,
                "agent_api_key": "agent-key-abcdef123456", "evolution_api_key": "evo-key-abcdef123456",
                "agent_timeout_s": 5, **fields}
        r = self.api("POST", "/api/v1/instances", json=body)
        if r.status_code == 409:
            patch = {k: v for k, v in body.items() if k != "name"}
            r = self.api("PATCH", f"/api/v1/instances/{name}", json=patch)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def send(self, instance: str, text: str, *, message_id: str | None = None, digits: str = "5515551234567",
             headers: dict | None = None, **kw) -> requests.Response:
        """POST an Evolution webhook for one text message."""
        return requests.post(f"{self.url}/webhook/evolution/{instance}",
                             json=webhook(instance, text, message_id=message_id, digits=digits, **kw),
                             headers=headers or {}, timeout=30)

    def wait_final(self, trace_id: str, timeout: float = 30.0) -> dict:
        """Poll the trace API until the trace leaves `processing`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.api("GET", f"/api/v1/traces/{trace_id}")
            if r.status_code == 200 and r.json()["status"] != "processing":
                return r.json()
            time.sleep(0.05)
        raise AssertionError(f"trace {trace_id} still not final after {timeout} s")

    def metrics_text(self) -> str:
        """One scrape of /metrics."""
        r = requests.get(self.url + "/metrics", timeout=10)
        assert r.status_code == 200, r.text
        return r.text


def webhook(instance: str, text: str, *, message_id: str | None = None,
            digits: str = "5515551234567", from_me: bool = False, event: str = "messages.upsert",
            extended: bool = False) -> dict:
    """An Evolution API v2 messages.upsert envelope."""
    message = {"extendedTextMessage": {"text": text}} if extended else {"conversation": text}
    return {"event": event, "instance": instance,
            "data": {"key": {"remoteJid": f"{digits}@s.whatsapp.net", "fromMe": from_me,
                             "id": message_id or "3EB0" + uuid.uuid4().hex[:16].upper()},
                     "pushName": "Ana", "message": message,
                     "messageType": "extendedTextMessage" if extended else "conversation",
                     "messageTimestamp": int(time.time())},
            "date_time": "2025-12-19T10:30:00.000Z", "server_url": "http://evolution:8080",
            "apikey": None}


def parse_metrics(text: str) -> dict:
    """{(name, frozenset(labels)): value} from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of name whose labels include the given ones."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


class Prometheus:
    """A real Prometheus (Debian package) scraping the given target with the project's rules."""

    def __init__(self, target: str, scrape_interval: str = "1s", config: str = "prometheus.native.yml",
                 token_file: Path | None = None) -> None:
        """config: which of prometheus/*.yml; token_file stands in for its bearer-token file."""
        import yaml

        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed: apt-get install -y prometheus "
                               "(make test does this when run as root)")
        self.dir = Path(tempfile.mkdtemp(prefix="omni-prom-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load((ROOT / "prometheus" / config).read_text())
        config["global"]["scrape_interval"] = scrape_interval
        config["global"]["evaluation_interval"] = scrape_interval
        config["rule_files"] = [str(ROOT / "prometheus" / "rules" / "*.yml")]
        for job in config["scrape_configs"]:
            job.pop("dns_sd_configs", None)
            job["static_configs"] = [{"targets": [target if job["job_name"] == "omni"
                                                  else f"127.0.0.1:{self.port}"]}]
            if "authorization" in job:
                job["authorization"]["credentials_file"] = str(token_file)
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(self.dir / "log", "w")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.dir / 'prometheus.yml'}",
             f"--storage.tsdb.path={self.dir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/-/ready", proc=self.proc, timeout=30)

    def query(self, expr: str) -> dict:
        """Instant query; returns the `data` of a successful answer (raises otherwise)."""
        r = requests.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"query failed: {expr}: {body}")
        return body["data"]

    def wait_for(self, expr: str, timeout: float = 30.0) -> list:
        """Poll until the query returns a non-empty result."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expr)["result"]
            if result:
                return result
            time.sleep(0.5)
        raise AssertionError(f"no data for {expr} after {timeout} s")

    def stop(self) -> None:
        """Stop it and remove its data."""
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
