"""Finalise messages whose worker died: called from gunicorn's master (app/gunicorn.conf.py)."""
from __future__ import annotations

import logging
import socket

import psutil

from app.db import Database, DatabaseError, DatabaseUnavailable
from app.traces.store import TraceStore

log = logging.getLogger("omni.recovery")


def _store(database_url: str) -> TraceStore:
    return TraceStore(Database(database_url, size=1))


def worker_died(database_url: str, pid: int) -> int:
    """Mark the unfinished messages of one exited worker as error."""
    owner = f"{socket.gethostname()}:{pid}"
    try:
        n = _store(database_url).abandon_owned(
            owner, f"interrupted: worker {pid} exited before the message finished")
    except (DatabaseUnavailable, DatabaseError) as exc:
        log.error("could not finalise messages of a dead worker (the periodic sweep will)",
                  extra={"event": "recovery_failed", "error": str(exc), "pid": pid})
        return 0
    if n:
        log.warning("finalised messages of a dead worker", extra={"event": "traces_recovered",
                                                                   "count": n, "pid": pid})
    return n


def service_started(database_url: str) -> int:
    """At startup: mark unfinished messages of this host's dead processes as error."""
    store = _store(database_url)
    host = socket.gethostname()
    try:
        total = 0
        for owner in store.processing_owners(host):
            pid = owner.rsplit(":", 1)[-1]
            if pid.isdigit() and psutil.pid_exists(int(pid)):
                continue  # a live process (another service on this host) still owns it
            total += store.abandon_owned(owner,
                                         "interrupted: service restarted before the message finished")
    except (DatabaseUnavailable, DatabaseError) as exc:
        log.error("startup recovery failed (the periodic sweep will catch up)",
                  extra={"event": "recovery_failed", "error": str(exc)})
        return 0
    if total:
        log.warning("finalised messages interrupted by a restart",
                    extra={"event": "traces_recovered", "count": total})
    return total
