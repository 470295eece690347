"""gunicorn settings for omni, all derived from AUTOMAGIK_OMNI_* (SPEC section 3).

Run: gunicorn -c app/gunicorn.conf.py 'app:create_app()'
"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Multiprocess metrics need this before prometheus_client is imported anywhere, including
# by this file's own import of the app package below (workers are forked from here).
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", os.path.join(
    tempfile.gettempdir(), f"omni-metrics-{os.environ.get('AUTOMAGIK_OMNI_PORT', '8882')}"))

from app.config import ConfigError, Settings  # noqa: E402

try:
    _settings = Settings.from_env()
except ConfigError as exc:
    # A clear one-line error instead of a traceback; gunicorn exits non-zero.
    sys.stderr.write(f"omni: configuration error: {exc}\n")
    sys.exit(2)

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
threads = _settings.threads
# Connections a worker holds at once (gunicorn's default: 1000). Workers race to accept, so a
# client opening its keep-alive pool in one burst could land every connection on one worker:
# that worker's GIL then caps the replica at about one core while the others idle (bench/:
# 128 connections all on one of 2 workers in ~1 run of 4, 590 instead of 900 msg/s). At
# threads x 4 a full worker stops accepting and the next connections go to the others; it
# still keeps up to threads x 3 idle keep-alive connections.
worker_connections = _settings.threads * 4
# gthread: the webhook path blocks briefly on the trace commit; threads overlap those waits.
worker_class = "gthread"
# Longer than the pipeline's drain so in-flight messages can finish on SIGTERM.
graceful_timeout = int(_settings.shutdown_grace_s) + 15
timeout = 60
keepalive = 5
# Header limits (bytes / count) answered with 4xx by gunicorn itself.
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
accesslog = "-"
loglevel = _settings.log_level.lower()
logger_class = "app.telemetry.gunicorn_logger.JsonLogger"
# Processes' own tmp files in memory where available (avoids disk stalls on heartbeats).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
proc_name = "omni"


def on_starting(server):
    """Master start: empty the metrics directory so old counts do not leak in."""
    if _settings.enable_metrics:
        from app.telemetry.metrics import wipe_multiprocess_dir

        wipe_multiprocess_dir(os.environ["PROMETHEUS_MULTIPROC_DIR"])


def when_ready(server):
    """Master ready: finalise messages a previous run on this host left unfinished."""
    if _settings.enable_tracing:
        from app.recovery import service_started

        service_started(_settings.database_url)


def post_worker_init(worker):
    """In the worker, app loaded: garbage-collector settings for serving (app/gc_tuning.py)."""
    from app.gc_tuning import tune_worker_gc
    tune_worker_gc()


def worker_exit(server, worker):
    """In the worker: drain in-flight messages and flush traces and logs."""
    app = getattr(worker, "wsgi", None)
    runtime = getattr(app, "extensions", {}).get("omni") if app is not None else None
    if runtime is not None:
        runtime.shutdown()


def child_exit(server, worker):
    """In the master: fold the dead worker's metrics and finalise what it left unfinished."""
    if _settings.enable_metrics:
        from app.telemetry.metrics import compact_dead_worker

        compact_dead_worker(worker.pid)
    if _settings.enable_tracing:
        from app.recovery import worker_died

        worker_died(_settings.database_url, worker.pid)
