-- Every list query is "newest first" with keyset pagination on (created_at, trace_id),
-- so each filter gets an index that ends in those two columns and the planner can stop
-- after `limit` rows instead of sorting the table.
CREATE INDEX IF NOT EXISTS message_trace_created ON message_trace (created_at DESC, trace_id DESC);
CREATE INDEX IF NOT EXISTS message_trace_instance_created ON message_trace (instance_name, created_at DESC, trace_id DESC);
CREATE INDEX IF NOT EXISTS message_trace_status_created ON message_trace (status, created_at DESC, trace_id DESC);
CREATE INDEX IF NOT EXISTS message_trace_user_created ON message_trace (user_id, created_at DESC, trace_id DESC);
-- Failures are rare: a partial index keeps "where did it fail" queries cheap.
CREATE INDEX IF NOT EXISTS message_trace_failed_step_created ON message_trace (failed_step, created_at DESC, trace_id DESC)
    WHERE failed_step IS NOT NULL;
-- Slow messages are rare too; the dashboards and the min_duration filter use it.
CREATE INDEX IF NOT EXISTS message_trace_slow_created ON message_trace (created_at DESC, trace_id DESC)
    WHERE duration_ms > 5000;
-- The recovery sweep looks only at unfinished rows.
CREATE INDEX IF NOT EXISTS message_trace_processing ON message_trace (created_at)
    WHERE status = 'processing';
