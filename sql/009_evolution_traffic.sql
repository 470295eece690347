-- What Evolution API 2.2-2.3 tells about a message, and what became of its reply.
--
-- Safe while the service runs: each ADD COLUMN is nullable without a default (a catalog
-- change, no table rewrite), and no index is built on message_trace, whose build would
-- hold writers for the length of a scan. lock_timeout bounds the wait for the brief
-- exclusive lock behind a long transaction; on a timeout the migration fails and is retried.
SET LOCAL lock_timeout = '5s';

ALTER TABLE message_trace
    ADD COLUMN IF NOT EXISTS message_type       text,         -- Evolution's messageType
    ADD COLUMN IF NOT EXISTS remote_jid         text,         -- data.key.remoteJid as received
    ADD COLUMN IF NOT EXISTS platform_timestamp timestamptz,  -- WhatsApp's messageTimestamp
    ADD COLUMN IF NOT EXISTS reply_message_id   text;         -- key.id of Evolution's sendText answer

-- One row per reply sent (written with the final state) and per receipt received. Receipts
-- land here by the reply's key id, not on message_trace: a receipt may arrive before the
-- batched final state that names the reply, and an UPDATE of message_trace would run the
-- analytics rollup triggers twice per reply for nothing. The trace API joins it by key.
CREATE TABLE IF NOT EXISTS message_reply (
    instance_id      integer     NOT NULL,
    reply_message_id text        NOT NULL,
    trace_id         uuid,                    -- null: a receipt for a message not (yet) known
    sent_at          timestamptz,
    delivered_at     timestamptz,
    read_at          timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, reply_message_id)
);
-- Retention deletes replies by age, like traces.
CREATE INDEX IF NOT EXISTS message_reply_created ON message_reply (created_at);

-- LID -> phone, learned from messages that carry both (app/contacts.py).
CREATE TABLE IF NOT EXISTS whatsapp_lid (
    lid        text        PRIMARY KEY,
    phone      text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Grafana reads message types and receipt times; never the JIDs or the LID directory
-- (personal data), like the columns left out in sql/003.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'grafana_reader') THEN
        GRANT SELECT (message_type, platform_timestamp) ON public.message_trace TO grafana_reader;
        GRANT SELECT (instance_id, trace_id, sent_at, delivered_at, read_at, created_at)
            ON public.message_reply TO grafana_reader;
    END IF;
END
$$;
