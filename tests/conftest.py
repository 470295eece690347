"""Shared fixtures: one PostgreSQL cluster, one sandbox, one gunicorn service per session."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.processes import create_database, stop_process  # noqa: E402
from tests.support import API_KEY, PgCluster, Sandbox, Service, migrate  # noqa: E402

GRAFANA_READER_PASSWORD = "reader-" + uuid.uuid4().hex[:12]

# The quick bench takes about a minute, mostly its own processes waiting on timed phases: it
# starts when collection ends and runs beside the suite; its test, moved last, waits for it.
BENCH_SMOKE = ("test_bench_smoke.py", "test_bench_quick_writes_every_figure")
BENCH_RUN = pytest.StashKey[dict]()


@pytest.hookimpl(trylast=True)  # after -k and -m deselected what will not run
def pytest_collection_modifyitems(config, items):
    """Move the bench smoke test last and start `python -m bench --quick` for it."""
    smoke = [item for item in items if (item.path.name, item.name) == BENCH_SMOKE]
    if not smoke or config.option.collectonly:
        return
    items[:] = [item for item in items if item not in smoke] + smoke
    out = Path(tempfile.mkdtemp(prefix="omni-bench-smoke-"))
    with open(out / "stdout.txt", "w") as stdout, open(out / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "bench", "--quick", "--out", str(out / "results")],
                                cwd=Path(__file__).resolve().parent.parent, stdout=stdout, stderr=stderr)
    config.stash[BENCH_RUN] = {"proc": proc, "out": out}


def pytest_unconfigure(config):
    """Stop the quick bench if the session ends before its test waited for it."""
    run = config.stash.get(BENCH_RUN, None)
    if run is None:
        return
    # SIGINT: the bench's finally blocks stop the PostgreSQL and services it started.
    stop_process(run["proc"], signal.SIGINT, timeout=30)
    shutil.rmtree(run["out"], ignore_errors=True)


@pytest.fixture()
def bench_run(request):
    """The quick bench started at collection (see pytest_collection_modifyitems)."""
    run = request.config.stash.get(BENCH_RUN, None)
    assert run is not None, "the quick bench was not started at collection (tests/conftest.py)"
    return run


@pytest.fixture(scope="session")
def pg():
    """A throwaway PostgreSQL cluster for the session (or the server in
    AUTOMAGIK_OMNI_TEST_DATABASE_URL, on which each test database is created)."""
    url = os.environ.get("AUTOMAGIK_OMNI_TEST_DATABASE_URL")
    if url:
        yield ExternalServer(url)
        return
    cluster = PgCluster()
    yield cluster
    cluster.destroy()


class ExternalServer:
    """Stand-in for PgCluster over an existing server (needs CREATEDB and CREATEROLE)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def create_database(self, name: str | None = None) -> str:
        """A new database on that server."""
        return create_database(self.url, name)


def create_grafana_reader(url: str) -> None:
    """The read-only role as postgres/init/01-grafana-reader.sh creates it, then its grants."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = 'grafana_reader'")
        if cur.fetchone() is None:
            cur.execute("CREATE ROLE grafana_reader LOGIN PASSWORD %(p)s", {"p": GRAFANA_READER_PASSWORD})
        else:
            cur.execute("ALTER ROLE grafana_reader LOGIN PASSWORD %(p)s", {"p": GRAFANA_READER_PASSWORD})
        cur.execute((Path(__file__).resolve().parent.parent / "sql" / "003_grafana_reader_grants.sql")
                    .read_text())
    conn.close()


@pytest.fixture(scope="session")
def database_url(pg):
    """Superuser URL of a session database with every migration and the reader role."""
    url = pg.create_database()
    # The role first, as in Docker (postgres/init runs before the migrations): each
    # migration's grants then apply as they would there.
    create_grafana_reader(url)
    migrate(url)
    return url


@pytest.fixture(scope="session")
def grafana_reader_url(database_url):
    """The same database as the Grafana read-only role."""
    from urllib.parse import urlparse, urlunparse

    parsed = urlparse(database_url)
    netloc = f"grafana_reader:{GRAFANA_READER_PASSWORD}@{parsed.hostname}:{parsed.port}"
    return urlunparse(parsed._replace(netloc=netloc))


@pytest.fixture()
def fresh_db(pg):
    """A new, migrated database for one test."""
    url = pg.create_database()
    migrate(url)
    return url


@pytest.fixture(scope="session")
def sandbox():
    """The demo sandbox (agent + Evolution simulator), answering at once."""
    box = Sandbox()
    yield box
    box.stop()


@pytest.fixture(scope="session")
def service(database_url, sandbox):
    """omni under gunicorn with 2 workers, its sandbox instance `bot` ready."""
    svc = Service(database_url, {"AUTOMAGIK_OMNI_SLOW_MESSAGE_SECONDS": "10"}).start()
    svc.ensure_instance("bot", sandbox.url)
    svc.sandbox = sandbox
    yield svc
    svc.stop()


@pytest.fixture()
def make_service(pg, sandbox):
    """Factory for services with their own database and settings, stopped after the test."""
    started: list[Service] = []

    def factory(env: dict | None = None, *, database_url: str | None = None, workers: int = 2,
                start: bool = True) -> Service:
        url = database_url
        if url is None:
            url = pg.create_database()
            migrate(url)
        svc = Service(url, env or {}, workers=workers)
        svc.sandbox = sandbox
        started.append(svc)
        return svc.start() if start else svc

    yield factory
    for svc in started:
        svc.stop()


@pytest.fixture()
def app_factory(pg):
    """In-process Flask apps (real PostgreSQL) for API tests that need no gunicorn."""
    from app import create_app
    from app.config import Settings

    apps = []

    def factory(database_url: str | None = None, **overrides):
        url = database_url
        if url is None:
            url = pg.create_database()
            migrate(url)
        settings = Settings(api_key=API_KEY, database_url=url, **overrides)
        app = create_app(settings)
        apps.append(app)
        return app

    yield factory
    for app in apps:
        app.extensions["omni"].shutdown()


@pytest.fixture(scope="session")
def traffic(service, sandbox):
    """The session service has processed completed, failed (agent and Evolution) and slow messages."""
    from concurrent.futures import ThreadPoolExecutor

    service.ensure_instance("patient", sandbox.url, agent_timeout_s=30)
    texts = [("bot", f"hello {i}") for i in range(20)] + [
        ("bot", "#status=500 fail"), ("bot", "#status=401 denied"), ("bot", "#evo_status=500 evo"),
        ("patient", "#delay=10500 slow one")]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda t: service.send(*t), texts))
    assert all(a.status_code == 202 for a in answers), [a.text for a in answers]
    return [service.wait_final(a.json()["trace_id"], timeout=40) for a in answers]


@pytest.fixture(scope="session")
def prometheus(service, traffic):
    """A real Prometheus scraping the session service every second, with the project's rules."""
    from tests.support import Prometheus

    prom = Prometheus(f"127.0.0.1:{service.port}")
    prom.wait_for('omni_messages_total{status="completed"}')
    # Rates need samples that change between scrapes: more traffic while it watches.
    for i in range(3):
        answers = [service.send("bot", f"watched {i}-{j}") for j in range(5)]
        for a in answers:
            service.wait_final(a.json()["trace_id"])
        time.sleep(1.1)
    prom.wait_for('sum(rate(omni_messages_total[1m])) > 0')
    yield prom
    prom.stop()


@pytest.fixture(scope="session")
def prometheus_url(prometheus):
    """Base URL of the Prometheus that scraped the service under traffic."""
    return prometheus.url


@pytest.fixture()
def stoppable(sandbox):
    """A service (2 workers, short drain) on its own PostgreSQL cluster that the test may stop.

    Yields (cluster, service); the session cluster is never touched.
    """
    cluster = PgCluster()
    svc = None
    try:
        url = cluster.create_database()
        migrate(url)
        svc = Service(url, {"AUTOMAGIK_OMNI_SHUTDOWN_GRACE_S": "2"}).start()
        svc.sandbox = sandbox
        yield cluster, svc
    finally:
        if svc is not None:
            svc.stop()
        cluster.destroy()
