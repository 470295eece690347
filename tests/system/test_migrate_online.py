"""Migrations applied to a running gateway (bench/migrate_online.py), small: the old release
serves webhooks at 100 msg/s on 20,000 traces while `python -m app migrate` applies the newest
migrations, then this tree's code serves beside it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.fault
@pytest.mark.timeout(300)
def test_newest_migrations_apply_under_traffic_without_refusing_a_webhook(tmp_path):
    """Exit 0; the newest migrations applied; webhooks answered during the migration, none
    refused by the old code or the new one; every message finished."""
    proc = subprocess.run([sys.executable, "-m", "bench.migrate_online", "--traces", "20000", "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=290)
    results = sorted(tmp_path.glob("migrate-online-*Z.json"))
    assert results, f"no result (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    r = json.loads(results[-1].read_text())
    assert proc.returncode == 0, (r["failed"], proc.stderr[-2000:])
    assert r["failed"] == []
    assert r["migration"]["rc"] == 0
    assert r["applied"] == r["newest"] and "009_evolution_traffic.sql" in r["applied"]
    assert set(r["newest"]) <= set(r["schema_versions"])
    assert r["dataset"]["rows"] >= 19_000
    assert r["during"]["webhooks"] > 0, "no webhook overlapped the migration"
    for phase in ("before", "during", "after", "new_code", "old_code_side_by_side"):
        assert r[phase]["refused"] == 0, (phase, r[phase])
    assert r["new_code"]["webhooks"] > 0 and r["all_old"]["webhooks"] > 500
    assert r["left_processing"] == 0
    assert r["released_files_changed"] == []
