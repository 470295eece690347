-- The canary (app/canary.py): its synthetic messages are marked on their trace and left out
-- of the analytics rollups, and a one-row lease lets one worker of one replica run it per
-- interval.
--
-- Safe while the service runs: ADD COLUMN with a constant default is a catalog change
-- (PostgreSQL 11 and later: no table rewrite, existing rows read false, so the rollups stay
-- exact without a rebuild), the new table is tiny and the trigger function is replaced in
-- place. lock_timeout bounds the wait for the brief exclusive lock on message_trace behind a
-- long transaction; on a timeout the migration fails and is retried.
SET LOCAL lock_timeout = '5s';

ALTER TABLE message_trace ADD COLUMN IF NOT EXISTS synthetic boolean NOT NULL DEFAULT false;

-- When the next canary run is due and what the last one found. A worker claims a run with
-- one upsert guarded by `next_run_at <= now()`: the row lock serialises concurrent claims and
-- each loser re-checks the guard against the winner's commit, so exactly one worker claims
-- each run. Nothing is held between statements: a worker that dies mid-run blocks nobody,
-- the next run is simply due one interval later.
CREATE TABLE IF NOT EXISTS canary_lease (
    id            boolean     PRIMARY KEY DEFAULT true CHECK (id),   -- one row only
    next_run_at   timestamptz NOT NULL,
    runs          bigint      NOT NULL DEFAULT 0,   -- runs claimed so far: the last run's number
    holder        text,                             -- host:pid of the worker that claimed it
    claimed_at    timestamptz,
    last_result   text,                             -- ok | slow | failed
    last_trace_id uuid,
    finished_at   timestamptz
);
INSERT INTO canary_lease (id, next_run_at) VALUES (true, '-infinity') ON CONFLICT DO NOTHING;

-- Synthetic rows never enter the rollups. The rollup triggers of 006 are statement-level
-- triggers with transition tables, and a statement trigger's WHEN cannot see row values
-- (only row triggers can say WHEN (NOT NEW.synthetic)), so the filter goes where the rows are
-- read: every "is final" test of the trigger generator of 010 (its add-only source, the
-- dynamic path's `final`, the early-exit probes) becomes "is final and not synthetic".
-- The generator is rewritten from its own definition rather than restated, so this is the
-- whole change; the count guards against a generator that is not 010's.
DO $$
DECLARE
    final constant text := $f$status IN ('completed', 'failed', 'error')$f$;
    def constant text := pg_get_functiondef('trace_rollup_compile()'::regprocedure);
    found constant int := (length(def) - length(replace(def, final, ''))) / length(final);
BEGIN
    IF position('NOT synthetic' IN def) > 0 THEN
        RETURN;
    END IF;
    IF found <> 6 THEN
        RAISE EXCEPTION 'trace_rollup_compile() holds % final-status tests, 010 has 6: '
                        'restate it with NOT synthetic instead', found;
    END IF;
    EXECUTE replace(def, final, final || ' AND NOT synthetic');
END
$$;

-- The triggers of 006 keep calling the regenerated function; sessions recompile it on their
-- next call. One transaction with the column: no write sees the filter without the column.
SELECT trace_rollup_compile();

-- Grafana's read-only role may tell canary traces apart, as sql/003 grants the other columns.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'grafana_reader') THEN
        GRANT SELECT (synthetic) ON public.message_trace TO grafana_reader;
    END IF;
END
$$;
