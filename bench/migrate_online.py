"""`python -m bench.migrate_online [--traces N] [--quick] [--out DIR]`: an upgrade under traffic.

The realistic upgrade: the gateway of the release before the newest migrations keeps serving
webhooks at 100 msg/s on a database of N traces while `python -m app migrate` of this tree
applies those migrations; then this tree's code starts beside it on the migrated schema.

1. A fresh database migrated with the migrations the old release had (its sql/ files,
   identical to this tree's: released migrations never change), N traces loaded in bulk
   through the rollup triggers (bench/traces.py).
2. The old release (`git archive` of the parent of the commit that added the first newer
   migration, into a temporary directory) under gunicorn, 2 workers.
3. Webhooks at 100 msg/s; after a warm-up, `python -m app migrate` of this tree, timed;
   pg_stat_activity sampled every 50 ms for backends waiting on a lock and what blocks them.
4. This tree's service beside the old one on the migrated schema, both under traffic.

Writes <out>/migrate-online-<stamp>.json and .md and prints the Markdown; exits 1 when a
webhook was refused, the migrations did not apply or a message did not finish.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psycopg2

from app.db import migrate as apply_migrations
from app.db import migration_files
from bench import traces
from demo.loadgen import build_webhook
from demo.processes import PYTHON, ROOT, PgCluster, Sandbox, Service, query_rows, wait_http

INSTANCE = "mig"
RATE = 100.0
TARGET_MS = 1000.0
# The migrations that came with the Evolution traffic and agent usage work: the first one
# applied to a running gateway; the old release is the code from just before it.
FIRST_NEW = "009"
FULL = dict(traces=1_000_000, warmup_s=20, after_s=20, side_by_side_s=15, first=FIRST_NEW,
            old=None, reader_s=0.0)
QUICK = dict(traces=20_000, warmup_s=5, after_s=5, side_by_side_s=5, first=FIRST_NEW,
             old=None, reader_s=0.0)
SAMPLE_S = 0.05
# Backends of the database waiting for a lock, with the statement they wait behind.
WAITING = """
SELECT a.pid, a.wait_event, extract(epoch FROM now() - a.query_start)::float8 AS waited_s,
       left(a.query, 160), pg_blocking_pids(a.pid),
       (SELECT left(b.query, 160) FROM pg_stat_activity b
        WHERE b.pid = (pg_blocking_pids(a.pid))[1])
FROM pg_stat_activity a
WHERE a.wait_event_type = 'Lock' AND a.datname = current_database() AND a.pid <> pg_backend_pid()
"""


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(f"[migrate-online {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def git(*args: str) -> str:
    """Output of a git command in this tree."""
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()


def release_before(migration: Path) -> str:
    """The commit just before `migration` was added: the release that did not have it."""
    added = git("log", "--format=%H", "--diff-filter=A", "--", f"sql/{migration.name}").split()
    if not added:
        raise SystemExit(f"sql/{migration.name} is not committed: nothing to compare with")
    return git("rev-parse", added[-1] + "^")


def old_release(commit: str) -> tuple[str, Path]:
    """(full commit, directory holding that commit's tree)."""
    commit = git("rev-parse", "--verify", commit + "^{commit}")
    tree = Path(tempfile.mkdtemp(prefix="omni-old-release-"))
    # An archive rather than a worktree: nothing is registered in the shared repository.
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return commit, tree


@dataclass
class TreeService(Service):
    """Service running the code of another tree (the old release)."""

    root: Path = ROOT

    def start(self, wait: bool = True) -> "TreeService":
        """Start gunicorn from `root` and wait for /health."""
        log_file = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [str(Path(PYTHON).parent / "gunicorn"), "-c", "app/gunicorn.conf.py", "app:create_app()"],
            cwd=self.root, env={**self.env(), "PYTHONPATH": str(self.root)},
            stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()
        if wait:
            wait_http(self.url + "/health", proc=self.proc, timeout=120)
        return self


@dataclass
class Flow:
    """Webhooks at a steady rate to one service, each answer recorded (never retried)."""

    url: str
    rate: float
    tag: str
    t0: float
    answers: list = field(default_factory=list)  # (t start, ms, status | None, error)
    stop: bool = False

    async def run(self) -> None:
        """Send until `stop` is set."""
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout,
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            tasks, seq = [], 0
            start = time.monotonic()
            while not self.stop:
                await asyncio.sleep(max(0.0, start + seq / self.rate - time.monotonic()))
                tasks.append(asyncio.create_task(self._one(session, seq)))
                seq += 1
            await asyncio.gather(*tasks)

    async def _one(self, session: aiohttp.ClientSession, seq: int) -> None:
        body = build_webhook(INSTANCE, f"5511{900000000 + seq % 5000}", f"upgrade {self.tag} {seq}",
                             message_id=f"MIG{self.tag}{seq:08d}")
        t = time.monotonic()
        status = error = None
        try:
            async with session.post(self.url, json=body) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            error = type(exc).__name__
        self.answers.append((round(t - self.t0, 3), round((time.monotonic() - t) * 1000, 1), status, error))


class LockSampler:
    """pg_stat_activity every SAMPLE_S on its own connection, in a thread."""

    def __init__(self, url: str, t0: float) -> None:
        self.url, self.t0 = url, t0
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "LockSampler":
        """Begin sampling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """End sampling."""
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        conn = psycopg2.connect(self.url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not self._stop.wait(SAMPLE_S):
                    cur.execute(WAITING)
                    t = round(time.monotonic() - self.t0, 3)
                    for pid, event, waited, query, blockers, blocker_query in cur.fetchall():
                        self.samples.append({"t": t, "pid": pid, "lock": event, "waited_s": round(waited or 0, 3),
                                             "query": query, "blocked_by": blockers,
                                             "blocker_query": blocker_query})
        finally:
            conn.close()

    def summary(self) -> dict:
        """Longest wait seen, most backends waiting at once, and the statements involved."""
        by_t: dict[float, int] = {}
        for s in self.samples:
            by_t[s["t"]] = by_t.get(s["t"], 0) + 1
        worst = max(self.samples, key=lambda s: s["waited_s"], default=None)
        return {"samples_with_waiters": len(by_t), "max_waiting_at_once": max(by_t.values(), default=0),
                "longest_wait_s": worst["waited_s"] if worst else 0.0,
                "longest_wait": worst,
                "blocking_statements": sorted({s["blocker_query"] or "" for s in self.samples})[:10]}


def stats(answers: list, lo: float, hi: float) -> dict:
    """Webhooks whose request overlapped [lo, hi] (run seconds): count, refused, latency."""
    sel = [a for a in answers if a[0] <= hi and a[0] + a[1] / 1000 >= lo]
    ms = sorted(a[1] for a in sel)
    refused = [a for a in sel if a[2] is None or not 200 <= a[2] < 300]

    def pct(q: float) -> float | None:
        """The q-quantile of the latencies (nearest rank)."""
        return ms[min(len(ms) - 1, max(0, int(round(q * len(ms) + 0.5)) - 1))] if ms else None

    return {"webhooks": len(sel), "refused": len(refused),
            "refused_kinds": sorted({str(a[2] or a[3]) for a in refused}),
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": ms[-1] if ms else None,
            "over_1s": sum(1 for m in ms if m > TARGET_MS)}


def db_one(url: str, sql: str, params=None):
    """First column of the first row."""
    return query_rows(url, sql, params)[0][0]


def load_traces(url: str, n: int) -> dict:
    """About n traces over the last 29 days (inside the 30-day retention, so the old
    service's periodic purge has nothing to delete), rollups kept by their triggers."""
    days = 28
    end = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    return traces.generate(url, max(1, n * days // (days + 1)), days=days, end=end)


async def _measure(cfg: dict, old_svc: Service, new_svc_factory, db_url: str) -> dict:
    t0 = time.monotonic()
    old_flow = Flow(f"{old_svc.url}/webhook/evolution/{INSTANCE}", RATE, "OLD", t0)
    old_task = asyncio.create_task(old_flow.run())
    await asyncio.sleep(cfg["warmup_s"])
    sampler = LockSampler(db_url, t0).start()
    await asyncio.sleep(1.0)
    reader = None
    if cfg["reader_s"]:
        # A dashboard query or report still reading message_trace when the upgrade starts.
        reader = threading.Thread(target=_long_reader, args=(db_url, cfg["reader_s"]), daemon=True)
        reader.start()
        await asyncio.sleep(0.2)
    log("migrating (python -m app migrate of this tree)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOMAGIK_OMNI_")}
    env["AUTOMAGIK_OMNI_DATABASE_URL"] = db_url
    mig_start = time.monotonic() - t0
    proc = await asyncio.create_subprocess_exec(PYTHON, "-m", "app", "migrate", cwd=str(ROOT), env=env,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    mig_end = time.monotonic() - t0
    if reader is not None:
        reader.join(cfg["reader_s"] + 30)
    await asyncio.sleep(1.0)
    sampler.stop()
    await asyncio.sleep(cfg["after_s"])
    log("this tree's service beside the old one")
    new_svc = await asyncio.get_running_loop().run_in_executor(None, new_svc_factory)
    new_flow = Flow(f"{new_svc.url}/webhook/evolution/{INSTANCE}", RATE / 5, "NEW", t0)
    new_task = asyncio.create_task(new_flow.run())
    side_start = time.monotonic() - t0
    await asyncio.sleep(cfg["side_by_side_s"])
    old_flow.stop = new_flow.stop = True
    await asyncio.gather(old_task, new_task)
    end = time.monotonic() - t0
    return {"old_flow": old_flow, "new_flow": new_flow, "new_svc": new_svc, "sampler": sampler,
            "migration": {"seconds": round(mig_end - mig_start, 2), "from_s": mig_start, "to_s": mig_end,
                          "rc": proc.returncode, "stdout": out.decode()[-2000:],
                          "stderr": err.decode()[-2000:]},
            "side_by_side": (side_start, end)}


def _long_reader(url: str, seconds: float) -> None:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM (SELECT 1 FROM message_trace LIMIT 1000) t")
            cur.execute("SELECT pg_sleep(%s)", (seconds,))
        conn.rollback()
    finally:
        conn.close()


def wait_final(url: str, timeout: float = 60.0) -> int:
    """Traces of the flows still `processing` after up to timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        left = db_one(url, "SELECT count(*) FROM message_trace WHERE instance_name = %s "
                           "AND status = 'processing'", (INSTANCE,))
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(1.0)


def markdown(r: dict) -> str:
    """The report."""
    m, d, b, a, lk = r["migration"], r["during"], r["before"], r["after"], r["locks"]
    fmt = lambda v: "-" if v is None else f"{v:,.1f}"  # noqa: E731
    lines = [
        f"### Online migration ({r['mode']}): {', '.join(r['applied']) or 'nothing'} on "
        f"{r['dataset']['rows']:,} traces",
        "",
        f"Old release `{r['old_commit'][:10]}` serving webhooks at {RATE:g} msg/s while "
        f"`python -m app migrate` ran"
        + (f", a transaction reading message_trace for {r['config']['reader_s']:g} s when it began"
           if r["config"].get("reader_s") else "") + f"; {r['machine']}.",
        "",
        "| webhooks | count | refused | p50 ms | p99 ms | max ms | over 1 s |",
        "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in (("before the migration", b), ("during the migration", d),
                    ("after it (old code)", a), ("new code beside the old", r["new_code"])):
        lines.append(f"| {name} | {s['webhooks']:,} | {s['refused']} | {fmt(s['p50_ms'])} | "
                     f"{fmt(s['p99_ms'])} | {fmt(s['max_ms'])} | {s['over_1s']} |")
    lines += ["",
              f"Migration: {m['seconds']} s (exit {m['rc']}). Backends waiting on a lock: at most "
              f"{lk['max_waiting_at_once']} at once, longest wait {lk['longest_wait_s']:.2f} s"
              + (f" (`{lk['longest_wait']['query'][:80]}` behind `{(lk['longest_wait']['blocker_query'] or '')[:80]}`)"
                 if lk["longest_wait"] else "") + ".",
              f"Traces loaded in {r['dataset']['seconds']} s ({r['dataset']['table_mb']} MB); "
              f"messages left processing: {r['left_processing']}.",
              ""]
    lines.append("Verdict: " + ("PASS" if not r["failed"] else "FAIL: " + "; ".join(r["failed"])))
    return "\n".join(lines) + "\n"


def run(cfg: dict, mode: str, out_dir: Path) -> int:
    """The whole measurement; the exit code."""
    started = time.monotonic()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    current = migration_files()
    old_commit, old_tree = None, None
    cluster = box = old_svc = new_svc = None
    try:
        if cfg["old"]:
            old_commit, old_tree = old_release(cfg["old"])
            old_sql = migration_files(old_tree / "sql")
            newest = [p for p in current if p.name not in {o.name for o in old_sql}]
        else:
            newest = [p for p in current if p.name[:3] >= cfg["first"]]
            if not newest:
                raise SystemExit(f"no migration numbered {cfg['first']} or later in sql/")
            old_commit, old_tree = old_release(release_before(newest[0]))
            old_sql = migration_files(old_tree / "sql")
        if not newest:
            raise SystemExit(f"the old release {old_commit[:10]} already has every migration")
        log(f"old release {old_commit[:10]} has {old_sql[-1].name}; newest: {', '.join(p.name for p in newest)}")
        changed = [p.name for p in old_sql if (ROOT / "sql" / p.name).read_text() != p.read_text()]
        missing = sorted({p.name for p in current if p not in newest} - {p.name for p in old_sql})
        if missing:
            raise SystemExit(f"the old release {old_commit[:10]} lacks {missing}: pick another --first")
        sql_dir = Path(tempfile.mkdtemp(prefix="omni-sql-old-"))
        for p in old_sql:
            shutil.copy(ROOT / "sql" / p.name, sql_dir / p.name)

        cluster = PgCluster(fsync=True)
        db_url = cluster.create_database()
        apply_migrations(db_url, sql_dir)
        shutil.rmtree(sql_dir, ignore_errors=True)
        log(f"loading {cfg['traces']:,} traces")
        dataset = load_traces(db_url, cfg["traces"])
        log(f"loaded {dataset['rows']:,} traces in {dataset['seconds']} s ({dataset['table_mb']} MB)")
        box = Sandbox(SANDBOX_LATENCY_MEDIAN_MS="300", SANDBOX_LOG_LEVEL="WARNING")
        env = {"AUTOMAGIK_OMNI_THREADS": "16"}
        old_svc = TreeService(db_url, env, workers=2, root=old_tree,
                              log_path=out_dir / f"migrate-online-{stamp}-old.log").start()
        old_svc.ensure_instance(INSTANCE, box.url)
        machine = f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start"

        def start_new() -> Service:
            """This tree's service on the same database."""
            return Service(db_url, env, workers=2,
                           log_path=out_dir / f"migrate-online-{stamp}-new.log").start()

        m = asyncio.run(_measure(cfg, old_svc, start_new, db_url))
        new_svc = m["new_svc"]
        left = wait_final(db_url)
        versions = [p.name for p in current]
        applied_now = set(db_one(db_url, "SELECT array_agg(version::text) FROM schema_migrations") or [])
        mig = m["migration"]
        applied = json.loads(mig["stdout"].strip().splitlines()[-1])["applied"] if mig["rc"] == 0 else []
        lo, hi = mig["from_s"], mig["to_s"]
        old_answers, new_answers = m["old_flow"].answers, m["new_flow"].answers
        side_lo, side_hi = m["side_by_side"]
        result = {
            "mode": mode, "started_at": stamp, "config": cfg, "rate": RATE, "machine": machine,
            "old_commit": old_commit, "newest": [p.name for p in newest], "applied": applied,
            "released_files_changed": changed,
            "dataset": dataset,
            "migration": {k: v for k, v in mig.items()},
            "before": stats(old_answers, 0.0, lo - 0.001),
            "during": stats(old_answers, lo, hi),
            "after": stats(old_answers, hi + 0.001, side_lo),
            "new_code": stats(new_answers, side_lo, side_hi),
            "old_code_side_by_side": stats(old_answers, side_lo, side_hi),
            "all_old": stats(old_answers, 0.0, side_hi),
            "locks": m["sampler"].summary(),
            "lock_samples": m["sampler"].samples[:500],
            "left_processing": left,
            "schema_versions": sorted(applied_now),
        }
        failed = []
        if mig["rc"] != 0 or not set(versions) <= applied_now:
            failed.append(f"migrations not applied (exit {mig['rc']}): {mig['stderr'][-300:]}")
        if result["all_old"]["refused"] or result["new_code"]["refused"]:
            failed.append(f"refused webhooks: old code {result['all_old']['refused']} "
                          f"{result['all_old']['refused_kinds']}, new code {result['new_code']['refused']}")
        if left:
            failed.append(f"{left} messages still processing")
        if changed:
            failed.append(f"released migrations differ from the old release: {changed}")
        result["failed"] = failed
        result["target_1s_met"] = (result["during"]["max_ms"] or 0) <= TARGET_MS
    finally:
        for stop in (new_svc and new_svc.stop, old_svc and old_svc.stop, box and box.stop,
                     cluster and cluster.destroy):
            if stop:
                try:
                    stop()
                except Exception as exc:  # noqa: BLE001 - stop the rest regardless
                    log(f"stopping: {exc}")
        if old_tree is not None:
            shutil.rmtree(old_tree, ignore_errors=True)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    text = markdown(result)
    (out_dir / f"migrate-online-{stamp}.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / f"migrate-online-{stamp}.md").write_text(text)
    print(text)
    log(f"wrote {out_dir}/migrate-online-{stamp}.json and .md in {result['elapsed_s']} s")
    return 1 if result["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and measure."""
    p = argparse.ArgumentParser(prog="python -m bench.migrate_online", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short phases (and 20,000 traces unless --traces)")
    p.add_argument("--traces", type=int, help="traces loaded before the migration (default 1,000,000)")
    p.add_argument("--first", default=FIRST_NEW,
                   help="number of the first migration applied online (default %(default)s)")
    p.add_argument("--old", help="commit of the old release (default: the one before --first); "
                                 "the migrations it lacks are the ones applied online")
    p.add_argument("--reader-s", type=float, default=0.0,
                   help="a transaction reading message_trace this long when the migration starts")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results directory")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL, first=args.first, old=args.old,
               reader_s=max(0.0, args.reader_s))
    if args.traces is not None:
        if args.traces < 1:
            p.error("--traces must be 1 or more")
        cfg["traces"] = args.traces
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    return run(cfg, "quick" if args.quick else "full", out_dir)


if __name__ == "__main__":
    sys.exit(main())
