"""Strict JSON request parsing: UTF-8 only, no lone surrogates, bounded nesting.

json.loads alone accepts UTF-16/32 bodies, `\\ud800` escapes that no database or encoder can
store (one such webhook used to kill a worker's trace writer), and nesting deep enough to
raise RecursionError (a 500). Every failure here is a ValueError, i.e. a 400 for callers.
"""
from __future__ import annotations

import json
import re
from typing import Any

from flask.json.provider import DefaultJSONProvider

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def loads(raw: bytes | str) -> Any:
    """Parse a request body; ValueError for non-UTF-8, lone surrogates or runaway nesting."""
    text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw  # UnicodeDecodeError is a ValueError
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text):
        try:  # only lone surrogates fail: escaped pairs were already combined
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("JSON string with an unpaired surrogate escape") from None
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None
    return value


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's provider with strict `loads` (request.get_json)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads(s)
