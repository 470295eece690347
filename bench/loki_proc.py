"""tests.loki_receiver.LokiReceiver as its own process (so its CPU is measured apart).

    python -m bench.loki_proc STATS_FILE

Prints the port on the first stdout line; every second writes cumulative counters to
STATS_FILE and forgets the stored entries so memory stays bounded during long runs.
"""
import json
import os
import signal
import sys
import time

from demo.loki_receiver import LokiReceiver


def main() -> int:
    stats_path = sys.argv[1]
    rx = LokiReceiver(unordered=True).start()  # two workers share each stream, like real Loki
    print(rx.port, flush=True)
    totals = {"entries": 0, "errors": 0, "pushes": 0, "requests": 0}
    stop = []
    last_error = None
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        time.sleep(1.0)
        with rx._lock:  # noqa: SLF001 - counters and reset under the receiver's lock
            totals["entries"] += len(rx.entries)
            totals["errors"] += len(rx.errors)
            totals["pushes"] += len(rx.pushes)
            totals["requests"] += rx.requests
            last_error = rx.errors[-1] if rx.errors else last_error
            rx.entries.clear()
            rx.errors.clear()
            rx.pushes.clear()
            rx.requests = 0
            rx._seen.clear()  # noqa: SLF001
        tmp = stats_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({**totals, "last_error": last_error}, fh)
        os.replace(tmp, stats_path)
    rx.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
