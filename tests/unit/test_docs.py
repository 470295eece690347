"""README.md and docs/*.md point only at what exists: links, anchors, repository paths, tests."""
from __future__ import annotations

import re
from pathlib import Path

from tests.support import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A repository path in backticks, optionally naming a function or test: `app/db.py::migrate`.
PATH = re.compile(r"`((?:app|bench|demo|docs|grafana|loki|postgres|prometheus|proxy|scripts|sql|tests)"
                  r"/[\w./-]*)(?:::(\w+))?`")
# `::name` right after a path names another function of the same file.
MORE = re.compile(r"`::(\w+)`")
# Written by `make bench` and `make soak` (git-ignored), so absent from a fresh clone.
NOT_YET = {"bench/results/"}


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def _defines(path: Path, name: str) -> bool:
    return re.search(rf"^\s*(?:async def|def|class) {name}\b|^{name} = ", path.read_text(), re.M) is not None


def test_every_relative_link_and_anchor_exists():
    broken = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s), mailto
            file_part, _, anchor = target.partition("#")
            dest = (doc.parent / file_part).resolve() if file_part else doc
            if not dest.exists():
                broken.append(f"{doc.name}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


def test_every_path_and_name_in_backticks_exists():
    missing = []
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            last = None
            for token in re.finditer(rf"{PATH.pattern}|{MORE.pattern}", line):
                path, name, more = token.group(1), token.group(2), token.group(3)
                if path is not None:
                    path = path.rstrip(".")
                    if any(c in path for c in "*<{") or "NNN" in path or path in NOT_YET:
                        last = None
                        continue
                    last = ROOT / path
                    if re.fullmatch(r"sql/\d{3}", path):  # a migration by its number
                        last = next(iter(sorted(ROOT.glob(path + "_*.sql"))), last)
                    if not last.exists():
                        missing.append(f"{doc.name}: {path}")
                        last = None
                elif last is not None and last.suffix == ".py":
                    name = more
                if name and last is not None and last.suffix == ".py" and not _defines(last, name):
                    missing.append(f"{doc.name}: {last.relative_to(ROOT)}::{name}")
    assert not missing, missing


def test_no_issue_numbers_or_rounds_in_the_docs():
    for doc in DOCS:
        text = doc.read_text()
        hits = re.findall(r"(?i)\bissue ?#?\d+|\bthis round\b|\bround \d+|\bthe round\b", text)
        assert not hits, (doc.name, hits)
