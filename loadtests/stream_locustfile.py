"""Users that ask for streamed answers (`Accept: text/event-stream`), for locust.

Run through `python -m loadtests.stream` (which sets LOAD_STREAM_RESULTS), not by hand. Each
user asks a question never asked before (so every answer is a real upstream call, streamed)
and times three moments of the answer from the moment it sent the request: the first byte of
the response, the first `delta` event and the `done` event (the last byte). Locust's own
statistics get them as requests of type `SSE` named `first byte`, `first delta` and
`last byte`; the raw times go to LOAD_STREAM_RESULTS (one JSON object a line) for the runner.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import IO, Any

import orjson
from locust import HttpUser, constant, events, task

_RESULTS: dict[str, IO[bytes]] = {}


def _out() -> IO[bytes] | None:
    path = os.environ.get("LOAD_STREAM_RESULTS")
    if path and "file" not in _RESULTS:
        _RESULTS["file"] = Path(path).open("ab", buffering=0)  # noqa: SIM115 - closed on quit
    return _RESULTS.get("file")


class StreamUser(HttpUser):
    """Asks one new question at a time and reads its answer as it streams."""

    wait_time = constant(0.1)

    def on_start(self) -> None:
        self.user = f"stream-{uuid.uuid4().hex[:12]}"

    @task
    def ask(self) -> None:
        text = f"tell me about star {uuid.uuid4().hex[:8]} and its planets"
        started = time.perf_counter()
        marks: dict[str, float] = {}
        status, error = 0, ""
        try:
            with self.client.post(
                "/v1/messages",
                json={"user_id": self.user, "text": text},
                headers={"Accept": "text/event-stream"},
                stream=True,
                catch_response=True,
                name="POST /v1/messages (stream)",
                timeout=120,
            ) as resp:
                status = resp.status_code
                for line in resp.iter_lines(chunk_size=None):
                    marks.setdefault("first byte", time.perf_counter())
                    if line.startswith(b"event: delta"):
                        marks.setdefault("first delta", time.perf_counter())
                    elif line.startswith(b"event: done"):
                        marks["done"] = time.perf_counter()
                marks["last byte"] = time.perf_counter()
                if status != 200 or "done" not in marks:
                    error = f"status {status}, done event {'done' in marks}"
                    resp.failure(error)
                else:
                    resp.success()
        except Exception as exc:  # a load test counts every failure
            error = type(exc).__name__
        ms = {k: (v - started) * 1000 for k, v in marks.items()}
        for name in ("first byte", "first delta", "last byte"):
            if name in ms and not error:
                events.request.fire(
                    request_type="SSE",
                    name=name,
                    response_time=ms[name],
                    response_length=0,
                    exception=None,
                    context={},
                )
        out = _out()
        if out is not None:
            out.write(orjson.dumps({"status": status, "error": error, **ms}) + b"\n")


@events.quitting.add_listener
def _close(**_: Any) -> None:
    if "file" in _RESULTS:
        _RESULTS.pop("file").close()
