"""Scenario plans: how many users at which second, and the phase each second belongs to.

Plain objects (no locust import) so they are unit-testable; the locustfile wraps the chosen
one in its single `LoadTestShape`.
"""

from __future__ import annotations

from dataclasses import dataclass

from loadtests.config import LoadConfig

# Phases the verdict looks for by name.
OVERLOAD = "overload"
RECOVERY = "recovery"
ATTACK = "attack"
AFTER = "after"
STREAMS_OPEN = "streams-open"  # webchat: the idle streams opening (not judged)


@dataclass(frozen=True)
class Step:
    users: int  # normal users
    spawn_rate: float
    phase: str
    abusers: int = 0
    outage: bool | None = None  # set the stub's outage fault to this on entering the phase
    surge: int = 0  # closed-loop users past the stack's capacity (spike's overload phase)
    hostile: bool = False  # hostile clients run beside the users (hostile's attack phase)
    streams: bool = False  # webchat: the idle event streams are held beside the users


class Plan:
    """A scenario's timeline; `at(t)` is None once it is over."""

    def __init__(self, cfg: LoadConfig) -> None:
        self.cfg = cfg

    def at(self, t: float) -> Step | None:
        raise NotImplementedError

    @property
    def length(self) -> float:
        """Seconds the plan runs at most."""
        return self.cfg.duration


class Steady(Plan):
    """`users` for `duration` seconds (also the soak: just longer)."""

    def at(self, t: float) -> Step | None:
        if t >= self.cfg.duration:
            return None
        return Step(self.cfg.users, self.cfg.spawn_rate, "run")


class Spike(Plan):
    """Baseline, then `spike_factor` times the users within `spike_rise`, held, and back
    (`between`); then an `overload` of closed-loop users past the stack's capacity; then
    the baseline again (`recovery`).

    The hold is a spike the stack absorbs; the overload is one it cannot, so that the run
    shows how it sheds and how fast it recovers once the surge ends. (The baseline between
    them is also what lets locust add the surge: it adds `fixed_count` users only after it
    removed some.)
    """

    def at(self, t: float) -> Step | None:
        c = self.cfg
        base = c.users
        peak = max(base + 1, round(base * c.spike_factor))
        rise_rate = (peak - base) / max(1.0, c.spike_rise)
        down_rate = max(rise_rate, 100.0)
        plan = [
            (c.spike_baseline, Step(base, c.spawn_rate, "baseline")),
            (c.spike_rise, Step(peak, rise_rate, "rise")),
            (c.spike_hold, Step(peak, rise_rate, "hold")),
        ]
        if c.spike_overload:
            surge = c.spike_overload_users
            plan += [
                (c.spike_between, Step(base, down_rate, "between")),
                # The surge arrives within two seconds: a spike, not a ramp.
                (c.spike_overload, Step(base, max(down_rate, surge / 2), OVERLOAD, surge=surge)),
            ]
        plan.append((c.spike_recovery, Step(base, down_rate, RECOVERY)))
        end = 0.0
        for seconds, step in plan:
            end += seconds
            if t < end:
                return step
        return None

    @property
    def length(self) -> float:
        c = self.cfg
        total = c.spike_baseline + c.spike_rise + c.spike_hold + c.spike_recovery
        return total + (c.spike_between + c.spike_overload if c.spike_overload else 0.0)


class Ramp(Plan):
    """Step up by `ramp_step_users` every `ramp_step_seconds` until `ramp_max_users`."""

    def at(self, t: float) -> Step | None:
        c = self.cfg
        n = int(t // c.ramp_step_seconds) + 1
        users = c.users + (n - 1) * c.ramp_step_users
        if users > c.ramp_max_users:
            return None
        rate = max(c.spawn_rate, c.ramp_step_users / 2)
        return Step(users, rate, f"step-{n}")

    @property
    def length(self) -> float:
        c = self.cfg
        steps = (c.ramp_max_users - c.users) // max(1, c.ramp_step_users) + 1
        return steps * c.ramp_step_seconds


class Abuse(Plan):
    """Normal users beside `abusers` spammers, each far beyond its rate limit."""

    def at(self, t: float) -> Step | None:
        if t >= self.cfg.duration:
            return None
        return Step(self.cfg.users, self.cfg.spawn_rate, "run", abusers=self.cfg.abusers)


class Outage(Plan):
    """The upstream stub fails completely from `outage_start` for `outage_length` seconds."""

    def at(self, t: float) -> Step | None:
        c = self.cfg
        if t >= c.duration:
            return None
        if t < c.outage_start:
            return Step(c.users, c.spawn_rate, "before", outage=False)
        if t < c.outage_start + c.outage_length:
            return Step(c.users, c.spawn_rate, "outage", outage=True)
        return Step(c.users, c.spawn_rate, "after", outage=False)


class Hostile(Plan):
    """Well-behaved users alone (`calm`), beside hostile clients for `duration` seconds
    (`attack`), then alone again (`after`: the stack must serve normally once they stop)."""

    def at(self, t: float) -> Step | None:
        c = self.cfg
        if t < c.hostile_calm:
            return Step(c.users, c.spawn_rate, "calm")
        if t < c.hostile_calm + c.duration:
            return Step(c.users, c.spawn_rate, ATTACK, hostile=True)
        if t < self.length:
            return Step(c.users, c.spawn_rate, AFTER)
        return None

    @property
    def length(self) -> float:
        return 2 * self.cfg.hostile_calm + self.cfg.duration


class Webchat(Plan):
    """Idle web chat streams opening beside the users (`open`, over `webchat_open` seconds
    plus a margin), then held while the users run for `duration` seconds (`run`, judged)."""

    def at(self, t: float) -> Step | None:
        c = self.cfg
        if t < self.opening:
            return Step(c.users, c.spawn_rate, STREAMS_OPEN, streams=True)
        if t < self.length:
            return Step(c.users, c.spawn_rate, "run", streams=True)
        return None

    @property
    def opening(self) -> float:
        return self.cfg.webchat_open + 5.0

    @property
    def length(self) -> float:
        return self.opening + self.cfg.duration


class Channels(Plan):
    """`channels_chats` chats arriving within two seconds (the spike), each sending its
    messages; `duration` bounds the phase (the verdict waits for the answers after it)."""

    def at(self, t: float) -> Step | None:
        c = self.cfg
        if t >= c.duration:
            return None
        return Step(c.channels_chats, max(1.0, c.channels_chats / 2), "spike")


PLANS: dict[str, type[Plan]] = {
    "steady": Steady,
    "soak": Steady,
    "spike": Spike,
    "ramp": Ramp,
    "abuse": Abuse,
    "outage": Outage,
    "hostile": Hostile,
    "webchat": Webchat,
    "channels": Channels,
}


def plan_for(cfg: LoadConfig) -> Plan:
    return PLANS[cfg.scenario](cfg)
