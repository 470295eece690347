"""`python -m bench --quick` (what `make bench QUICK=1` runs) completes and writes its files.

The conftest starts it as soon as collection ends, so it runs beside the rest of the suite,
and moves this test last.

A smoke check only: it asserts that every figure is present, never how fast anything is.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest


@pytest.mark.timeout(400)
def test_bench_quick_writes_every_figure(bench_run):
    assert shutil.which("wrk"), "wrk is not installed: apt-get install wrk (make test installs it as root)"
    # Started when collection ended (tests/conftest.py), so it ran beside the other tests.
    proc = bench_run["proc"]
    try:
        proc.wait(360)
    except subprocess.TimeoutExpired:
        pytest.fail("python -m bench --quick did not finish in 6 minutes")
    out = bench_run["out"]
    stdout, stderr = (out / "stdout.txt").read_text(), (out / "stderr.txt").read_text()
    assert proc.returncode == 0, stderr[-4000:] + stdout[-2000:]
    tmp_path = out / "results"
    jsons, mds = list(tmp_path.glob("*.json")), list(tmp_path.glob("*.md"))
    assert len(jsons) == 1 and len(mds) == 1
    result = json.loads(jsons[0].read_text())
    assert result["mode"] == "quick" and not result["failures"]
    for key in ("cpu", "cores", "memory_gb", "kernel", "python", "postgres"):
        assert result["machine"][key], key
    # Every figure of the report (bench/report.py) has a value.
    figures = {row["figure"]: row["value"] for row in result["targets"]}
    assert len(figures) >= 16
    missing = [name for name, value in figures.items() if value is None]
    assert not missing, missing
    tp = result["throughput"]["median"]
    for setup in ("bare", "on", "off"):
        assert tp[setup]["msgs_per_s"] > 0
    assert result["throughput"]["on_off_ratio"] > 0
    # The cost-by-layer table: every layer measured at the steady rate.
    layers = result["layers"]
    assert set(layers) == {"off", "tracing", "metrics", "detailed logs", "detailed logs + loki", "on"}
    for name, row in layers.items():
        assert row["msgs_per_s"] > 0 and row["cpu_us_per_msg"] > 0, name
    assert layers["tracing"]["cpu_by_group"]["postgres"] > 0  # traces were really written
    assert result["latency"]["memory"]["workers"]
    assert len(result["trace_store"]["list"]["variants"]) >= 9  # each filter alone and combined
    assert all(v["first_p99_ms"] > 0 for v in result["trace_store"]["list"]["variants"])
    assert result["trace_store"]["retention"]["deleted"] > 0
    assert "analytics" in result["trace_store"]
    rc = result["receipts"]
    assert rc["replies_read"] == rc["messages"]  # every reply got its row and both receipts
    assert all(rc[k] is not None for k in rc if k.startswith("pg_us_"))
    # The Markdown table carries every figure and the machine.
    md = mds[0].read_text()
    assert "| figure | value | target | met |" in md and result["machine"]["cpu"] in md
    for name in figures:
        assert name in md
    assert "| figure | value | target | met |" in stdout
