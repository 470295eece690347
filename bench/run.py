"""`python -m bench [--quick] [--out DIR]`: the omni benchmark suite.

Starts its own PostgreSQL (fsync on), sandboxes, gunicorn services, a Loki receiver and the
load generators; measures every figure of the report (bench/report.py); writes <out>/<timestamp>.json and .md
(medians over repeated runs, the machine named) and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import json
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import psutil
import psycopg2
import requests

from bench import load, machine, profile, receipts, stack, traces
from bench.report import markdown, targets
from demo.processes import metric, parse_metrics, query_rows

ROOT = Path(__file__).resolve().parent.parent

# The full run stays under 15 minutes with the 10-minute memory run in it: the
# on/off pairs are stable since connections spread over the workers (0.48-0.54 over 10
# pairs), so 5 short pairs and 2 x 4 s per layer are enough.
FULL = dict(tp_repeats=5, tp_seconds=4, warmup_seconds=2, profile_seconds=5, layer_repeats=2, layer_seconds=4,
            layer_delay_ms=100,
            lat_seconds=600, lat_rate=100, mem_sample_s=5,
            traces=1_000_000, first_samples=60, walks=4, pages=10, analytics_repeats=3, receipt_messages=20_000)
QUICK = dict(tp_repeats=1, tp_seconds=2, warmup_seconds=1, profile_seconds=2, layer_repeats=1, layer_seconds=1,
             layer_delay_ms=100,
             lat_seconds=6, lat_rate=100, mem_sample_s=1,
             traces=20_000, first_samples=20, walks=2, pages=10, analytics_repeats=2, receipt_messages=2_000)


# Saturation needs more open webhooks than an all-off worker: with tracing on each 202 waits
# for a durable commit (a few ms), and 32 connections left that setup waiting on latency with
# a core idle (on/off 0.35-0.55 between runs); 128 keep both cores busy in every setup.
SATURATION_CONNECTIONS = 128
# Bare Flask (the reference, far from the others) runs before every third on/off pair.
BARE_EVERY = 3
# Steady load: 32 connections each pausing layer_delay_ms (100 ms) is ~300 webhooks/s.
STEADY_CONNECTIONS = 32


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _db_count(url: str, sql: str, params=None) -> int:
    return query_rows(url, sql, params)[0][0]


def _sandbox_calls(box) -> int:
    return requests.get(box.url + "/calls", timeout=10).json()["total"]


def _wait_stable(read, settle: float = 0.5, timeout: float = 60.0) -> tuple[int, float]:
    """Poll read() until it stops changing for `settle` s; (value, monotonic time of last change)."""
    last, changed = read(), time.monotonic()
    deadline = changed + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = read()
        if now != last:
            last, changed = now, time.monotonic()
        elif time.monotonic() - changed >= settle:
            break
    return last, changed


# --------------------------------------------------------------------------- throughput

class Setups:
    """The setups compared side by side: bare reference, omni all-on, omni all-off, and omni
    with a single telemetry layer on (the cost-by-layer table)."""

    def __init__(self, pg: stack.Pg, box, loki: stack.Loki) -> None:
        self.pg, self.box, self.loki = pg, box, loki
        self.bare = stack.Bare()
        self.services: dict[str, object] = {}
        self.dbs: dict[str, str | None] = {}
        self.instance_id: dict[str, int] = {}
        envs = {"on": {"AUTOMAGIK_OMNI_LOKI_URL": loki.url}, "off": stack.TELEMETRY_OFF}
        for name, env in stack.LAYERS.items():
            env = {**stack.TELEMETRY_OFF, **env}
            if env.pop("loki", None):
                env["AUTOMAGIK_OMNI_LOKI_URL"] = loki.url
            envs[name] = env
        def start(name: str, env: dict) -> None:
            db = pg.new_db()
            # With the 0 ms agent a few hundred messages in flight keep both cores busy; a
            # larger backlog only makes each run end with seconds of draining.
            svc = stack.omni(db, {"AUTOMAGIK_OMNI_MAX_IN_FLIGHT": "256", **env})
            self.services[name] = svc
            svc.ensure_instance("bench", box.url, agent_timeout_s=30)
            # Messages are counted from final traces where tracing is on, else at the sandbox.
            self.dbs[name] = None if env.get("AUTOMAGIK_OMNI_ENABLE_TRACING") == "false" else db
            self.instance_id[name] = svc.api("GET", "/api/v1/instances/bench").json()["id"]

        # Started side by side: each start is mostly waiting (migrations, gunicorn boot).
        with concurrent.futures.ThreadPoolExecutor(len(envs)) as pool:
            for fut in [pool.submit(start, name, env) for name, env in envs.items()]:
                fut.result()
        self.on, self.off = self.services["on"], self.services["off"]

    def stop(self) -> None:
        for svc in self.services.values():
            svc.stop()
        self.bare.stop()


def run_setup(s: Setups, name: str, tag: str, seconds: float, delay_ms: int | None = None) -> dict:
    """One closed-loop run; for omni, throughput is messages from webhook to final status.

    Without delay_ms wrk floods (saturation); with it the load is steady and below saturation.
    """
    svc = s.bare if name == "bare" else s.services[name]
    db = None if name == "bare" else s.dbs[name]
    groups = {"workers": lambda: stack.tree(svc.proc.pid), "postgres": s.pg.processes,
              "sandbox": lambda: stack.tree(s.box.proc.pid),
              "loki receiver": lambda: stack.tree(s.loki.proc.pid)}
    meter = stack.CpuMeter(groups)
    calls0 = _sandbox_calls(s.box)
    loki0 = s.loki.stats()["entries"]
    kids0 = os.times()
    meter.start()
    t0 = time.monotonic()
    w = load.wrk(svc.url, "bench", tag, seconds, delay_ms=delay_ms,
                 connections=SATURATION_CONNECTIONS if delay_ms is None else STEADY_CONNECTIONS)
    t_wrk = time.monotonic()
    out = {"setup": name, "tag": tag, "wrk_rps": round(w["rps"], 1), "acked": w["ok"],
           "non2xx": w["non2xx"], "socket_errors": w["connect_errors"] + w["read_errors"]
           + w["write_errors"] + w["timeouts"], "ack_p50_ms": w["lat_p50_us"] / 1000,
           "ack_p99_ms": w["lat_p99_us"] / 1000}
    if name == "bare":
        done, t_end = w["ok"], t_wrk
    elif db is not None:
        like = f"3EB0{tag}%"
        iid = s.instance_id[name]
        _wait_stable(lambda: _db_count(db, "SELECT count(*) FROM message_trace WHERE status <> "
                                       "'processing' AND instance_id = %s AND message_id LIKE %s",
                                       (iid, like)), settle=0.6)
        done, t_end = _db_last_final(db, iid, like, t0, t_wrk)
        out["processing_left"] = _db_count(db, "SELECT count(*) FROM message_trace WHERE "
                                           "status = 'processing' AND instance_id = %s AND message_id "
                                           "LIKE %s", (iid, like))
    else:
        calls, t_end = _wait_stable(lambda: _sandbox_calls(s.box), settle=0.6)
        done = calls - calls0
    cpu = meter.stop()
    kids1 = os.times()
    cpu["wrk"] = (kids1.children_user + kids1.children_system) - (kids0.children_user + kids0.children_system)
    elapsed = max(t_end - t0, 1e-3)
    out.update(messages=done, seconds=round(elapsed, 2), msgs_per_s=round(done / elapsed, 1),
               cpu_us_per_msg={k: round(v / max(done, 1) * 1e6) for k, v in cpu.items()},
               loki_entries=s.loki.stats()["entries"] - loki0)
    return out


def _db_last_final(url: str, iid: int, like: str, t0: float, t_wrk: float) -> tuple[int, float]:
    """Count of final traces of a run and the (monotonic) time its last one was written."""
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("""SELECT count(*), extract(epoch FROM max(updated_at) - min(created_at)),
                                  extract(epoch FROM now() - max(updated_at))
                           FROM message_trace WHERE status <> 'processing' AND instance_id = %s
                             AND message_id LIKE %s""", (iid, like))
            n, span, ago = cur.fetchone()
    finally:
        conn.close()
    t_end = time.monotonic() - float(ago or 0)
    return n, max(t_end, t0 + 1e-3)


def throughput(s: Setups, cfg: dict) -> dict:
    """Saturated throughput of bare, all on and all off; on/off from back-to-back pairs.

    The machine's speed drifts by tens of percent within a minute (a shared host), so each
    on/off pair runs adjacently, in alternating order (on off, off on, ...), and the ratio is
    the median over many short pairs; bare, the reference, runs between pairs every few rounds.
    """
    runs = []
    log("throughput: warm-up")
    for name in ("bare", "on", "off"):
        run_setup(s, name, f"w{name}", cfg["warmup_seconds"])

    def one(name: str, tag: str, label: str) -> None:
        res = run_setup(s, name, tag, cfg["tp_seconds"])
        log(f"throughput {label} {name}: {res['msgs_per_s']} msg/s "
            f"(wrk {res['wrk_rps']} req/s, non2xx {res['non2xx']})")
        runs.append(res)

    for r in range(cfg["tp_repeats"]):
        if r % BARE_EVERY == 0:
            one("bare", f"b{r}bare", f"reference {r // BARE_EVERY + 1}")
        for name in (("on", "off") if r % 2 == 0 else ("off", "on")):
            one(name, f"r{r}{name}", f"pair {r + 1}/{cfg['tp_repeats']}")
    med = {}
    for name in ("bare", "on", "off"):
        mine = [x for x in runs if x["setup"] == name]
        med[name] = {"msgs_per_s": round(statistics.median(x["msgs_per_s"] for x in mine), 1),
                     "wrk_rps": round(statistics.median(x["wrk_rps"] for x in mine), 1),
                     "ack_p99_ms": round(statistics.median(x["ack_p99_ms"] for x in mine), 2),
                     "cpu_us_per_msg": {k: round(statistics.median(x["cpu_us_per_msg"][k] for x in mine))
                                        for k in mine[0]["cpu_us_per_msg"]},
                     "non2xx": sum(x["non2xx"] for x in mine)}
    # The ratio of each A/B pair measured back to back, then the median of those ratios.
    ratios = []
    for r in range(cfg["tp_repeats"]):
        on = next(x for x in runs if x["tag"] == f"r{r}on")
        off = next(x for x in runs if x["tag"] == f"r{r}off")
        ratios.append(on["msgs_per_s"] / off["msgs_per_s"] if off["msgs_per_s"] else 0.0)
    return {"runs": runs, "median": med,
            "on_off_ratio": round(statistics.median(ratios), 3), "on_off_ratios": [round(x, 3) for x in ratios],
            "on_vs_bare": round(med["on"]["msgs_per_s"] / med["bare"]["msgs_per_s"], 3)
            if med["bare"]["msgs_per_s"] else None}


# CPU that telemetry adds on this box: the service's workers, PostgreSQL and the Loki
# receiver (the stand-in for Loki, which shares the machine in docker-compose too).
TELEMETRY_GROUPS = ("workers", "postgres", "loki receiver")


def layer_costs(s: Setups, cfg: dict) -> dict:
    """Each telemetry layer alone on top of "all off", A B A B, at one steady rate.

    Below saturation no setup sheds load: at saturation the setups whose 202 does not wait
    for a commit answer many webhooks 503 "overloaded", and that wasted work lands on the
    messages they complete, which hides what each layer costs. Here every webhook is a
    message, and CPU per message is the cost; its ratio to "all off" is the throughput
    ratio the layer would give if the stack alone (workers, PostgreSQL, Loki) used the CPU.
    """
    names = ["off"] + list(stack.LAYERS) + ["on"]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    delay = cfg["layer_delay_ms"]
    for r in range(cfg["layer_repeats"]):
        for n in (names if r % 2 == 0 else list(reversed(names))):
            res = run_setup(s, n, f"l{r}{n.replace(' ', '')}", cfg["layer_seconds"], delay_ms=delay)
            log(f"layer run {r + 1}/{cfg['layer_repeats']} {n}: {res['msgs_per_s']} msg/s, "
                f"non2xx {res['non2xx']}")
            runs[n].append(res)

    def stack_cpu(x: dict) -> float:
        return sum(x["cpu_us_per_msg"][g] for g in TELEMETRY_GROUPS)

    base = statistics.median(stack_cpu(x) for x in runs["off"])
    out = {}
    for n in names:
        cpu = statistics.median(stack_cpu(x) for x in runs[n])
        out[n] = {"msgs_per_s": round(statistics.median(x["msgs_per_s"] for x in runs[n]), 1),
                  "non2xx": sum(x["non2xx"] for x in runs[n]),
                  "cpu_us_per_msg": round(cpu), "added_cpu_us_per_msg": round(cpu - base),
                  "cpu_ratio_off_to_this": round(base / cpu, 3) if cpu else None,
                  "cpu_by_group": {g: round(statistics.median(x["cpu_us_per_msg"][g] for x in runs[n]))
                                   for g in TELEMETRY_GROUPS}}
    return out


def cpu_profile(s: Setups, cfg: dict) -> dict:
    """py-spy on one worker of the all-on service during an extra (uncounted) run."""
    if not profile.available():
        return {"skipped": "py-spy not installed (.venv/bin/pip install py-spy)"}
    pids = s.on.worker_pids()
    result: dict = {}

    def spy() -> None:
        time.sleep(0.5)
        try:
            path = profile.record(pids[0], cfg["profile_seconds"] - 1)
            result.update(profile.summarize(path))
            path.unlink(missing_ok=True)
        except Exception as exc:  # a profile failure must not sink the whole bench
            result["error"] = f"{type(exc).__name__}: {exc}"

    th = threading.Thread(target=spy)
    th.start()
    run = run_setup(s, "on", "prof", cfg["profile_seconds"])
    th.join(120)
    result["run_msgs_per_s"] = run["msgs_per_s"]
    worker_us = run["cpu_us_per_msg"]["workers"]
    result["worker_cpu_us_per_msg"] = worker_us
    result["worker_cpu_us_per_msg_by_category"] = {
        k: round(v * worker_us) for k, v in result.get("by_category", {}).items()}
    return result


# --------------------------------------------------------------------------- latency + memory

def latency_memory(pg: stack.Pg, loki: stack.Loki, cfg: dict) -> dict:
    """Open loop at 100 msg/s, agent at a 4 s median: ack latency, completion, worker RSS."""
    box = stack.sandbox(4000)
    db = pg.new_db()
    svc = stack.omni(db, {"AUTOMAGIK_OMNI_LOKI_URL": loki.url})
    try:
        gen = load.open_loop(svc.url, svc.api_key, box.url, "demo", cfg["lat_rate"], cfg["lat_seconds"])
        t0 = time.monotonic()
        samples: list[dict] = []
        while gen.poll() is None:
            row = {"t": round(time.monotonic() - t0, 1), "rss_mb": {}}
            for pid in svc.worker_pids():
                try:
                    row["rss_mb"][pid] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
                except psutil.Error:
                    pass
            try:
                row["in_flight"] = metric(parse_metrics(svc.metrics_text()), "omni_messages_in_flight")
            except Exception:  # noqa: BLE001 - a missed scrape is not a failure
                pass
            samples.append(row)
            time.sleep(cfg["mem_sample_s"])
        out, err = gen.communicate()
        summary = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
        # Every accepted message must reach a final status.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _db_count(
                db, "SELECT count(*) FROM message_trace WHERE status = 'processing'"):
            time.sleep(0.5)
        conn = psycopg2.connect(db)
        with conn.cursor() as cur:
            cur.execute("SELECT status, count(*) FROM message_trace GROUP BY status")
            statuses = dict(cur.fetchall())
        conn.close()
    finally:
        svc.stop()
        box.stop()
    accepted = summary["by_status"].get("202", 0)
    return {"rate": cfg["lat_rate"], "seconds": cfg["lat_seconds"], "loadgen": summary,
            "ack_p50_ms": summary["ack_ms"]["p50"], "ack_p99_ms": summary["ack_ms"]["p99"],
            "ack_max_ms": summary["ack_ms"]["max"], "sent": summary["sent"], "accepted": accepted,
            "http_503": summary["by_status"].get("503", 0), "errors": summary["errors"],
            "trace_statuses": statuses, "all_completed": statuses.get("completed", 0) == accepted
            and accepted == summary["sent"] and not statuses.get("processing"),
            "in_flight_max": max((r.get("in_flight", 0) for r in samples), default=0),
            "memory": memory_summary(samples)}


def memory_summary(samples: list[dict]) -> dict:
    """Per worker: max RSS and the least-squares slope after the first 20% of the run."""
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for row in samples:
        for pid, mb in row["rss_mb"].items():
            by_pid.setdefault(pid, []).append((row["t"], mb))
    workers = []
    for pid, pts in by_pid.items():
        end = pts[-1][0]
        tail = [p for p in pts if p[0] >= 0.2 * end] or pts
        slope = 0.0
        if len(tail) >= 2:
            mt = statistics.fmean(t for t, _ in tail)
            mm = statistics.fmean(m for _, m in tail)
            den = sum((t - mt) ** 2 for t, _ in tail)
            slope = sum((t - mt) * (m - mm) for t, m in tail) / den * 60 if den else 0.0
        workers.append({"pid": pid, "first_mb": pts[0][1], "last_mb": pts[-1][1],
                        "max_mb": max(m for _, m in pts), "slope_mb_per_min": round(slope, 2)})
    return {"workers": workers, "samples": len(samples),
            "max_mb": max((w["max_mb"] for w in workers), default=None),
            "max_slope_mb_per_min": max((w["slope_mb_per_min"] for w in workers), default=None)}


# --------------------------------------------------------------------------- traces

def trace_store(pg: stack.Pg, cfg: dict) -> dict:
    db = pg.cluster.create_database()
    stack.migrate(db)
    end = traces.worst_purge_end(dt.datetime.now(dt.timezone.utc))
    log(f"traces: generating {cfg['traces']:,} traces per 30 days (+1 expired day) up to {end:%Y-%m-%d %H:%M}")
    gen = traces.generate(db, cfg["traces"], end=end)
    log(f"traces: generated {gen['rows']:,} rows in {gen['seconds']} s")
    box = stack.sandbox(0)
    # Retention far out so the periodic purge leaves the expired day to the measured DELETE.
    svc = stack.omni(db, {"AUTOMAGIK_OMNI_TRACE_RETENTION_DAYS": "3650"})
    try:
        svc.ensure_instance("bench", box.url)
        log("traces: list API")
        api = traces.api_latency(svc.url, svc.api_key, cfg["first_samples"], cfg["walks"], cfg["pages"], end)
        log(f"traces: worst p99 {api['worst_p99_ms']} ms; analytics")
        ana = traces.analytics_latency(svc.url, svc.api_key, cfg["analytics_repeats"], end)
        log("traces: retention")
        ret = traces.retention(svc, "bench", db, end - dt.timedelta(days=30))
    finally:
        svc.stop()
        box.stop()
    return {"dataset": gen, "list": api, "analytics": ana, "retention": ret}


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 2 minutes)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results directory")
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    results: dict = {"mode": "quick" if args.quick else "full", "started_at": stamp,
                     "config": {**cfg, "connections": SATURATION_CONNECTIONS}}
    failures = []
    pg = stack.Pg()
    loki = stack.Loki()
    try:
        results["machine"] = machine.describe(pg.version())
        log(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores")

        box = stack.sandbox(0)
        setups = None
        try:
            setups = Setups(pg, box, loki)
            results["throughput"] = throughput(setups, cfg)
            log("telemetry cost by layer")
            results["layers"] = layer_costs(setups, cfg)
            log("profile")
            results["profile"] = cpu_profile(setups, cfg)
        except Exception:  # keep going: the other figures are independent
            failures.append(traceback.format_exc())
            log(failures[-1])
        finally:
            if setups is not None:
                setups.stop()
            box.stop()

        for name, func in (("latency", lambda: latency_memory(pg, loki, cfg)),
                           ("trace_store", lambda: trace_store(pg, cfg)),
                           ("receipts", lambda: receipts.receipt_cost(pg, cfg["receipt_messages"]))):
            log(name)
            try:
                results[name] = func()
            except Exception:
                failures.append(traceback.format_exc())
                log(failures[-1])
    finally:
        loki.stop()
        pg.destroy()
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    results["targets"] = targets(results)
    results["failures"] = failures
    text = markdown(results)
    (out_dir / f"{stamp}.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / f"{stamp}.md").write_text(text)
    print(text)
    log(f"wrote {out_dir / stamp}.json and .md in {results['elapsed_s']} s")
    return 1 if failures else 0
