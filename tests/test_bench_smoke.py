"""`python -m bench --quick` (what `make bench QUICK=1` runs) completes and writes its files.

A smoke check only: it asserts that every figure is present, never how fast anything is.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(400)
def test_bench_quick_writes_every_figure(tmp_path):
    assert shutil.which("wrk"), "wrk is not installed: apt-get install wrk (make test installs it as root)"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    jsons, mds = list(tmp_path.glob("*.json")), list(tmp_path.glob("*.md"))
    assert len(jsons) == 1 and len(mds) == 1
    result = json.loads(jsons[0].read_text())
    assert result["mode"] == "quick" and not result["failures"]
    for key in ("cpu", "cores", "memory_gb", "kernel", "python", "postgres"):
        assert result["machine"][key], key
    # Every figure of issue 5 has a value.
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
    # The Markdown table carries every figure and the machine.
    md = mds[0].read_text()
    assert "| figure | value | target | met |" in md and result["machine"]["cpu"] in md
    for name in figures:
        assert name in md
    assert "| figure | value | target | met |" in proc.stdout
