"""Group commit of trace rows: one writer thread per worker, many rows per transaction.

A webhook hands its new row to the writer and waits for the commit that contains it, so an
accepted message is durable before its 202 (SPEC 4.3) while concurrent webhooks share one
fsync. Final states are handed over without waiting; they are written together once the
oldest has waited FINISH_LINGER_S, and retried until the database takes them, bounded in
memory.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from concurrent.futures import Future

from app.db import Database, DatabaseError, DatabaseUnavailable, RowRejected
from app.telemetry.recorder import Recorder
from app.traces.store import FinishedTrace, NewTrace, ReceiptRow, TraceStore

log = logging.getLogger("omni.traces")

MAX_BATCH = 500
# Final states waiting for an unreachable database; past this the oldest are dropped and
# the recovery sweep marks those messages `error` once the database is back.
MAX_PENDING_FINISH = 100_000
# Nobody waits for a final state, so it waits for company: the final states of the last
# 0.1 s go in one UPDATE, whose rollup triggers then upsert each (hour, bucket) once for many
# messages. Written one by one, or a few along with each batch of new rows, they cost a
# statement and a trigger run each (PostgreSQL CPU per message at a steady 300 msg/s:
# ~680 us riding along with the inserts, ~500 us in 50 ms batches, ~410 us in 0.5 s
# batches; bench/). 0.1 s is far below what a user polling the trace API notices.
FINISH_LINGER_S = 0.1
# A receipt can overtake the final state naming its reply (batched above, possibly in another
# worker): one that matches no reply is looked up once more this much later before it
# counts as a receipt for a message we did not send. Its row is kept either way, so the
# trace shows it whenever the reply's row arrives.
RECEIPT_RECHECK_S = 2.0


class TraceWriter:
    """Batches inserts (waited for) and final updates (fire and forget) in one thread."""

    def __init__(self, db: Database, store: TraceStore, recorder: Recorder) -> None:
        self.db = db
        self.store = store
        self.recorder = recorder
        self._receipts: collections.deque[ReceiptRow] = collections.deque()
        self._recheck: collections.deque[tuple[float, ReceiptRow]] = collections.deque()
        self._cond = threading.Condition()
        self._inserts: list[tuple[NewTrace, Future]] = []
        # New rows whose statement went out on a connection that then broke: committed or
        # not, nobody knows yet. Written again (the unique key tells) until one answer comes.
        self._in_doubt: list[tuple[NewTrace, Future]] = []
        self._finishes: collections.deque[FinishedTrace] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._retry_at = 0.0
        self._finish_since = 0.0  # when the oldest queued final state arrived
        self._flushing = False
        self._writing = 0  # rows taken from the queues whose transaction is not over yet
        self.batches = 0

    def start(self) -> None:
        """Start the writer thread."""
        self._thread = threading.Thread(target=self._run, name="omni-trace-writer", daemon=True)
        self._thread.start()

    def insert(self, row: NewTrace) -> Future:
        """Queue a new row; the future gives (trace_id, inserted) once committed."""
        fut: Future = Future()
        with self._cond:
            if self._stopping:
                fut.set_exception(DatabaseUnavailable("service is shutting down"))
                return fut
            self._inserts.append((row, fut))
            self._cond.notify()
        return fut

    def finish(self, row: FinishedTrace) -> None:
        """Queue a final state; written as soon as the database allows."""
        with self._cond:
            if len(self._finishes) >= MAX_PENDING_FINISH:
                self._finishes.popleft()
                self.recorder.upstream_failed("database", "write_failed")
            if not self._finishes:
                self._finish_since = time.monotonic()
                self._cond.notify()  # the writer's wait must now end by the linger deadline
            self._finishes.append(row)
            if len(self._finishes) == MAX_BATCH:
                self._cond.notify()

    def receipt(self, row: ReceiptRow) -> None:
        """Queue a delivery or read receipt; written with the next final states."""
        with self._cond:
            if len(self._receipts) >= MAX_PENDING_FINISH:
                self._receipts.popleft()
                self.recorder.upstream_failed("database", "write_failed")
            if not self._finishes and not self._receipts:
                self._finish_since = time.monotonic()
                self._cond.notify()
            self._receipts.append(row)

    @property
    def pending(self) -> int:
        """Rows not yet committed (queued or in the transaction being written)."""
        with self._cond:
            return (len(self._inserts) + len(self._in_doubt) + len(self._finishes) + len(self._receipts)
                    + self._writing)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued is written; False if that took too long."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.pending == 0:
                    return True
                with self._cond:
                    self._flushing = True  # no lingering: final states are due now
                    self._cond.notify()
                time.sleep(0.01)
            return self.pending == 0
        finally:
            with self._cond:
                self._flushing = False

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is left (within timeout) and end the thread."""
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _finishes_due_at(self) -> float:
        """Monotonic time at which queued final states must be written (inf: none queued)."""
        recheck = self._recheck[0][0] if self._recheck else float("inf")
        if self._in_doubt:
            recheck = min(recheck, self._retry_at)
        if not self._finishes and not self._receipts:
            return recheck
        due = self._finish_since + (0.0 if len(self._finishes) >= MAX_BATCH or self._flushing
                                    else FINISH_LINGER_S)
        return min(max(due, self._retry_at), recheck)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._inserts:
                    wait = self._finishes_due_at() - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(None if wait == float("inf") else max(0.001, wait))
                if self._stopping and not self._inserts:
                    return
                now = time.monotonic()
                doubtful = []
                if self._in_doubt and now >= self._retry_at:
                    doubtful, self._in_doubt = self._in_doubt[:MAX_BATCH], self._in_doubt[MAX_BATCH:]
                room = MAX_BATCH - len(doubtful)
                inserts, self._inserts = doubtful + self._inserts[:room], self._inserts[room:]
                due = now >= self._finishes_due_at()
                finishes = [self._finishes.popleft() for _ in range(min(MAX_BATCH, len(self._finishes)))] \
                    if due else []
                receipts = [self._receipts.popleft() for _ in range(min(MAX_BATCH, len(self._receipts)))] \
                    if due and now >= self._retry_at else []
                recheck: list[ReceiptRow] = []
                while self._recheck and self._recheck[0][0] <= now and len(recheck) < MAX_BATCH:
                    recheck.append(self._recheck.popleft()[1])
                self._writing = len(inserts) + len(finishes) + len(receipts)
            try:
                self._write(inserts, finishes, len(doubtful))
                # After the final states: a receipt for a reply finished in this batch matches.
                if receipts or recheck:
                    self._write_receipts(receipts, recheck)
            finally:
                with self._cond:
                    self._writing = 0

    def _write(self, inserts: list[tuple[NewTrace, Future]], finishes: list[FinishedTrace],
               doubtful: int = 0) -> None:
        """Write one batch; the first `doubtful` inserts are rows already in doubt."""
        sent = False
        try:
            # One statement per batch on an autocommit cursor: no BEGIN/COMMIT round trips.
            with self.db.cursor(dict_rows=False, autocommit=True) as cur:
                sent = True
                result = self.store.write_batch(cur, [row for row, _ in inserts], finishes)
            self.batches += 1
            self._retry_at = 0.0
        except Exception as exc:  # noqa: BLE001 - whatever happens, this thread must survive
            outage = isinstance(exc, DatabaseUnavailable) or (
                isinstance(exc, DatabaseError) and not isinstance(exc, RowRejected))
            if not outage and len(inserts) + len(finishes) > 1:
                # One row the database (or the encoder) refuses must not fail its
                # neighbours: write each row alone so that only its own message suffers.
                log.warning("trace batch refused, writing its rows one by one",
                            extra={"event": "trace_batch_split", "error": str(exc)})
                for i, item in enumerate(inserts):
                    self._write([item], [], 1 if i < doubtful else 0)
                for row in finishes:
                    self._write([], [row])
                return
            reason = "unavailable" if isinstance(exc, DatabaseUnavailable) else "write_failed"
            self.recorder.upstream_failed("database", reason)
            # A connection lost once the statement was out (a crash between the commit and its
            # answer) may have committed the new rows. Refusing them would answer 503 for a
            # row that exists: its redelivery would be told `duplicate` and nobody would
            # process it. They are written again instead; their webhooks wait as for a slow
            # commit, and a row that lands after its webhook gave up is processed then.
            keep = len(inserts) if sent and isinstance(exc, DatabaseUnavailable) else doubtful
            if keep:
                with self._cond:
                    self._in_doubt[:0] = inserts[:keep]
                if keep > doubtful:
                    log.warning("trace insert outcome unknown, writing again",
                                extra={"event": "trace_insert_in_doubt", "rows": keep - doubtful})
            for _, fut in inserts[keep:]:
                fut.set_exception(exc if isinstance(exc, DatabaseUnavailable) else DatabaseUnavailable(str(exc)))
            if not outage:
                # Retrying the same row would fail forever: it is dropped (a new row's webhook
                # got 503; a final state's message is marked `error` by the sweep later).
                log.error("trace row dropped", exc_info=not isinstance(exc, DatabaseError),
                          extra={"event": "trace_write_failed", "error": str(exc)})
                return
            log.error("trace write failed", extra={"event": "trace_write_failed", "error": str(exc)})
            with self._cond:
                self._finishes.extendleft(reversed(finishes))
            # Back off so an outage costs one failed attempt a second, not a busy loop.
            self._retry_at = time.monotonic() + 1.0
            return
        for new, fut in inserts:
            trace_id, _ = result.get((new.instance_id, new.message_id), (new.trace_id, True))
            # Duplicates inside one batch share a key: only the row whose id won was inserted.
            fut.set_result((trace_id, trace_id == new.trace_id))


    def _write_receipts(self, receipts: list[ReceiptRow], recheck: list[ReceiptRow]) -> None:
        try:
            with self.db.cursor(dict_rows=False, autocommit=True) as cur:
                rows = self.store.write_receipts(cur, receipts) if receipts else []
                if recheck:
                    rows += self.store.replies(cur, sorted({(r.instance_id, r.reply_message_id)
                                                             for r in recheck}))
        except Exception as exc:  # noqa: BLE001 - this thread must survive
            reason = "unavailable" if isinstance(exc, DatabaseUnavailable) else "write_failed"
            self.recorder.upstream_failed("database", reason)
            log.error("receipt write failed", extra={"event": "receipt_write_failed", "error": str(exc)})
            if isinstance(exc, DatabaseUnavailable) or (
                    isinstance(exc, DatabaseError) and not isinstance(exc, RowRejected)):
                with self._cond:
                    self._receipts.extendleft(reversed(receipts))
                    self._recheck.extendleft((0.0, r) for r in reversed(recheck))
                self._retry_at = time.monotonic() + 1.0
            return
        by_key = {(row[0], row[1]): row for row in rows}
        later = time.monotonic() + RECEIPT_RECHECK_S
        second_look = {id(r) for r in recheck}
        for receipt in receipts + recheck:
            row = by_key.get((receipt.instance_id, receipt.reply_message_id))
            if row is not None and row[2] is not None:
                self._observe(receipt, row)
            elif id(receipt) in second_look:
                self.recorder.webhook_ignored("receipt_unknown")
            else:
                with self._cond:
                    self._recheck.append((later, receipt))

    def _observe(self, receipt: ReceiptRow, row: tuple) -> None:
        """Receipt latency, once per reply and kind: only the receipt that set the time counts."""
        sent_at, delivered_at, read_at = row[3], row[4], row[5]
        first = delivered_at if receipt.status == "delivered" else read_at
        if sent_at is not None and first == receipt.at:
            self.recorder.reply_receipt(receipt.instance_name, receipt.status,
                                        (receipt.at - sent_at).total_seconds())


def new_trace_id() -> uuid.UUID:
    """A random trace id."""
    return uuid.uuid4()
