"""The machine a result was measured on."""
from __future__ import annotations

import os
import platform
import subprocess


def describe(pg_version: str) -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    try:
        wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("[")[0].strip()
    except OSError:
        wrk = None
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(),
            "memory_gb": round(mem_kb / 2**20, 1), "kernel": platform.release(),
            "os": platform.platform(), "python": platform.python_version(),
            "postgres": pg_version, "wrk": wrk, "hostname": platform.node()}
