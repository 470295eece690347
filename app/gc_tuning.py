"""Garbage-collector settings for a gunicorn worker, applied once its app is loaded."""
from __future__ import annotations

import gc

# CPython collects the youngest generation every 700 container allocations, and each pass
# walks every young object still alive: at saturation that is the state of the ~250
# messages in flight, so a worker spent ~300 us of every message in the collector
# (bench/, gc callbacks; perf put gc_collect_main at 5-20% of worker CPU). Every 10,000
# allocations the same passes cost ~40 us a message. Garbage that needs the collector
# (cycles: tracebacks, futures) waits a little longer; worker memory stays flat (bench/).
GEN0_THRESHOLD = 10_000
# Older generations keep CPython's ratios (each collected after 10 collections of the one
# below): in-flight state that dies after its agent call is freed as soon as before.
GEN1_THRESHOLD = 10
GEN2_THRESHOLD = 10


def tune_worker_gc() -> None:
    """Freeze what loading the app created and collect young objects less often."""
    gc.collect()
    # Modules, routes, settings and pools live as long as the worker: frozen, no collection
    # walks them again (the full passes shrink from ~70,000 objects to what requests make).
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
