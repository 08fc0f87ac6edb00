"""Schemathesis hooks for tests/test_schemathesis.py (loaded through `SCHEMATHESIS_HOOKS`).

A generated `wait` is a long poll of up to 30 s on an empty inbox: a few of them would spend
the whole time budget. Valid waits are scaled down to under half a second, still above zero,
so the long-poll path is exercised; invalid ones (negative, over 30, not numbers) are left as
they are, so negative cases stay negative.
"""

from __future__ import annotations

import re
from typing import Any

import schemathesis

_MAX_WAIT = 30
_SCALE = 60
# The coverage phase hands query values over already serialized.
_PLAIN_NUMBER = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")


def _scaled(wait: float) -> float | None:
    """`wait` shortened when it is valid (0 < wait <= 30), else None."""
    return (round(wait / _SCALE, 3) or 0.001) if 0 < wait <= _MAX_WAIT else None


def _shorter(wait: object) -> object:
    if isinstance(wait, str) and _PLAIN_NUMBER.fullmatch(wait):
        scaled = _scaled(float(wait))
        return wait if scaled is None else str(scaled)
    if isinstance(wait, int | float) and not isinstance(wait, bool):
        scaled = _scaled(wait)
        return wait if scaled is None else scaled
    return wait


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    """Shorten a valid `wait`; leave everything else as generated (every phase calls this)."""
    if isinstance(case.query, dict) and "wait" in case.query:
        case.query["wait"] = _shorter(case.query["wait"])
    return case
