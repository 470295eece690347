#!/usr/bin/env python3
"""Build grafana/dashboards/omni-runbooks.json from docs/runbooks.md.

Every `## ` section of the runbooks becomes one text panel; panel n is the n-th section, so
an alert's runbook_url is `<Grafana root URL>d/omni-runbooks/omni-runbooks?viewPanel=panel-n`
and opens that section alone, inside the stack, without network access. Run it after
editing docs/runbooks.md; tests/system/test_stack_config.py fails while the two differ.

    python3 scripts/runbooks-dashboard.py          # rewrite the dashboard
    python3 scripts/runbooks-dashboard.py --check  # exit 1 if it is out of date
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "docs" / "runbooks.md"
TARGET = ROOT / "grafana" / "dashboards" / "omni-runbooks.json"
UID = "omni-runbooks"
PANEL_HEIGHT = 14   # grid units; a section scrolls inside its panel


def sections(markdown: str) -> list[tuple[str, str]]:
    """(title, body) of every `## ` section, in order; the body keeps its heading."""
    found: list[tuple[str, list[str]]] = []
    for line in markdown.splitlines():
        if line.startswith("## "):
            found.append((line[3:].strip(), [line]))
        elif found:
            found[-1][1].append(line)
    return [(title, "\n".join(lines).strip() + "\n") for title, lines in found]


def dashboard(markdown: str) -> dict:
    panels = []
    for n, (title, body) in enumerate(sections(markdown), start=1):
        panels.append({
            "id": n, "type": "text", "title": title,
            "gridPos": {"h": PANEL_HEIGHT, "w": 24, "x": 0, "y": (n - 1) * PANEL_HEIGHT},
            "options": {"mode": "markdown", "content": body},
        })
    return {
        "uid": UID, "title": "Omni runbooks",
        "description": "One panel per alert runbook (built from docs/runbooks.md); alert runbook_url links open one panel.",
        "tags": ["omni"], "timezone": "browser", "editable": False, "schemaVersion": 41,
        "version": 1, "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "templating": {"list": []}, "annotations": {"list": []},
        "links": [{"title": "Omni dashboards", "type": "dashboards", "tags": ["omni"],
                   "asDropdown": True, "includeVars": False, "keepTime": True}],
        "panels": panels,
    }


def render(markdown: str) -> str:
    return json.dumps(dashboard(markdown), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render(SOURCE.read_text())
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is out of date: run scripts/runbooks-dashboard.py",
                  file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
