-- Duration filters that match few rows (e.g. max_duration=1000 when messages take ~4 s):
-- without this the planner walks the created_at index over the whole table, about 450 ms
-- on 1 M traces (bench/). The index lets it read the few matching rows and sort them; the
-- finer statistics let it see that the range is rare (the default 100-bucket histogram
-- estimated 2,877 rows for 42 real ones and kept the full walk).
CREATE INDEX IF NOT EXISTS message_trace_duration ON message_trace (duration_ms);
ALTER TABLE message_trace ALTER COLUMN duration_ms SET STATISTICS 1000;
