"""py-spy on replica 1 under load, and where its CPU went (from py-spy's raw stacks)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.common import VENV_BIN


def record(pid: int, seconds: int, out: Path, load: Callable[[int], object]) -> dict[str, Any]:
    """Record `pid` with py-spy for `seconds` while `load(seconds)` sends traffic."""
    spy = shutil.which("py-spy", path=str(VENV_BIN)) or shutil.which("py-spy")
    if not spy or not pid:
        return {"skipped": "py-spy or replica 1 not found"}
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "100", "-f", "raw"]
    cmd += ["-o", str(out), "--nonblocking"]
    spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    load(seconds)
    _, err = spy_proc.communicate(timeout=60)
    if not out.exists():
        return {"skipped": f"py-spy failed: {err.decode()[-300:]}"}
    return {"file": str(out), **top_frames(out.read_text())}


def top_frames(raw: str, n: int = 12) -> dict[str, Any]:
    """Where replica 1's CPU went, from py-spy's raw (collapsed) stacks.

    `by_component`: each sample charged to the deepest frame outside the standard library
    (a send() inside asyncio's streams is the Redis client's or aiohttp's cost), named by
    package, or by module inside `bot`; `bot_inclusive`: the bot's own functions with
    everything they call; `self`: the leaf functions.
    """
    own: Counter[str] = Counter()
    component: Counter[str] = Counter()
    bot: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        total += k
        frames = stack.split(";")
        own[_frame(frames[-1])] += k
        component[next((c for c in map(_component, reversed(frames)) if c), "event loop")] += k
        for f in {_frame(f) for f in frames if "(bot/" in f and "cli.py" not in f}:
            bot[f] += k

    def top(c: Counter[str]) -> list[list[Any]]:
        return [[f, round(v / max(1, total), 3)] for f, v in c.most_common(n)]

    return {
        "samples": total,
        "by_component": top(component),
        "bot_inclusive": top(bot),
        "self": top(own),
    }


_STDLIB = ("asyncio/", "typing", "uuid", "abc", "enum", "functools", "contextlib", "<frozen")


def _component(frame: str) -> str | None:
    """`redis`, `aiohttp`, `bot.api.middleware`...; None for the standard library."""
    where = frame.partition(" (")[2].rpartition(":")[0]
    if not where or where.startswith(_STDLIB) or "/" not in where:
        return None
    top, _, rest = where.partition("/")
    if top == "bot" and rest in ("serve.py", "cli.py"):
        return None  # the process's root frames: their own time is the event loop's
    if top == "bot":
        return "bot." + rest.removesuffix(".py").replace("/", ".")
    if top in ("uvloop", "runpy"):
        return None
    return top


def _frame(f: str) -> str:
    # "func (path/to/module.py:123)" -> "func (path/to/module.py)"
    name, _, where = f.partition(" (")
    return f"{name} ({where.rstrip(')').rpartition(':')[0]})" if where else name
