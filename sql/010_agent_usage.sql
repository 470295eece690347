-- The agent's token usage and its cost on every trace, priced per instance, and summed in the
-- analytics rollups (sql/006) so usage over any period stays exact like the counts.
--
-- Every change here is metadata only (nullable columns, or constant defaults) and function
-- bodies: no table rewrite, no scan of message_trace, only brief locks.

ALTER TABLE message_trace
    ADD COLUMN IF NOT EXISTS input_tokens     integer,
    ADD COLUMN IF NOT EXISTS output_tokens    integer,
    -- numeric: sums over millions of messages must add up to the cent, and past rows keep
    -- the price in force when they ran (computed by the worker, never recomputed).
    ADD COLUMN IF NOT EXISTS cost_usd         numeric,
    -- The agent's own session id, to find the conversation in the agent's logs.
    ADD COLUMN IF NOT EXISTS agent_session_id text;

-- USD per million tokens; null: the cost of the instance's messages is unknown.
ALTER TABLE instance
    ADD COLUMN IF NOT EXISTS input_cost_per_mtok  double precision CHECK (input_cost_per_mtok >= 0),
    ADD COLUMN IF NOT EXISTS output_cost_per_mtok double precision CHECK (output_cost_per_mtok >= 0);

-- usage_n counts the messages that reported usage and cost_n those with a cost, so a sum
-- of 0 tells "no tokens" from "not known".
ALTER TABLE trace_rollup_hour
    ADD COLUMN IF NOT EXISTS input_tokens  bigint  NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS output_tokens bigint  NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS usage_n       bigint  NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS cost_usd      numeric NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS cost_n        bigint  NOT NULL DEFAULT 0;
ALTER TABLE trace_user_day
    ADD COLUMN IF NOT EXISTS input_tokens  bigint  NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS output_tokens bigint  NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS usage_n       bigint  NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS cost_usd      numeric NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS cost_n        bigint  NOT NULL DEFAULT 0;

-- 006's upserts with the usage sums; %1$s is now a query of signed rows
-- (sign, instance_name, user_id, status, duration_ms, created_at, steps,
--  input_tokens, output_tokens, cost_usd). The histograms are unchanged.
-- Purges stay exact without more: trace_rollup_forget_before() drops whole hours of
-- trace_rollup_hour and whole days of trace_user_day, and the purge-mode trigger subtracts
-- the cutoff day's rows from trace_user_day with the 4th statement below.
CREATE OR REPLACE FUNCTION trace_rollup_statements() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $fn$
WITH template(hist) AS (SELECT $q$WITH d AS (%1$s),
   e AS (SELECT sign, instance_name, created_at, 'total'::text AS kind, duration_ms::numeric AS ms
         FROM d WHERE duration_ms IS NOT NULL
         UNION ALL
         SELECT sign, instance_name, created_at, x->>'step', (x->>'duration_ms')::numeric
         FROM d, jsonb_array_elements(CASE jsonb_typeof(d.steps) WHEN 'array' THEN d.steps
                                           ELSE '[]'::jsonb END) AS x
         WHERE x->>'duration_ms' IS NOT NULL AND x->>'step' IS NOT NULL),
   b AS (SELECT sign, instance_name, date_trunc('%2$s', created_at, 'UTC') AS u, kind, ms,
                floor(ln(1 + greatest(ms, 0)::float8) / ln(1.01))::int AS bucket FROM e)
   INSERT INTO trace_hist_%2$s AS t (instance_name, %2$s, kind, bucket, n, ms_sum)
   SELECT coalesce(instance_name, '*'), u, kind, bucket, sum(sign), sum(sign * ms)
   FROM b GROUP BY GROUPING SETS ((instance_name, u, kind, bucket), (u, kind, bucket))
   ORDER BY 1, 2, 3, 4
   ON CONFLICT (instance_name, %2$s, kind, bucket) DO UPDATE
   SET n = t.n + excluded.n, ms_sum = t.ms_sum + excluded.ms_sum$q$)
SELECT ARRAY[
$q$INSERT INTO trace_rollup_hour AS t (instance_name, hour, status, messages, duration_n, duration_sum, slow_n,
                                   input_tokens, output_tokens, usage_n, cost_usd, cost_n)
   SELECT instance_name, date_trunc('hour', created_at, 'UTC') AS h, status, sum(sign),
          coalesce(sum(sign) FILTER (WHERE duration_ms IS NOT NULL), 0),
          coalesce(sum(sign * duration_ms::bigint), 0),
          coalesce(sum(sign) FILTER (WHERE duration_ms > 10000), 0),
          coalesce(sum(sign * input_tokens::bigint), 0), coalesce(sum(sign * output_tokens::bigint), 0),
          coalesce(sum(sign) FILTER (WHERE input_tokens IS NOT NULL OR output_tokens IS NOT NULL), 0),
          coalesce(sum(sign * cost_usd), 0), coalesce(sum(sign) FILTER (WHERE cost_usd IS NOT NULL), 0)
   FROM (%1$s) d GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
   ON CONFLICT (instance_name, hour, status) DO UPDATE
   SET messages = t.messages + excluded.messages, duration_n = t.duration_n + excluded.duration_n,
       duration_sum = t.duration_sum + excluded.duration_sum, slow_n = t.slow_n + excluded.slow_n,
       input_tokens = t.input_tokens + excluded.input_tokens,
       output_tokens = t.output_tokens + excluded.output_tokens, usage_n = t.usage_n + excluded.usage_n,
       cost_usd = t.cost_usd + excluded.cost_usd, cost_n = t.cost_n + excluded.cost_n$q$,
format(hist, '%1$s', 'hour'),
format(hist, '%1$s', 'day'),
$q$INSERT INTO trace_user_day AS t (instance_name, day, user_id, n,
                                input_tokens, output_tokens, usage_n, cost_usd, cost_n)
   SELECT coalesce(instance_name, '*'), dd, user_id, sum(sign),
          coalesce(sum(sign * input_tokens::bigint), 0), coalesce(sum(sign * output_tokens::bigint), 0),
          coalesce(sum(sign) FILTER (WHERE input_tokens IS NOT NULL OR output_tokens IS NOT NULL), 0),
          coalesce(sum(sign * cost_usd), 0), coalesce(sum(sign) FILTER (WHERE cost_usd IS NOT NULL), 0)
   FROM (SELECT sign, instance_name, user_id, date_trunc('day', created_at, 'UTC') AS dd,
                input_tokens, output_tokens, cost_usd FROM (%1$s) d) d
   GROUP BY GROUPING SETS ((instance_name, dd, user_id), (dd, user_id))
   ORDER BY 1, 2, 3
   ON CONFLICT (instance_name, day, user_id) DO UPDATE
   SET n = t.n + excluded.n, input_tokens = t.input_tokens + excluded.input_tokens,
       output_tokens = t.output_tokens + excluded.output_tokens, usage_n = t.usage_n + excluded.usage_n,
       cost_usd = t.cost_usd + excluded.cost_usd, cost_n = t.cost_n + excluded.cost_n$q$
] FROM template
$fn$;

-- 007's generator, with the usage columns in the rows the upserts read (its add-only
-- source and the dynamic path's `cols`); otherwise the same function.
CREATE OR REPLACE FUNCTION trace_rollup_compile() RETURNS void
LANGUAGE plpgsql AS $compile$
DECLARE
    -- The add-only source: 006's INSERT source, as static SQL.
    src constant text := $s$SELECT 1 AS sign, instance_name, user_id, status, duration_ms, created_at, steps, input_tokens, output_tokens, cost_usd
               FROM new_rows WHERE status IN ('completed', 'failed', 'error')$s$;
    adds text := '';
    stmt text;
BEGIN
    FOREACH stmt IN ARRAY trace_rollup_statements() LOOP
        adds := adds || format(stmt, src) || E';\n';
    END LOOP;
    -- replace(), not format(): the body's own format() strings hold % signs.
    EXECUTE replace($body$
CREATE OR REPLACE FUNCTION trace_rollup_trigger() RETURNS trigger
LANGUAGE plpgsql AS $fn$
-- Generated by trace_rollup_compile() (sql/007, sql/010) from trace_rollup_statements(); do not edit.
#variable_conflict use_column
DECLARE
    cols constant text := 'instance_name, user_id, status, duration_ms, created_at, steps, input_tokens, output_tokens, cost_usd';
    final constant text := $$status IN ('completed', 'failed', 'error')$$;
    purge_day constant timestamptz := CASE WHEN TG_OP = 'DELETE'
        THEN nullif(current_setting('omni.rollup_purge', true), '')::timestamptz END;
    add_only boolean := TG_OP = 'INSERT';
    src text;
    stmt text;
    stmts text[];
    cleanups text[];
BEGIN
    -- Separate statements: old_rows exists only for UPDATE and DELETE triggers.
    IF TG_OP = 'UPDATE' THEN
        add_only := NOT EXISTS (SELECT 1 FROM old_rows WHERE status IN ('completed', 'failed', 'error'));
    END IF;
    IF add_only THEN
        IF NOT EXISTS (SELECT 1 FROM new_rows WHERE status IN ('completed', 'failed', 'error')) THEN
            RETURN NULL;   -- e.g. new `processing` rows: nothing to count yet
        END IF;
        -- The hot path, planned once per session: trace_rollup_statements() on new_rows.
@ADD_NEW_ROWS@
        RETURN NULL;
    END IF;

    -- Something final is deleted or updated: 006's dynamic path.
    IF purge_day IS NOT NULL THEN
        -- Purge: only the per-user counts of the cutoff's own day; the rest is done once
        -- by trace_rollup_forget_before().
        IF NOT EXISTS (SELECT 1 FROM old_rows WHERE status IN ('completed', 'failed', 'error')
                                                AND created_at >= purge_day) THEN
            RETURN NULL;
        END IF;
        src := format('SELECT -1 AS sign, %s FROM old_rows WHERE %s AND created_at >= %L',
                      cols, final, purge_day);
    ELSIF TG_OP = 'DELETE' THEN
        IF NOT EXISTS (SELECT 1 FROM old_rows WHERE status IN ('completed', 'failed', 'error')) THEN
            RETURN NULL;
        END IF;
        src := format('SELECT -1 AS sign, %s FROM old_rows WHERE %s', cols, final);
    ELSE
        src := format('SELECT 1 AS sign, %1$s FROM new_rows WHERE %2$s
                       UNION ALL SELECT -1, %1$s FROM old_rows WHERE %2$s', cols, final);
    END IF;
    stmts := trace_rollup_statements();
    cleanups := trace_rollup_cleanup_statements();
    IF purge_day IS NOT NULL THEN
        -- Zero rows are removed once by trace_rollup_forget_before().
        stmts := stmts[4:4];
        cleanups := '{}';
    END IF;
    FOREACH stmt IN ARRAY stmts LOOP
        EXECUTE format(stmt, src);
    END LOOP;
    FOREACH stmt IN ARRAY cleanups LOOP
        EXECUTE format(stmt, src);
    END LOOP;
    RETURN NULL;
END
$fn$$body$, '@ADD_NEW_ROWS@', adds);
END
$compile$;

-- The triggers of 006 keep calling the regenerated function; sessions recompile it on their
-- next call.
SELECT trace_rollup_compile();

-- Grafana's read-only role reads tokens and cost (the cost panels), as sql/003 grants the
-- other columns: a no-op where the role does not exist.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'grafana_reader') THEN
        GRANT SELECT (input_tokens, output_tokens, cost_usd) ON public.message_trace TO grafana_reader;
    END IF;
END
$$;
