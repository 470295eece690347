"""Duplicate detection when tracing is off (no trace rows to deduplicate against)."""
from __future__ import annotations

import collections
import threading
import uuid


class RecentIds:
    """The last N message ids of this worker mapped to their trace ids (best effort)."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._ids: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def claim(self, key: tuple, trace_id: uuid.UUID) -> tuple[uuid.UUID, bool]:
        """(trace id, True) for a new key; (original trace id, False) for a repeat."""
        with self._lock:
            if key in self._ids:
                return self._ids[key], False
            self._ids[key] = trace_id
            if len(self._ids) > self.size:
                self._ids.popitem(last=False)
            return trace_id, True
