"""Load-test settings: the stack's own settings plus ``LOAD_*`` knobs, read once.

The target comes from the same settings `make up` uses (`BOT_PUBLIC_PORT`, `BOT_STUB_PORT`,
`BOT_PROMETHEUS_PORT`...), so pointing a load test at a private stack is a matter of
exporting its ports. Every target is on 127.0.0.1: anything else is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlparse

from bot.settings import Settings, load_settings, merged_environ

SCENARIOS = (
    "steady",
    "spike",
    "ramp",
    "abuse",
    "outage",
    "soak",
    "hostile",
    "webchat",
    "channels",
)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# The hostile scenario's clients (loadtests/hostile.py), each from its own address.
HOSTILE_KINDS = (
    "bad_params",
    "long_polls",
    "duplicates",
    "malformed",
    "big_headers",
    "odd_methods",
    "rotating_ids",
    "slow_bodies",
)


class ConfigError(ValueError):
    """A load-test setting has a value we cannot run with."""


@dataclass(frozen=True, slots=True)
class Objectives:
    """What a scenario promises; each becomes one pass/fail check of the verdict."""

    p99_ms: float = 1500.0  # p99 of answered requests (inbox long-polls excluded)
    max_shed_share: float = 0.01  # 503 `overloaded` answers, as a share of all requests
    max_no_json: int = 0  # requests without a JSON answer (connection errors, HTML, timeouts)
    max_other_5xx: int = 0  # any 5xx that is not an `overloaded` shed with Retry-After
    max_normal_limited: int = 0  # 429s seen by well-behaved users
    min_abuse_limited: int = 1  # abuse: the spammers must actually be limited
    exactly_once: bool = False  # outage: every 202'd message delivered exactly once
    min_queued: int = 0  # outage: the outage must actually have queued messages
    max_mem_growth_mb: float = 25.0  # soak: growth of a process's RSS after warm-up...
    max_mem_growth_share: float = 0.2  # ...and relative to its size (both must be exceeded)
    min_knee_rps: float = 0.0  # ramp: the knee must be at least this many answers/s
    min_success_share: float = 0.0  # hostile: well-behaved requests answered 200/202
    max_gateway_errors: int = 0  # 502/504 to anyone (hostile and surge clients included)
    max_recovery_s: float = 10.0  # spike: seconds after the overload until back in objective
    recovery_p99_ms: float = 1500.0  # spike: "back" means within the steady scenario's p99
    min_streams_share: float = 0.0  # webchat: share of the idle streams held to the end
    ordered_once: bool = False  # channels: every acked message answered once, in chat order


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """Everything a scenario run needs, from the environment, then `.env`, then defaults."""

    scenario: str
    stack: Settings
    target: str  # NGINX, e.g. http://127.0.0.1:8080
    stub: str  # the upstream stub's admin API
    prometheus: str
    api_key: str
    users: int  # users in steady state (baseline of spike/ramp)
    spawn_rate: float
    duration: float  # seconds of the main phase (steady, abuse, outage, soak)
    user_interval: float  # seconds between two messages of one user (constant pacing)
    spike_factor: float
    spike_baseline: float
    spike_rise: float
    spike_hold: float
    spike_recovery: float
    spike_between: float  # seconds at the baseline between the hold and the overload
    spike_overload: float  # seconds of the phase past the stack's capacity (0: none)
    spike_overload_users: int  # closed-loop users of that phase
    hostile_calm: float  # hostile: seconds of well-behaved traffic alone, before and after
    hostile_long_polls: int  # hostile: concurrent `wait=30` polls from one address
    webchat_streams: int  # webchat: idle event streams held beside the steady load
    webchat_open: float  # webchat: seconds over which they open (before the judged phase)
    hostile_rate: float  # hostile: requests/s of each paced hostile client
    channels_chats: int  # channels: chats writing at once (the spike)
    channels_messages: int  # channels: messages each chat sends, one after the other
    discord_signing_key: str  # channels: hex seed of the key DISCORD_PUBLIC_KEY verifies
    hostile_duplicates: int  # hostile: concurrent copies of one message_id in a flood
    hostile_slow_bodies: int  # hostile: concurrent clients dribbling their bodies
    hostile_kinds: tuple[str, ...]  # hostile: which kinds of hostile client run (empty: all)
    ramp_step_users: int
    ramp_step_seconds: float
    ramp_max_users: int
    ramp_user_interval: float
    abusers: int
    abuser_rate: float  # messages/s of one abusive user
    outage_start: float
    outage_length: float
    delivery_timeout: float  # outage: how long to wait for deferred replies after the run
    mem_interval: float  # seconds between two memory samples
    questions: int  # size of the question pool (Zipf-like popularity)
    zipf_s: float
    unique_question_share: float  # long tail: questions nobody asked before
    processes: int  # locust processes (1 = local runner; >1 = master + workers)
    timeout: float  # client timeout of one request
    report_root: str
    objectives: Objectives = field(default_factory=Objectives)

    @property
    def target_address(self) -> tuple[str, int]:
        """NGINX's host and port, for the scenarios that speak HTTP over raw sockets."""
        url = urlparse(self.target)
        return url.hostname or "127.0.0.1", url.port or 80

    def public(self) -> dict[str, Any]:
        """The settings worth printing in a report (no secrets)."""
        out = {
            k: getattr(self, k)
            for k in self.__slots__
            if k not in ("stack", "api_key", "objectives", "discord_signing_key")
        }
        out["objectives"] = {k: getattr(self.objectives, k) for k in self.objectives.__slots__}
        return out


# Per-scenario defaults that fit a 2-core machine shared with the stack it loads.
_SCENARIO_DEFAULTS: dict[str, dict[str, Any]] = {
    "steady": {"duration": 60.0, "objectives": {"p99_ms": 1500.0}},
    # 30 users at one message a second (each standing for several people), then 300.
    "spike": {
        "users": 30,
        "user_interval": 1.0,
        "objectives": {"p99_ms": 3000.0, "max_shed_share": 0.05},
    },
    "ramp": {"users": 20, "objectives": {"p99_ms": 1500.0, "min_knee_rps": 20.0}},
    "abuse": {"duration": 60.0, "objectives": {"p99_ms": 1500.0}},
    "outage": {
        "duration": 60.0,
        # Cached questions are answered stale during the outage: more new ones, more 202s.
        "unique_question_share": 0.3,
        "objectives": {"p99_ms": 2500.0, "exactly_once": True, "min_queued": 1},
    },
    "soak": {"duration": 600.0, "objectives": {"p99_ms": 1500.0}},
    # Judged on the steady objective: hostile clients must not cost the others anything.
    "hostile": {"duration": 60.0, "objectives": {"p99_ms": 1500.0, "min_success_share": 0.999}},
    # Judged on the steady objective too: idle web chat streams must not cost messages anything.
    "webchat": {"duration": 60.0, "objectives": {"p99_ms": 1500.0, "min_streams_share": 0.99}},
    # Every chat at once, each message as soon as the one before was acked: Telegram's 1 s
    # ack is the objective; then every answer once, in order, from the stub's record.
    "channels": {
        "duration": 30.0,
        "user_interval": 0.05,
        "delivery_timeout": 120.0,
        "objectives": {"p99_ms": 1000.0, "ordered_once": True},
    },
}
STEADY_P99_MS: float = _SCENARIO_DEFAULTS["steady"]["objectives"]["p99_ms"]

_OBJECTIVE_ENV = {
    "LOAD_P99_MS": "p99_ms",
    "LOAD_MAX_SHED_SHARE": "max_shed_share",
    "LOAD_MAX_NO_JSON": "max_no_json",
    "LOAD_MAX_OTHER_5XX": "max_other_5xx",
    "LOAD_MAX_NORMAL_LIMITED": "max_normal_limited",
    "LOAD_SOAK_MAX_GROWTH_MB": "max_mem_growth_mb",
    "LOAD_SOAK_MAX_GROWTH_SHARE": "max_mem_growth_share",
    "LOAD_RAMP_MIN_RPS": "min_knee_rps",
    "LOAD_MIN_SUCCESS_SHARE": "min_success_share",
    "LOAD_MAX_GATEWAY_ERRORS": "max_gateway_errors",
    "LOAD_MAX_RECOVERY_S": "max_recovery_s",
    "LOAD_MIN_STREAMS_SHARE": "min_streams_share",
}


def _loopback(url: str, name: str) -> str:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK:
        raise ConfigError(f"{name}={url!r}: load is only ever sent to 127.0.0.1")
    return url.rstrip("/")


def _hostile_kinds(raw: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = sorted(set(names) - set(HOSTILE_KINDS))
    if unknown:
        raise ValueError(f"unknown {', '.join(unknown)}; of {', '.join(HOSTILE_KINDS)}")
    return names


def _hex_seed(raw: str) -> str:
    if len(raw) != 64 or not all(c in "0123456789abcdefABCDEF" for c in raw):
        raise ValueError("expected the 32-byte Ed25519 seed as 64 hex digits")
    return raw


def load_config(scenario: str, environ: Mapping[str, str] | None = None) -> LoadConfig:
    """Build the configuration of one scenario run."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
    env = merged_environ(environ)
    stack = load_settings(env)
    defaults = _SCENARIO_DEFAULTS[scenario]

    def get(name: str, parse: Callable[[str], Any], default: Any) -> Any:
        raw = env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return parse(raw)
        except ValueError as exc:
            raise ConfigError(f"invalid setting {name}={raw!r}: {exc}") from None

    objectives = Objectives(**defaults.get("objectives", {}), recovery_p99_ms=STEADY_P99_MS)
    for var, attr in _OBJECTIVE_ENV.items():
        kind = type(getattr(objectives, attr))
        objectives = replace(objectives, **{attr: get(var, kind, getattr(objectives, attr))})

    api_keys = stack.api_keys
    return LoadConfig(
        scenario=scenario,
        stack=stack,
        target=_loopback(
            get("LOAD_TARGET_URL", str, f"http://127.0.0.1:{stack.public_port}"),
            "LOAD_TARGET_URL",
        ),
        stub=_loopback(f"http://127.0.0.1:{stack.stub_port}", "BOT_STUB_PORT"),
        prometheus=_loopback(
            get("LOAD_PROMETHEUS_URL", str, f"http://127.0.0.1:{stack.prometheus_port}"),
            "LOAD_PROMETHEUS_URL",
        ),
        api_key=get("LOAD_API_KEY", str, api_keys[0].key if api_keys else ""),
        users=get("LOAD_USERS", int, defaults.get("users", 30)),
        spawn_rate=get("LOAD_SPAWN_RATE", float, 10.0),
        duration=get("LOAD_DURATION", float, defaults.get("duration", 60.0)),
        user_interval=get("LOAD_USER_INTERVAL", float, defaults.get("user_interval", 3.0)),
        spike_factor=get("LOAD_SPIKE_FACTOR", float, 10.0),
        spike_baseline=get("LOAD_SPIKE_BASELINE", float, 20.0),
        spike_rise=get("LOAD_SPIKE_RISE", float, 10.0),
        spike_hold=get("LOAD_SPIKE_HOLD", float, 30.0),
        spike_recovery=get("LOAD_SPIKE_RECOVERY", float, 20.0),
        spike_between=get("LOAD_SPIKE_BETWEEN", float, 10.0),
        spike_overload=get("LOAD_SPIKE_OVERLOAD", float, 20.0),
        # Three times what the stack can hold in flight: past capacity whatever its speed.
        spike_overload_users=get(
            "LOAD_SPIKE_OVERLOAD_USERS", int, 3 * stack.replicas * stack.max_inflight
        ),
        hostile_calm=get("LOAD_HOSTILE_CALM", float, 15.0),
        hostile_long_polls=get("LOAD_HOSTILE_LONG_POLLS", int, stack.edge_conn),
        webchat_streams=get("LOAD_WEBCHAT_STREAMS", int, 2000),
        webchat_open=get("LOAD_WEBCHAT_OPEN", float, 20.0),
        hostile_rate=get("LOAD_HOSTILE_RATE", float, 20.0),
        channels_chats=get("LOAD_CHANNELS_CHATS", int, 200),
        channels_messages=get("LOAD_CHANNELS_MESSAGES", int, 5),
        discord_signing_key=get("LOAD_DISCORD_SIGNING_KEY", _hex_seed, ""),
        hostile_duplicates=get("LOAD_HOSTILE_DUPLICATES", int, 50),
        hostile_slow_bodies=get("LOAD_HOSTILE_SLOW_BODIES", int, 20),
        hostile_kinds=get("LOAD_HOSTILE_KINDS", _hostile_kinds, ()),
        ramp_step_users=get("LOAD_RAMP_STEP_USERS", int, 50),
        ramp_step_seconds=get("LOAD_RAMP_STEP_SECONDS", float, 10.0),
        ramp_max_users=get("LOAD_RAMP_MAX_USERS", int, 1000),
        ramp_user_interval=get("LOAD_RAMP_USER_INTERVAL", float, 0.5),
        abusers=get("LOAD_ABUSERS", int, 3),
        abuser_rate=get("LOAD_ABUSER_RATE", float, 10.0),
        outage_start=get("LOAD_OUTAGE_START", float, 20.0),
        outage_length=get("LOAD_OUTAGE_LENGTH", float, 20.0),
        delivery_timeout=get(
            "LOAD_DELIVERY_TIMEOUT", float, defaults.get("delivery_timeout", 120.0)
        ),
        mem_interval=get("LOAD_MEM_INTERVAL", float, 5.0),
        questions=get("LOAD_QUESTIONS", int, 200),
        zipf_s=get("LOAD_ZIPF_S", float, 1.1),
        unique_question_share=get(
            "LOAD_UNIQUE_QUESTION_SHARE", float, defaults.get("unique_question_share", 0.1)
        ),
        processes=get("LOAD_PROCESSES", int, 1),
        timeout=get("LOAD_TIMEOUT", float, 30.0),
        report_root=get("LOAD_REPORT_DIR", str, "reports"),
        objectives=objectives,
    )
