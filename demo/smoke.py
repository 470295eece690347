"""`make smoke`: end-to-end checks of a running stack, each against the URL it is given.

An empty URL leaves that part out (reported as "not checked"); every check that runs must
pass for exit status 0. The test suite runs it against the parts that run without Docker.
"""
from __future__ import annotations

import argparse
import base64
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

DASHBOARDS = ("omni-overview", "omni-traces", "omni-trace-detail", "omni-logs")
SLO_RULES = Path(__file__).resolve().parent.parent / "prometheus" / "rules" / "omni-slo.rules.yml"
# Recorded over 1 d, 3 d or 30 d (evaluated every 5 minutes, or read those): a stack minutes
# old may not have them yet.
LONG_WINDOW = re.compile(r"(1d|3d|30d|budget_remaining)$")


class CheckFailed(Exception):
    """A smoke check did not pass."""


def _http(method: str, url: str, body: dict | None = None, headers: dict | None = None,
          timeout: float = 10) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    except (OSError, ValueError) as exc:
        raise CheckFailed(f"{method} {url}: {exc}") from None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode(errors="replace")


def _wait(what: str, timeout: float, probe):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = probe()
            if result:
                return result
        except CheckFailed as exc:
            last = exc
        time.sleep(1)
    raise CheckFailed(f"{what}: not seen within {timeout:g} s" + (f" ({last})" if last else ""))


class Smoke:
    """The checks, sharing the message they send."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.key = {"x-api-key": args.api_key}
        self.trace_id: str | None = None
        auth = base64.b64encode(f"admin:{args.grafana_password}".encode()).decode()
        self.grafana_auth = {"Authorization": "Basic " + auth}
        # Prometheus and Loki are not published in compose: reach them through Grafana.
        self.via_grafana: dict = {}
        for name in ("prometheus", "loki"):
            if not getattr(args, name) and args.grafana and args.grafana_password:
                setattr(args, name, f"{args.grafana}/api/datasources/proxy/uid/{name}")
                self.via_grafana[name] = self.grafana_auth

    def health(self) -> str:
        status, body = _http("GET", self.a.omni + "/health")
        if status != 200 or body.get("status") != "ok":
            raise CheckFailed(f"/health answered {status}: {body}")
        return f"ok (database {body['checks']['database']}, loki {body['checks']['loki']})"

    def _instance(self) -> None:
        status, _ = _http("GET", f"{self.a.omni}/api/v1/instances/{self.a.instance}", headers=self.key)
        if status == 404:
            status, body = _http("POST", self.a.omni + "/api/v1/instances", headers=self.key, body={
                "name": self.a.instance, "agent_api_url": self.a.agent_url,
                "evolution_url": self.a.agent_url, "agent_timeout_s": 30})
            if status not in (201, 409):
                raise CheckFailed(f"creating instance {self.a.instance}: {status} {body}")
        elif status != 200:
            raise CheckFailed(f"instances API answered {status} (is the API key right?)")

    def _send(self, text: str) -> str:
        envelope = {"event": "messages.upsert", "instance": self.a.instance,
                    "data": {"key": {"remoteJid": "5500000000001@s.whatsapp.net", "fromMe": False,
                                     "id": "SMOKE" + uuid.uuid4().hex[:14].upper()},
                             "pushName": "smoke", "message": {"conversation": text},
                             "messageType": "conversation", "messageTimestamp": int(time.time())}}
        status, body = _http("POST", f"{self.a.omni}/webhook/evolution/{self.a.instance}", envelope)
        if status != 202:
            raise CheckFailed(f"webhook answered {status}: {body}")
        return body["trace_id"]

    def message(self) -> str:
        self._instance()
        self.trace_id = self._send("smoke test " + uuid.uuid4().hex[:8])

        def final():
            status, body = _http("GET", f"{self.a.omni}/api/v1/traces/{self.trace_id}", headers=self.key)
            return body if status == 200 and body["status"] != "processing" else None

        trace = _wait("final trace", 60, final)
        if trace["status"] != "completed":
            raise CheckFailed(f"trace {self.trace_id} ended {trace['status']}: {trace['error_message']}")
        return f"trace {self.trace_id} completed in {trace['duration_ms']} ms"

    def prometheus(self) -> str:
        # Selecting on instance_name proves the label survived the scrape next to
        # Prometheus's own `instance`. Instance names are [a-z0-9_-]: safe in the string.
        who = self.a.instance if self.trace_id else "any instance"
        matcher = f'instance_name="{self.a.instance}"' if self.trace_id else 'instance_name!=""'
        query = f"sum by (step) (omni_message_step_duration_seconds_count{{{matcher}}})"

        def probe():
            status, body = _http("GET", f"{self.a.prometheus}/api/v1/query?"
                                 + urllib.parse.urlencode({"query": query}),
                                 headers=self.via_grafana.get("prometheus"))
            result = body.get("data", {}).get("result", []) if status == 200 else []
            return result if len({r["metric"].get("step") for r in result}) == 4 else None

        result = _wait(f"step histograms of {who} in Prometheus", self.a.timeout, probe)
        return f"histograms of {who} for " + ", ".join(sorted(r["metric"]["step"] for r in result))

    def _prom(self, path: str, **params) -> object:
        url = f"{self.a.prometheus}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        status, body = _http("GET", url, headers=self.via_grafana.get("prometheus"))
        if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
            raise CheckFailed(f"Prometheus {path} answered {status}: {str(body)[:200]}")
        return body["data"]

    def _value(self, expr: str) -> float | None:
        result = self._prom("query", query=expr)["result"]
        return float(result[0]["value"][1]) if result else None

    def canary(self) -> str:
        interval = self._value("max(omni_canary_interval_seconds)")
        if not interval:
            raise CheckFailed("no canary configured (omni_canary_interval_seconds is "
                              f"{'absent' if interval is None else 0}): set AUTOMAGIK_OMNI_CANARY_INSTANCE")
        expr = 'sum(omni_canary_runs_total{result="ok"})'
        first = self._value(expr) or 0.0

        def probe():
            now = self._value(expr) or 0.0
            return now if now > first else None

        # Two intervals, plus a scrape, a run's own duration and a rule evaluation.
        now = _wait(f"a new ok canary run ({expr} above {first:g})", max(self.a.timeout, 2 * interval + 45),
                    probe)
        return f"ok runs {first:g} -> {now:g} (every {interval:g} s)"

    def slo_rules(self) -> str:
        text = SLO_RULES.read_text()
        groups = set(re.findall(r"^  - name: (\S+)", text, re.M))
        records = set(re.findall(r"^\s+- record: (\S+)", text, re.M))
        loaded = {g["name"]: g for g in self._prom("rules", type="record")["groups"] if g["name"] in groups}
        if set(loaded) != groups:
            raise CheckFailed(f"SLO rule groups not loaded: {sorted(groups - set(loaded))}")
        rules = {r["name"]: r for g in loaded.values() for r in g["rules"]}
        broken = {n: r.get("lastError") for n, r in rules.items() if r.get("health") == "err"}
        if set(rules) != records or broken:
            raise CheckFailed(f"SLO recording rules missing {sorted(records - set(rules))} "
                              f"or failing {broken}")
        required = {r for r in records if not LONG_WINDOW.search(r)}
        names: set[str] = set()

        def present():
            result = self._prom("query", query='count by (__name__) ({__name__=~"omni:slo_.+"})')["result"]
            names.clear()
            names.update(r["metric"]["__name__"] for r in result)
            return required <= names

        try:
            _wait("series of the SLO recording rules", self.a.timeout, present)
        except CheckFailed:
            # The error ratios have no sample without traffic in their window (docs/slo.md).
            raise CheckFailed("no series of " + ", ".join(sorted(required - names))
                              + " (no messages completed in the last minutes?)") from None
        longs = records - required
        return (f"{len(groups)} groups, {len(records)} recording rules; series of all "
                f"{len(required)} up to 6 h, {len(longs & names)}/{len(longs)} of the 1 d-30 d ones")

    def loki(self) -> str:
        if not self.trace_id:
            raise CheckFailed("no message was sent (the message check must run first)")
        params = urllib.parse.urlencode({"query": f'{{service="omni"}} | trace_id="{self.trace_id}"',
                                         "start": str(int((time.time() - 3600) * 1e9)), "limit": "100"})

        def probe():
            status, body = _http("GET", f"{self.a.loki}/loki/api/v1/query_range?{params}",
                                 headers=self.via_grafana.get("loki"))
            streams = body.get("data", {}).get("result", []) if status == 200 else []
            return sum(len(s["values"]) for s in streams)

        n = _wait("the message's log lines in Loki", self.a.timeout, probe)
        return f"{n} log lines of trace {self.trace_id}"

    def grafana(self) -> str:
        headers = self.grafana_auth
        status, found = _http("GET", f"{self.a.grafana}/api/search?type=dash-db", headers=headers)
        if status != 200:
            raise CheckFailed(f"Grafana search answered {status} (admin password?)")
        missing = set(DASHBOARDS) - {d.get("uid") for d in found}
        if missing:
            raise CheckFailed(f"dashboards missing: {sorted(missing)}")
        status, rule = _http("GET", f"{self.a.grafana}/api/v1/provisioning/alert-rules/omni-slow-messages",
                             headers=headers)
        if status != 200:
            raise CheckFailed(f"alert rule omni-slow-messages: {status}")
        for uid in ("prometheus", "loki", "traces"):
            status, _ = _http("GET", f"{self.a.grafana}/api/datasources/uid/{uid}", headers=headers)
            if status != 200:
                raise CheckFailed(f"datasource {uid}: {status}")
        return f"{len(DASHBOARDS)} dashboards, 3 datasources, rule '{rule.get('title')}'"

    def alert(self) -> str:
        self._instance()
        self._send("#delay=10500 smoke slow message")

        def probe():
            status, alerts = _http("GET", self.a.sandbox + "/alerts")
            text = json.dumps(alerts) if status == 200 else ""
            return "omni-slow-messages" in text or "Slow messages" in text

        _wait("slow-message alert at the sandbox sink", self.a.alert_timeout, probe)
        return "slow-message alert delivered to the sink"


def _env_file(path: str | None) -> dict:
    values = {}
    if path:
        try:
            for line in open(path):
                if "=" in line and not line.lstrip().startswith("#"):
                    k, v = line.strip().split("=", 1)
                    values[k] = v
        except FileNotFoundError:
            pass
    return values


def main(argv: list[str] | None = None) -> int:
    """Run the checks whose URLs are given; print one line each."""
    p = argparse.ArgumentParser(prog="python -m demo.smoke", description=__doc__)
    p.add_argument("--omni", default="http://127.0.0.1:8882")
    p.add_argument("--prometheus", default="", help="default: through Grafana's datasource proxy")
    p.add_argument("--loki", default="", help="default: through Grafana's datasource proxy")
    p.add_argument("--grafana", default="")
    p.add_argument("--sandbox", default="", help="sandbox URL as seen from here (alert sink)")
    p.add_argument("--agent-url", default="", help="sandbox URL as the service sees it "
                   "(default: http://sandbox:8890 with an --env-file, else --sandbox)")
    p.add_argument("--env-file", help="read AUTOMAGIK_OMNI_API_KEY and GRAFANA_ADMIN_PASSWORD from it")
    p.add_argument("--api-key", default="")
    p.add_argument("--grafana-password", default="")
    p.add_argument("--instance", default="smoke")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--alert-timeout", type=float, default=300)
    p.add_argument("--no-canary", action="store_true",
                   help="leave out the canary check (a stack without AUTOMAGIK_OMNI_CANARY_INSTANCE)")
    a = p.parse_args(argv)
    env = _env_file(a.env_file)
    a.api_key = a.api_key or env.get("AUTOMAGIK_OMNI_API_KEY", "")
    a.grafana_password = a.grafana_password or env.get("GRAFANA_ADMIN_PASSWORD", "")
    a.agent_url = a.agent_url or ("http://sandbox:8890" if env else a.sandbox)
    smoke = Smoke(a)
    checks = [("health", a.omni, smoke.health), ("message", a.omni and a.api_key and a.agent_url, smoke.message),
              ("prometheus", a.prometheus, smoke.prometheus),
              ("canary", a.prometheus and not a.no_canary, smoke.canary),
              ("slo-rules", a.prometheus, smoke.slo_rules), ("loki", a.loki, smoke.loki),
              ("grafana", a.grafana and a.grafana_password, smoke.grafana),
              ("alert", a.grafana and a.sandbox, smoke.alert)]
    failed = 0
    for name, enabled, check in checks:
        if not enabled:
            why = "--no-canary" if name == "canary" and a.no_canary else "no URL or credentials given"
            print(f"-    {name:<11} not checked ({why})")
            continue
        try:
            print(f"ok   {name:<11} {check()}", flush=True)
        except CheckFailed as exc:
            failed += 1
            print(f"FAIL {name:<11} {exc}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
