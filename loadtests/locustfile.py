"""Users of the bot stack for locust, and the one load shape that plays the chosen scenario.

Run through `python -m loadtests.run SCENARIO` (which sets LOAD_SCENARIO and LOAD_RUN_DIR),
not by hand. Every user has its own `user_id` and sends fresh `message_id`s: a mix of
`/echo`, questions of Zipf-like popularity (so the answer cache matters; a share of them
never asked before), `/prefs` and `/help`; after a 202 it polls its inbox until the reply
arrives. Abusers send far beyond their rate limit; the spike's surge users ask without
pause, past what the stack can hold; the hostile scenario's clients (`loadtests.hostile`) and
the webchat scenario's idle event streams (`loadtests.webchat`) run in the process that plays
the shape. Each answer is classified for the verdict
(`loadtests.slo`) into a `Tally` that workers ship to the master.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
from locust import LoadTestShape, User, events
from locust.contrib.fasthttp import FastHttpUser, ResponseContextManager
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtests import channels, slo
from loadtests.config import LoadConfig, load_config
from loadtests.hostile import HostileClients
from loadtests.shapes import plan_for
from loadtests.tally import Tally
from loadtests.webchat import IdleStreams

CONFIG: LoadConfig = load_config(os.environ.get("LOAD_SCENARIO", "steady"))
TALLY = Tally()
_STATE: dict[str, Any] = {"phase": "start"}
POLL_WAIT = 2  # seconds an inbox poll may wait for a reply (long poll)
POLL_GIVE_UP = 60.0  # a user stops polling for a reply after this long; the run checks later

# Zipf-like popularity over the question pool: question k is asked ~ 1/k^s as often.
_CUM_WEIGHTS = list(
    itertools.accumulate(1 / (k**CONFIG.zipf_s) for k in range(1, CONFIG.questions + 1))
)
_TOPICS = ["pulsar", "quasar", "neutron star", "black hole", "comet", "nebula", "magnetar"]


def question(unique_share: float = CONFIG.unique_question_share) -> str:
    if random.random() < unique_share:
        return f"what happened to object {uuid.uuid4().hex[:10]}?"
    k = random.choices(range(CONFIG.questions), cum_weights=_CUM_WEIGHTS)[0]
    return f"what is a {_TOPICS[k % len(_TOPICS)]} number {k}?"


def _headers() -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    if CONFIG.api_key:
        h["Authorization"] = f"Bearer {CONFIG.api_key}"
    return h


HEADERS = _headers()


def _json(resp: ResponseContextManager) -> Any:
    try:
        return orjson.loads(resp.content or b"")
    except orjson.JSONDecodeError:
        return None


def _header(resp: ResponseContextManager, name: str) -> str | None:
    value = resp.headers.get(name) if resp.headers is not None else None
    return str(value) if value is not None else None


class _BotUser(FastHttpUser):
    """Shared plumbing: send, classify, record."""

    abstract = True
    abusive = False
    prefix = ""  # outcome names of users judged apart (the surge): not the well-behaved ones
    network_timeout = CONFIG.timeout
    connection_timeout = min(10.0, CONFIG.timeout)
    interval = CONFIG.user_interval

    def on_start(self) -> None:
        self.sent = 0
        self.identity = f"{'abuser' if self.abusive else 'user'}-{uuid.uuid4().hex[:12]}"
        # A user paced faster than the stack's sustained per-user rate stands for several
        # people: it takes a fresh identity before its burst allowance runs out.
        rate = self.stack_rate()
        self.rotate_every = (
            max(1, CONFIG.stack.rate_burst) if not self.abusive and 1 / self.interval > rate else 0
        )
        self.backoff = 0.0  # seconds a refused request asked us to wait (Retry-After)
        self.pending: dict[str, tuple[str, float]] = {}  # message_id -> (user_id, since)
        self.cursor: dict[str, str] = {}
        self.seen: set[str] = set()

    @staticmethod
    def stack_rate() -> float:
        r = CONFIG.stack.rate_limit
        return r.count / r.period if CONFIG.stack.rate_limit_enabled else float("inf")

    def wait_time(self) -> float:
        return random.uniform(0.5, 1.5) * self.interval

    def user_id(self) -> str:
        if self.rotate_every and self.sent and self.sent % self.rotate_every == 0:
            self.identity = f"user-{uuid.uuid4().hex[:12]}"
        return self.identity

    def send(self, text: str, kind: str) -> None:
        uid = self.user_id()
        self.sent += 1
        mid = f"m-{uuid.uuid4().hex}"
        body = orjson.dumps({"user_id": uid, "text": text, "message_id": mid})
        with self.client.post(
            "/v1/messages",
            data=body.decode(),
            headers=HEADERS,
            name=f"/v1/messages [{kind}]",
            catch_response=True,
        ) as resp:
            data = self.classify(resp)
            if data is None:
                return
            if resp.status_code == 202:
                self.count(slo.QUEUED)
                if not self.prefix:
                    TALLY.queue(uid, mid)
                    self.pending[mid] = (uid, time.monotonic())
            elif resp.status_code == 200 and kind == "question":
                self.count(slo.QUESTIONS)
                if data.get("cached") or _header(resp, "X-Cache") in ("HIT", "STALE"):
                    self.count(slo.CACHED)

    def count(self, outcome: str) -> None:
        TALLY.count(_STATE["phase"], self.prefix + outcome)

    def classify(self, resp: ResponseContextManager, poll: bool = False) -> Any:
        """Count the answer for the verdict and tell locust whether it failed."""
        phase = _STATE["phase"]
        status = resp.status_code
        ms = resp.request_meta["response_time"]
        well_behaved = not self.abusive and not self.prefix
        if well_behaved and not poll:
            TALLY.second(time.time(), status in slo.SUCCESS_STATUSES, ms)
        self.count(slo.REQUESTS)
        if self.abusive:
            self.count(slo.ABUSE_REQUESTS)
        data = _json(resp)
        if not isinstance(data, dict):
            self.count(slo.NO_JSON)
            TALLY.example(
                f"{phase}: no JSON answer: status {status} {getattr(resp, 'error', None) or ''}"
            )
            resp.failure(f"no JSON answer (status {status})")
            return None
        self.count(slo.ANSWERED)
        self.count(f"status:{status}")
        if well_behaved and not poll:
            TALLY.observe(phase, ms)
        code = (data.get("error") or {}).get("code") if status >= 400 else None
        if status < 300:
            resp.success()
            return data
        self.backoff = _retry_after(resp)
        if status == 429:
            if self.abusive:
                self.count(slo.LIMITED_ABUSE)
                resp.success()  # what an abuser deserves
            else:
                self.count(slo.LIMITED_NORMAL)
                resp.failure("well-behaved user rate limited")
            return None
        if status == 503 and code == "overloaded" and _header(resp, "Retry-After"):
            self.count(slo.SHED)
            resp.failure("shed (overloaded)")
            return None
        if status >= 500:
            self.count(slo.OTHER_5XX)
            TALLY.example(f"{phase}: {self.prefix}{status} {code}")
            resp.failure(f"{status} {code}")
            return None
        self.count(slo.BAD_4XX)
        TALLY.example(f"{phase}: {status} {code}")
        resp.failure(f"{status} {code}")
        return None

    def poll_inbox(self) -> None:
        """One (long) poll of the inbox of the oldest identity still waiting for a reply."""
        now = time.monotonic()
        for mid, (_, since) in list(self.pending.items()):
            if now - since > POLL_GIVE_UP:
                del self.pending[mid]
        if not self.pending:
            return
        uid = next(iter(self.pending.values()))[0]
        after = self.cursor.get(uid, "")
        TALLY.count(_STATE["phase"], slo.POLLS)
        with self.client.get(
            f"/v1/users/{uid}/replies?after={after}&wait={POLL_WAIT}",
            headers=HEADERS,
            name="/v1/users/[id]/replies",
            catch_response=True,
        ) as resp:
            data = self.classify(resp, poll=True)
        if not data:
            return
        self.cursor[uid] = str(data.get("next") or after)
        for reply in data.get("replies") or []:
            mid = str(reply.get("message_id"))
            if mid in self.seen:
                TALLY.count(_STATE["phase"], slo.DELIVERED_DUP)
                TALLY.example(f"reply delivered twice to one reader: {mid}")
                continue
            self.seen.add(mid)
            if self.pending.pop(mid, None) is not None:
                TALLY.count(_STATE["phase"], slo.DELIVERED_SEEN)
                TALLY.deliver(mid)


class ChatUser(_BotUser):
    """A person chatting with the bot at a human pace."""

    def _task(self) -> None:
        if self.pending:
            self.poll_inbox()
            return
        roll = random.random()
        if roll < 0.45:
            self.send(question(), "question")
        elif roll < 0.80:
            self.send(f"/echo hello {self.sent}", "echo")
        elif roll < 0.88:
            self.send(f"/prefs set lang {random.choice(['en', 'de', 'fr'])}", "prefs")
        elif roll < 0.95:
            self.send(random.choice(["/prefs", "/prefs get lang"]), "prefs")
        else:
            self.send("/help", "help")

    tasks = [_task]


class RampUser(ChatUser):
    """The same person, faster: the ramp adds load by adding these."""

    interval = CONFIG.ramp_user_interval


class Abuser(_BotUser):
    """One identity sending far beyond its rate limit."""

    abusive = True
    fixed_count = CONFIG.abusers

    def wait_time(self) -> float:
        return 1 / max(0.1, CONFIG.abuser_rate)

    def _task(self) -> None:
        self.send(f"/echo spam {self.sent}", "abuse")

    tasks = [_task]


class SurgeUser(ChatUser):
    """One of a crowd arriving at once: asks without pause (only a refusal's Retry-After),
    things nobody asked before, so every question holds a slot of the stack for the
    upstream's latency. Judged apart from the well-behaved users (`surge:` outcomes)."""

    prefix = slo.SURGE
    fixed_count = CONFIG.spike_overload_users

    def wait_time(self) -> float:
        backoff, self.backoff = self.backoff, 0.0
        return backoff

    def _task(self) -> None:
        if random.random() < 0.6:
            self.send(question(unique_share=1.0), "surge")
        else:
            self.send(f"/echo surge {self.sent}", "surge")

    tasks = [_task]


class ChannelChat(FastHttpUser):
    """One chat of one platform (`loadtests.channels`): its messages one after the other,
    each once the one before was acked; a refused one resent as the platform would."""

    network_timeout = CONFIG.timeout
    connection_timeout = min(10.0, CONFIG.timeout)
    platforms: tuple[str, ...] = ()
    signer: channels.Signer | None = None
    tag = channels.run_tag(os.environ.get("LOAD_RUN_DIR", ""))
    chats = itertools.count()

    def on_start(self) -> None:
        cls = type(self)
        if cls.signer is None:
            cls.platforms = channels.platforms(CONFIG)
            cls.signer = channels.Signer(CONFIG)
            TALLY.notes[channels.PLATFORMS_NOTE] = list(cls.platforms)
        self.platform = cls.platforms[next(cls.chats) % len(cls.platforms)]
        self.chat = cls.signer.chat(self.platform)
        self.seq = 0

    def wait_time(self) -> float:
        return CONFIG.user_interval if self.seq < CONFIG.channels_messages else 1.0

    def _task(self) -> None:
        if self.seq >= CONFIG.channels_messages or self.signer is None:
            return
        text = channels.message_text(self.tag, self.platform, self.chat, self.seq)
        hook = self.signer.webhook(self.platform, self.chat, text)
        deadline = time.monotonic() + 60
        while (outcome := self._post(self.signer.signed(self.platform, hook))) == "again":
            if time.monotonic() > deadline:
                break
            TALLY.count(_STATE["phase"], channels.RESENT)
            time.sleep(0.2)  # gevent's, under locust
        if outcome == "acked":
            TALLY.count(_STATE["phase"], channels.ACKED)
            TALLY.queue(channels.chat_key(self.platform, self.chat), str(self.seq))
        self.seq += 1

    def _post(self, hook: channels.Webhook) -> str:
        """acked (200), again (503, 5xx, no answer: the platform resends) or refused (4xx)."""
        phase = _STATE["phase"]
        with self.client.post(
            hook.path,
            data=hook.body.decode(),  # orjson wrote UTF-8: the same bytes go out
            headers=hook.headers,
            name=f"{hook.path} [{self.platform}]",
            catch_response=True,
        ) as resp:
            status = resp.status_code
            TALLY.count(phase, slo.REQUESTS)
            if not isinstance(_json(resp), dict):
                TALLY.count(phase, slo.NO_JSON)
                TALLY.example(f"{phase}: {self.platform}: no JSON answer: status {status}")
                resp.failure(f"no JSON answer (status {status})")
                return "again"
            TALLY.count(phase, slo.ANSWERED)
            TALLY.count(phase, f"status:{status}")
            TALLY.observe(phase, resp.request_meta["response_time"])
            TALLY.second(time.time(), status == 200, resp.request_meta["response_time"])
            if status == 200:
                resp.success()
                return "acked"
            resp.failure(f"{status}")
            TALLY.example(f"{phase}: {self.platform}: {status}")
            if status == 503:
                TALLY.count(phase, slo.SHED)
                return "again"
            TALLY.count(phase, slo.OTHER_5XX if status >= 500 else slo.BAD_4XX)
            return "again" if status >= 500 else "refused"

    tasks = [_task]


def _retry_after(resp: ResponseContextManager) -> float:
    try:
        return max(1.0, float(_header(resp, "Retry-After") or 0))
    except ValueError:
        return 1.0


def _stub_outage(on: bool) -> None:
    req = urllib.request.Request(
        f"{CONFIG.stub}/admin/faults",
        data=json.dumps({"outage": on}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=5):
            pass
        TALLY.notes.setdefault("outage_events", []).append([time.time(), on])
    except OSError as exc:
        TALLY.example(f"could not set the stub's outage={on}: {exc}")


class ScenarioShape(LoadTestShape):
    """Plays `CONFIG.scenario`'s plan, marks its phases and drives the stub's faults."""

    def __init__(self) -> None:
        super().__init__()
        self.plan = plan_for(CONFIG)
        self.user_class: type[User] = ChatUser
        if CONFIG.scenario == "ramp":
            self.user_class = RampUser
        elif CONFIG.scenario == "channels":
            self.user_class = ChannelChat
        self.hostile: HostileClients | None = None
        self.streams: IdleStreams | None = None

    def tick(self) -> tuple[int, float, list[type[User]] | None] | None:
        t = self.get_run_time()
        step = self.plan.at(t)
        if step is None:
            self._hostile(False)
            self._streams(False)
            _end_phase()
            return None
        if step.phase != _STATE["phase"]:
            if CONFIG.scenario == "ramp" and _STATE["phase"].startswith("step-"):
                _end_phase()
                if not slo.phase_ok(TALLY, _STATE["phase"], CONFIG.objectives):
                    TALLY.notes["ramp_stopped_after"] = _STATE["phase"]
                    return None
            if not step.hostile:
                self._hostile(False)  # every hostile connection gone before the next phase
            _start_phase(step.phase, self.runner)
            TALLY.notes.setdefault("phase_users", {})[step.phase] = step.users
            if step.surge:
                TALLY.notes["surge_users"] = step.surge
            if step.outage is not None and (step.outage or "outage_events" in TALLY.notes):
                _stub_outage(step.outage)
            self._hostile(step.hostile)
            self._streams(step.streams)
        else:
            _end_phase()
        classes: list[type[User]] = [self.user_class]
        if step.abusers:
            classes.append(Abuser)
        if step.surge:
            classes.append(SurgeUser)
        return step.users + step.abusers + step.surge, step.spawn_rate, classes

    def _hostile(self, on: bool) -> None:
        """Start the hostile clients on entering the attack, stop them on leaving it."""
        if on and self.hostile is None:
            self.hostile = HostileClients(CONFIG, TALLY, lambda: str(_STATE["phase"]))
            self.hostile.start()
            TALLY.notes["hostile_addresses"] = self.hostile.addresses
        elif not on and self.hostile is not None:
            started = time.monotonic()
            self.hostile.stop()
            TALLY.notes["hostile_stop_seconds"] = round(time.monotonic() - started, 2)
            self.hostile = None

    def _streams(self, on: bool) -> None:
        """Open the webchat scenario's idle streams once; close them when it ends."""
        if on and self.streams is None:
            self.streams = IdleStreams(CONFIG, TALLY, lambda: str(_STATE["phase"]))
            self.streams.start()
        elif not on and self.streams is not None:
            self.streams.stop()
            self.streams = None


def _start_phase(name: str, runner: Any) -> None:
    _end_phase()
    _STATE["phase"] = name
    now = time.time()
    TALLY.phases[name] = [now, now]
    if isinstance(runner, MasterRunner):
        runner.send_message("bot_phase", {"phase": name})


def _end_phase() -> None:
    span = TALLY.phases.get(_STATE["phase"])
    if span:
        span[1] = time.time()


def _set_phase(msg: Any, **_: Any) -> None:
    _STATE["phase"] = msg.data["phase"]


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        environment.runner.register_message("bot_phase", _set_phase)


@events.report_to_master.add_listener
def _on_report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    data["bot_tally"] = TALLY.drain()


@events.worker_report.add_listener
def _on_worker_report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    TALLY.merge(data.get("bot_tally"))


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    _end_phase()
    run_dir = os.environ.get("LOAD_RUN_DIR")
    if run_dir:
        Path(run_dir, "tally.json").write_bytes(orjson.dumps(TALLY.to_json()))
