"""The seams between the API, the core and its adapters (issue 16, items 3 and 4).

Core speaks its own language (kinds, typed replies, value types in a module that imports
nothing of the bot's), and each error is mapped to HTTP in one place. Against the real
Redis; the replica in-process (aiohttp's own test server) where HTTP is what is checked.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from bot import runtime
from bot.answers import ASK, Answer, Ask
from bot.api import keys
from bot.api.keys import REPLICA
from bot.app import create_app
from bot.core.service import BotService
from bot.core.types import Job, Outcome, Reply
from bot.core.validation import parse_message
from bot.errors import BadRequest, UpstreamUnavailable
from bot.inbox import Inbox
from bot.ratelimit import LocalLimiter, Policy
from bot.settings import ENV_VARS, Rate, SettingsError, load_settings
from bot.store import MAX_PREFS, Store, TooManyPrefs
from tests.support import free_port, unique

BOT = Path(__file__).resolve().parents[1] / "bot"


def _imported_modules(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; relative ones as written)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def _mentions(path: Path, name: str) -> bool:
    return any(
        isinstance(node, ast.Name | ast.Attribute | ast.alias)
        and name
        in (getattr(node, "id", None), getattr(node, "attr", None), getattr(node, "name", None))
        for node in ast.walk(ast.parse(path.read_text()))
    )


def test_core_value_types_import_nothing_of_the_bot() -> None:
    imported = _imported_modules(BOT / "core" / "types.py")
    assert imported, "expected at least the standard library"
    assert not {m for m in imported if m == "bot" or m.startswith(("bot.", "."))}, imported


def test_retry_adapters_take_job_from_the_core_types() -> None:
    for path in sorted((BOT / "retries").glob("*.py")):
        assert "bot.core.service" not in _imported_modules(path), path.name


def test_only_the_rendering_middleware_turns_redis_errors_into_http() -> None:
    mapping = sorted(p.name for p in (BOT / "api").glob("*.py") if _mentions(p, "RedisError"))
    assert mapping == ["middleware.py"]


def test_only_the_api_knows_http_status_codes_of_outcomes() -> None:
    fields = {f.name for f in dataclasses.fields(Outcome)}
    assert "kind" in fields and "status" not in fields


class _Upstream:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    async def answer(self, question: str, context: list[dict[str, Any]], ask: Ask = ASK) -> Answer:
        if self.fail:
            raise UpstreamUnavailable("down for the test", 2.0)
        return Answer(f"answer to {question}")


class _Deferrer:
    def __init__(self) -> None:
        self.jobs: list[Job] = []

    async def defer(self, job: Job, retry_after: float | None) -> None:
        self.jobs.append(job)


def _service(redis: Redis, upstream: _Upstream, **kw: Any) -> BotService:
    policy = Policy(Rate(100, 1.0), 100)
    return BotService(Store(redis, policy), upstream, policy, LocalLimiter(policy), **kw)


def _msg(user: str, text: str, mid: str | None = None) -> Any:
    return parse_message({"user_id": user, "text": text, "message_id": mid or unique("m")}, "r")


async def test_core_answers_in_kinds_and_a_replay_finds_the_deferred_reply(redis: Redis) -> None:
    deferrer, inbox = _Deferrer(), Inbox(redis)
    service = _service(redis, _Upstream(fail=True), deferrer=deferrer, inbox=inbox)
    user = unique()
    helped = await service.handle(_msg(user, "/help"))
    assert (helped.kind, helped.body["status"], helped.replayed) == ("replied", "replied", False)

    msg = _msg(user, "what is a pulsar?")
    queued = await service.handle(msg)
    assert (queued.kind, queued.body) == (
        "queued",
        {"message_id": msg.message_id, "status": "queued"},
    )
    assert [j.message_id for j in deferrer.jobs] == [msg.message_id]

    again = await service.handle(msg)  # no reply yet: the record says queued
    assert (again.kind, again.replayed) == ("queued", True)
    assert await inbox.deliver(user, msg.message_id, "a neutron star")
    later = await service.handle(msg)  # the deferred reply is there now
    assert (later.kind, later.body["reply"], later.replayed) == ("replied", "a neutron star", True)


async def test_inbox_delivered_is_the_reply_with_its_kind_and_cursor(redis: Redis) -> None:
    inbox, user = Inbox(redis), unique()
    assert await inbox.delivered(user, "m1") is None
    assert await inbox.deliver(user, "m1", "sorry", "apology")
    apology = await inbox.delivered(user, "m1")
    assert isinstance(apology, Reply) and apology.kind == "apology"
    assert not await inbox.answered(user, "m1")
    assert await inbox.deliver(user, "m1", "the answer")
    answer = await inbox.delivered(user, "m1")
    page, _ = await inbox.page(user)
    assert answer == page[-1]  # the same reply, cursor included
    assert (answer.reply, answer.kind) == ("the answer", "answer")
    assert await inbox.answered(user, "m1")


async def test_too_many_prefs_is_one_400_error_whoever_sets_them(redis: Redis) -> None:
    store, user = Store(redis, Policy(Rate(1, 1.0), 0)), unique()
    await store.set_prefs(user, {f"k{i}": "v" for i in range(MAX_PREFS)})
    with pytest.raises(TooManyPrefs) as exc:
        await store.set_prefs(user, {"one-more": "v"})
    assert isinstance(exc.value, BadRequest)
    assert (exc.value.status, exc.value.code) == (400, "too_many_prefs")
    service = _service(redis, _Upstream())
    with pytest.raises(TooManyPrefs):
        await service.handle(_msg(user, "/prefs set another v"))


@pytest.fixture
async def redisless() -> AsyncIterator[TestClient[Any, Any]]:
    """A replica in-process whose Redis and RabbitMQ are nowhere (closed ports)."""
    settings = load_settings(
        {
            "BOT_DOTENV": "/dev/null",
            "REDIS_URL": "redis://127.0.0.1:1/0",
            "AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
        }
    )
    async with TestClient(TestServer(create_app(settings))) as client:
        yield client


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/users/u1/prefs", None),
        ("PUT", "/v1/users/u1/prefs", {"prefs": {"lang": "en"}}),
        ("DELETE", "/v1/users/u1/prefs", None),
        ("DELETE", "/v1/users/u1/prefs/lang", None),
        ("GET", "/v1/users/u1/replies", None),
        ("POST", "/v1/messages", {"user_id": "u1", "text": "/prefs"}),
    ],
)
async def test_redis_down_is_a_503_json_with_retry_after_on_every_route(
    redisless: TestClient[Any, Any], method: str, path: str, body: Any
) -> None:
    resp = await redisless.request(method, path, json=body)
    assert resp.status == 503, await resp.text()
    assert (await resp.json())["error"]["code"] == "unavailable"
    assert resp.headers["Retry-After"] == "5"


# --- typed state, components built complete, process plumbing once (items 2 and 5) ---------


def test_the_app_shares_no_untyped_state() -> None:
    app_keys = [v for v in vars(keys).values() if isinstance(v, web.AppKey)]
    assert app_keys
    loose = [k for k in app_keys if k._t in (dict, list, object)]
    assert not loose, loose


def test_derived_values_come_from_the_settings_once() -> None:
    settings = load_settings({"BOT_DOTENV": "/dev/null", "BOT_UPSTREAM_TIMEOUT": "3"})
    store = Store.from_settings(settings, Redis())
    service = BotService.from_settings(settings, store, _Upstream(), deferrer=None, inbox=None)
    assert store.lease_ms == settings.lease_ms == 11_000
    assert service.wait_timeout == settings.lease_ms / 1000 + 1
    assert store.record_ttl == settings.idempotency_ttl


async def test_a_started_replica_has_its_service_built_complete(redis_url: str) -> None:
    settings = load_settings(
        {"BOT_DOTENV": "/dev/null", "REDIS_URL": redis_url, "AMQP_URL": "amqp://u:p@127.0.0.1:1/"}
    )
    app = create_app(settings)
    async with TestClient(TestServer(app)) as client:
        replica = app[REPLICA]
        assert replica.service.inbox is replica.inbox
        assert replica.service.deferrer is not None
        assert replica.service.store is replica.store
        assert (await client.get("/readyz")).status == 200


def test_the_worker_does_not_import_the_http_app() -> None:
    probe = "import sys, bot.serve_worker; print(sorted(m[:7] for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.strip().strip("[]").replace("'", "").split(", "))
    assert "bot.run" in loaded  # the shared process plumbing...
    assert not {"bot.app", "bot.api"} & loaded  # ... but none of the HTTP app


async def test_the_metrics_server_serves_and_stops() -> None:
    port = free_port()
    async with aiohttp.ClientSession() as http:
        async with (
            runtime.metrics_server("127.0.0.1", port),
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            assert resp.status == 200 and "bot_http_requests" in await resp.text()
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://127.0.0.1:{port}/metrics")


# --- one settings table, in the code and in the README (item 8) ----------------------------


def test_the_readme_lists_exactly_the_settings_the_code_reads() -> None:
    readme = (BOT.parent / "README.md").read_text()
    section = readme[readme.index("## Settings\n") : readme.index("## The HTTP API")]
    listed = re.findall(r"^\| `([A-Z_]+)` \|", section, re.MULTILINE)
    assert len(listed) == len(set(listed)), "a setting is listed twice"
    assert set(listed) == set(ENV_VARS)


def test_the_contracts_adopted_settings_are_in_the_code_table() -> None:
    adopted = {
        "BOT_MAX_INFLIGHT",
        "BOT_EDGE_RATE",
        "BOT_EDGE_BURST",
        "BOT_EDGE_CONN",
        "BOT_QUEUE_PREFIX",
        "BOT_CACHE_STALE_TTL",
        "UPSTREAM_KIND",
        "UPSTREAM_MODEL",
        "UPSTREAM_API_KEY",
        "BOT_OBSERVABILITY",
        "BOT_OPEN_API",
        "BOT_TRUSTED_PROXIES",
        "BOT_KEY_RATE_LIMIT",
        "BOT_KEY_RATE_BURST",
        "BOT_LONGPOLL_MAX",
        "BOT_LONGPOLL_PER_USER",
        "BOT_REDIS_MAXMEMORY",
    }
    assert adopted <= set(ENV_VARS), adopted - set(ENV_VARS)
    assert {v for v in ENV_VARS if v.startswith("BOT_BREAKER_")}  # BOT_BREAKER_*


def test_a_bad_redis_maxmemory_stops_with_one_line_naming_it() -> None:
    assert load_settings({"BOT_DOTENV": "/dev/null"}).redis_maxmemory == "256mb"
    assert (
        load_settings({"BOT_DOTENV": "/dev/null", "BOT_REDIS_MAXMEMORY": "2GB"}).redis_maxmemory
        == "2gb"
    )
    with pytest.raises(SettingsError, match="BOT_REDIS_MAXMEMORY"):
        load_settings({"BOT_DOTENV": "/dev/null", "BOT_REDIS_MAXMEMORY": "lots"})
