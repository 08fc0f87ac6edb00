"""Per-key order inside one process: work submitted for a key runs after the key's earlier
work has finished, while different keys run side by side."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class Lanes:
    """One FIFO lane per key (a conversation)."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Task[None]] = {}

    def submit(self, key: str, work: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run `work` once everything submitted before for `key` is done. Call it before any
        await in a consumer callback, so the lane takes messages in delivery order."""
        before = self._tails.get(key)

        async def run() -> None:
            if before is not None:
                await asyncio.wait([before])  # its failure is its own
            await work()

        task = asyncio.create_task(run())
        self._tails[key] = task
        task.add_done_callback(lambda done: self._drop(key, done))
        return task

    def _drop(self, key: str, task: asyncio.Task[None]) -> None:
        if self._tails.get(key) is task:
            del self._tails[key]

    def __len__(self) -> int:
        return len(self._tails)
