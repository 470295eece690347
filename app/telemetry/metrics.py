"""Every Prometheus metric of the service (SPEC section 5), in one place.

Under gunicorn the module runs in multiprocess mode: PROMETHEUS_MULTIPROC_DIR is set
by app/gunicorn.conf.py before any worker imports prometheus_client, and one scrape of
/metrics merges the files of every live and dead worker.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import threading
from typing import Any

if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # prometheus_client opens its files at import; the directory must exist by then.
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from prometheus_client import (  # noqa: E402
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.mmap_dict import MmapedDict  # noqa: E402

from app.vocabulary import (  # noqa: E402
    AUTH_REASONS, CANARY_RESULTS, FINAL_STATUSES, IGNORE_REASONS, RECEIPT_STATUSES, REJECT_REASONS, STEP_OUTCOMES,
    STEPS, TOKEN_TYPES, UPSTREAM_REASONS)


# Messages take 3 to 7 s end to end; the slow-message alert counts le="10".
MESSAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 10, 15, 20, 30, 60, 120)
# Steps range from sub-millisecond (validation) to the agent's seconds.
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 4, 5,
                6, 7, 8, 10, 15, 20, 30, 60, 120)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# WhatsApp -> Evolution -> us is normally sub-second; minutes or hours after an outage.
LAG_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)
# Delivery takes a second or two; a read receipt comes when the person opens the chat.
RECEIPT_BUCKETS = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)

MESSAGES = Counter("omni_messages_total", "Messages that reached a final status.",
                   ["instance_name", "status"])
MESSAGE_DURATION = Histogram("omni_message_duration_seconds",
                             "End-to-end time from webhook to final status.",
                             ["instance_name", "status"], buckets=MESSAGE_BUCKETS)
STEP_DURATION = Histogram("omni_message_step_duration_seconds",
                          "Time spent in each processing step.",
                          ["instance_name", "step", "status"], buckets=STEP_BUCKETS)
AGENT_FIRST_CHUNK = Histogram("omni_agent_first_chunk_seconds",
                              "Time from the agent call to its first streamed chunk.",
                              ["instance_name"], buckets=STEP_BUCKETS)
AGENT_TOKENS = Counter("omni_agent_tokens_total", "Tokens the agent reported using, by type.",
                       ["instance_name", "type"])
AGENT_COST = Counter("omni_agent_cost_usd_total",
                     "Cost of the agent's tokens in USD, at the instance's prices.", ["instance_name"])
HTTP_DURATION = Histogram("omni_http_request_duration_seconds",
                          "HTTP requests served, by route template.",
                          ["method", "route", "status"], buckets=HTTP_BUCKETS)
WEBHOOK_REJECTED = Counter("omni_webhook_rejected_total", "Webhooks refused, by reason.", ["reason"])
WEBHOOK_IGNORED = Counter("omni_webhook_ignored_total",
                          "Valid Evolution webhooks answered 200 ignored, by reason.", ["reason"])
WEBHOOK_LAG = Histogram("omni_webhook_lag_seconds",
                        "Arrival here minus WhatsApp's messageTimestamp, per accepted message.",
                        ["instance_name"], buckets=LAG_BUCKETS)
REPLY_RECEIPT = Histogram("omni_reply_receipt_seconds",
                          "From our send of a reply to its delivery or read receipt.",
                          ["instance_name", "status"], buckets=RECEIPT_BUCKETS)
UPSTREAM_ERRORS = Counter("omni_upstream_errors_total", "Failed calls to a dependency.",
                          ["upstream", "reason"])
AUTH_FAILURES = Counter("omni_auth_failures_total", "Failed authentications, by reason.", ["reason"])
LOG_RECORDS_DROPPED = Counter("omni_log_records_dropped_total",
                              "Log records that could not be delivered to Loki.")
IN_FLIGHT = Gauge("omni_messages_in_flight", "Accepted messages still being processed.",
                  multiprocess_mode="livesum")
# Per-worker resources: 'liveall' keeps one series per live worker (pid label) and drops
# a worker's series when gunicorn reports it dead.
WORKER_MEMORY = Gauge("omni_worker_resident_memory_bytes", "Resident memory of a worker.",
                      multiprocess_mode="liveall")
# A counter, not a per-pid gauge: each worker adds the CPU it used since its previous sample,
# and a dead worker's count stays in the archive, so rate() holds across restarts.
WORKER_CPU = Counter("omni_worker_cpu_seconds_total",
                     "CPU seconds (user + system) used by the workers, every worker that ran.")
WORKER_CONNECTIONS = Gauge("omni_worker_open_connections",
                           "Open sockets of a worker (clients, database, upstreams, Loki).",
                           multiprocess_mode="liveall")
WORKER_THREADS = Gauge("omni_worker_threads", "Threads of a worker.", multiprocess_mode="liveall")
COST_BUDGET = Gauge("omni_cost_budget_usd_per_day",
                    "Daily agent cost budget of the omni-cost-burn alert (0: no alert).",
                    multiprocess_mode="max")
BUILD_INFO = Gauge("omni_build_info", "Version of the running service.", ["version"],
                   multiprocess_mode="max")

# The canary (app/canary.py). Its messages are counted here and in no other metric.
# Like MESSAGE_BUCKETS (a canary is one message end to end), with exactly 10 for the slow line.
CANARY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 60, 120)
CANARY_RUNS = Counter("omni_canary_runs_total",
                      "Canary runs by result: ok, slow (completed after the slow threshold), failed.",
                      ["result"])
CANARY_DURATION = Histogram("omni_canary_duration_seconds",
                            "Duration of a canary's message as its trace records it (webhook to final "
                            "status); the time waited when it never finished.", buckets=CANARY_BUCKETS)
# 'max': every worker of a replica sets the same value; 0 tells the alert the canary is off.
CANARY_INTERVAL = Gauge("omni_canary_interval_seconds",
                        "Configured canary interval (0: no canary).", multiprocess_mode="max")
# 'max' over workers and replicas: the latest run of each result wins, whoever ran it.
CANARY_LAST_RUN = Gauge("omni_canary_last_run_timestamp_seconds",
                        "Unix time of the last canary run with each result.", ["result"],
                        multiprocess_mode="max")

_seeded: set[str] = set()
_seed_lock = threading.Lock()


def multiprocess_enabled() -> bool:
    """True when prometheus_client writes to a shared directory (gunicorn)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def seed_static(version: str, cost_budget_usd_per_day: float = 0.0) -> None:
    """Create the series whose labels are known in advance, at 0 (SPEC 5)."""
    BUILD_INFO.labels(version=version).set(1)
    COST_BUDGET.set(cost_budget_usd_per_day)
    for upstream, reasons in UPSTREAM_REASONS.items():
        for reason in reasons:
            UPSTREAM_ERRORS.labels(upstream=upstream, reason=reason)
    for reason in REJECT_REASONS:
        WEBHOOK_REJECTED.labels(reason=reason)
    for reason in IGNORE_REASONS:
        WEBHOOK_IGNORED.labels(reason=reason)
    for reason in AUTH_REASONS:
        AUTH_FAILURES.labels(reason=reason)
    LOG_RECORDS_DROPPED.inc(0)


def seed_canary(interval_s: float | None) -> None:
    """Create the canary's run counters at 0 and export its interval (None: no canary)."""
    for result in CANARY_RESULTS:
        CANARY_RUNS.labels(result=result)
    CANARY_INTERVAL.set(interval_s or 0)


_children: dict[tuple, Any] = {}


def child(metric: Any, *values: str) -> Any:
    """metric.labels(*values) (values in the metric's label order), cached per process.

    labels() validates the names and takes a lock on every call; on the per-message path
    (4 steps, the message, the HTTP request) that was a quarter of the Prometheus cost.
    Label values here are bounded (instances, steps, statuses, routes), so is the cache.
    """
    key = (metric, values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*values)
    return found


def seed_instance(instance: str) -> None:
    """Create an instance's message and step series at 0 the first time it is used."""
    if instance in _seeded:
        return
    with _seed_lock:
        if instance in _seeded:
            return
        for status in FINAL_STATUSES:
            MESSAGES.labels(instance_name=instance, status=status)
            MESSAGE_DURATION.labels(instance_name=instance, status=status)
        for step in STEPS:
            for status in STEP_OUTCOMES:
                STEP_DURATION.labels(instance_name=instance, step=step, status=status)
        AGENT_FIRST_CHUNK.labels(instance_name=instance)
        WEBHOOK_LAG.labels(instance_name=instance)
        for status in RECEIPT_STATUSES:
            REPLY_RECEIPT.labels(instance_name=instance, status=status)
        for kind in TOKEN_TYPES:
            AGENT_TOKENS.labels(instance_name=instance, type=kind)
        AGENT_COST.labels(instance_name=instance)
        _seeded.add(instance)


_cpu_counted: tuple[int, float] = (0, 0.0)   # (pid, CPU seconds counted so far)
_cpu_lock = threading.Lock()


def count_cpu(seconds: float) -> None:
    """Add to WORKER_CPU what this process used since the last call (seconds: its total)."""
    global _cpu_counted
    with _cpu_lock:
        pid, counted = _cpu_counted
        if pid != os.getpid():
            # A forked child inherits the parent's figure, but its own CPU times start at 0.
            counted = 0.0
        if seconds > counted:
            WORKER_CPU.inc(seconds - counted)
            counted = seconds
        _cpu_counted = (os.getpid(), counted)


def sample_worker_resources() -> None:
    """Record this worker's memory, CPU, connections and threads (called periodically)."""
    import psutil

    proc = psutil.Process()
    with proc.oneshot():
        WORKER_MEMORY.set(proc.memory_info().rss)
        times = proc.cpu_times()
        count_cpu(times.user + times.system)
        WORKER_THREADS.set(proc.num_threads())
    try:
        WORKER_CONNECTIONS.set(_count_sockets())
    except OSError:
        pass


def _count_sockets() -> int:
    # Our own socket descriptors, not psutil.net_connections(): that parses the whole
    # host's /proc/net/tcp* on every call, ~150 ms with a few thousand connections open
    # (2.5% of a busy worker's CPU at one call per 5 s, bench/).
    n = 0
    for entry in os.scandir("/proc/self/fd"):
        try:
            if os.readlink(entry.path).startswith("socket:"):
                n += 1
        except OSError:  # closed meanwhile
            pass
    return n


@contextlib.contextmanager
def _dir_lock(path: str, exclusive: bool):
    # Compaction moves counts between files; the lock keeps a scrape from seeing them twice.
    with open(os.path.join(path, ".compact.lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def compact_dead_worker(pid: int, path: str | None = None) -> None:
    """Mark a worker dead and fold its counter and histogram files into archive files.

    Without this every restarted worker (max_requests, crashes) leaves files behind that
    each scrape must read forever; with it counts survive and the directory stays small.
    """
    path = path or os.environ["PROMETHEUS_MULTIPROC_DIR"]
    multiprocess.mark_process_dead(pid, path)
    with _dir_lock(path, exclusive=True):
        for typ in ("counter", "histogram"):
            dead = os.path.join(path, f"{typ}_{pid}.db")
            if not os.path.exists(dead):
                continue
            archive = MmapedDict(os.path.join(path, f"{typ}_archive.db"))
            try:
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(dead):
                    old, _ = archive.read_value(key)
                    archive.write_value(key, old + value, timestamp)
            finally:
                archive.close()
            os.remove(dead)
        for leftover in glob.glob(os.path.join(path, f"gauge_*_{pid}.db")):
            os.remove(leftover)


def wipe_multiprocess_dir(path: str) -> None:
    """Empty (or create) the multiprocess directory at service start."""
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db") or name == ".compact.lock":
            os.remove(os.path.join(path, name))


class _NonEmptyFilesCollector:
    """MultiProcessCollector that skips files a starting worker has created but not sized yet.

    prometheus_client creates a worker's file and then grows it; a scrape landing between
    the two would fail on the empty file (struct.error) and answer 500.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def collect(self):
        files = []
        for name in glob.glob(os.path.join(self.path, "*.db")):
            try:
                if os.path.getsize(name) >= 8:
                    files.append(name)
            except FileNotFoundError:
                continue
        return multiprocess.MultiProcessCollector.merge(files, accumulate=True)


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric, merged over all workers when multiprocess."""
    if multiprocess_enabled():
        path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        registry = CollectorRegistry()
        registry.register(_NonEmptyFilesCollector(path))
        with _dir_lock(path, exclusive=False):
            return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
