#!/bin/sh
# Create `grafana_reader`, the read-only role of Grafana's "traces" data source.
#
# Run by the postgres image on the first start (empty data directory), as the superuser
# POSTGRES_USER on POSTGRES_DB. Also usable by hand or from tests against any server:
#   GRAFANA_DB_PASSWORD=... OMNI_INIT_DATABASE_URL=postgresql://user:pw@host:port/omni \
#     sh postgres/init/01-grafana-reader.sh
# (or GRAFANA_DB_PASSWORD_FILE=<path of a file holding it>).
# The column grants are sql/003_grafana_reader_grants.sql (one source of truth): run here
# too, so they apply whether the tables exist now or are created later by migrations.
set -eu

# In compose the password arrives as a secret file (GRAFANA_DB_PASSWORD_FILE), like the
# image's own POSTGRES_PASSWORD_FILE; psql below reads it from this script's environment.
if [ -n "${GRAFANA_DB_PASSWORD_FILE:-}" ]; then
    if [ -n "${GRAFANA_DB_PASSWORD:-}" ]; then
        echo "01-grafana-reader: GRAFANA_DB_PASSWORD and GRAFANA_DB_PASSWORD_FILE are both set" >&2
        exit 1
    fi
    GRAFANA_DB_PASSWORD=$(cat -- "$GRAFANA_DB_PASSWORD_FILE")
    export GRAFANA_DB_PASSWORD
fi

if [ -z "${GRAFANA_DB_PASSWORD:-}" ]; then
    echo "01-grafana-reader: GRAFANA_DB_PASSWORD is not set; refusing to create grafana_reader without a password" >&2
    exit 1
fi

here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
grants=""
for candidate in "${OMNI_SQL_DIR:-/omni-sql}/003_grafana_reader_grants.sql" \
                 "$here/../../sql/003_grafana_reader_grants.sql"; do
    if [ -r "$candidate" ]; then grants=$candidate; break; fi
done
if [ -z "$grants" ]; then
    echo "01-grafana-reader: sql/003_grafana_reader_grants.sql not found (mount it at /omni-sql)" >&2
    exit 1
fi

run_psql() {
    if [ -n "${OMNI_INIT_DATABASE_URL:-}" ]; then
        psql -X -v ON_ERROR_STOP=1 --dbname "$OMNI_INIT_DATABASE_URL" "$@"
    else
        psql -X -v ON_ERROR_STOP=1 ${POSTGRES_USER:+--username "$POSTGRES_USER"} \
            ${POSTGRES_DB:+--dbname "$POSTGRES_DB"} "$@"
    fi
}

# The password is read inside psql from the environment (\getenv, psql 15+): it never
# appears on a command line, and %L quotes it safely whatever it contains.
run_psql <<'SQL'
\getenv reader_password GRAFANA_DB_PASSWORD
SELECT format('CREATE ROLE grafana_reader LOGIN PASSWORD %L', :'reader_password')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'grafana_reader')
\gexec
SELECT format('ALTER ROLE grafana_reader WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD %L',
              :'reader_password')
\gexec
-- Belt and braces on top of the grants: every transaction of this role is read-only,
-- and a runaway dashboard query is cancelled after 30 s.
ALTER ROLE grafana_reader SET default_transaction_read_only = on;
ALTER ROLE grafana_reader SET statement_timeout = '30s';
SELECT format('GRANT CONNECT ON DATABASE %I TO grafana_reader', current_database())
\gexec
GRANT USAGE ON SCHEMA public TO grafana_reader;
SQL

run_psql --file "$grants"
echo "01-grafana-reader: role grafana_reader ready"
