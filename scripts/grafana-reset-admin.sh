#!/bin/sh
# Apply GRAFANA_ADMIN_PASSWORD from .env to the running Grafana: GF_SECURITY_ADMIN_PASSWORD
# only takes effect when Grafana's volume is first created, so a changed password needs this.
# Usage: scripts/grafana-reset-admin.sh   (extra compose flags via COMPOSE, e.g.
#        COMPOSE="docker compose -f docker-compose.yml -f docker-compose.scale.yml")
set -eu

root=$(CDPATH= cd -- "$(dirname -- "$0")/.." && pwd)
env_file="$root/.env"
compose=${COMPOSE:-docker compose}

if [ ! -r "$env_file" ]; then
    echo "grafana-reset-admin: $env_file not found (run scripts/gen-env.sh or make up first)" >&2
    exit 1
fi
password=$(sed -n 's/^GRAFANA_ADMIN_PASSWORD=//p' "$env_file" | tail -n 1)
if [ -z "$password" ] || [ "$password" = "change-me" ]; then
    echo "grafana-reset-admin: GRAFANA_ADMIN_PASSWORD is not set in $env_file" >&2
    exit 1
fi

cd "$root"
# The password travels on stdin-less argv inside the container only; it is never echoed.
$compose exec -T grafana grafana cli --homepath /usr/share/grafana \
    admin reset-admin-password "$password" >/dev/null
echo "grafana-reset-admin: the Grafana admin password now matches GRAFANA_ADMIN_PASSWORD in .env"
