"""What real Evolution traffic adds per message: the new trace fields, the reply row, receipts.

PostgreSQL CPU is measured on the server's processes while the trace store's own statements
run in the writer's batch sizes; worker CPU is the webhook-side parse of a receipt and its
hand-over to the writer, timed in this process.
"""
from __future__ import annotations

import datetime as dt
import time
import uuid

from app import evolution
from app.db import Database
from app.traces.store import FinishedTrace, NewTrace, ReceiptRow, TraceStore, rows_json
from bench import stack

BATCH = 50  # about 0.1 s of final states at a few hundred messages a second (the writer's linger)


def _new(i: int, full: bool) -> NewTrace:
    now = dt.datetime.now(dt.timezone.utc)
    return NewTrace(trace_id=uuid.uuid4(), instance_id=1, instance_name="bench", message_id=f"m{i}-{full}",
                    user_id="whatsapp:+5511900000001", message_content="What can you do? I need help",
                    created_at=now, steps=[{"step": "webhook_received", "status": "success",
                                            "duration_ms": 1, "timestamp": now.isoformat()}],
                    owner="bench:1", message_type="conversation" if full else None,
                    remote_jid="103899771998284@lid" if full else None,
                    platform_timestamp=now if full else None)


def _final(row: NewTrace, reply: str | None) -> FinishedTrace:
    return FinishedTrace(trace_id=row.trace_id, status="completed", duration_ms=4200,
                         response_content="Echo: What can you do? I need help", steps=row.steps,
                         failed_step=None, error_message=None, instance_id=1, reply_message_id=reply,
                         sent_at=dt.datetime.now(dt.timezone.utc) if reply else None)


def _batches(items: list, size: int = BATCH):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def receipt_cost(pg: stack.Pg, messages: int) -> dict:
    """CPU per message of each new write, PostgreSQL (µs) and worker (µs)."""
    url = pg.new_db()
    db = Database(url, size=2)
    store = TraceStore(db)
    meter = stack.CpuMeter({"postgres": pg.processes})
    out: dict = {"messages": messages, "batch": BATCH}

    def phase(name: str, work, count: int) -> None:
        meter.start()
        with db.cursor(dict_rows=False, autocommit=True) as cur:
            work(cur)
        out[f"pg_us_{name}"] = round(meter.stop()["postgres"] / count * 1e6, 1)

    try:
        plain = [_new(i, False) for i in range(messages)]
        full = [_new(i, True) for i in range(messages)]
        phase("per_insert_without_new_fields", lambda cur: [store.write_batch(cur, b, []) for b in _batches(plain)],
              messages)
        phase("per_insert_with_new_fields", lambda cur: [store.write_batch(cur, b, []) for b in _batches(full)],
              messages)
        phase("per_final_without_reply", lambda cur: [store.write_batch(cur, [], [_final(r, None) for r in b])
                                                       for b in _batches(plain)], messages)
        replies = ["3EB0" + uuid.uuid4().hex[:16].upper() for _ in full]
        phase("per_final_with_reply", lambda cur: [store.write_batch(cur, [], [_final(r, k) for r, k in b])
                                                    for b in _batches(list(zip(full, replies)))], messages)
        now = dt.datetime.now(dt.timezone.utc)
        receipts = [ReceiptRow(1, "bench", k, "delivered", now) for k in replies] + \
                   [ReceiptRow(1, "bench", k, "read", now + dt.timedelta(seconds=2)) for k in replies]
        phase("per_receipt", lambda cur: [store.write_receipts(cur, b) for b in _batches(receipts)], len(receipts))
        with db.cursor() as cur:
            cur.execute("SELECT count(*) AS n FROM message_reply WHERE read_at IS NOT NULL AND trace_id IS NOT NULL")
            out["replies_read"] = cur.fetchone()["n"]
    finally:
        db.close()

    body = {"event": "messages.update", "instance": "bench",
            "data": {"keyId": replies[0], "remoteJid": "5511900000001@s.whatsapp.net", "fromMe": True,
                     "participant": None, "status": "DELIVERY_ACK", "instanceId": "bae4", "messageId": "cm1"}}
    n = 20_000
    t0 = time.process_time()
    for _ in range(n):
        got = evolution.read_webhook(body)
        row = ReceiptRow(1, "bench", got.message_id, got.status, dt.datetime.now(dt.timezone.utc))
    rows_json([[row.instance_id, row.reply_message_id, row.status, row.at.isoformat()]] * BATCH)
    out["worker_us_per_receipt_parse"] = round((time.process_time() - t0) / n * 1e6, 2)
    return out
