"""A process stuck before it serves exits with its stack on stderr, so its supervisor restarts it.

The replica and the worker arm a watchdog (faulthandler's thread) when they begin starting and
disarm it once they serve. These run the real `bot serve` entry point, with the deadline made
short, once with a start-up that blocks the event loop and once with a healthy one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import requests

from infra.common import free_port
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


def _launch(redis_db: int, hang: bool) -> tuple[subprocess.Popen[str], int]:
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        **stack_env(redis_db, BOT_QUEUE_PREFIX=unique("test-startup")),
        "BOT_LOG_FORMAT": "json",
    }
    if hang:
        env["HANG"] = "1"
    cmd = [sys.executable, "-c", LAUNCH, "serve", "--port", str(port)]
    cmd += ["--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(
        cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    return proc, port


def test_a_replica_stuck_in_start_up_exits_with_its_stack(redis_db: int) -> None:
    proc, _ = _launch(redis_db, hang=True)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "Timeout (0:00:01)!" in err
    assert "in stuck" in err  # where it hung, for whoever reads the log


def test_a_replica_that_started_outlives_the_deadline(redis_db: int) -> None:
    proc, port = _launch(redis_db, hang=False)
    try:
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
    finally:
        proc.terminate()
        proc.wait(timeout=20)
