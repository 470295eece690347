"""`python -m bench.soak [--quick] [--out DIR]`: the chaos soak.

A steady flow of distinct WhatsApp messages (50 a second, each agent answer 1-4 s) goes to
the gateway (gunicorn, 2 workers, PostgreSQL with fsync, Loki push to a strict stand-in)
from a sender that retries like Evolution API, while faults hit on a schedule: PostgreSQL
stopped and crashed, a table lock, a worker SIGKILL, a gunicorn restart, Loki down, agent
5xx and timeout bursts, Evolution 5xx. At the end every message is accounted for from three
sources that do not trust each other: the sender's log, the trace rows and what the
Evolution side received. Writes <out>/soak-<stamp>.json, .md and -sender.jsonl, prints the
Markdown, and exits 1 naming every invariant that failed (docs/reliability.md).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import re
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psycopg2
import requests

from demo.loadgen import build_webhook
from demo.loki_receiver import LokiReceiver
from demo.processes import (ROOT, PgCluster, Sandbox, Service, metric, migrate, parse_metrics, query_rows,
                            wait_http)

INSTANCE = "soak"
FINAL = ("completed", "failed", "error")
AGENT_DELAY_MS = (1000, 4000)
# Well above the agent's 4 s: on a loaded machine a 4 s answer can take a few seconds more,
# and only the timeout burst should end in timeouts.
AGENT_TIMEOUT_S = 10
# Evolution API's webhook retry (src/api/integrations/event/webhook/webhook.controller.ts,
# retryWebhookRequest, and its WEBHOOK.RETRY / REQUEST defaults): any answer but a 2xx is
# retried, and so are connection errors and 30 s timeouts, except these statuses; the
# pause is 5 s doubling up to 300 s, +-20 % jitter, never under 5 s. Evolution makes 10
# attempts; the soak caps them (FULL/QUICK) so the run ends, and reports what it gave up.
NON_RETRYABLE = (400, 401, 403, 404, 422)
RETRY_INITIAL_S = 5.0
RETRY_MAX_S = 300.0
RETRY_JITTER = 0.2
REQUEST_TIMEOUT_S = 30.0
# A message sent this long before a fault began is still at its agent when it hits.
IN_FLIGHT_S = AGENT_DELAY_MS[1] / 1000

FULL = dict(seconds=600, rate=50, max_attempts=6, drain_s=150)
QUICK = dict(seconds=90, rate=50, max_attempts=4, drain_s=60)

# (name, start as a share of the run, seconds in the full run, seconds in the quick run).
# The lock stall stays 12 s in both: past the webhook's 10 s commit wait is the point.
# The SIGKILL comes before the lock stall: the messages whose rows commit late must then run
# to their end untouched, so one left unprocessed shows (it is recovered at the restart).
SCHEDULE = (
    ("pg_stop", 0.06, 20, 8),
    ("agent_5xx", 0.15, 20, 6),
    ("worker_sigkill", 0.22, 0, 0),
    ("lock_stall", 0.26, 12, 12),
    ("loki_down", 0.42, 60, 20),
    ("agent_timeout", 0.58, 20, 6),
    ("pg_crash", 0.68, 20, 8),
    ("evolution_5xx", 0.78, 30, 10),
    ("gunicorn_restart", 0.90, 0, 0),
)
WHAT = {
    "pg_stop": "PostgreSQL stopped (`pg_ctl stop -m fast`), started again",
    "agent_5xx": "every agent call answers 500",
    "lock_stall": "`LOCK TABLE message_trace IN ACCESS EXCLUSIVE MODE` held 12 s",
    "worker_sigkill": "one gunicorn worker SIGKILLed",
    "loki_down": "Loki refuses connections, then comes back on the same port",
    "agent_timeout": f"every agent call hangs (instance timeout {AGENT_TIMEOUT_S} s)",
    "pg_crash": "PostgreSQL crashed (`pg_ctl stop -m immediate`), started again (crash recovery)",
    "evolution_5xx": "every Evolution sendText answers 503",
    "gunicorn_restart": "the whole gunicorn stopped (SIGTERM) and started again",
}


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the sender


@dataclass
class Delivery:
    """One message as the sender saw it: every attempt and how it ended."""

    seq: int
    mid: str
    delay_ms: int
    first_at: float = 0.0
    attempts: list = field(default_factory=list)  # [t, status | None, error | None, ms, trace_id]
    outcome: str = "pending"  # accepted | duplicate | gave_up | dropped_4xx | ignored

    def trace_ids(self) -> set[str]:
        """Trace ids named by the 2xx answers."""
        return {a[4] for a in self.attempts if a[4]}


def retry_pause(attempt: int, rng: random.Random) -> float:
    """Evolution's pause before the attempt after `attempt` (1-based)."""
    pause = min(RETRY_INITIAL_S * 2 ** (attempt - 1), RETRY_MAX_S)
    pause += pause * RETRY_JITTER * (rng.random() * 2 - 1)
    return max(RETRY_INITIAL_S, pause)


class Sender:
    """Distinct messages at a steady rate, each delivered until a 2xx or a non-retryable 4xx."""

    def __init__(self, url: str, rate: float, seconds: float, max_attempts: int, t0: float,
                 run_id: str, seed: int = 13) -> None:
        self.url = url
        self.rate = rate
        self.seconds = seconds
        self.max_attempts = max_attempts
        self.t0 = t0
        self.run_id = run_id
        self.rng = random.Random(seed)
        self.deliveries: list[Delivery] = []
        self.in_flight = 0
        self.errors: dict[str, str] = {}  # first message of each connection error kind

    async def run(self) -> None:
        """Send for `seconds`, then wait until every delivery ended (retries included)."""
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            tasks = []
            total = int(self.rate * self.seconds)
            for seq in range(total):
                due = self.t0 + seq / self.rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                d = Delivery(seq, f"SOAK{self.run_id}{seq:07d}", self.rng.randint(*AGENT_DELAY_MS))
                self.deliveries.append(d)
                tasks.append(asyncio.create_task(self._deliver(session, d)))
            log(f"sender: {total} messages sent in {time.monotonic() - self.t0:.0f} s; "
                f"{self.in_flight} deliveries still retrying")
            await asyncio.gather(*tasks)

    async def _deliver(self, session: aiohttp.ClientSession, d: Delivery) -> None:
        self.in_flight += 1
        digits = f"5511{9_0000_0000 + d.seq % 2000:09d}"
        body = build_webhook(INSTANCE, digits, f"soak {d.mid} #delay={d.delay_ms}", message_id=d.mid)
        rng = random.Random(d.seq)
        try:
            for attempt in range(1, self.max_attempts + 1):
                t = time.monotonic()
                status = error = trace_id = answer = None
                try:
                    async with session.post(self.url, json=body) as resp:
                        status = resp.status
                        answer = await resp.json(content_type=None)
                except asyncio.TimeoutError:
                    status, error = None, "timeout"
                except aiohttp.ClientError as exc:
                    # Also after the status line: an answer not read whole is no answer.
                    status, error = None, type(exc).__name__
                    self.errors.setdefault(error, str(exc)[:200])
                except ValueError:
                    answer = None  # a body that is not JSON: the status decides
                if status is not None and 200 <= status < 300:
                    trace_id = answer.get("trace_id") if isinstance(answer, dict) else None
                    kind = answer.get("status") if isinstance(answer, dict) else None
                d.attempts.append([round(t - self.t0, 3), status, error,
                                   round((time.monotonic() - t) * 1000, 1), trace_id])
                if attempt == 1:
                    d.first_at = round(t - self.t0, 3)
                if status is not None and 200 <= status < 300:
                    d.outcome = {"accepted": "accepted", "duplicate": "duplicate"}.get(kind, "ignored")
                    if d.outcome == "duplicate" and any(a[1] == 202 for a in d.attempts):
                        d.outcome = "accepted"
                    return
                if status in NON_RETRYABLE:
                    d.outcome = "dropped_4xx"
                    return
                if attempt < self.max_attempts:
                    await asyncio.sleep(retry_pause(attempt, rng))
            d.outcome = "gave_up"
        finally:
            self.in_flight -= 1


# --------------------------------------------------------------------------- faults


@dataclass
class Fault:
    """One scheduled fault and what was seen of it."""

    name: str
    at: float
    seconds: float
    started: float | None = None
    ended: float | None = None
    detail: dict = field(default_factory=dict)
    error: str | None = None

    def window(self) -> tuple[float, float]:
        """First-send times of the messages it may touch: from those still at their agent
        when it began to the end of the fault."""
        start = self.started if self.started is not None else self.at
        end = self.ended if self.ended is not None else start + self.seconds
        return start - IN_FLIGHT_S, end


class LokiTap:
    """The Loki stand-in, with its stored entries counted and forgotten every few seconds so
    a long run stays small; pushes (time, status) are kept."""

    def __init__(self) -> None:
        self.rx = LokiReceiver(unordered=True).start()
        self.port = self.rx.port
        self.entries = 0
        self.pushes: list[tuple[float, int]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._compact_loop, daemon=True)
        self._thread.start()

    def compact(self) -> None:
        """Fold what the receiver stored into the counters."""
        rx = self.rx
        with rx._lock:  # noqa: SLF001 - the receiver's own lock guards its lists
            self.entries += len(rx.entries)
            self.pushes += [(p["time"], p["status"]) for p in rx.pushes]
            self.errors += rx.errors
            rx.entries.clear()
            rx.pushes.clear()
            rx.errors.clear()
            rx._seen.clear()  # noqa: SLF001

    def _compact_loop(self) -> None:
        while not self._stop.wait(2.0):
            self.compact()

    def stop(self) -> None:
        """Stop serving and compacting."""
        self._stop.set()
        self._thread.join(5)
        self.compact()
        self.rx.stop()


class Injector:
    """Runs the schedule in a thread: blocking process control beside the asyncio sender."""

    def __init__(self, faults: list[Fault], t0: float, cluster: PgCluster, db_url: str,
                 svc: Service, box: Sandbox, loki: LokiTap) -> None:
        self.faults, self.t0 = faults, t0
        self.cluster, self.db_url, self.svc, self.box, self.loki = cluster, db_url, svc, box, loki
        self.thread = threading.Thread(target=self._run, name="soak-faults", daemon=True)
        self.stopping = threading.Event()

    def now(self) -> float:
        """Seconds since the run began."""
        return round(time.monotonic() - self.t0, 3)

    def start(self) -> "Injector":
        """Begin the schedule."""
        self.thread.start()
        return self

    def _run(self) -> None:
        # Each fault in its own thread at its own time: one that takes longer than planned
        # (a slow restart, a slow scrape) must not push the rest of the schedule back.
        threads = []
        for fault in self.faults:
            if self.stopping.wait(max(0.0, self.t0 + fault.at - time.monotonic())):
                break
            t = threading.Thread(target=self._one, args=(fault,), name=f"soak-{fault.name}",
                                 daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()

    def _one(self, fault: Fault) -> None:
        log(f"fault {fault.name} ({fault.seconds:g} s)")
        fault.started = self.now()
        try:
            getattr(self, "_" + fault.name)(fault)
        except Exception:  # noqa: BLE001 - recorded; the invariants name the fault
            fault.error = traceback.format_exc()
            log(f"fault {fault.name} failed: {fault.error}")
            self._recover()
        if fault.ended is None:
            fault.ended = self.now()

    def _recover(self) -> None:
        """After an injection broke halfway: everything back up, so the rest is measurable."""
        for step in (self.cluster.start, lambda: self.box_faults({}, clear=True), self.loki.rx.up):
            try:
                step()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def box_faults(self, body: dict, clear: bool = False) -> dict:
        """Switch the sandbox's run-time outages."""
        r = (requests.delete(self.box.url + "/faults", timeout=10) if clear
             else requests.put(self.box.url + "/faults", json=body, timeout=10))
        r.raise_for_status()
        return r.json()

    def _down(self, fault: Fault, mode: str) -> None:
        self.cluster.stop(mode)
        fault.detail["stopped_at"] = self.now()
        time.sleep(max(0.0, fault.seconds - (self.now() - fault.started)))
        self.cluster.start()
        fault.detail["accepting_at"] = self.now()

    def _pg_stop(self, fault: Fault) -> None:
        self._down(fault, "fast")

    def _pg_crash(self, fault: Fault) -> None:
        self._down(fault, "immediate")

    def _lock_stall(self, fault: Fault) -> None:
        conn = psycopg2.connect(self.db_url)
        try:
            with conn.cursor() as cur:
                cur.execute("LOCK TABLE message_trace IN ACCESS EXCLUSIVE MODE")
                fault.detail["locked_at"] = self.now()
                time.sleep(fault.seconds)
            conn.rollback()
        finally:
            conn.close()

    def _worker_sigkill(self, fault: Fault) -> None:
        before = sorted(self.svc.worker_pids())
        victim = before[0]
        os.kill(victim, signal.SIGKILL)
        fault.detail.update(victim=victim, workers_before=before)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = sorted(self.svc.worker_pids())
            if victim not in now and len(now) == len(before):
                fault.detail.update(workers_after=now, replaced_at=self.now())
                break
            time.sleep(0.1)
        fault.ended = self.now()

    def _gunicorn_restart(self, fault: Fault) -> None:
        old = self.svc.proc.pid
        code = self.svc.stop(signal.SIGTERM)
        fault.detail.update(old_master=old, exit_code=code, stopped_at=self.now())
        self.svc.start(wait=False)
        # Every sender's retry arrives at once when it listens again: /health waits its turn.
        wait_http(self.svc.url + "/health", timeout=180, proc=self.svc.proc)
        fault.detail.update(new_master=self.svc.proc.pid, healthy_at=self.now())
        deadline = time.monotonic() + 30
        while len(self.svc.worker_pids()) < self.svc.workers and time.monotonic() < deadline:
            time.sleep(0.1)
        fault.detail["workers_after"] = sorted(self.svc.worker_pids())
        fault.ended = self.now()

    def _loki_down(self, fault: Fault) -> None:
        self.loki.rx.down()
        down = time.monotonic()
        # The service's failed-push counter, before and after: scraped beside the outage so a
        # slow scrape on a loaded machine does not stretch it. Counters only grow, and the
        # restart that wipes them comes later.
        before: list[float] = []
        scrape = threading.Thread(target=lambda: before.append(self._loki_errors()), daemon=True)
        scrape.start()
        time.sleep(max(0.0, down + fault.seconds - time.monotonic()))
        self.loki.rx.up()
        fault.ended = self.now()
        fault.detail["up_at"] = fault.ended
        fault.detail["up_monotonic"] = time.monotonic()
        scrape.join(60)
        time.sleep(2.0)
        after = self._loki_errors()
        fault.detail["service_push_errors"] = after - before[0] if before else float("nan")

    def _loki_errors(self) -> float:
        for _ in range(3):  # a scrape can time out on a loaded machine
            try:
                text = requests.get(self.svc.url + "/metrics", timeout=15).text
                return metric(parse_metrics(text), "omni_upstream_errors_total", upstream="loki")
            except (requests.RequestException, ValueError):
                time.sleep(1.0)
        return float("nan")

    def _burst(self, fault: Fault, on: dict, off: dict) -> None:
        fault.detail["faults"] = self.box_faults(on)
        time.sleep(fault.seconds)
        self.box_faults(off)

    def _agent_5xx(self, fault: Fault) -> None:
        self._burst(fault, {"agent_status": 500}, {"agent_status": None})

    def _agent_timeout(self, fault: Fault) -> None:
        self._burst(fault, {"agent_hang": True}, {"agent_hang": False})

    def _evolution_5xx(self, fault: Fault) -> None:
        self._burst(fault, {"evo_status": 503}, {"evo_status": None})


# --------------------------------------------------------------------------- accounting


def drain(url: str, timeout: float) -> tuple[int, float]:
    """Wait until no trace of the run is `processing`; (how many still are, seconds waited)."""
    t0 = time.monotonic()
    while True:
        left = query_rows(url, "SELECT count(*) FROM message_trace WHERE instance_name = %s "
                            "AND status = 'processing'", (INSTANCE,))[0][0]
        if left == 0 or time.monotonic() - t0 > timeout:
            return left, round(time.monotonic() - t0, 1)
        time.sleep(1.0)


def classify(row: dict | None) -> str:
    """The outcome of a trace row, finer than its status."""
    if row is None:
        return "no row"
    status, step, err = row["status"], row["failed_step"] or "", row["error_message"] or ""
    if status == "completed":
        return "completed"
    if status == "failed":
        if step == "agent_called":
            return "failed: agent timeout" if "timed out" in err else \
                "failed: agent 500" if "500" in err else "failed: agent, other"
        if step == "evolution_send":
            return "failed: evolution 503" if "503" in err else "failed: evolution, other"
        return "failed: other"
    if status == "error":
        for key, label in (("worker", "error: worker killed"),
                           ("shutting down", "error: service shutting down"),
                           ("restarted", "error: service restarted"),
                           ("abandoned", "error: abandoned (swept)")):
            if key in err:
                return label
        return "error: other"
    return status


MID = re.compile(r"soak (SOAK\w+) ")
WORKER_EXITED = re.compile(r"interrupted: worker (\d+) exited")


def account(deliveries: list[Delivery], rows: dict[str, dict], sent: list[dict],
            calls: list[dict], stray_rows: int, killed: set[int]) -> dict:
    """Join the sender's log, the trace rows, the agent's calls and the Evolution side's sends
    per message; `killed` are the worker PIDs the soak SIGKILLed."""
    replies: dict[str, int] = {}
    attempts_by_mid: dict[str, int] = {}
    agent: dict[str, int] = {}
    for call in calls:
        m = MID.search(call.get("message_content") or "")
        if m:
            agent[m.group(1)] = agent.get(m.group(1), 0) + 1
    pattern = MID
    for item in sent:
        m = pattern.search(item.get("text") or "")
        if not m or item.get("instance") != INSTANCE:
            continue
        attempts_by_mid[m.group(1)] = attempts_by_mid.get(m.group(1), 0) + 1
        if (item.get("status") or 0) < 300:
            replies[m.group(1)] = replies.get(m.group(1), 0) + 1
    known = {d.mid for d in deliveries}
    per: list[dict] = []
    for d in deliveries:
        row = rows.get(d.mid)
        n = replies.get(d.mid, 0)
        calls_n = agent.get(d.mid, 0)
        accepted = d.outcome in ("accepted", "duplicate")
        final = row is not None and row["status"] in FINAL
        err = (row or {}).get("error_message") or ""
        exited = WORKER_EXITED.search(err)
        per.append({
            "mid": d.mid, "first_at": d.first_at, "outcome": d.outcome,
            "retried": len(d.attempts) > 1, "row": classify(row),
            "status": row["status"] if row else None, "replies": n, "agent_calls": calls_n,
            "lost": accepted and not final,
            "stuck": row is not None and row["status"] == "processing",
            "double": n > 1,
            "trace_mismatch": accepted and (len(d.trace_ids()) != 1 or row is None
                                            or d.trace_ids() != {row["trace_id"]}),
            "completed_reply_not_one": row is not None and row["status"] == "completed" and n != 1,
            "gave_up_unaccounted": d.outcome == "gave_up" and row is not None and not final,
            "agent_twice": calls_n > 1,
            "outcome_without_call": row is not None and row["status"] in ("completed", "failed")
                                    and calls_n == 0,
            # Answered only `duplicate`: the row was committed by an attempt whose answer was
            # lost (a 503 after a slow commit, a reset); its worker still owes the processing,
            # unless the soak killed that worker first (its messages end `error` unprocessed).
            "duplicate_never_processed": d.outcome == "duplicate" and calls_n == 0
                                         and not (exited and int(exited.group(1)) in killed),
            # Left unfinished by a worker that exited cleanly (not the one killed), or found
            # by the startup recovery after a clean restart: a message its worker dropped.
            "recovered_after_clean_exit": bool(exited and int(exited.group(1)) not in killed)
                                          or "service restarted" in err,
        })
    answers: dict[str, int] = {}
    for d in deliveries:
        for a in d.attempts:
            key = str(a[1]) if a[1] is not None else a[2]
            answers[key] = answers.get(key, 0) + 1
    latencies = sorted(a[3] for d in deliveries for a in d.attempts if a[1] in (200, 202))
    return {
        "per_message": per,
        "answers": dict(sorted(answers.items())),
        "replies_without_message": sum(n for mid, n in replies.items() if mid not in known),
        "replies_without_row": sum(1 for mid in replies if mid in known and mid not in rows),
        "stray_rows": stray_rows,
        "send_attempts": sum(attempts_by_mid.values()),
        "answer_ms": {"p50": _pct(latencies, 0.5), "p99": _pct(latencies, 0.99),
                      "max": latencies[-1] if latencies else None},
    }


def timeline(deliveries: list[Delivery], sent: list[dict], t0_wall: float) -> list[dict]:
    """Per second of the run: webhook answers by kind and Evolution sends by answer."""
    seconds: dict[int, dict[str, int]] = {}
    for d in deliveries:
        for a in d.attempts:
            kind = "2xx" if a[1] is not None and a[1] < 300 else str(a[1]) if a[1] else "conn/timeout"
            row = seconds.setdefault(int(a[0]), {})
            row[kind] = row.get(kind, 0) + 1
    for item in sent:
        if item.get("instance") != INSTANCE or not item.get("received_at"):
            continue
        at = dt.datetime.fromisoformat(item["received_at"].replace("Z", "+00:00")).timestamp()
        row = seconds.setdefault(int(at - t0_wall), {})
        kind = f"send {item.get('status')}"
        row[kind] = row.get(kind, 0) + 1
    return [{"t": t, **seconds[t]} for t in sorted(seconds)]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, max(0, int(round(q * len(values) + 0.5)) - 1))]


COLUMNS = ("sent", "accepted 1st try", "accepted after retry", "duplicate only", "gave up",
           "completed", "failed", "error", "stuck", "double replies", "lost")


def tally(per: list[dict]) -> dict[str, int]:
    """The table's columns over some messages."""
    return {
        "sent": len(per),
        "accepted 1st try": sum(1 for p in per if p["outcome"] == "accepted" and not p["retried"]),
        "accepted after retry": sum(1 for p in per if p["outcome"] == "accepted" and p["retried"]),
        "duplicate only": sum(1 for p in per if p["outcome"] == "duplicate"),
        "gave up": sum(1 for p in per if p["outcome"] == "gave_up"),
        "completed": sum(1 for p in per if p["status"] == "completed"),
        "failed": sum(1 for p in per if p["status"] == "failed"),
        "error": sum(1 for p in per if p["status"] == "error"),
        "stuck": sum(1 for p in per if p["stuck"]),
        "double replies": sum(1 for p in per if p["double"]),
        "lost": sum(1 for p in per if p["lost"]),
    }


def by_window(per: list[dict], faults: list[Fault]) -> list[dict]:
    """One tally per fault window, one for the messages outside every window, one in all."""
    out = []
    inside: set[str] = set()
    for f in faults:
        lo, hi = f.window()
        members = [p for p in per if lo <= p["first_at"] <= hi]
        inside.update(p["mid"] for p in members)
        out.append({"window": f.name, "from_s": round(max(0.0, lo), 1), "to_s": round(hi, 1),
                    **tally(members)})
    out.append({"window": "outside every fault", "from_s": None, "to_s": None,
                **tally([p for p in per if p["mid"] not in inside])})
    out.append({"window": "all", "from_s": None, "to_s": None, **tally(per)})
    return out


def observe(faults: list[Fault], deliveries: list[Delivery], per: list[dict],
            loki: LokiTap, sends: list[tuple[float, int]]) -> dict[str, str | None]:
    """Per fault: None if it was injected and its effect seen, else what is missing."""
    attempts = [a for d in deliveries for a in d.attempts]
    rows_by_mid = {p["mid"]: p for p in per}
    # An upstream fault hits the messages accepted while it is on (or shortly before: their
    # agent call is still running), whenever they were first sent.
    accepted_at = {d.mid: next(a[0] for a in d.attempts if a[1] is not None and a[1] < 300)
                   for d in deliveries if d.outcome in ("accepted", "duplicate")}
    out: dict[str, str | None] = {}
    for f in faults:
        if f.error or f.started is None:
            out[f.name] = "not injected" + (f": {f.error.splitlines()[-1]}" if f.error else "")
            continue
        s, e = f.started, f.ended
        in_window = [a for a in attempts if s <= a[0] <= e]
        rows = [rows_by_mid[mid]["row"] for mid, t in accepted_at.items()
                if s - IN_FLIGHT_S <= t <= e]
        why = None
        if f.name in ("pg_stop", "pg_crash"):
            refused = [a for a in in_window if a[1] == 503]
            after = [a for a in attempts if a[0] > e and a[1] == 202]
            f.detail["refused_503"] = len(refused)
            why = None if refused and after else f"503 during: {len(refused)}, 202 after: {len(after)}"
        elif f.name == "lock_stall":
            # Answered (not sent) while the table is locked: a loaded gateway may have held
            # the request in its queue for seconds first. PostgreSQL is up, so a 503 then is
            # the commit wait running out.
            locked = f.detail.get("locked_at", s)
            slow = [a for a in attempts if a[1] == 503
                    and locked <= a[0] + a[3] / 1000 <= locked + f.seconds + 1]
            f.detail["refused_503"] = len(slow)
            why = None if slow else "no webhook answered 503 during the stall"
        elif f.name == "worker_sigkill":
            killed = [p for p in per if p["row"] == "error: worker killed"]
            f.detail["messages_interrupted"] = len(killed)
            why = None if f.detail.get("replaced_at") is not None else "the worker was not replaced"
        elif f.name == "gunicorn_restart":
            refused = [a for a in in_window if a[1] is None or a[1] >= 500]
            f.detail["refused_or_unreachable"] = len(refused)
            ok = f.detail.get("new_master") not in (None, f.detail.get("old_master"))
            why = None if ok and refused else f"new master: {ok}, refused: {len(refused)}"
        elif f.name == "loki_down":
            up = f.detail.get("up_monotonic", float("inf"))
            resumed = [p for p in loki.pushes if p[0] > up and p[1] == 204]
            f.detail["pushes_after_up"] = len(resumed)
            errs = f.detail.get("service_push_errors", 0)
            why = None if resumed and errs and errs > 0 else \
                f"push errors while down: {errs}, pushes after: {len(resumed)}"
        elif f.name in ("agent_5xx", "agent_timeout", "evolution_5xx"):
            label = {"agent_5xx": "failed: agent 500", "agent_timeout": "failed: agent timeout",
                     "evolution_5xx": "failed: evolution 503"}[f.name]
            f.detail["messages_failed"] = rows.count(label)
            why = None if rows.count(label) else f"no message '{label}' accepted in the window"
            if f.name == "evolution_5xx":
                refused = sum(1 for t, status in sends if s <= t <= e and status == 503)
                f.detail["sends_answered_503"] = refused
                if not refused:
                    why = "no sendText answered 503 during the outage"
        out[f.name] = why
    return out


def invariants(acc: dict, per: list[dict], stuck_total: int, observed: dict) -> dict[str, int]:
    """Counts that must all be 0."""
    answers = acc["answers"]
    inv = {
        "lost (accepted, no final row)": sum(1 for p in per if p["lost"]),
        "stuck in processing (any row of the run)": stuck_total,
        "double replies": sum(1 for p in per if p["double"]),
        "gave-up messages with a row not final": sum(1 for p in per if p["gave_up_unaccounted"]),
        "accepted with another trace id than its row": sum(1 for p in per if p["trace_mismatch"]),
        "completed without exactly one reply": sum(1 for p in per if p["completed_reply_not_one"]),
        "4xx answers (a dropped message)": sum(v for k, v in answers.items()
                                              if k.isdigit() and 400 <= int(k) < 500),
        "valid messages answered `ignored`": sum(1 for p in per if p["outcome"] == "ignored"),
        "replies for no trace row": acc["replies_without_row"] + acc["replies_without_message"],
        # The sweep is the last resort for a row nobody owns any more: none of these faults
        # should need it (a worker's death and a restart are finalised at once), so a row it
        # finalised is a message accepted and then never processed.
        "accepted but never processed (finalised by the stale sweep)":
            sum(1 for p in per if p["row"] == "error: abandoned (swept)"),
        "accepted but never processed (recovered after a clean exit)":
            sum(1 for p in per if p["recovered_after_clean_exit"]),
        "answered `duplicate`, never handed to the agent":
            sum(1 for p in per if p["duplicate_never_processed"]),
        "agent called twice for one message": sum(1 for p in per if p["agent_twice"]),
        "completed or failed without an agent call": sum(1 for p in per if p["outcome_without_call"]),
        "rows for messages never sent": acc["stray_rows"],
        "faults not injected or not observed": sum(1 for v in observed.values() if v),
    }
    return inv


def markdown(result: dict) -> str:
    """The report: per-window table, outcomes, invariants."""
    cfg = result["config"]
    lines = [f"### Chaos soak ({result['mode']}): {cfg['seconds']} s at {cfg['rate']} msg/s",
             "",
             f"{result['machine']}; {result['elapsed_s']} s in all, drain {result['drain_s']} s.",
             "",
             "| fault window (first send, s) | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for w in result["windows"]:
        name = w["window"] if w["from_s"] is None else f"{w['window']} ({w['from_s']:g}-{w['to_s']:g})"
        if w["window"] == "all":
            name = "**all**"
        lines.append(f"| {name} | " + " | ".join(f"{w[c]:,}" for c in COLUMNS) + " |")
    lines += ["", "| outcome | messages |", "|---|---:|"]
    for k, v in result["outcomes"].items():
        lines.append(f"| {k} | {v:,} |")
    lines += ["", "| webhook answer | count |", "|---|---:|"]
    for k, v in result["answers"].items():
        lines.append(f"| {k} | {v:,} |")
    lines += ["", "| invariant (must be 0) | count |", "|---|---:|"]
    for k, v in result["invariants"].items():
        lines.append(f"| {k} | {v}{'' if v == 0 else ' **FAIL**'} |")
    lines += ["", "| fault | what | at (s) | seen |", "|---|---|---|---|"]
    for f in result["faults"]:
        seen = result["observed"][f["name"]] or "yes: " + ", ".join(
            f"{k} {v}" for k, v in f["detail"].items()
            if k in ("refused_503", "messages_interrupted", "refused_or_unreachable",
                     "pushes_after_up", "service_push_errors", "messages_failed",
                     "sends_answered_503"))
        lines.append(f"| {f['name']} | {WHAT[f['name']]} | {f['started']}-{f['ended']} | {seen} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def machine() -> str:
    """Cores and load: the soak shares the machine."""
    load = os.getloadavg()
    return f"{os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"


def run(cfg: dict, mode: str, out_dir: Path) -> int:
    """The whole soak; returns the exit code."""
    started = time.monotonic()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_id = stamp[2:8] + stamp[9:15]
    quick = mode == "quick"
    faults = [Fault(name, round(share * cfg["seconds"], 1), quick_s if quick else full_s)
              for name, share, full_s, quick_s in SCHEDULE]
    cluster = box = svc = loki = injector = None
    load_start = machine()
    try:
        cluster = PgCluster(fsync=True)  # a crash must not lose acknowledged commits
        db_url = cluster.create_database()
        migrate(db_url)
        loki = LokiTap()
        box = Sandbox(SANDBOX_LOG_LEVEL="WARNING", SANDBOX_SENT_LIMIT="1000000",
                      SANDBOX_CALLS_LIMIT="1000000")
        svc = Service(db_url, {"AUTOMAGIK_OMNI_THREADS": "16",
                               "AUTOMAGIK_OMNI_LOKI_URL": loki.rx.url}, workers=2,
                      log_path=out_dir / f"soak-{stamp}-service.log").start()
        svc.ensure_instance(INSTANCE, box.url, agent_timeout_s=AGENT_TIMEOUT_S)
        deadline = time.monotonic() + 30
        while len(svc.worker_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        log(f"{mode}: {cfg['seconds']} s at {cfg['rate']} msg/s; {machine()}")
        t0 = time.monotonic() + 0.5
        t0_wall = time.time() + 0.5
        sender = Sender(f"{svc.url}/webhook/evolution/{INSTANCE}", cfg["rate"], cfg["seconds"],
                        cfg["max_attempts"], t0, run_id)
        injector = Injector(faults, t0, cluster, db_url, svc, box, loki).start()
        asyncio.run(sender.run())
        injector.thread.join(120)
        load_end = machine()
        log("draining")
        stuck, drain_s = drain(db_url, cfg["drain_s"])
        rows = {}
        for mid, tid, status, step, err in query_rows(
                db_url, "SELECT message_id, trace_id::text, status, failed_step, error_message "
                        "FROM message_trace WHERE instance_name = %s", (INSTANCE,)):
            rows[mid] = {"trace_id": tid, "status": status, "failed_step": step, "error_message": err}
        known = {d.mid for d in sender.deliveries}
        sent = box.sent()
        calls = requests.get(box.url + "/calls", timeout=60).json()["recent"]
        killed = {f.detail["victim"] for f in faults if f.name == "worker_sigkill" and "victim" in f.detail}
        acc = account(sender.deliveries, rows, sent, calls, sum(1 for m in rows if m not in known),
                      killed)
        per = acc["per_message"]
        sends = [(dt.datetime.fromisoformat(i["received_at"].replace("Z", "+00:00")).timestamp()
                  - t0_wall, i.get("status") or 0) for i in sent
                 if i.get("instance") == INSTANCE and i.get("received_at")]
        observed = observe(faults, sender.deliveries, per, loki, sends)
        outcomes: dict[str, int] = {"messages sent": len(per)}
        for key in ("accepted", "duplicate", "gave_up", "dropped_4xx", "ignored"):
            label = {"accepted": "accepted (202, or 200 duplicate after a 202)",
                     "duplicate": "accepted, 200 duplicate only (an earlier answer was lost)",
                     "gave_up": f"sender gave up ({cfg['max_attempts']} attempts)",
                     "dropped_4xx": "dropped on a 4xx", "ignored": "answered ignored"}[key]
            outcomes[label] = sum(1 for p in per if p["outcome"] == key)
        for label in sorted({p["row"] for p in per}):
            outcomes[f"trace: {label}"] = sum(1 for p in per if p["row"] == label)
        outcomes["replies sent once"] = sum(1 for p in per if p["replies"] == 1)
        outcomes["replies sent twice or more"] = sum(1 for p in per if p["replies"] > 1)
        inv = invariants(acc, per, stuck, observed)
        result = {
            "mode": mode, "started_at": stamp, "config": cfg, "machine": f"{load_start} at start, "
            f"{load_end.split(', ', 1)[1]} at the end", "drain_s": drain_s,
            "stuck_after_drain": stuck, "elapsed_s": 0.0,
            "faults": [{"name": f.name, "at": f.at, "seconds": f.seconds, "started": f.started,
                        "ended": f.ended, "detail": {k: v for k, v in f.detail.items()
                                                     if k != "up_monotonic"}, "error": f.error}
                       for f in faults],
            "observed": observed, "windows": by_window(per, faults), "outcomes": outcomes,
            "answers": acc["answers"], "answer_ms": acc["answer_ms"],
            "send_attempts": acc["send_attempts"], "connection_errors": sender.errors,
            "timeline": timeline(sender.deliveries, sent, t0_wall),
            "loki": {"entries": loki.entries, "pushes": len(loki.pushes), "format_errors": loki.errors[:5]},
            "invariants": inv, "failed": [k for k, v in inv.items() if v],
            "examples": {k: [p["mid"] for p in per if p[f]][:5] for k, f in (
                ("lost", "lost"), ("stuck", "stuck"), ("double", "double"),
                ("trace_mismatch", "trace_mismatch"), ("completed_reply_not_one", "completed_reply_not_one"),
                ("recovered_after_clean_exit", "recovered_after_clean_exit"),
                ("duplicate_never_processed", "duplicate_never_processed"),
                ("agent_twice", "agent_twice"))},
        }
        with open(out_dir / f"soak-{stamp}-sender.jsonl", "w") as fh:
            for d in sender.deliveries:
                fh.write(json.dumps({"mid": d.mid, "delay_ms": d.delay_ms, "outcome": d.outcome,
                                     "attempts": d.attempts, "trace": rows.get(d.mid)}) + "\n")
    finally:
        if injector is not None:
            injector.stopping.set()
        for stop in (svc and svc.stop, box and box.stop, loki and loki.stop,
                     cluster and cluster.destroy):
            if stop:
                try:
                    stop()
                except Exception:  # noqa: BLE001 - stop the rest regardless
                    log(traceback.format_exc())
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    text = markdown(result)
    (out_dir / f"soak-{stamp}.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / f"soak-{stamp}.md").write_text(text)
    print(text)
    log(f"wrote {out_dir}/soak-{stamp}.json and .md in {result['elapsed_s']} s")
    if result["failed"]:
        log("FAILED: " + "; ".join(f"{k}: {inv[k]}" for k in result["failed"]))
        for name, why in observed.items():
            if why:
                log(f"  {name}: {why}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the soak."""
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the same faults, shorter (about 2 minutes)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="results directory")
    args = p.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    return run(QUICK if args.quick else FULL, "quick" if args.quick else "full", out_dir)


if __name__ == "__main__":
    sys.exit(main())
