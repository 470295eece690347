-- Retention without per-row rollup bookkeeping (issue 5: one expired day in under 1 s).
--
-- A purge deletes every trace of whole expired hours. Subtracting each deleted row from the
-- rollups (expanding its steps jsonb) cost ~90 us a row; instead, while the session sets
-- omni.rollup_purge = 'on', the delete trigger only maintains trace_user_day (which has no
-- hourly form to subtract from), and trace_rollup_forget_before() then drops the hourly
-- rollup rows of those hours and subtracts them from the daily histograms: exact, because
-- the hourly rows are exactly what was deleted.

CREATE OR REPLACE FUNCTION trace_rollup_trigger() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    cols constant text := 'instance_name, user_id, status, duration_ms, created_at, steps';
    final constant text := $$status IN ('completed', 'failed', 'error')$$;
    purge constant boolean := TG_OP = 'DELETE'
                              AND coalesce(current_setting('omni.rollup_purge', true), '') = 'on';
    src text;
    stmt text;
    stmts text[];
    cleanups text[];
    changed bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        src := format('SELECT 1 AS sign, %s FROM new_rows WHERE %s', cols, final);
        EXECUTE format('SELECT count(*) FROM new_rows WHERE %s', final) INTO changed;
    ELSIF TG_OP = 'DELETE' THEN
        src := format('SELECT -1 AS sign, %s FROM old_rows WHERE %s', cols, final);
        EXECUTE format('SELECT count(*) FROM old_rows WHERE %s', final) INTO changed;
    ELSE
        src := format('SELECT 1 AS sign, %1$s FROM new_rows WHERE %2$s
                       UNION ALL SELECT -1, %1$s FROM old_rows WHERE %2$s', cols, final);
        EXECUTE format('SELECT (SELECT count(*) FROM new_rows WHERE %1$s)
                             + (SELECT count(*) FROM old_rows WHERE %1$s)', final) INTO changed;
    END IF;
    IF changed = 0 THEN
        RETURN NULL;   -- e.g. new `processing` rows: nothing to count yet
    END IF;
    stmts := trace_rollup_statements();
    cleanups := trace_rollup_cleanup_statements();
    IF purge THEN
        -- Only the per-user table; trace_rollup_forget_before() handles the others.
        stmts := stmts[4:4];
        cleanups := cleanups[4:4];
    END IF;
    FOREACH stmt IN ARRAY stmts LOOP
        EXECUTE format(stmt, src);
    END LOOP;
    IF TG_OP <> 'INSERT' THEN
        FOREACH stmt IN ARRAY cleanups LOOP
            EXECUTE format(stmt, src);
        END LOOP;
    END IF;
    RETURN NULL;
END
$fn$;

-- After every trace before `cutoff` (an exact UTC hour) was deleted in purge mode.
CREATE OR REPLACE FUNCTION trace_rollup_forget_before(cutoff timestamptz) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    IF cutoff <> date_trunc('hour', cutoff, 'UTC') THEN
        RAISE EXCEPTION 'cutoff % is not a whole UTC hour', cutoff;
    END IF;
    UPDATE trace_hist_day t SET n = t.n - h.n, ms_sum = t.ms_sum - h.ms_sum
    FROM (SELECT instance_name, date_trunc('day', hour, 'UTC') AS day, kind, bucket,
                 sum(n) AS n, sum(ms_sum) AS ms_sum
          FROM trace_hist_hour WHERE hour < cutoff GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4) h
    WHERE t.instance_name = h.instance_name AND t.day = h.day AND t.kind = h.kind
      AND t.bucket = h.bucket;
    DELETE FROM trace_hist_day WHERE day < cutoff AND n = 0;
    DELETE FROM trace_hist_hour WHERE hour < cutoff;
    DELETE FROM trace_rollup_hour WHERE hour < cutoff;
END
$fn$;
