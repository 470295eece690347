"""The group-commit trace writer against a real PostgreSQL."""
from __future__ import annotations

import datetime as dt
import threading
import time
import uuid

import pytest

from app.db import Database, DatabaseUnavailable, RowRejected
from app.traces.store import FinishedTrace, NewTrace, TraceStore
from app.traces.writer import TraceWriter
from app.telemetry.recorder import Recorder


def _row(message_id: str | None = None) -> NewTrace:
    return NewTrace(trace_id=uuid.uuid4(), instance_id=1, instance_name="w",
                    message_id=message_id or uuid.uuid4().hex, user_id="whatsapp:+1555",
                    message_content="hi", created_at=dt.datetime.now(dt.timezone.utc), steps=[],
                    owner="test:1")


@pytest.fixture()
def writer(fresh_db):
    db = Database(fresh_db, size=2)
    w = TraceWriter(db, TraceStore(db), Recorder())
    w.start()
    yield w
    w.stop()
    db.close()


def test_concurrent_inserts_share_commits(writer):
    results, barrier = [], threading.Barrier(40)

    def insert():
        barrier.wait()
        results.append(writer.insert(_row()).result(timeout=10))

    threads = [threading.Thread(target=insert) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 40 and all(inserted for _, inserted in results)
    assert writer.batches < 40, "every row had its own transaction"


def test_duplicates_in_one_batch_map_to_the_first(writer):
    futures = [writer.insert(_row("same-id")) for _ in range(5)]
    answers = [f.result(timeout=10) for f in futures]
    assert sum(1 for _, inserted in answers if inserted) == 1
    assert len({trace_id for trace_id, _ in answers}) == 1


def test_an_unexpected_error_fails_the_batch_not_the_thread(writer, monkeypatch):
    calls = {"n": 0}
    original = writer.store.write_batch

    def broken_once(cur, rows, finished):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("unexpected")
        return original(cur, rows, finished)

    monkeypatch.setattr(writer.store, "write_batch", broken_once)
    with pytest.raises(DatabaseUnavailable):
        writer.insert(_row()).result(timeout=10)
    assert writer.insert(_row()).result(timeout=10)[1] is True


def test_a_commit_whose_answer_was_lost_is_written_again_not_refused(writer, monkeypatch):
    """PostgreSQL crashing between a commit and its answer: the row exists, the writer saw
    only a broken connection. The row is written again (the unique key finds it ours), so
    its webhook is not told 503 for a row that a redelivery would then call `duplicate`."""
    calls = {"n": 0}
    original = writer.store.write_batch

    def commit_then_lose_the_connection(cur, rows, finished):
        calls["n"] += 1
        result = original(cur, rows, finished)  # autocommit: committed here
        if calls["n"] == 1:
            raise DatabaseUnavailable("server closed the connection unexpectedly")
        return result

    monkeypatch.setattr(writer.store, "write_batch", commit_then_lose_the_connection)
    row = _row()
    trace_id, inserted = writer.insert(row).result(timeout=10)
    assert (trace_id, inserted) == (row.trace_id, True) and calls["n"] == 2
    assert writer.db.fetchone("SELECT count(*) AS n FROM message_trace WHERE message_id = %(m)s",
                              {"m": row.message_id})["n"] == 1


def test_a_row_in_doubt_that_a_redelivery_wrote_first_is_a_duplicate(writer, monkeypatch):
    """The lost statement did not commit and the redelivery's row landed first: the row in
    doubt resolves as not inserted, so only the redelivery's worker processes the message."""
    calls = {"n": 0}
    original = writer.store.write_batch

    def lose_the_connection_once(cur, rows, finished):
        calls["n"] += 1
        if calls["n"] == 1:
            raise DatabaseUnavailable("server closed the connection unexpectedly")
        return original(cur, rows, finished)

    monkeypatch.setattr(writer.store, "write_batch", lose_the_connection_once)
    first = _row("redelivered")
    pending = writer.insert(first)
    time.sleep(0.2)  # the first attempt failed; its retry waits for the back-off
    again = _row("redelivered")
    assert writer.insert(again).result(timeout=10) == (again.trace_id, True)
    assert pending.result(timeout=10) == (again.trace_id, False)


def test_a_database_that_refuses_connections_still_fails_inserts_at_once(fresh_db):
    """Nothing was sent, so nothing is in doubt: the webhook can answer 503 right away."""
    db = Database("postgresql://nobody@127.0.0.1:1/none", size=1)
    w = TraceWriter(db, TraceStore(db), Recorder())
    w.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(DatabaseUnavailable):
            w.insert(_row()).result(timeout=10)
        assert time.monotonic() - t0 < 5
    finally:
        w.stop(timeout=1)

def _finished(trace_id: uuid.UUID) -> FinishedTrace:
    return FinishedTrace(trace_id=trace_id, status="completed", duration_ms=5, response_content="ok",
                         steps=[], failed_step=None, error_message=None)


def _status(db: Database, trace_id: uuid.UUID) -> str:
    return db.fetchone("SELECT status FROM message_trace WHERE trace_id = %(id)s", {"id": trace_id})["status"]


def test_final_states_are_written_together_after_the_linger(writer, monkeypatch):
    monkeypatch.setattr("app.traces.writer.FINISH_LINGER_S", 1.0)  # room for a slow machine
    first, _ = writer.insert(_row()).result(timeout=10)
    second, _ = writer.insert(_row()).result(timeout=10)
    batches = writer.batches
    writer.finish(_finished(first))
    writer.finish(_finished(second))
    # New rows do not wait for them, nor carry them before their time...
    third, _ = writer.insert(_row()).result(timeout=10)
    assert writer.batches == batches + 1 and writer.pending == 2
    assert _status(writer.db, first) == "processing"
    # ...and once the linger is over both go in one more batch.
    deadline = time.monotonic() + 5
    while writer.pending and time.monotonic() < deadline:
        time.sleep(0.005)
    assert writer.pending == 0 and writer.batches == batches + 2
    assert _status(writer.db, first) == _status(writer.db, second) == "completed"
    assert _status(writer.db, third) == "processing"


def test_flush_does_not_wait_for_the_linger(writer, monkeypatch):
    monkeypatch.setattr("app.traces.writer.FINISH_LINGER_S", 30.0)
    trace_id, _ = writer.insert(_row()).result(timeout=10)
    writer.finish(_finished(trace_id))
    t0 = time.monotonic()
    assert writer.flush(timeout=5)
    assert time.monotonic() - t0 < 5
    assert _status(writer.db, trace_id) == "completed"


def test_new_rows_and_final_states_go_in_one_statement(fresh_db):
    """One round trip per batch: the INSERT and the final UPDATE share one statement, so
    no BEGIN or COMMIT of their own, and both land or neither does."""
    db = Database(fresh_db, size=1)
    store = TraceStore(db)
    first = _row()
    with db.cursor(dict_rows=False, autocommit=True) as cur:
        store.write_batch(cur, [first], [])
        statements = []

        class Spy:
            def __getattr__(self, name):
                return getattr(cur, name)

            def execute(self, sql, *args):
                statements.append(sql)
                return cur.execute(sql, *args)

        second = _row()
        result = store.write_batch(Spy(), [second, _row(first.message_id)], [_finished(first.trace_id)])
    assert len(statements) == 2  # the batch, then the lookup of the duplicate's original id
    assert statements[0].startswith("WITH ")  # one statement: the final states and the new rows
    assert "UPDATE message_trace" in statements[0] and "INSERT INTO message_trace" in statements[0]
    assert result[(1, second.message_id)] == (second.trace_id, True)
    assert result[(1, first.message_id)] == (first.trace_id, False)
    assert _status(db, first.trace_id) == "completed" and _status(db, second.trace_id) == "processing"
    # A failing statement leaves nothing behind: the final state of `second` is not written
    # when the new row in the same statement is invalid.
    bad = _row()
    bad.instance_name = None  # NOT NULL violation
    with pytest.raises(RowRejected):  # the NOT NULL violation, as the db layer names it
        with db.cursor(dict_rows=False, autocommit=True) as cur:
            store.write_batch(cur, [bad], [_finished(second.trace_id)])
    assert _status(db, second.trace_id) == "processing"
    db.close()


def test_a_refused_row_fails_alone(writer):
    """A row the database refuses (here an int overflow and a NOT NULL violation) fails only
    its own message: the batch is written again row by row, the neighbours' new rows and
    final states land, and nothing is retried forever."""
    from app.telemetry import metrics

    def failures() -> float:
        return metrics.UPSTREAM_ERRORS.labels(upstream="database", reason="write_failed")._value.get()

    done = [writer.insert(_row()).result(timeout=10)[0] for _ in range(3)]
    before = failures()
    writer._cond.acquire()  # noqa: SLF001 - hold the writer so all of these go in one batch
    try:
        bad_final = _finished(done[0])
        bad_final.duration_ms = 2 ** 40  # integer out of range
        writer.finish(bad_final)
        writer.finish(_finished(done[1]))
        writer.finish(_finished(done[2]))
        bad_new = _row()
        bad_new.instance_name = None  # NOT NULL violation
        futures = [writer.insert(_row()), writer.insert(bad_new), writer.insert(_row())]
    finally:
        writer._cond.release()  # noqa: SLF001
    assert writer.flush(10)
    assert futures[0].result(timeout=10)[1] is True and futures[2].result(timeout=10)[1] is True
    with pytest.raises(DatabaseUnavailable):
        futures[1].result(timeout=10)
    db = writer.db
    assert [_status(db, t) for t in done] == ["processing", "completed", "completed"]
    assert failures() - before == 2  # the two refused rows, once each
    assert writer.pending == 0


def _receipt(reply_id: str, status: str, at: dt.datetime | None = None):
    from app.traces.store import ReceiptRow

    return ReceiptRow(instance_id=1, instance_name="w", reply_message_id=reply_id, status=status,
                      at=at or dt.datetime.now(dt.timezone.utc))


def _reply(fresh_db, trace_id):
    from tests.support import rows

    return rows(fresh_db, """SELECT t.reply_message_id, r.trace_id, r.sent_at, r.delivered_at, r.read_at
                             FROM message_trace t LEFT JOIN message_reply r
                               ON r.instance_id = t.instance_id AND r.reply_message_id = t.reply_message_id
                             WHERE t.trace_id = %s""", (str(trace_id),))[0]


def _replied(row: NewTrace, reply_id: str) -> FinishedTrace:
    now = dt.datetime.now(dt.timezone.utc)
    return FinishedTrace(trace_id=row.trace_id, status="completed", duration_ms=5, response_content="ok",
                         steps=[], failed_step=None, error_message=None, instance_id=1,
                         reply_message_id=reply_id, sent_at=now)


def test_a_receipt_before_the_final_state_still_lands_on_its_trace(writer, fresh_db):
    """The receipt of a reply can overtake the batched final state that names the reply."""
    from app.telemetry import metrics

    row = _row()
    writer.insert(row).result(timeout=10)
    reply_id = "3EB0" + uuid.uuid4().hex[:16].upper()
    early = dt.datetime.now(dt.timezone.utc)
    delivered = metrics.REPLY_RECEIPT.labels(instance_name="w", status="delivered")
    unknown = metrics.WEBHOOK_IGNORED.labels(reason="receipt_unknown")
    count = lambda: sum(b.get() for b in delivered._buckets)  # noqa: E731
    before, unknown_before = count(), unknown._value.get()
    writer.receipt(_receipt(reply_id, "delivered", early))
    assert writer.flush(5)
    time.sleep(0.3)
    writer.finish(_replied(row, reply_id))
    writer.receipt(_receipt(reply_id, "read"))
    assert writer.flush(5)
    got = _reply(fresh_db, row.trace_id)
    assert got[0] == reply_id and got[1] == row.trace_id and got[3] == early and got[4] is not None
    # Looked up again after RECEIPT_RECHECK_S: it was ours after all, not an unknown receipt.
    time.sleep(2.5)
    assert unknown._value.get() == unknown_before
    assert count() == before + 1


def test_receipts_merge_earliest_wins_and_read_implies_delivered(writer, fresh_db):
    row = _row()
    writer.insert(row).result(timeout=10)
    reply_id = "3EB0" + uuid.uuid4().hex[:16].upper()
    writer.finish(_replied(row, reply_id))
    assert writer.flush(5)
    t0 = dt.datetime.now(dt.timezone.utc)
    writer.receipt(_receipt(reply_id, "read", t0 + dt.timedelta(seconds=2)))
    assert writer.flush(5)
    got = _reply(fresh_db, row.trace_id)
    assert got[3] == got[4] == t0 + dt.timedelta(seconds=2)  # READ alone: delivered then too
    writer.receipt(_receipt(reply_id, "delivered", t0))
    writer.receipt(_receipt(reply_id, "read", t0 + dt.timedelta(seconds=5)))
    assert writer.flush(5)
    got = _reply(fresh_db, row.trace_id)
    assert got[3] == t0 and got[4] == t0 + dt.timedelta(seconds=2)


def test_unknown_receipts_are_counted_once_after_a_second_look(writer):
    from app.telemetry import metrics

    unknown = metrics.WEBHOOK_IGNORED.labels(reason="receipt_unknown")
    before = unknown._value.get()
    for _ in range(3):
        writer.receipt(_receipt("3EB0" + uuid.uuid4().hex[:16].upper(), "delivered"))
    assert writer.flush(5)
    assert unknown._value.get() == before
    time.sleep(2.6)
    assert unknown._value.get() == before + 3
