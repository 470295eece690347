"""Every query of the provisioned Grafana dashboards and alert rules, ready to run.

Used by tests/test_stack_config.py (offline checks) and tests/test_dashboard_queries.py
(each PromQL against a real Prometheus, each SQL against PostgreSQL as grafana_reader).

    from tests.grafana_queries import promql_queries, sql_queries, logql_queries
    for q in sql_queries():        # Query(source, panel, ref_id, text, datasource_uid)
        cursor.execute(q.text)     # macros and $variables already expanded

SQL: Grafana's PostgreSQL macros are expanded the way the data source does
(`$__timeFilter(col)` -> `col BETWEEN '...' AND '...'`, ...) and dashboard variables are
replaced by sample values (SAMPLE_VALUES, overridable per call). PromQL: variables and
$__interval / $__rate_interval / $__range are replaced. LogQL: likewise; `stream_selectors`
returns the label names used in `{...}` selectors.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
ALERTING_DIR = ROOT / "grafana" / "provisioning" / "alerting"
DATASOURCES_FILE = ROOT / "grafana" / "provisioning" / "datasources" / "datasources.yml"

PROMETHEUS_UID = "prometheus"
LOKI_UID = "loki"
TRACES_UID = "traces"

# A value per dashboard variable for running the queries outside Grafana.
SAMPLE_VALUES: dict[str, str] = {
    "instance_name": ".*",       # the "All" value (allValue) of the instance_name variables
    "status": ".*",
    "min_duration_ms": "0",
    "bucket": "day",
    "trace_id": "00000000-0000-0000-0000-000000000000",
    "env": ".+",
    "level": ".+",
    "search": "",
}

# Built-in variables Grafana defines itself (never in templating.list).
BUILTIN_VARIABLES = {
    "__interval", "__interval_ms", "__rate_interval", "__rate_interval_ms", "__range",
    "__range_s", "__range_ms", "__auto", "__from", "__to", "__timeFilter", "__timeFrom",
    "__timeTo", "__timeGroup", "__timeGroupAlias", "__unixEpochFilter", "__unixEpochFrom",
    "__unixEpochTo", "__unixEpochGroup", "__unixEpochGroupAlias", "__unixEpochNanoFilter",
    "__unixEpochNanoFrom", "__unixEpochNanoTo", "__timeEpoch", "__value", "__data",
    "__field", "__series", "__url_time_range", "__all", "__dashboard", "__org", "__user",
    "__name", "__schema", "__table", "__column", "__timezone",
}

_VAR_RE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_.]*)(?::(?P<fmt>[a-z]+))?\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


@dataclass(frozen=True)
class Query:
    source: str            # file name, e.g. "omni-overview.json" or "omni-rules.yml"
    panel: str             # panel title, variable name or alert rule uid
    ref_id: str
    text: str              # the query as written in the file
    datasource_uid: str

    def expanded(self, **kwargs) -> str:
        """The query with variables and macros replaced (see expand_promql / expand_sql)."""
        if self.datasource_uid == TRACES_UID:
            return expand_sql(self.text, **kwargs)
        if self.datasource_uid == LOKI_UID:
            return expand_logql(self.text, **kwargs)
        return expand_promql(self.text, **kwargs)


# ------------------------------------------------------------------ collection
def dashboards() -> dict[str, dict]:
    """Every dashboard JSON, by file name."""
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def alert_files() -> dict[str, dict]:
    """Every alerting provisioning file, by file name."""
    return {p.name: yaml.safe_load(p.read_text()) or {}
            for p in sorted(ALERTING_DIR.glob("*.y*ml"))}


def alert_rules() -> Iterator[tuple[str, dict]]:
    """(file name, rule) for every provisioned alert rule."""
    for name, doc in alert_files().items():
        for group in doc.get("groups") or []:
            for rule in group.get("rules") or []:
                yield name, rule


def iter_panels(panels: Iterable[dict]) -> Iterator[dict]:
    """Panels, descending into rows."""
    for panel in panels or []:
        yield panel
        yield from iter_panels(panel.get("panels") or [])


def _uid(ds) -> str | None:
    if isinstance(ds, dict):
        return ds.get("uid")
    return ds if isinstance(ds, str) else None


def _target_text(target: dict, uid: str | None) -> str | None:
    if uid == TRACES_UID:
        return target.get("rawSql")
    return target.get("expr")


def dashboard_queries() -> Iterator[Query]:
    """Every panel target and query variable of every dashboard."""
    for name, dash in dashboards().items():
        for panel in iter_panels(dash.get("panels", [])):
            panel_uid = _uid(panel.get("datasource"))
            for target in panel.get("targets") or []:
                uid = _uid(target.get("datasource")) or panel_uid
                text = _target_text(target, uid)
                if text:
                    yield Query(name, panel.get("title", ""), target.get("refId", "A"), text, uid)
        for var in dash.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            uid = _uid(var.get("datasource"))
            query = var.get("query")
            if isinstance(query, dict):
                if uid == LOKI_UID and query.get("label"):
                    text = query.get("stream") or ""
                else:
                    text = query.get("query") or ""
            else:
                text = query or ""
            if uid == PROMETHEUS_UID:
                # Grafana's label_values(selector, label) is not PromQL: run the selector.
                m = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", text)
                if m:
                    text = m.group(1)
            if text:
                yield Query(name, f"variable {var['name']}", "var", text, uid)


def alert_queries() -> Iterator[Query]:
    """Every data-source query of every alert rule (expressions excluded)."""
    for name, rule in alert_rules():
        for item in rule.get("data") or []:
            uid = item.get("datasourceUid")
            if uid in (None, "__expr__", "-100"):
                continue
            model = item.get("model") or {}
            text = model.get("rawSql") if uid == TRACES_UID else model.get("expr")
            if text:
                yield Query(name, rule["uid"], item.get("refId", "A"), text, uid)


def all_queries() -> list[Query]:
    return list(dashboard_queries()) + list(alert_queries())


def promql_queries() -> list[Query]:
    return [q for q in all_queries() if q.datasource_uid == PROMETHEUS_UID]


def sql_queries() -> list[Query]:
    return [q for q in all_queries() if q.datasource_uid == TRACES_UID]


def logql_queries() -> list[Query]:
    return [q for q in all_queries() if q.datasource_uid == LOKI_UID]


# ------------------------------------------------------------------ variables
def variables_used(text: str) -> set[str]:
    """Names of the $variables / ${variables} a string refers to."""
    names = set()
    for m in _VAR_RE.finditer(text):
        name = m.group("braced") or m.group("plain")
        names.add(name.split(".")[0])
    return names


def _format(value: str, fmt: str | None) -> str:
    if fmt == "regex":
        return value if value in (".*", ".+") else re.escape(value)
    if fmt == "sqlstring":
        return "'" + value.replace("'", "''") + "'"
    return value


def replace_variables(text: str, values: Mapping[str, str] | None = None,
                      builtins: Mapping[str, str] | None = None) -> str:
    """Replace dashboard variables (SAMPLE_VALUES overridden by `values`) and builtins."""
    merged = dict(SAMPLE_VALUES)
    merged.update(values or {})
    merged.update(builtins or {})

    def sub(m: re.Match) -> str:
        name = m.group("braced") or m.group("plain")
        if name not in merged:
            return m.group(0)
        return _format(str(merged[name]), m.group("fmt"))

    return _VAR_RE.sub(sub, text)


# ------------------------------------------------------------------ PromQL / LogQL
def expand_promql(text: str, values: Mapping[str, str] | None = None,
                  interval: str = "1m", range_: str = "1h") -> str:
    return replace_variables(text, values, {
        "__interval": interval, "__rate_interval": interval, "__auto": interval,
        "__range": range_, "__interval_ms": "60000", "__range_s": "3600", "__range_ms": "3600000",
    })


def expand_logql(text: str, values: Mapping[str, str] | None = None,
                 interval: str = "1m", range_: str = "1h") -> str:
    return expand_promql(text, values, interval, range_)


_SELECTOR_RE = re.compile(r"\{([^{}]*)\}")
_MATCHER_RE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*\"((?:[^\"\\]|\\.)*)\"\s*")


def stream_selectors(logql: str) -> list[dict[str, str]]:
    """The `{label op "value"}` stream selectors of a LogQL query, as {label: op} dicts.

    Template text inside line_format ({{.field}}) is ignored."""
    cleaned = re.sub(r"\$\{[^}]*\}", "VAR", logql)  # ${var} is not a selector
    cleaned = re.sub(r'line_format\s+"(?:[^"\\]|\\.)*"', "", cleaned)
    cleaned = re.sub(r"\{\{.*?\}\}", "", cleaned)
    selectors = []
    for m in _SELECTOR_RE.finditer(cleaned):
        body = m.group(1).strip()
        if not body:
            continue
        matchers = {}
        for part in _split_matchers(body):
            mm = _MATCHER_RE.fullmatch(part)
            if not mm:
                raise ValueError(f"cannot parse stream matcher {part!r} in {logql!r}")
            matchers[mm.group(1)] = mm.group(2)
        selectors.append(matchers)
    return selectors


def _split_matchers(body: str) -> list[str]:
    parts, buf, quoted, escaped = [], "", False, False
    for ch in body:
        if escaped:
            buf += ch; escaped = False; continue
        if ch == "\\":
            buf += ch; escaped = True; continue
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append(buf); buf = ""; continue
        buf += ch
    if buf.strip():
        parts.append(buf)
    return parts


# ------------------------------------------------------------------ SQL macros
def _ts(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _interval_seconds(interval: str) -> int:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", interval.strip().strip("'\""))
    if not m:
        raise ValueError(f"bad interval {interval!r}")
    n, unit = int(m.group(1)), m.group(2)
    return max(1, {"ms": n // 1000, "s": n, "m": n * 60, "h": n * 3600, "d": n * 86400}[unit])


def _split_args(args: str) -> list[str]:
    out, depth, buf = [], 0, ""
    for ch in args:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(buf.strip()); buf = ""; continue
        buf += ch
    if buf.strip():
        out.append(buf.strip())
    return out


def _macro_calls(text: str, name: str) -> Iterator[tuple[int, int, list[str]]]:
    """(start, end, args) of every `$__name(...)` call, innermost parentheses balanced."""
    token = f"$__{name}("
    pos = 0
    while True:
        start = text.find(token, pos)
        if start < 0:
            return
        i, depth = start + len(token), 1
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        yield start, i, _split_args(text[start + len(token):i - 1])
        pos = i


def expand_sql(text: str, values: Mapping[str, str] | None = None,
               time_from: datetime | None = None, time_to: datetime | None = None,
               interval: str = "1m") -> str:
    """Expand Grafana's PostgreSQL macros, then replace dashboard variables.

    Mirrors the grafana-postgresql-datasource macro engine: the time range is
    [time_from, time_to] (default: the last 30 days, so test data always falls inside)."""
    time_to = time_to or datetime.now(timezone.utc)
    time_from = time_from or time_to - timedelta(days=30)
    frm, to = _ts(time_from), _ts(time_to)
    efrom, eto = int(time_from.timestamp()), int(time_to.timestamp())
    step = _interval_seconds(interval)

    def group(args: list[str], alias: bool) -> str:
        col, iv = args[0], _interval_seconds(args[1]) if len(args) > 1 else step
        fill = ""  # the fill argument only affects Grafana's post-processing
        expr = f"floor(extract(epoch from {col})/{iv})*{iv}"
        return expr + (' AS "time"' if alias else "") + fill

    def unix_group(args: list[str], alias: bool) -> str:
        col, iv = args[0], _interval_seconds(args[1]) if len(args) > 1 else step
        return f"floor(({col})/{iv})*{iv}" + (' AS "time"' if alias else "")

    macros = {
        "timeFilter": lambda a: f"{a[0]} BETWEEN '{frm}' AND '{to}'",
        "timeFrom": lambda a: f"'{frm}'",
        "timeTo": lambda a: f"'{to}'",
        "timeGroup": lambda a: group(a, False),
        "timeGroupAlias": lambda a: group(a, True),
        "unixEpochFilter": lambda a: f"{a[0]} >= {efrom} AND {a[0]} <= {eto}",
        "unixEpochFrom": lambda a: str(efrom),
        "unixEpochTo": lambda a: str(eto),
        "unixEpochNanoFilter": lambda a: f"{a[0]} >= {efrom * 10**9} AND {a[0]} <= {eto * 10**9}",
        "unixEpochNanoFrom": lambda a: str(efrom * 10**9),
        "unixEpochNanoTo": lambda a: str(eto * 10**9),
        "unixEpochGroup": lambda a: unix_group(a, False),
        "unixEpochGroupAlias": lambda a: unix_group(a, True),
    }
    # Longest names first: $__timeGroupAlias before $__timeGroup.
    for name in sorted(macros, key=len, reverse=True):
        while True:
            calls = list(_macro_calls(text, name))
            if not calls:
                break
            start, end, args = calls[0]
            text = text[:start] + macros[name](args) + text[end:]
    # Argument-less forms Grafana also accepts.
    text = text.replace("$__timeFrom", f"'{frm}'").replace("$__timeTo", f"'{to}'")
    text = text.replace("$__unixEpochFrom", str(efrom)).replace("$__unixEpochTo", str(eto))
    return replace_variables(text, values, {
        "__interval": f"{step}s", "__interval_ms": str(step * 1000),
        "__from": str(efrom * 1000), "__to": str(eto * 1000),
    })
