-- Retention, faster (issue 5: one expired day in under 1 s; it measured 0.95-1.1 s).
--
-- trace_rollup_forget_before() (sql/006) folds the expired hours of the cutoff's day into its
-- daily histograms: it sums ~80 k hourly rows (a day of 1 M traces a month) by key. Under the
-- default 4 MB work_mem that sort spilled to an external merge on disk: ~150 ms of the
-- update; with room in memory ~100 ms (a hash aggregate is no faster). Scoped to the
-- function's own calls, so no other query gets the larger work_mem.
ALTER FUNCTION trace_rollup_forget_before(timestamptz) SET work_mem = '64MB';

-- The cleanups after a subtraction (sql/006: drop rollup rows that reached zero, for the
-- (instance, hour|day) keys touched) joined those keys to the whole table: with current
-- statistics the planner preferred a sequential scan for `n = 0` (it estimates a transition
-- table filtered on status at ~1.5 % of its rows), so every delete or update of final rows
-- read all of trace_user_day and trace_hist_day: ~70 + ~40 ms at 1 M traces a month for a
-- 1,366-row partial hour, growing with the tables. Now each key is looked up through the
-- primary key's prefix, in a LATERAL subquery run once per key (OFFSET 0 keeps the planner
-- from flattening it back into that join): ~17 + ~6 ms. The rows are deleted by ctid, with
-- the zero test repeated on the row deleted, so a row a concurrent writer has just raised
-- from zero stays.
CREATE OR REPLACE FUNCTION trace_rollup_cleanup_statements() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $fn$
SELECT array_agg(format($q$DELETE FROM %1$s t WHERE %4$s AND t.ctid = ANY (ARRAY(
   SELECT z.ctid FROM (SELECT DISTINCT %2$s AS instance_name, date_trunc(%3$L, created_at, 'UTC') AS u
                       FROM (%%1$s) d%5$s WHERE sign < 0) k,
        LATERAL (SELECT r.ctid FROM %1$s r
                 WHERE r.instance_name = k.instance_name AND r.%6$s = k.u AND %7$s OFFSET 0) z))$q$,
   tbl, inst, unit, replace(zero, 'r.', 't.'), star, col, zero) ORDER BY ord)
FROM (VALUES
    (1, 'trace_rollup_hour', 'instance_name', 'hour', '', 'hour', 'r.messages = 0 AND r.duration_n = 0'),
    (2, 'trace_hist_hour', 'x.i', 'hour', ', LATERAL (VALUES (d.instance_name), (''*'')) AS x(i)', 'hour', 'r.n = 0'),
    (3, 'trace_hist_day', 'x.i', 'day', ', LATERAL (VALUES (d.instance_name), (''*'')) AS x(i)', 'day', 'r.n = 0'),
    (4, 'trace_user_day', 'x.i', 'day', ', LATERAL (VALUES (d.instance_name), (''*'')) AS x(i)', 'day', 'r.n = 0')
) AS c(ord, tbl, inst, unit, star, col, zero)
$fn$;
