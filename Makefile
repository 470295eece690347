# omni-telemetry: `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
COMPOSE := docker compose --profile demo
# Where `make smoke` looks (override for a remote stack).
OMNI_URL ?= http://127.0.0.1:8882
# Empty: Prometheus and Loki are reached through Grafana's datasource proxy (not published).
PROMETHEUS_URL ?=
LOKI_URL ?=
GRAFANA_URL ?= http://127.0.0.1:3000
SANDBOX_URL ?= http://127.0.0.1:8890

.PHONY: help up run down clean logs ps test test-unit lint bench soak check smoke grafana-reset-admin venv tools

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-20s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

venv: $(VENV)/.installed ## create .venv with the service and test dependencies

tools: ## install prometheus, PostgreSQL 15 and wrk when missing (as root)
	@bash scripts/ensure-tools.sh

up: ## start the Docker stack with demo traffic, wait until healthy, print URLs
	@docker info >/dev/null 2>&1 || { echo "make up: no Docker engine is reachable here." >&2; \
	  echo "Use 'make run' to run the service, PostgreSQL, Prometheus and the demo natively." >&2; exit 1; }
	@bash scripts/gen-env.sh
	$(COMPOSE) up -d --build --wait
	@echo ""
	@echo "omni-telemetry is up:"
	@echo "  Grafana     http://127.0.0.1:3000  (user admin, password GRAFANA_ADMIN_PASSWORD in .env)"
	@echo "  omni API    http://127.0.0.1:8882  (x-api-key: AUTOMAGIK_OMNI_API_KEY in .env)"
	@echo "  Prometheus, Loki: inside the compose network, through Grafana (Explore)"
	@echo "  Sandbox     http://127.0.0.1:8890/sent  and  /alerts"
	@echo "Credentials: .env (mode 600, never committed)."

run: venv ## run service, PostgreSQL, sandbox, demo traffic and Prometheus natively (Ctrl-C stops)
	@bash scripts/ensure-tools.sh
	$(PY) -m demo.native

down: ## stop the Docker stack (keeps volumes)
	$(COMPOSE) down

clean: ## stop the Docker stack and delete its volumes
	$(COMPOSE) down -v

logs: ## follow the Docker stack's logs
	$(COMPOSE) logs -f --tail=100

ps: ## show the Docker stack's services
	$(COMPOSE) ps

test: venv tools lint ## install what the suite needs, lint, and run every tier of tests
	$(PY) -m pytest

test-unit: venv ## the fast tier only: no servers (tests/unit)
	$(PY) -m pytest tests/unit

lint: venv ## ruff on the whole tree, mypy on app/ (settings in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: venv tools ## benchmarks (QUICK=1 for a short smoke run)
	$(PY) -m bench $(if $(QUICK),--quick)

soak: venv tools ## chaos soak: 10 min at 50 msg/s under scheduled faults (QUICK=1: about 2 min)
	$(PY) -m bench.soak $(if $(QUICK),--quick)

check: venv tools ## validate compose, Dockerfile, Prometheus, Loki and Grafana files offline
	$(PY) -m pytest -q tests/system/test_stack_config.py

smoke: venv ## end-to-end checks of a running stack (URLs overridable, see Makefile)
	$(PY) -m demo.smoke --omni $(OMNI_URL) --prometheus "$(PROMETHEUS_URL)" --loki "$(LOKI_URL)" \
	  --grafana $(GRAFANA_URL) --sandbox $(SANDBOX_URL) --env-file .env

grafana-reset-admin: ## apply GRAFANA_ADMIN_PASSWORD from .env to an existing Grafana volume
	bash scripts/grafana-reset-admin.sh
