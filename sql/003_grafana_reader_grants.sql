-- Read-only access for Grafana's "traces" data source (role grafana_reader).
--
-- The role itself is created by postgres/init/01-grafana-reader.sh (Docker) with its
-- password; this file only grants, so it is safe everywhere:
--   * as a migration: a no-op where the role does not exist (e.g. `make run`), and the
--     grant when the role was created before the tables (Docker: init runs first);
--   * from the init script: a no-op until the table exists.
-- Idempotent: GRANT of an existing privilege changes nothing.
--
-- Only the columns the dashboards read: never message_content / response_content
-- (personal data), message_id or owner; nothing on the `instance` table (it holds the
-- agent and Evolution API keys and webhook secrets).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'grafana_reader')
       AND to_regclass('public.message_trace') IS NOT NULL THEN
        GRANT USAGE ON SCHEMA public TO grafana_reader;
        GRANT SELECT (trace_id, instance_id, instance_name, user_id, status, duration_ms,
                      created_at, updated_at, steps, failed_step, error_message)
            ON public.message_trace TO grafana_reader;
    END IF;
END
$$;
