"""A process stuck before it serves exits with its stack on stderr, so its supervisor restarts it.

The replica and the worker arm a watchdog (faulthandler's thread) when they begin starting and
disarm it once they serve. These run the real `bot serve` entry point, with the deadline made
short, once with a start-up that blocks the event loop and once with a healthy one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import structlog.testing

from bot import runtime
from bot.settings import load_settings
from infra.common import drop_queues, free_port
from tests.support import stack_env, unique

# Runs `bot serve` with a one-second deadline; HANG=1 blocks the loop during start-up, as a
# replica stuck in C code (or a synchronous call) would.
LAUNCH = """
import os, sys, time
import bot.app, bot.runtime
from bot.cli import main
bot.runtime.STARTUP_DEADLINE = 1.0
if os.environ.get("HANG"):
    async def stuck(redis):
        time.sleep(600)
    bot.app.warn_if_not_persistent = stuck
sys.exit(main(sys.argv[1:]))
"""


@contextlib.contextmanager
def _launch(redis_db: int, hang: bool) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`bot serve` in a process of its own; its queues deleted after."""
    port, metrics_port = free_port(), free_port()
    stack = stack_env(redis_db, BOT_QUEUE_PREFIX=unique("test-startup"))
    env = {**os.environ, **stack, "BOT_LOG_FORMAT": "json"}
    if hang:
        env["HANG"] = "1"
    cmd = [sys.executable, "-c", LAUNCH, "serve", "--port", str(port)]
    cmd += ["--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(
        cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        yield proc, port
    finally:
        proc.kill()
        proc.wait(timeout=20)
        drop_queues(load_settings(stack, dotenv=Path("/dev/null")))


def test_a_replica_stuck_in_start_up_exits_with_its_stack(redis_db: int) -> None:
    with _launch(redis_db, hang=True) as (proc, _):
        _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "Timeout (0:00:01)!" in err
    assert "in stuck" in err  # where it hung, for whoever reads the log


def test_a_replica_that_started_outlives_the_deadline(redis_db: int) -> None:
    with _launch(redis_db, hang=False) as (proc, port):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        time.sleep(2.5)  # well past the one-second deadline
        assert proc.poll() is None
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok


async def test_a_task_that_swallows_its_cancellation_cannot_hang_a_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`cancel_and_wait` goes on after `STOP_TIMEOUT` and logs where the task was; a task that
    ended with an error still raises it, as awaiting it would."""
    monkeypatch.setattr(runtime, "STOP_TIMEOUT", 0.2)

    deaf = [True]

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:  # what a library converting it to an error amounts to
                if not deaf[0]:
                    raise

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        await runtime.cancel_and_wait(task)
    assert time.monotonic() - started < 2
    [entry] = [e for e in logs if e["event"] == "task_did_not_stop"]
    assert entry["task"] == "stubborn" and "in stubborn" in entry["stack"], entry
    deaf[0] = False  # let the test's loop end cleanly
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    # a task that failed: its error, not a silent stop
    async def failing() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(failing())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="boom"):
        await runtime.cancel_and_wait(failed)
    # and one that stops when asked is simply awaited
    quick = asyncio.create_task(asyncio.sleep(3600))
    await runtime.cancel_and_wait(quick)
    assert quick.cancelled()
