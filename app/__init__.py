"""omni: the AI-agent messaging gateway with full telemetry. `create_app()` builds the service."""
from __future__ import annotations

import atexit
import datetime as dt
import logging
import time
from dataclasses import dataclass

from flask import Flask, g, request
from werkzeug.middleware.proxy_fix import ProxyFix

from app import errors
from app.auth import Guard
from app.canary import Canary
from app.config import Settings
from app.contacts import LidDirectory
from app.db import Database
from app.dedup import RecentIds
from app.instances import InstanceRepo
from app.jsonsafe import StrictJSONProvider
from app.pipeline import Pipeline, owner_id
from app.ratelimit import WindowCounter
from app.telemetry import logs, metrics
from app.traces.store import TraceStore
from app.traces.writer import TraceWriter
from app.version import __version__

log = logging.getLogger("omni")
MAX_BODY_BYTES = 1 << 20
# Any other method string becomes "other" so clients cannot create label values.
_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}


@dataclass
class Runtime:
    """Everything one worker holds: settings, pools, background threads."""

    settings: Settings
    db: Database
    instances: InstanceRepo
    traces: TraceStore
    writer: TraceWriter | None
    pipeline: Pipeline
    guard: Guard
    loki: object | None
    recent_ids: RecentIds
    contacts: LidDirectory
    webhook_rate_instance: WindowCounter
    webhook_rate_address: WindowCounter
    version: str = __version__
    _stopped: bool = False

    def shutdown(self) -> None:
        """Drain in-flight messages, flush traces and logs, close connections (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        interrupted = self.pipeline.shutdown(self.settings.shutdown_grace_s)
        if self.writer is not None:
            self.writer.stop(timeout=10)
        log.info("worker stopped", extra={"event": "worker_stopped", "interrupted": interrupted})
        if self.loki is not None:
            self.loki.close()
        self.db.close()

    def sweep(self) -> None:
        """Mark messages whose worker was lost as error (runs periodically in each worker)."""
        n = self.traces.sweep_stale(self.settings.evolution_timeout_s + 60)
        if n:
            log.warning("marked abandoned messages as error", extra={"event": "traces_swept", "count": n})

    def purge(self) -> None:
        """Delete traces past retention; one process at a time holds the purge lock."""
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=self.settings.trace_retention_days)
        n = self.traces.delete_older_than(cutoff)
        if n:
            log.info("purged expired traces", extra={"event": "traces_purged", "count": n})


def _count_dropped_logs(settings: Settings):
    def on_drop(n: int) -> None:
        if settings.enable_metrics:
            metrics.LOG_RECORDS_DROPPED.inc(n)
    return on_drop


def _make_loki(settings: Settings):
    if not settings.loki_url:
        return None
    from app.telemetry.loki import LokiHandler

    on_drop = _count_dropped_logs(settings)

    def on_error(reason: str) -> None:
        if settings.enable_metrics:
            metrics.UPSTREAM_ERRORS.labels(upstream="loki", reason=reason).inc()

    return LokiHandler(settings.loki_url, {"service": "omni", "env": settings.env},
                       on_drop=on_drop, on_error=on_error)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the Flask app and start this worker's background threads."""
    settings = settings or Settings.from_env()
    loki = _make_loki(settings)
    logs.setup(settings.log_level, loki, on_drop=_count_dropped_logs(settings))
    logs.REDACTOR.add(settings.api_key, settings.metrics_token)

    app = Flask(__name__)
    app.json = StrictJSONProvider(app)  # 400, not 500, for non-UTF-8, lone surrogates, deep nesting
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.json.sort_keys = False
    if settings.trusted_proxies:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)  # type: ignore[method-assign]

    db = Database(settings.database_url, size=settings.db_pool_size)
    traces = TraceStore(db)
    writer = TraceWriter(db, traces, settings.enable_metrics) if settings.enable_tracing else None

    def _contacts_failed() -> None:
        if settings.enable_metrics:
            metrics.UPSTREAM_ERRORS.labels(upstream="database", reason="write_failed").inc()
    periodic: list = []
    rt = Runtime(
        settings=settings, db=db, instances=InstanceRepo(db), traces=traces, writer=writer,
        pipeline=None,  # type: ignore[arg-type]
        guard=Guard(settings.api_key, settings.auth_failures_per_minute, settings.enable_metrics, db),
        loki=loki, recent_ids=RecentIds(), contacts=LidDirectory(db, on_error=_contacts_failed),
        webhook_rate_instance=WindowCounter(settings.webhook_rate_per_instance or 1, 1.0),
        webhook_rate_address=WindowCounter(settings.webhook_rate_per_address or 1, 1.0))
    periodic.append((60.0, rt.guard.prune))
    if settings.enable_tracing:
        periodic += [(settings.sweep_interval_s, rt.sweep), (settings.purge_interval_s, rt.purge)]
    if settings.enable_metrics:
        metrics.seed_static(__version__, settings.cost_alert_usd_per_day)
        metrics.seed_canary(settings.canary_interval_s if settings.canary_instance else None)
        metrics.sample_worker_resources()
        periodic.append((5.0, metrics.sample_worker_resources))
    if settings.canary_instance:
        canary = Canary(settings, db, rt.instances, traces, owner_id())
        periodic.append((canary.poll_interval_s, canary.run_once))
    rt.pipeline = Pipeline(settings, writer, periodic)
    app.extensions["omni"] = rt

    errors.register(app)
    from app.health import bp as health_bp
    from app.instances.api import bp as instances_bp
    from app.traces.api import bp as traces_bp
    from app.webhooks import bp as webhooks_bp

    for bp in (health_bp, webhooks_bp, instances_bp, traces_bp):
        app.register_blueprint(bp)
    if settings.enable_metrics:
        _install_http_metrics(app)

    if writer is not None:
        writer.start()
    rt.pipeline.start()
    atexit.register(rt.shutdown)
    log.info("worker started", extra={"event": "worker_started", "settings": settings.public()})
    return app


def _install_http_metrics(app: Flask) -> None:
    @app.before_request
    def _start_timer() -> None:
        g.t0 = time.perf_counter()

    @app.after_request
    def _observe(response):
        t0 = g.get("t0")
        if t0 is not None:
            route = request.url_rule.rule if request.url_rule is not None else "unmatched"
            method = request.method if request.method in _METHODS else "other"
            metrics.child(metrics.HTTP_DURATION, method, route,
                          str(response.status_code)).observe(time.perf_counter() - t0)
        return response


__all__ = ["create_app", "Settings"]
