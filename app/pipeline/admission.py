"""The in-flight bound of a worker: a webhook claims a slot before it accepts a message."""
from __future__ import annotations

import threading
import time

from app.telemetry.recorder import Recorder


class Admission:
    """At most `limit` accepted messages in flight; closed when the worker shuts down."""

    def __init__(self, limit: int, recorder: Recorder) -> None:
        self.limit = limit
        self.recorder = recorder
        self.accepting = True
        self._in_flight = 0
        self._slot_freed = threading.Condition(threading.Lock())

    @property
    def in_flight(self) -> int:
        """Accepted messages not yet finished in this worker."""
        return self._in_flight

    def try_reserve(self, wait: float = 0.0) -> bool:
        """Claim a slot, waiting up to `wait` s for one when the worker is full; False when
        none came free or the worker is shutting down.

        The short wait is backpressure: a burst (or a sender that keeps N requests open) is
        slowed to the rate messages finish instead of being answered 503 over and over, which
        cost CPU the full worker needed for the messages it already had.
        """
        deadline = time.monotonic() + wait
        with self._slot_freed:
            while self.accepting and self._in_flight >= self.limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._slot_freed.wait(remaining)
            if not self.accepting:
                return False
            self._in_flight += 1
        self.recorder.in_flight(1)
        return True

    def release(self) -> None:
        """Give back a slot claimed by try_reserve."""
        with self._slot_freed:
            self._in_flight -= 1
            self._slot_freed.notify()
        self.recorder.in_flight(-1)

    def close(self) -> None:
        """Accept nothing more; webhooks waiting for a slot are answered 503 at once."""
        with self._slot_freed:
            self.accepting = False
            self._slot_freed.notify_all()

    def drain(self, timeout: float) -> int:
        """Wait up to timeout s for in-flight messages to finish; how many are left."""
        deadline = time.monotonic() + timeout
        while self._in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._in_flight
