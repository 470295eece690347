"""The result table: every benchmark figure with its target, as JSON rows and Markdown."""
from __future__ import annotations


def _get(d: dict, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def targets(r: dict) -> list[dict]:
    """One row per figure: value, target, met (None where a figure is only reported)."""
    rows = []

    def add(figure: str, value, target: str, met) -> None:
        rows.append({"figure": figure, "value": value, "target": target,
                     "met": None if met is None or value is None else bool(met)})

    med = _get(r, "throughput", "median", default={})
    add("pipeline throughput, all telemetry on (msg/s, webhook to final trace)",
        _get(med, "on", "msgs_per_s"), "report", None)
    add("bare gunicorn+Flask endpoint, same body (req/s, same run)", _get(med, "bare", "msgs_per_s"),
        "reference", None)
    add("omni all-on / bare", _get(r, "throughput", "on_vs_bare"), "report", None)
    add("worker CPU per message, all on (µs)", _get(med, "on", "cpu_us_per_msg", "workers"), "report", None)
    add("worker CPU per request, bare (µs)", _get(med, "bare", "cpu_us_per_msg", "workers"), "report", None)
    ratio = _get(r, "throughput", "on_off_ratio")
    add("telemetry cost: throughput on/off (median of A/B pairs)", ratio, ">= 0.90",
        ratio is not None and ratio >= 0.90)
    steady = _get(r, "layers", "on", "cpu_ratio_off_to_this")
    add("  same, from stack CPU per message at a steady rate below saturation (off/on)", steady, "report",
        None)
    lat = r.get("latency", {})
    add(f"webhook ack p99 at {lat.get('rate', 100)} msg/s, agent median 4 s (ms)", lat.get("ack_p99_ms"),
        "< 25 ms", lat.get("ack_p99_ms") is not None and lat["ack_p99_ms"] < 25)
    add("  503 answers during that run", lat.get("http_503"), "0", lat.get("http_503") == 0)
    add("  every accepted message completed", lat.get("all_completed"), "true", lat.get("all_completed"))
    add("  messages in flight (max sampled)", lat.get("in_flight_max"), "~400", None)
    worst = _get(r, "trace_store", "list", "worst_p99_ms")
    rows_n = _get(r, "trace_store", "dataset", "rows_per_30_days")
    add(f"trace list API, worst p99 over every filter, first and cursor pages ({rows_n or '?'} traces/30 d)",
        worst, "< 50 ms", worst is not None and worst < 50)
    ana = _get(r, "trace_store", "analytics", default={}) or {}
    a30 = _get(ana, "30 days, all instances", "median_ms")
    add("analytics over 30 days, all instances (median ms)", a30, "< 300 ms", a30 is not None and a30 < 300)
    a1 = _get(ana, "30 days, one instance", "median_ms")
    add("analytics over 30 days, one instance (median ms)", a1, "< 300 ms", a1 is not None and a1 < 300)
    ret = _get(r, "trace_store", "retention", default={}) or {}
    add(f"retention: delete one expired day ({ret.get('deleted', '?')} rows, cutoff 23:59 UTC: the costliest hour) (ms)",
        ret.get("purge_ms"),
        "< 1000 ms", ret.get("purge_ms") is not None and ret["purge_ms"] < 1000)
    add("  webhook insert max latency during the purge (ms)", ret.get("insert_max_ms_during_purge"),
        "not blocked", None if ret.get("insert_max_ms_during_purge") is None
        else ret["insert_max_ms_during_purge"] < 1000)
    mem = lat.get("memory", {})
    add(f"worker RSS max over {lat.get('seconds', '?')} s at {lat.get('rate', 100)} msg/s (MB)",
        mem.get("max_mb"), "< 150 MB", mem.get("max_mb") is not None and mem["max_mb"] < 150)
    add("worker RSS slope after warm-up (MB/min, worst worker)", mem.get("max_slope_mb_per_min"),
        "flat", None if mem.get("max_slope_mb_per_min") is None else abs(mem["max_slope_mb_per_min"]) < 1.0)
    return rows


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown(r: dict) -> str:
    m = r.get("machine", {})
    lines = [f"# omni benchmark ({r.get('mode')}, {r.get('started_at')}, {r.get('elapsed_s')} s)", "",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gb')} GB RAM, "
             f"kernel {m.get('kernel')}, Python {m.get('python')}, PostgreSQL {m.get('postgres')}, "
             f"{m.get('wrk')}.", "",
             "| figure | value | target | met |", "|---|---|---|---|"]
    for row in r.get("targets", []):
        met = {True: "yes", False: "**NO**", None: "-"}[row["met"]]
        lines.append(f"| {row['figure']} | {_fmt(row['value'])} | {row['target']} | {met} |")
    tp = r.get("throughput")
    if tp:
        lines += ["", f"## Throughput runs (closed loop, wrk {r.get('config', {}).get('connections', 128)} "
                  "connections; medians)", "",
                  "| setup | msg/s (to final trace) | wrk req/s | ack p99 ms | CPU µs/msg by process |",
                  "|---|---|---|---|---|"]
        for name, label in (("bare", "bare Flask"), ("on", "omni all on"), ("off", "omni all off")):
            x = tp["median"][name]
            cpu = ", ".join(f"{k} {v}" for k, v in x["cpu_us_per_msg"].items())
            lines.append(f"| {label} | {_fmt(x['msgs_per_s'])} | {_fmt(x['wrk_rps'])} | "
                         f"{_fmt(x['ack_p99_ms'])} | {cpu} |")
        lines.append(f"\non/off ratios of each A/B pair: {tp['on_off_ratios']}")
    layers = r.get("layers")
    if layers:
        lines += ["", "## Telemetry cost by layer (each alone on top of all off; steady load, A B A B, medians)",
                  "", "CPU per message of the service's workers, PostgreSQL and the Loki receiver together; "
                  "\"off / this\" is the throughput ratio the layer gives when that stack alone uses the CPU.",
                  "", "| setup | msg/s offered and done | 503s | CPU µs/msg | added µs/msg | off / this | "
                  "workers / postgres / loki receiver |", "|---|---|---|---|---|---|---|"]
        for name, x in layers.items():
            label = {"off": "all off", "on": "all on"}.get(name, f"+ {name}")
            g = x["cpu_by_group"]
            lines.append(f"| {label} | {_fmt(x['msgs_per_s'])} | {x['non2xx']} | {_fmt(x['cpu_us_per_msg'])} | "
                         f"{_fmt(x['added_cpu_us_per_msg'])} | {_fmt(x['cpu_ratio_off_to_this'])} | "
                         f"{g['workers']} / {g['postgres']} / {g['loki receiver']} |")
    prof = r.get("profile")
    if prof:
        lines += ["", "## Where a worker's CPU goes (py-spy, all telemetry on)", ""]
        if "by_category" in prof:
            lines += ["| part | share | µs/msg |", "|---|---|---|"]
            for k, v in prof["by_category"].items():
                lines.append(f"| {k} | {v:.1%} | {prof['worker_cpu_us_per_msg_by_category'].get(k)} |")
            lines.append("\nBy thread: " + ", ".join(f"{k} {v:.0%}" for k, v in prof["by_thread"].items()))
        else:
            lines.append(str(prof.get("skipped") or prof.get("error")))
    lst = _get(r, "trace_store", "list", "variants")
    if lst:
        ds = r["trace_store"]["dataset"]
        lines += ["", f"## Trace list API ({ds['rows']:,} rows, {ds['table_mb']} MB with indexes; ms over HTTP)",
                  "", "| filter | first page p50 | first page p99 | cursor pages p99 | pages followed |",
                  "|---|---|---|---|---|"]
        for v in lst:
            lines.append(f"| {v['variant']} | {_fmt(v['first_p50_ms'])} | {_fmt(v['first_p99_ms'])} | "
                         f"{_fmt(v['deep_p99_ms'])} | {v['deepest_page']} |")
    ana = _get(r, "trace_store", "analytics")
    if ana:
        lines += ["", "## Analytics (ms over HTTP)", "", "| case | median | max | traces |", "|---|---|---|---|"]
        for k, v in ana.items():
            lines.append(f"| {k} | {_fmt(v['median_ms'])} | {_fmt(v['max_ms'])} | {_fmt(v['total'])} |")
    rc = r.get("receipts")
    if rc:
        lines += ["", f"## Evolution fields, replies and receipts ({rc['messages']:,} messages, batches of "
                  f"{rc['batch']}; CPU µs per message or receipt)", "", "| write | PostgreSQL µs |", "|---|---|"]
        for key, label in (("per_insert_without_new_fields", "new trace row, without the Evolution fields"),
                           ("per_insert_with_new_fields", "new trace row, with message_type, remote_jid, platform_timestamp"),
                           ("per_final_without_reply", "final state, no reply id"),
                           ("per_final_with_reply", "final state with reply id and its message_reply row"),
                           ("per_receipt", "one receipt (two per reply: delivered, read)")):
            lines.append(f"| {label} | {_fmt(rc.get('pg_us_' + key))} |")
        lines.append(f"\nWorker CPU to parse a receipt webhook and queue it: {rc['worker_us_per_receipt_parse']} µs.")
    mem = _get(r, "latency", "memory", "workers")
    if mem:
        lines += ["", "## Worker memory (RSS MB)", "", "| worker | first | last | max | slope MB/min |",
                  "|---|---|---|---|---|"]
        for w in mem:
            lines.append(f"| {w['pid']} | {w['first_mb']} | {w['last_mb']} | {w['max_mb']} | "
                         f"{w['slope_mb_per_min']} |")
    if r.get("failures"):
        lines += ["", "## Failures", ""] + [f"```\n{f}\n```" for f in r["failures"]]
    return "\n".join(lines) + "\n"
