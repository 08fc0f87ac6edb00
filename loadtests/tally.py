"""What a load run saw, classified for the verdict: mergeable across locust processes.

Each locust process records into its own `Tally`; workers ship what they gathered since
their last report to the master (`drain`), which `merge`s it. Latencies are kept as a
histogram of rounded milliseconds per phase, so percentiles of any set of phases can be
computed after the run without keeping every sample. Well-behaved answers are also kept
per second of the wall clock (`timeline`), so the spike can tell when the stack was back.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

MAX_QUEUED_TRACKED = 100_000
MAX_EXAMPLES = 20


def bucket_ms(ms: float) -> int:
    """Round a latency the way locust does: 2 significant digits above 100 ms."""
    if ms < 100:
        return round(ms)
    if ms < 1000:
        return int(round(ms, -1))
    return int(round(ms, -2))


def percentile(hist: dict[int, int], q: float) -> float:
    """The `q` quantile (0..1) of a {bucket_ms: count} histogram; 0 when empty."""
    total = sum(hist.values())
    if total == 0:
        return 0.0
    rank = max(1, math.ceil(q * total))
    seen = 0
    for ms in sorted(hist):
        seen += hist[ms]
        if seen >= rank:
            return float(ms)
    return float(max(hist))


@dataclass
class Tally:
    """Counts per phase and outcome, latency histograms, queued and delivered message ids."""

    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    latency: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    queued: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    delivered: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    phases: dict[str, list[float]] = field(default_factory=dict)  # name -> [start, end] epoch
    notes: dict[str, Any] = field(default_factory=dict)
    # epoch second -> {"ok"/"bad": count, "ms:<bucket>": count} of well-behaved answers
    timeline: dict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, phase: str, outcome: str, n: int = 1) -> None:
        with self._lock:
            self.counts[phase][outcome] += n

    def observe(self, phase: str, ms: float) -> None:
        with self._lock:
            self.latency[phase][bucket_ms(ms)] += 1

    def second(self, at: float, ok: bool, ms: float) -> None:
        """One well-behaved answer that completed at epoch `at`: good or not, and how slow."""
        with self._lock:
            sec = self.timeline[int(at)]
            sec["ok" if ok else "bad"] += 1
            sec[f"ms:{bucket_ms(ms)}"] += 1

    def example(self, text: str) -> None:
        with self._lock:
            if len(self.examples) < MAX_EXAMPLES:
                self.examples.append(text[:300])

    def queue(self, user_id: str, message_id: str) -> None:
        with self._lock:
            if sum(len(v) for v in self.queued.values()) < MAX_QUEUED_TRACKED:
                self.queued[user_id].append(message_id)

    def deliver(self, message_id: str) -> None:
        with self._lock:
            self.delivered[message_id] += 1

    # Shipping between processes and to disk.

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {
                "counts": {p: dict(c) for p, c in self.counts.items()},
                "latency": {p: {str(k): v for k, v in h.items()} for p, h in self.latency.items()},
                "queued": dict(self.queued),
                "delivered": dict(self.delivered),
                "examples": list(self.examples),
                "phases": dict(self.phases),
                "notes": dict(self.notes),
                "timeline": {str(k): dict(v) for k, v in self.timeline.items()},
            }

    def drain(self) -> dict[str, Any]:
        """Everything recorded since the last drain (a worker's report to the master)."""
        data = self.to_json()
        with self._lock:
            self.counts.clear()
            self.latency.clear()
            self.queued.clear()
            self.delivered.clear()
            self.examples.clear()
            self.timeline.clear()
        return data

    def merge(self, data: dict[str, Any] | None) -> None:
        if not data:
            return
        with self._lock:
            for phase, c in data.get("counts", {}).items():
                self.counts[phase].update(c)
            for phase, h in data.get("latency", {}).items():
                self.latency[phase].update({int(float(k)): v for k, v in h.items()})
            for user, ids in data.get("queued", {}).items():
                self.queued[user].extend(ids)
            self.delivered.update(data.get("delivered", {}))
            room = MAX_EXAMPLES - len(self.examples)
            self.examples.extend(data.get("examples", [])[: max(0, room)])
            self.phases.update(data.get("phases", {}))
            self.notes.update(data.get("notes", {}))
            for sec, c in data.get("timeline", {}).items():
                self.timeline[int(sec)].update(c)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Tally:
        tally = cls()
        tally.merge(data)
        return tally

    # Reading.

    def total(self, outcome: str, phases: list[str] | None = None) -> int:
        with self._lock:
            return sum(
                c.get(outcome, 0) for p, c in self.counts.items() if phases is None or p in phases
            )

    def hist(self, phases: list[str] | None = None) -> dict[int, int]:
        out: Counter[int] = Counter()
        with self._lock:
            for p, h in self.latency.items():
                if phases is None or p in phases:
                    out.update(h)
        return dict(out)

    def second_figures(self, sec: int) -> tuple[int, int, float]:
        """(good, bad, p99 ms) of the well-behaved answers completed in one second."""
        with self._lock:
            c = dict(self.timeline.get(sec, {}))
        hist = {int(k[3:]): n for k, n in c.items() if k.startswith("ms:")}
        return c.get("ok", 0), c.get("bad", 0), percentile(hist, 0.99)

    def phase_seconds(self, phase: str) -> float:
        start, end = self.phases.get(phase, [0.0, 0.0])
        return max(0.0, end - start)
