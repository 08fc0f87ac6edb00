"""The benchmark's settings: the running stack's, plus `BENCH_*` from the environment."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bot.settings import Settings, load_settings, merged_environ
from infra.common import ROOT


@dataclass(frozen=True)
class BenchConfig:
    stack: Settings
    env: dict[str, str]
    duration: float
    warmup: float
    connections: int
    threads: int
    private_stacks: bool
    profile: bool
    report_root: Path

    @property
    def target(self) -> str:
        return f"http://127.0.0.1:{self.stack.public_port}"


def load_bench_config() -> BenchConfig:
    """BENCH_DURATION (s, default 10), BENCH_WARMUP (2), BENCH_CONNECTIONS (64),
    BENCH_THREADS (2), BENCH_PRIVATE_STACKS (true), BENCH_PROFILE (true), BENCH_REPORT_DIR."""
    env = merged_environ(dotenv=ROOT / ".env")
    stack = load_settings(env)

    def flag(name: str, default: bool) -> bool:
        return env.get(name, str(default)).strip().lower() in ("1", "true", "yes", "on")

    return BenchConfig(
        stack=stack,
        env=env,
        duration=float(env.get("BENCH_DURATION", "10")),
        warmup=float(env.get("BENCH_WARMUP", "2")),
        connections=int(env.get("BENCH_CONNECTIONS", "64")),
        threads=int(env.get("BENCH_THREADS", "2")),
        private_stacks=flag("BENCH_PRIVATE_STACKS", True),
        profile=flag("BENCH_PROFILE", True),
        report_root=Path(env.get("BENCH_REPORT_DIR", str(ROOT / "reports"))),
    )
