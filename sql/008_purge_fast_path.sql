-- Retention, faster (issue 5: one expired day in under 1 s; it measured 0.95-1.1 s).
--
-- trace_rollup_forget_before() (sql/006) folds the expired hours of the cutoff's day into its
-- daily histograms: it sums ~80 k hourly rows (a day of 1 M traces a month) by key. Under the
-- default 4 MB work_mem that sort spilled to an external merge on disk: ~150 ms of the
-- update; with room in memory ~100 ms (a hash aggregate is no faster). Scoped to the
-- function's own calls, so no other query gets the larger work_mem.
ALTER FUNCTION trace_rollup_forget_before(timestamptz) SET work_mem = '64MB';
