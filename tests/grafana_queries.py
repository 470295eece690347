"""Every query of the provisioned Grafana dashboards and alert rules, ready to run.

Used by tests/system/test_stack_config.py (offline checks) and tests/system/test_dashboard_queries.py
(each PromQL against a real Prometheus, each SQL against PostgreSQL as grafana_reader).

    from tests.grafana_queries import promql_queries, sql_queries, logql_queries
    for q in sql_queries():        # Query(source, panel, ref_id, text, datasource_uid, variables)
        cursor.execute(q.expanded(values={"instance_name": ["bot"]}))

Variables are interpolated the way Grafana 13 does it (`interpolate`): `${var:format}`
through Grafana's format registry (percentencode, uriencode, sqlstring, regex, ...), a bare
`$var` through the data source's own default escaping (PostgreSQL, Prometheus, Loki), "All"
as the variable's custom all value inserted verbatim (Grafana formats it only for text,
percentencode and queryparam) or else as the list of its options. SQL then goes through
what Grafana's PostgreSQL backend does after the browser: the `$__interval` and
`$__unixEpochFrom()` replacements, then every `$__macro(...)` anywhere in the text, inside
string literals too (`$__timeFilter(col)` -> `col BETWEEN '...' AND '...'`, ...). PromQL
and LogQL: $__interval / $__rate_interval / $__range are replaced. Values come from
SAMPLE_VALUES and SAMPLE_OPTIONS unless a call overrides them.

`sql_tokens` and `logql_tokens` are strict lexers of the rendered queries, for checking that
a variable's value stays inside one string literal whatever it contains.
"""
from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass, field
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

# Grafana's value of a variable set to "All".
ALL = "$__all"

# A value per dashboard variable for running the queries outside Grafana: what a freshly
# opened dashboard shows (every All, the textboxes' defaults). Multi-value variables take
# lists.
SAMPLE_VALUES: dict[str, object] = {
    "instance_name": ALL,
    "status": ALL,
    "min_duration_ms": "0",
    "bucket": "day",
    "trace_id": "00000000-0000-0000-0000-000000000000",
    "env": ALL,
    "level": ALL,
    "search": "",
}

# Options of the query variables (Grafana asks their data source); "All" without a custom
# all value stands for these.
SAMPLE_OPTIONS: dict[str, list[str]] = {
    "instance_name": ["bot", "beta"],
    "env": ["test"],
}

# Values a textbox, or a crafted URL (?var-x=...), can give any variable: quotes of every
# kind, escapes, closing braces, comments, Grafana's own macros and variables.
HOSTILE_VALUES = (
    "'", "' OR '1'='1", "\\", '"', "}", "\\'", '\\"', "`", "') OR ('1'='1", "'; SELECT 1; --",
    "*/ --", '" } or {service=~".+', '\\" | line_format "x', "a\nb", "%27", "%7B%7D", ".*",
    "$__timeFrom() OR true -- $__timeFrom()", "$__timeFilter(x) OR true", "$__nope(x)",
    "$__interval", "${trace_id}", "$instance_name",
)
# Variable types whose value reaches a query: all but the built-in ones.
VALUE_VARIABLE_TYPES = ("textbox", "query", "custom")

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
    # The dashboard's variable definitions (templating.list entries) by name.
    variables: Mapping[str, dict] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def expanded(self, **kwargs) -> str:
        """The query with variables and macros replaced (see expand_promql / expand_sql)."""
        kwargs.setdefault("variables", self.variables)
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
        defs = dashboard_variables(dash)
        for panel in iter_panels(dash.get("panels", [])):
            panel_uid = _uid(panel.get("datasource"))
            for target in panel.get("targets") or []:
                uid = _uid(target.get("datasource")) or panel_uid
                text = _target_text(target, uid)
                if text:
                    yield Query(name, panel.get("title", ""), target.get("refId", "A"), text, uid, defs)
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
                yield Query(name, f"variable {var['name']}", "var", text, uid, defs)


def dashboard_variables(dash: dict) -> dict[str, dict]:
    """A dashboard's variable definitions by name."""
    return {v["name"]: v for v in dash.get("templating", {}).get("list", [])}


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


def variable_references(text: str) -> list[tuple[str, str | None, int, int]]:
    """(name, format or None, start, end) of every variable reference in a string."""
    return [((m.group("braced") or m.group("plain")), m.group("fmt"), m.start(), m.end())
            for m in _VAR_RE.finditer(text)]


# Grafana's format registry as Grafana 13 runs it (@grafana/scenes
# variables/interpolation/formatRegistry.ts), one function per format: value is a str or a
# list of str. Older dashboards engines differ (json quoted a single string, sqlstring left
# " alone): the stack pins Grafana 13.
def _regex_escape(value: str) -> str:
    # escapeRegex of @grafana/data
    return re.sub(r"[\\^$*+?.()|\[\]{}/]", lambda m: "\\" + m.group(0), value)


def _js_json(value) -> str:
    # JSON.stringify: no spaces; non-ASCII kept as is.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def uri_component_strict(value: str) -> str:
    """encodeURIComponent, then ! ' ( ) * too (RFC 3986): Grafana's percentencode."""
    return urllib.parse.quote(value, safe="-_.~")


def uri_strict(value: str) -> str:
    """encodeURI, then ! ' ( ) * too: Grafana's uriencode."""
    return urllib.parse.quote(value, safe=";,/?:@&=+$#-_.~")


def _lucene_escape(value: str) -> str:
    try:
        float(value)
        return value
    except ValueError:
        return re.sub(r'([!*+\-=<>\s&|()\[\]{}^~?:\\/"])', r"\\\1", value)


def _listed(value) -> list[str]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _fmt_regex(value, var):
    if isinstance(value, str):
        return _regex_escape(value)
    escaped = [_regex_escape(v) for v in value]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def _fmt_lucene(value, var):
    if isinstance(value, str):
        return _lucene_escape(value)
    if not value:
        return "__empty__"
    return "(" + " OR ".join('"' + _lucene_escape(v) + '"' for v in value) + ")"


def _fmt_sqlstring(value, var):
    def one(v: str) -> str:
        return "'" + v.replace("'", "''").replace('"', '\\"') + "'"
    return ",".join(one(v) for v in _listed(value))


FORMATS = {
    "raw": lambda value, var: ",".join(_listed(value)),
    "regex": _fmt_regex,
    "pipe": lambda value, var: "|".join(_listed(value)),
    "csv": lambda value, var: ",".join(_listed(value)),
    "distributed": lambda value, var: ",".join(
        v if i == 0 else f"{var['name']}={v}" for i, v in enumerate(_listed(value))),
    "json": lambda value, var: value if isinstance(value, str) else _js_json(value),
    "percentencode": lambda value, var: uri_component_strict(
        value if isinstance(value, str) else "{" + ",".join(value) + "}"),
    "uriencode": lambda value, var: uri_strict(
        value if isinstance(value, str) else "{" + ",".join(value) + "}"),
    "singlequote": lambda value, var: ",".join("'" + v.replace("'", "\\'") + "'" for v in _listed(value)),
    "doublequote": lambda value, var: ",".join('"' + v.replace('"', '\\"') + '"' for v in _listed(value)),
    "sqlstring": _fmt_sqlstring,
    "glob": lambda value, var: ("{" + ",".join(value) + "}" if not isinstance(value, str) and len(value) > 1
                                else ",".join(_listed(value))),
    "text": lambda value, var: " + ".join(_listed(value)),
    "lucene": _fmt_lucene,
    "queryparam": lambda value, var: "&".join(f"var-{var['name']}={uri_component_strict(v)}"
                                              for v in _listed(value)),
}


# What each data source does with a variable written without a format.
def _sql_default(value, var):
    # grafana-sql SqlDatasource.interpolateVariable (PostgresQueryModel.quoteLiteral)
    if isinstance(value, str):
        if var.get("multi") or var.get("includeAll"):
            return "'" + value.replace("'", "''") + "'"
        return value.replace("'", "''")
    return ",".join("'" + v.replace("'", "''") + "'" for v in value)


def _prometheus_default(value, var):
    # grafana-prometheus interpolateQueryExpr, without the prometheusSpecialCharsInLabelValues toggle
    def special(v: str) -> str:
        return re.sub(r"[$^*{}\[\]+?.()|]", lambda m: "\\\\" + m.group(0), v.replace("\\", "\\\\\\\\"))
    if not var.get("multi") and not var.get("includeAll"):
        return ",".join(v.replace("\\", "\\\\").replace("'", "\\\\'") for v in _listed(value))
    if isinstance(value, str):
        return special(value)
    escaped = [special(v) for v in value]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def _loki_default(value, var):
    # grafana loki datasource interpolateQueryExpr
    def special(v: str) -> str:
        return re.sub(r"[$^*{}\[\]+?.()|]", lambda m: "\\\\" + m.group(0), v.replace("\\", "\\\\\\\\"))
    if not var.get("multi") and not var.get("includeAll"):
        return ",".join(_listed(value))
    if isinstance(value, str):
        return special(value)
    return "|".join(special(v) for v in value)


DATASOURCE_DEFAULTS = {TRACES_UID: _sql_default, PROMETHEUS_UID: _prometheus_default, LOKI_UID: _loki_default}


def variable_options(var: dict, options: Mapping[str, list[str]] | None = None) -> list[str]:
    """The values "All" stands for when the variable has no custom all value."""
    if options and var["name"] in options:
        return list(options[var["name"]])
    if var.get("type") == "custom":
        return [o.split(" : ")[-1].strip() for o in re.split(r"(?<!\\),", var.get("query") or "") if o.strip()]
    if var["name"] in SAMPLE_OPTIONS:
        return list(SAMPLE_OPTIONS[var["name"]])
    return [o["value"] for o in var.get("options") or [] if o.get("value") != ALL]


def interpolate(var: dict, value, fmt: str | None, datasource_uid: str | None,
                options: Mapping[str, list[str]] | None = None, recurse=lambda s: s) -> str:
    """One variable reference, rendered as Grafana renders it."""
    if value == ALL or value == [ALL]:
        custom = var.get("allValue")
        if custom:
            if fmt == "text":
                return "All"
            if fmt == "percentencode":
                return uri_component_strict(custom)
            if fmt == "queryparam":
                return f"var-{var['name']}=All"
            return recurse(custom)
        value = variable_options(var, options)
    elif var.get("multi") and isinstance(value, str):
        value = [value]
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r} of ${{{var['name']}}} is not modelled here")
        return FORMATS[fmt](value, var)
    default = DATASOURCE_DEFAULTS.get(datasource_uid)
    return default(value, var) if default else ",".join(_listed(value))


def replace_variables(text: str, values: Mapping[str, object] | None = None,
                      builtins: Mapping[str, str] | None = None, *,
                      variables: Mapping[str, dict] | None = None,
                      options: Mapping[str, list[str]] | None = None,
                      datasource_uid: str | None = None) -> str:
    """Replace dashboard variables (SAMPLE_VALUES overridden by `values`) and builtins.

    variables: the dashboard's definitions (a name missing there is treated as a plain
    single-value variable). Values are not interpolated again: Grafana does not either
    (only a custom all value is)."""
    merged = dict(SAMPLE_VALUES)
    merged.update(values or {})
    defs = variables or {}

    def sub(m: re.Match) -> str:
        name = m.group("braced") or m.group("plain")
        if builtins and name in builtins:
            return builtins[name]
        if name not in merged:
            return m.group(0)
        var = defs.get(name) or {"name": name}
        return interpolate(var, merged[name], m.group("fmt"), datasource_uid, options,
                           recurse=lambda s: replace_variables(s, values, builtins, variables=variables,
                                                               options=options, datasource_uid=datasource_uid))

    return _VAR_RE.sub(sub, text)


# ------------------------------------------------------------------ PromQL / LogQL
def expand_promql(text: str, values: Mapping[str, object] | None = None,
                  interval: str = "1m", range_: str = "1h", *,
                  variables: Mapping[str, dict] | None = None,
                  options: Mapping[str, list[str]] | None = None,
                  datasource_uid: str = PROMETHEUS_UID) -> str:
    return replace_variables(text, values, {
        "__interval": interval, "__rate_interval": interval, "__auto": interval,
        "__range": range_, "__interval_ms": "60000", "__range_s": "3600", "__range_ms": "3600000",
    }, variables=variables, options=options, datasource_uid=datasource_uid)


def expand_logql(text: str, values: Mapping[str, object] | None = None,
                 interval: str = "1m", range_: str = "1h", *,
                 variables: Mapping[str, dict] | None = None,
                 options: Mapping[str, list[str]] | None = None) -> str:
    return expand_promql(text, values, interval, range_, variables=variables, options=options,
                         datasource_uid=LOKI_UID)


class LexError(ValueError):
    """The text is not a well-formed query of that language."""


# Go string literal escapes (strconv.Unquote, which Loki's LogQL lexer applies).
_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
               "\\": "\\", '"': '"'}
_LOGQL_OPERATORS = ("|=", "|~", "|>", "!=", "!~", "!>", "=~", "==", ">=", "<=", "=", ">", "<", "|",
                    ",", "(", ")", "{", "}", "[", "]", "+", "-", "*", "/", "%", "^")
_DURATION_RE = re.compile(r"(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h|d|w|y))+")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _go_string(text: str, i: int) -> tuple[str, int]:
    """Decode the Go "..." literal starting at text[i]; (value, index after it)."""
    out, i = [], i + 1
    while True:
        if i >= len(text) or text[i] == "\n":
            raise LexError(f"unterminated string at {i} in {text!r}")
        ch = text[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        esc = text[i + 1:i + 2]
        if esc in _GO_ESCAPES:
            out.append(_GO_ESCAPES[esc])
            i += 2
        elif esc in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[esc]
            digits = text[i + 2:i + 2 + width]
            if not re.fullmatch(r"[0-9a-fA-F]{%d}" % width, digits):
                raise LexError(f"bad \\{esc} escape at {i} in {text!r}")
            code = int(digits, 16)
            if esc != "x" and (0xD800 <= code <= 0xDFFF or code > 0x10FFFF):
                raise LexError(f"invalid code point at {i} in {text!r}")
            out.append(chr(code))
            i += 2 + width
        elif re.fullmatch(r"[0-7]", esc or "x"):
            digits = text[i + 1:i + 4]
            if not re.fullmatch(r"[0-7]{3}", digits) or int(digits, 8) > 255:
                raise LexError(f"bad octal escape at {i} in {text!r}")
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            raise LexError(f"invalid escape \\{esc} at {i} in {text!r}")


def logql_tokens(text: str) -> list[tuple[str, str]]:
    """Strict LogQL lexer: (kind, text) with kind STR (decoded), DUR, NUM, ID, OP, COMMENT."""
    tokens, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == "#":
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            tokens.append(("COMMENT", text[i:end]))
            i = end
        elif ch == '"':
            value, i = _go_string(text, i)
            tokens.append(("STR", value))
        elif ch == "`":
            end = text.find("`", i + 1)
            if end < 0:
                raise LexError(f"unterminated raw string at {i} in {text!r}")
            tokens.append(("STR", text[i + 1:end].replace("\r", "")))
            i = end + 1
        elif m := _DURATION_RE.match(text, i):
            tokens.append(("DUR", m.group(0)))
            i = m.end()
        elif m := _NUMBER_RE.match(text, i):
            tokens.append(("NUM", m.group(0)))
            i = m.end()
        elif m := _IDENT_RE.match(text, i):
            tokens.append(("ID", m.group(0)))
            i = m.end()
        else:
            op = next((o for o in _LOGQL_OPERATORS if text.startswith(o, i)), None)
            if op is None:
                raise LexError(f"unexpected {ch!r} at {i} in {text!r}")
            tokens.append(("OP", op))
            i += len(op)
    return tokens


def skeleton(tokens: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The tokens with every string literal's content blanked: the query's structure."""
    return [(kind, "" if kind == "STR" else value) for kind, value in tokens]


def stream_selectors(logql: str) -> list[dict[str, tuple[str, str]]]:
    """The stream selectors of a rendered LogQL query, each {label: (operator, value)}.

    Strict: every `{...}` outside string literals must be `label op "string", ...`."""
    tokens, selectors, i = logql_tokens(logql), [], 0
    while i < len(tokens):
        if tokens[i] == ("OP", "{"):
            matchers, i = {}, i + 1
            while True:
                label, op, value = (tokens + [("", "")] * 3)[i:i + 3]
                if label[0] != "ID" or op[0] != "OP" or op[1] not in ("=", "!=", "=~", "!~") or value[0] != "STR":
                    raise LexError(f"bad stream matcher at token {i} in {logql!r}")
                if label[1] in matchers:
                    raise LexError(f"label {label[1]} matched twice in {logql!r}")
                matchers[label[1]] = (op[1], value[1])
                i += 3
                sep = tokens[i] if i < len(tokens) else ("", "")
                if sep == ("OP", "}"):
                    break
                if sep != ("OP", ","):
                    raise LexError(f"bad stream selector at token {i} in {logql!r}")
                i += 1
            selectors.append(matchers)
        elif tokens[i] == ("OP", "}"):
            raise LexError(f"unbalanced }} in {logql!r}")
        i += 1
    return selectors


def sql_tokens(text: str) -> list[tuple[str, str]]:
    """Strict PostgreSQL lexer (standard_conforming_strings on): kinds STR (decoded), QID,
    ID (lower case), NUM, PARAM, OP, PUNCT, COMMENT. E'', U&'', B'' and X'' literals are
    refused: the dashboards use none, and their rules differ."""
    tokens, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
        elif text.startswith("--", i):
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            tokens.append(("COMMENT", text[i:end]))
            i = end
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while depth:
                if j >= len(text):
                    raise LexError(f"unterminated comment at {i} in {text!r}")
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            tokens.append(("COMMENT", text[i:j]))
            i = j
        elif ch == "'":
            out, j = [], i + 1
            while True:
                if j >= len(text):
                    raise LexError(f"unterminated string at {i} in {text!r}")
                if text[j] == "'":
                    if text.startswith("''", j):
                        out.append("'")
                        j += 2
                        continue
                    break
                out.append(text[j])
                j += 1
            tokens.append(("STR", "".join(out)))
            i = j + 1
        elif ch == '"':
            end = i + 1
            while True:
                end = text.find('"', end)
                if end < 0:
                    raise LexError(f"unterminated identifier at {i} in {text!r}")
                if text.startswith('""', end):
                    end += 2
                    continue
                break
            tokens.append(("QID", text[i + 1:end].replace('""', '"')))
            i = end + 1
        elif ch == "$":
            if m := re.compile(r"\$(\d+)").match(text, i):
                tokens.append(("PARAM", m.group(1)))
                i = m.end()
                continue
            m = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$").match(text, i)
            if not m:
                raise LexError(f"unexpected $ at {i} in {text!r}")
            end = text.find(m.group(0), m.end())
            if end < 0:
                raise LexError(f"unterminated dollar quote at {i} in {text!r}")
            tokens.append(("STR", text[m.end():end]))
            i = end + len(m.group(0))
        elif m := re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?").match(text, i):
            tokens.append(("NUM", m.group(0)))
            i = m.end()
        elif m := re.compile(r"[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*").match(text, i):
            if text.startswith("'", m.end()) or text.startswith("&'", m.end()):
                raise LexError(f"prefixed string literal {m.group(0)}'...' at {i} in {text!r}")
            tokens.append(("ID", m.group(0).lower()))
            i = m.end()
        elif text.startswith("::", i):
            tokens.append(("OP", "::"))
            i += 2
        elif ch in "(),;[].:":
            tokens.append(("PUNCT", ch))
            i += 1
        elif m := re.compile(r"[+\-*/<>=~!@#%^&|`?]+").match(text, i):
            op = m.group(0)
            # An operator ends where a comment starts (PostgreSQL's scan.l).
            for marker in ("--", "/*"):
                if marker in op:
                    op = op[:op.index(marker)]
            if not op:
                continue
            tokens.append(("OP", op))
            i += len(op)
        else:
            raise LexError(f"unexpected {ch!r} at {i} in {text!r}")
    return tokens


# ------------------------------------------------------------------ SQL macros
def _ts(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _interval_seconds(interval: str) -> int:
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", interval.strip().strip("'\""))
    if not m:
        raise ValueError(f"bad interval {interval!r}")
    n, unit = int(m.group(1)), m.group(2)
    return max(1, {"ms": n // 1000, "s": n, "m": n * 60, "h": n * 3600, "d": n * 86400}[unit])


# grafana-postgresql-datasource macros.go: `$` identifier `(` anything but `)` `)`.
_SQL_MACRO_RE = re.compile(r"\$([_a-zA-Z0-9]+)\(([^)]*)\)")


def expand_sql(text: str, values: Mapping[str, object] | None = None,
               time_from: datetime | None = None, time_to: datetime | None = None,
               interval: str = "1m", *, variables: Mapping[str, dict] | None = None,
               options: Mapping[str, list[str]] | None = None) -> str:
    """Interpolate the variables (Grafana's front end), then expand the macros (its back end).

    Mirrors the grafana-postgresql-datasource macro engine, which runs over the whole text,
    string literals included: the time range is [time_from, time_to] (default: the last 30
    days, so test data always falls inside). An unknown macro raises, as it fails there."""
    time_to = time_to or datetime.now(timezone.utc)
    time_from = time_from or time_to - timedelta(days=30)
    frm, to = _ts(time_from), _ts(time_to)
    efrom, eto = int(time_from.timestamp()), int(time_to.timestamp())
    step = _interval_seconds(interval)
    text = replace_variables(text, values, {
        "__interval": f"{step}s", "__interval_ms": str(step * 1000),
        "__from": str(efrom * 1000), "__to": str(eto * 1000),
    }, variables=variables, options=options, datasource_uid=TRACES_UID)
    # sqleng.Interpolate
    text = text.replace("$__interval_ms", str(step * 1000)).replace("$__interval", f"{step}s")
    text = text.replace("$__unixEpochFrom()", str(efrom)).replace("$__unixEpochTo()", str(eto))

    def group(args: list[str], alias: bool) -> str:
        if len(args) < 2:
            raise ValueError("$__timeGroup needs a column and an interval")
        iv = _interval_seconds(args[1].strip("'"))
        return f"floor(extract(epoch from {args[0]})/{iv})*{iv}" + (' AS "time"' if alias else "")

    def unix_group(args: list[str], alias: bool) -> str:
        if len(args) < 2:
            raise ValueError("$__unixEpochGroup needs a column and an interval")
        iv = _interval_seconds(args[1].strip("'"))
        return f"floor(({args[0]})/{iv})*{iv}" + (' AS "time"' if alias else "")

    macros = {
        "__time": lambda a: f'{a[0]} AS "time"',
        "__timeEpoch": lambda a: f'extract(epoch from {a[0]}) as "time"',
        "__timeFilter": lambda a: f"{a[0]} BETWEEN '{frm}' AND '{to}'",
        "__timeFrom": lambda a: f"'{frm}'",
        "__timeTo": lambda a: f"'{to}'",
        "__timeGroup": lambda a: group(a, False),
        "__timeGroupAlias": lambda a: group(a, True),
        "__unixEpochFilter": lambda a: f"{a[0]} >= {efrom} AND {a[0]} <= {eto}",
        "__unixEpochNanoFilter": lambda a: f"{a[0]} >= {efrom * 10**9} AND {a[0]} <= {eto * 10**9}",
        "__unixEpochNanoFrom": lambda a: str(efrom * 10**9),
        "__unixEpochNanoTo": lambda a: str(eto * 10**9),
        "__unixEpochGroup": lambda a: unix_group(a, False),
        "__unixEpochGroupAlias": lambda a: unix_group(a, True),
    }

    def sub(m: re.Match) -> str:
        name = m.group(1)
        # pre-5.3 compatibility: $__timeGroup(...) directly followed by ',' gets the alias
        if name == "__timeGroup" and text[m.end():m.end() + 1] == ",":
            name = "__timeGroupAlias"
        if name not in macros:
            raise ValueError(f"unknown macro {name!r}")
        return macros[name]([a.strip(" ") for a in m.group(2).split(",")])

    return _SQL_MACRO_RE.sub(sub, text)
