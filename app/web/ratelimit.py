"""Fixed-window counters per key (client address, instance), kept in worker memory."""
from __future__ import annotations

import math
import threading
import time


class WindowCounter:
    """Counts events per key in the current window; bounded in memory."""

    def __init__(self, limit: int, window_s: float = 60.0, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._counts: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def _current(self, key: str, now: float) -> tuple[float, int]:
        start, count = self._counts.get(key, (now, 0))
        if now - start >= self.window_s:
            return now, 0
        return start, count

    def hit(self, key: str) -> int:
        """Count one event for key; return the count in the current window."""
        now = time.monotonic()
        with self._lock:
            start, count = self._current(key, now)
            if len(self._counts) >= self.max_keys and key not in self._counts:
                self._prune(now)
            self._counts[key] = (start, count + 1)
            return count + 1

    def exceeded(self, key: str) -> bool:
        """True when key already used up its allowance in this window."""
        with self._lock:
            return self._current(key, time.monotonic())[1] >= self.limit

    def retry_after(self, key: str) -> int:
        """Whole seconds until key's window ends."""
        with self._lock:
            start, _ = self._current(key, time.monotonic())
        return max(1, math.ceil(self.window_s - (time.monotonic() - start)))

    def _prune(self, now: float) -> None:
        self._counts = {k: v for k, v in self._counts.items() if now - v[0] < self.window_s}
        if len(self._counts) >= self.max_keys:
            self._counts.clear()
