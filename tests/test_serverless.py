"""The serverless handler (`bot.serverless`) answers as a replica does (issue 21).

One table of requests is replayed against the replica's aiohttp app (in process) and against
`Container.serve` with API Gateway HTTP API (payload 2.0) events, each on a fresh Redis DB (the
run's own, flushed between them), the real RabbitMQ (a queue prefix of the test's own) and a
stub upstream of its own (it numbers its answers): status, JSON body and the contract's headers
must be the same. Only what is per request by nature is normalised: a reply's `at` and the
inbox cursor `next` (Redis stream ids, made of the clock), and the hash of the context the stub
puts in its answers (the context holds each exchange's time). Signatures are made by the
platforms' maintained code (slack_sdk's signer, PyNaCl's Ed25519), as in tests/test_channels*.py.

Then what only the handler has: REST API (1.0) events refused, base64 bodies, header case,
cookies both ways, one container per process, a failed question queued in RabbitMQ (or the
outbox while RabbitMQ is away) and answered by the shared retry worker, the module importing
no aiohttp server, and the handler driven through AWS's runtime interface client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_response import Response
from redis.asyncio import Redis
from slack_sdk.signature import SignatureVerifier

from bot.api import gateway
from bot.api.keys import HTTP, REDIS, SETTINGS
from bot.inbox import Inbox
from bot.retries.outbox import outbox_key
from bot.serverless import Container, _Process
from bot.settings import ENV_VARS, Settings, load_settings
from bot.upstream import build_answerer
from infra.common import drop_queues, free_port
from infra.stub import create_stub_app
from tests.support import AMQP_URL, AppClient, Upstream, reset_redis_db
from tests.test_channels import SECRET as TG_SECRET
from tests.test_channels import channel_env, connected, update
from tests.test_channels_slack_discord import (
    SLACK_SECRET,
    discord_headers,
    event,
    interaction,
    slack_env,
)
from tests.test_retries import running_worker

ROOT = Path(__file__).resolve().parent.parent
MakeClient = Callable[..., Awaitable[AppClient]]
KEY, TG_KEY = "k1-serverless-test-key", "k2-serverless-tg-only"
# What the contract lets a client rely on, besides the status and the body.
CONTRACT_HEADERS = (
    "content-type",
    "x-request-id",
    "retry-after",
    "ratelimit",
    "ratelimit-policy",
    "idempotent-replayed",
    "x-cache",
    "allow",
    "www-authenticate",
)
JSON = {"Content-Type": "application/json"}
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Step:
    """One request of the table (or, with `do`, something done between two)."""

    name: str
    method: str = "GET"
    path: str = "/healthz"
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    query: str = ""
    do: Callable[[Side], Awaitable[None]] | None = None


@dataclass
class Side:
    """What a step may touch: the stub upstream and the run's Redis."""

    upstream: Upstream
    redis: Redis


def msg(user: str, text: str, mid: str | None = None, **headers: str) -> Step:
    body: dict[str, str] = {"user_id": user, "text": text}
    if mid is not None:
        body["message_id"] = mid
    return Step(
        f"message {user} {text[:20]!r} {mid}",
        "POST",
        "/v1/messages",
        orjson.dumps(body),
        {**JSON, **AUTH, **headers},
    )


def telegram(name: str, body: bytes, secret: str = TG_SECRET) -> Step:
    headers = {**JSON, "X-Telegram-Bot-Api-Secret-Token": secret}
    return Step(name, "POST", "/channels/telegram", body, headers)


def slack_signed(body: bytes, secret: str = SLACK_SECRET, form: bool = False) -> dict[str, str]:
    stamp = str(int(time.time()))
    signature = SignatureVerifier(secret).generate_signature(timestamp=stamp, body=body)
    assert signature is not None
    kind = "application/x-www-form-urlencoded" if form else "application/json"
    return {
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": signature,
        "Content-Type": kind,
    }


async def _outage(side: Side) -> None:
    side.upstream.faults(outage=True)


async def _recovery(side: Side) -> None:
    side.upstream.faults(outage=False)


async def _deliver(side: Side) -> None:
    inbox = Inbox(side.redis)
    await inbox.deliver("sl-replies", "r-1", "the first deferred reply")
    await inbox.deliver("sl-replies", "r-2", "the second")


def table() -> list[Step]:
    """The requests, made afresh for each side (Slack's signatures carry the time)."""
    slack_event = event("Ev-sl-1", "C0SL", "hello from slack")
    slack_form = urlencode(
        {
            "command": "/ask",
            "text": "what is a quasar?",
            "team_id": "T0TEAM",
            "user_id": "U0USER",
            "channel_id": "C0SL",
            "trigger_id": "1337.42.abcd",
            "response_url": "https://hooks.slack.com/commands/T0TEAM/1/xyz",
        }
    ).encode()
    discord_ping = orjson.dumps({"type": 1, "id": "1", "application_id": "1", "token": "t"})
    discord_ask = interaction("445566778899", "tok-1", "what is a magnetar?")
    big = orjson.dumps({"user_id": "sl-big", "text": "x" * (70 * 1024)})
    prefs = "/v1/users/sl-prefs/prefs"
    return [
        Step("liveness"),
        Step("readiness", path="/readyz"),
        Step("HEAD of a GET route", "HEAD"),
        Step("unknown route", path="/nope", headers=AUTH),
        Step("method not allowed", "PATCH", "/v1/messages", headers=AUTH),
        # Input, good and bad.
        msg("sl-echo", "/echo hello", "m-echo", **{"X-Request-ID": "rid-echo-1"}),
        msg("sl-echo", "/echo hello", "m-echo", **{"X-Request-ID": "rid-echo-2"}),
        msg("sl-help", "/help", "m-help"),
        msg("sl-sse", "/echo streamed", "m-sse", Accept="text/event-stream"),
        msg("sl-sse", "/echo streamed", "m-sse", Accept="text/event-stream"),
        msg("sl-ask", "what is a pulsar?", "m-ask-1"),
        msg("sl-ask", "what is a pulsar?", "m-ask-2"),
        msg("sl-bad id!", "/help"),
        msg("sl-empty", "   "),
        Step("not JSON", "POST", "/v1/messages", b"{nope", {**JSON, **AUTH}),
        Step("not an object", "POST", "/v1/messages", b"[1, 2]", {**JSON, **AUTH}),
        Step("empty body", "POST", "/v1/messages", b"", {**JSON, **AUTH}),
        Step(
            "form, not JSON",
            "POST",
            "/v1/messages",
            b"user_id=a&text=b",
            {"Content-Type": "application/x-www-form-urlencoded", **AUTH},
        ),
        Step(
            "compressed body",
            "POST",
            "/v1/messages",
            b"\x1f\x8b\x08\x00",
            {**JSON, **AUTH, "Content-Encoding": "gzip"},
        ),
        Step("over 64 KiB", "POST", "/v1/messages", big, {**JSON, **AUTH}),
        # API keys.
        Step("no key", "POST", "/v1/messages", b"{}", JSON),
        Step("wrong key", "POST", "/v1/messages", b"{}", {**JSON, "Authorization": "Bearer no"}),
        Step("not bearer", "GET", prefs, headers={"Authorization": f"Basic {KEY}"}),
        msg("sl-other", "/help", Authorization=f"Bearer {TG_KEY}"),
        msg("tg:42", "/echo tg", "m-tg", Authorization=f"Bearer {TG_KEY}"),
        Step("prefix key, path user", "GET", prefs, headers={"Authorization": f"Bearer {TG_KEY}"}),
        # Rate limits (2 at once, then 1 a minute: the third in a row is refused).
        msg("sl-rl", "/echo 1", "rl-1"),
        msg("sl-rl", "/echo 2", "rl-2"),
        msg("sl-rl", "/echo 3", "rl-3"),
        msg("sl-rl", "/echo 1", "rl-1"),  # a replay is not counted, and still answered
        # A failed question: queued for the retry worker (202), and its replay.
        Step("upstream down", do=_outage),
        msg("sl-queued", "what is a blazar?", "m-queued"),
        msg("sl-queued", "what is a blazar?", "m-queued"),
        Step("upstream back", do=_recovery),
        # Preferences.
        Step(
            "put prefs", "PUT", prefs, b'{"prefs": {"lang": "en", "tz": "UTC"}}', {**JSON, **AUTH}
        ),
        Step("get prefs", "GET", prefs, headers=AUTH),
        Step("bad pref key", "PUT", prefs, b'{"prefs": {"no way": "x"}}', {**JSON, **AUTH}),
        Step("bad prefs body", "PUT", prefs, b'{"lang": "en"}', {**JSON, **AUTH}),
        Step("delete one pref", "DELETE", prefs + "/tz", headers=AUTH),
        Step("prefs after delete", "GET", prefs, headers=AUTH),
        Step("delete prefs", "DELETE", prefs, headers=AUTH),
        # Replies.
        Step("deliver two replies", do=_deliver),
        Step("replies", "GET", "/v1/users/sl-replies/replies", headers=AUTH),
        Step("one reply", "GET", "/v1/users/sl-replies/replies", headers=AUTH, query="limit=1"),
        Step("bad limit", "GET", "/v1/users/sl-replies/replies", headers=AUTH, query="limit=0"),
        Step("bad cursor", "GET", "/v1/users/sl-replies/replies", headers=AUTH, query="after=x"),
        Step("bad wait", "GET", "/v1/users/sl-replies/replies", headers=AUTH, query="wait=31"),
        Step("twice", "GET", "/v1/users/sl-replies/replies", headers=AUTH, query="limit=1&limit=2"),
        # Telegram.
        telegram("telegram", orjson.dumps(update(7001, 4242, "hello"))),
        telegram("telegram again (deduplicated)", orjson.dumps(update(7001, 4242, "hello"))),
        telegram("telegram, wrong secret", orjson.dumps(update(7002, 4242, "hi")), "wrong"),
        telegram("telegram, no update", b"{}"),
        # Slack.
        Step(
            "slack url_verification",
            "POST",
            "/channels/slack/events",
            b'{"type": "url_verification", "challenge": "c-42"}',
            slack_signed(b'{"type": "url_verification", "challenge": "c-42"}'),
        ),
        Step(
            "slack event", "POST", "/channels/slack/events", slack_event, slack_signed(slack_event)
        ),
        Step(
            "slack event, bad signature",
            "POST",
            "/channels/slack/events",
            slack_event,
            slack_signed(slack_event, secret="not-the-secret"),
        ),
        Step(
            "slack command",
            "POST",
            "/channels/slack/commands",
            slack_form,
            slack_signed(slack_form, form=True),
        ),
        # Discord.
        Step(
            "discord ping",
            "POST",
            "/channels/discord/interactions",
            discord_ping,
            discord_headers(discord_ping),
        ),
        Step(
            "discord command",
            "POST",
            "/channels/discord/interactions",
            discord_ask,
            discord_headers(discord_ask),
        ),
        Step(
            "discord, bad signature",
            "POST",
            "/channels/discord/interactions",
            discord_ask,
            {**discord_headers(discord_ask), "X-Signature-Ed25519": "00" * 64},
        ),
    ]


def table_env(upstream: Upstream, prefix: str) -> dict[str, str]:
    return {
        **channel_env(upstream),
        **slack_env(upstream.url),
        "BOT_API_KEYS": f"{KEY},{TG_KEY}=tg:",
        "BOT_RATE_LIMIT": "1/minute",
        "BOT_RATE_BURST": "1",
        "BOT_QUEUE_PREFIX": prefix,
        "BOT_WEBCHAT_SECRET": "",
    }


Answer = tuple[int, dict[str, str], Any]


def normalised(status: int, headers: dict[str, str], body: bytes) -> Answer:
    """Status, the contract's headers (names lower-cased) and the body (JSON parsed), with a
    reply's time and the inbox cursor (both from the clock) replaced by their shape."""
    kept = {k: headers[k] for k in CONTRACT_HEADERS if k in headers}
    json = headers.get("content-type", "").startswith("application/json")
    parsed: Any = orjson.loads(body) if body and json else body
    if isinstance(parsed, dict) and "replies" in parsed:
        assert isinstance(parsed["next"], str) and parsed["next"].count("-") == 1
        parsed["next"] = "<cursor>"
        for reply in parsed["replies"]:
            assert reply["at"].endswith("Z"), reply
            reply["at"] = "<time>"
    if isinstance(parsed, dict) and isinstance(parsed.get("reply"), str):
        # The stub names the context it was given by a hash, and the context holds the times.
        parsed["reply"] = re.sub(r"\(context [0-9a-f]{12}\)$", "(context <hash>)", parsed["reply"])
    if "x-request-id" in kept and not kept["x-request-id"].startswith("rid-"):
        assert len(kept["x-request-id"]) == 32, kept  # made by the replica: a uuid4's hex
        kept["x-request-id"] = "<generated>"
    return status, kept, parsed


def api_event(
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    query: str = "",
    *,
    cookies: list[str] | None = None,
    base64_body: bool = False,
) -> dict[str, Any]:
    """An API Gateway HTTP API payload 2.0 event, as API Gateway makes one: header names
    lower-cased, `content-length` set, a body that is not UTF-8 in base64."""
    sent = {k.lower(): v for k, v in (headers or {}).items()}
    encoded = False
    text: str | None = None
    if body is not None:
        sent["content-length"] = str(len(body))
        try:
            text = body.decode() if not base64_body else None
        except UnicodeDecodeError:
            text = None
        if text is None:
            text, encoded = base64.b64encode(body).decode(), True
    ev: dict[str, Any] = {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": sent,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "api",
            "domainName": "api.execute-api.eu-west-1.amazonaws.com",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": "test",
            },
            "requestId": uuid.uuid4().hex,
            "stage": "$default",
            "timeEpoch": int(time.time() * 1000),
        },
        "isBase64Encoded": encoded,
    }
    if text is not None:
        ev["body"] = text
    if cookies:
        ev["cookies"] = cookies
    return ev


async def via_app(client: AppClient, step: Step) -> Answer:
    path = step.path + (f"?{step.query}" if step.query else "")
    async with client.request(step.method, path, data=step.body, headers=step.headers) as r:
        return normalised(r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read())


async def via_handler(container: Container, step: Step) -> Answer:
    res = await container.serve(
        api_event(step.method, step.path, step.body, step.headers, step.query)
    )
    body = res.get("body", "")
    raw = base64.b64decode(body) if res.get("isBase64Encoded") else body.encode()
    return normalised(res["statusCode"], res["headers"], raw)


@contextlib.asynccontextmanager
async def container_for(settings: Settings, broker_wait: float = 30) -> AsyncIterator[Container]:
    """A container as a first invocation makes it, once RabbitMQ is there (unless the test
    wants it away): on a busy machine the broker may take longer than a Lambda waits."""
    container = await Container.start(settings, "bot-lambda-test", broker_wait=broker_wait)
    try:
        yield container
    finally:
        await container.close()


@pytest.fixture
def prefix() -> str:
    return f"sl-{uuid.uuid4().hex[:8]}"


async def replay(side: Side, send: Callable[[Step], Awaitable[Answer]]) -> list[tuple[str, Answer]]:
    """The table, step by step, through `send`: each request's answer by name; the steps that
    act on the world (an outage, a recovery, a delivery) done on `side` in their turn."""
    answers = []
    for step in table():
        if step.do is not None:
            await step.do(side)
            continue
        answers.append((step.name, await send(step)))
    return answers


async def test_the_table_answers_alike_on_the_app_and_the_handler(
    make_app_client: MakeClient,
    upstream: Upstream,
    redis_db: int,
    redis: Redis,
    prefix: str,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> None:
    client = await make_app_client(**table_env(upstream, prefix))
    settings = client.app[SETTINGS]
    side = Side(upstream, redis)
    await connected(client)
    on_app = await replay(side, lambda step: via_app(client, step))
    await client.close()
    reset_redis_db(redis_db)
    upstream.faults(outage=False)
    side = Side(Upstream(await aiohttp_server(create_stub_app(latency_ms=0))), redis)

    async with container_for(replace(settings, upstream_url=side.upstream.url)) as container:
        on_handler = await replay(side, lambda step: via_handler(container, step))
    for (name, app_answer), (_, handler_answer) in zip(on_app, on_handler, strict=True):
        assert handler_answer == app_answer, name
    # The table means something: it holds each kind of answer the contract names.
    statuses = {answer[0] for _, answer in on_app}
    assert {200, 202, 204, 400, 401, 403, 404, 405, 413, 415, 429} <= statuses, statuses
    named: dict[str, Answer] = {}
    for name, answer in on_app:
        named.setdefault(name, answer)  # a replay's row has the name of the first
    assert named["message sl-echo '/echo hello' m-echo"][1]["x-request-id"] == "rid-echo-1"
    assert named["slack url_verification"][2] == {"challenge": "c-42"}
    assert named["discord command"][2] == {"type": 5}
    assert named["replies"][2]["replies"][1]["reply"] == "the second"
    streamed = named["message sl-sse '/echo streamed' m-sse"]
    assert streamed[1]["content-type"] == "text/event-stream"
    assert streamed[2].startswith(b"event: done\ndata: {"), streamed


@pytest.fixture
def settings(redis_url: str, upstream: Upstream, prefix: str) -> Iterator[Settings]:
    """The table's settings, as `make_app_client` makes them; the prefix's queues deleted when
    the test ends (left for the end of the run, a test's 14 quorum queues each would add up
    to more than the shared broker's file handles allow: docs/runbooks.md)."""
    env = {
        "REDIS_URL": redis_url,
        "AMQP_URL": AMQP_URL,
        "UPSTREAM_URL": upstream.url,
        **table_env(upstream, prefix),
    }
    made = load_settings(env, dotenv=Path("/dev/null"))
    yield made
    drop_queues(made)


async def test_a_rest_api_event_is_refused_with_a_400_naming_the_format(
    settings: Settings,
) -> None:
    rest = {
        "version": "1.0",
        "resource": "/v1/messages",
        "path": "/v1/messages",
        "httpMethod": "POST",
        "headers": {"Content-Type": "application/json"},
        "body": "{}",
        "requestContext": {"requestId": "x"},
        "isBase64Encoded": False,
    }
    async with container_for(settings) as container:
        for ev in (rest, {"no": "version"}, "not even an object"):
            res = await container.serve(ev)
            assert res["statusCode"] == 400
            assert res["headers"]["content-type"] == "application/json"
            error = orjson.loads(res["body"])["error"]
            assert error["code"] == "unsupported_event"
            assert "payload format version 2.0" in error["message"]
        assert (
            "1.0 (REST API)"
            in orjson.loads((await container.serve(rest))["body"])["error"]["message"]
        )


def _malformed_events() -> dict[str, dict[str, Any]]:
    """Events API Gateway never makes, as a direct invoke could: wrong types, lone surrogates."""
    good = api_event("POST", "/v1/messages", orjson.dumps({"user_id": "u", "text": "hi"}), JSON)
    edits: dict[str, Callable[[dict[str, Any]], object]] = {
        "body a lone surrogate": lambda e: e.update(body='{"user_id":"u","text":"\ud800"}'),
        "body a number": lambda e: e.update(body=5),
        "base64 body a number": lambda e: e.update(body=5, isBase64Encoded=True),
        "path a lone surrogate": lambda e: e.update(rawPath="/v1/users/\ud800/prefs"),
        "path a number": lambda e: e.update(rawPath=5),
        "query a lone surrogate": lambda e: e.update(rawQueryString="limit=\ud800"),
        "header a lone surrogate": lambda e: e["headers"].update({"x-request-id": "\udcff"}),
        "header a number": lambda e: e["headers"].update({"x-n": 5}),
        "headers a list": lambda e: e.update(headers=["x"]),
        "cookies a string": lambda e: e.update(cookies="a=b"),
        "cookies numbers": lambda e: e.update(cookies=[1]),
        "method not a token": lambda e: e["requestContext"]["http"].update(method="G T"),
        "source ip a number": lambda e: e["requestContext"]["http"].update(sourceIp=5),
        "request context a string": lambda e: e.update(requestContext="x"),
    }
    events = {}
    for name, edit in edits.items():
        event = copy.deepcopy(good)
        edit(event)
        events[name] = event
    return events


async def test_malformed_events_get_a_400_json_never_an_exception(settings: Settings) -> None:
    """An exception in the handler is API Gateway's bare 500: every malformed event, as a direct
    invoke could send, is refused with the API's 400 JSON instead, and the container serves on."""
    async with container_for(settings) as container:
        for name, event in _malformed_events().items():
            res = await container.serve(event)
            assert res["statusCode"] == 400, (name, res)
            assert orjson.loads(res["body"])["error"]["code"] == "unsupported_event", name
        res = await container.serve(api_event("GET", "/healthz"))
        assert res["statusCode"] == 200


async def test_a_base64_body_is_decoded(settings: Settings) -> None:
    body = orjson.dumps({"user_id": "sl-b64", "text": "/echo über", "message_id": "b-1"})
    headers = {**JSON, **AUTH}
    async with container_for(settings) as container:
        res = await container.serve(
            api_event("POST", "/v1/messages", body, headers, base64_body=True)
        )
        assert res["statusCode"] == 200, res
        assert orjson.loads(res["body"])["reply"] == "über"
        bad = api_event("POST", "/v1/messages", body, headers, base64_body=True)
        bad["body"] = "not base64 at all!"
        res = await container.serve(bad)
        assert res["statusCode"] == 400
        assert orjson.loads(res["body"])["error"]["code"] == "invalid_body"


async def test_the_web_chat_is_not_served_here_and_says_so_in_json(settings: Settings) -> None:
    """docs/contract-changes.md: the web chat needs a held connection; its routes answer the
    JSON 404 of any unknown route, never a handler's half-working answer."""
    body = orjson.dumps({"text": "hi", "message_id": "w-1"})
    async with container_for(settings) as container:
        for method, path in [
            ("POST", "/chat/session"),
            ("POST", "/chat/messages"),
            ("GET", "/chat/events"),
        ]:
            res = await container.serve(
                api_event(method, path, body if method == "POST" else None, JSON)
            )
            assert res["statusCode"] == 404, (path, res)
            assert orjson.loads(res["body"])["error"]["code"] == "not_found"


async def test_header_names_match_in_any_case(settings: Settings) -> None:
    body = orjson.dumps({"user_id": "sl-case", "text": "/echo case"})
    async with container_for(settings) as container:
        ev = api_event("POST", "/v1/messages", body)
        ev["headers"] = {
            "CONTENT-TYPE": "application/json",
            "aUtHoRiZaTiOn": f"Bearer {KEY}",
            "X-Request-Id": "rid-case",
        }
        res = await container.serve(ev)
        assert res["statusCode"] == 200, res
        assert res["headers"]["x-request-id"] == "rid-case"
        ev["headers"] = {"CONTENT-TYPE": "application/json"}  # the key is what is missing
        assert (await container.serve(ev))["statusCode"] == 401


async def test_cookies_pass_both_ways() -> None:
    """In: 2.0's `cookies` become the request's Cookie header. Out: every Set-Cookie (set
    by header or by `set_cookie`) goes to the result's `cookies`, none in its headers."""
    ev = api_event("GET", "/healthz", cookies=["session=abc", "theme=dark"])
    request = gateway.request_from_event(gateway.check_event(ev), {})
    assert request.headers["Cookie"] == "session=abc; theme=dark"
    response = Response(body=b"{}", content_type="application/json")
    response.set_cookie("session", "s1", httponly=True, samesite="Strict", path="/chat")
    response.headers.add("Set-Cookie", "other=2; Path=/")
    res = gateway.result(response)
    assert res["cookies"] == [
        "session=s1; HttpOnly; Path=/chat; SameSite=Strict",
        "other=2; Path=/",
    ]
    assert "set-cookie" not in res["headers"]
    assert "cookies" not in gateway.result(Response(body=b"{}"))


def test_one_container_per_process_reused_by_every_invocation(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`handler` makes the clients on its first invocation, on one loop, and reuses them."""
    for name, value in _environ(settings).items():
        monkeypatch.setenv(name, value)
    process = _Process()
    try:
        first = process.run(api_event("GET", "/healthz"))
        container, loop = process.container, process.loop
        assert container is not None and loop is not None
        redis, http = container.app[REDIS], container.app[HTTP]
        second = process.run(api_event("GET", "/readyz"))
        assert first["statusCode"] == second["statusCode"] == 200
        assert process.container is container and process.loop is loop
        assert container.app[REDIS] is redis and container.app[HTTP] is http
        assert orjson.loads(second["body"])["dependencies"] == {"redis": True, "rabbitmq": True}
    finally:
        process.close()


def test_invalid_settings_answer_a_json_503_naming_the_setting_not_its_value(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in _environ(settings).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BOT_RATE_LIMIT", "s3cret-looking/fortnight")
    process = _Process()
    try:
        res = process.run(api_event("GET", "/healthz"))
    finally:
        process.close()
    assert res["statusCode"] == 503 and res["headers"]["retry-after"] == "60"
    error = orjson.loads(res["body"])["error"]
    assert error["code"] == "misconfigured" and "BOT_RATE_LIMIT" in error["message"]
    assert "s3cret" not in res["body"]
    assert process.container is None  # read again by the next invocation


def _environ(settings: Settings) -> dict[str, str]:
    """The environment that loads `settings`' essentials (for a process of the handler's)."""
    return {
        "REDIS_URL": settings.redis_url,
        "AMQP_URL": settings.amqp_url,
        "UPSTREAM_URL": settings.upstream_url,
        "BOT_QUEUE_PREFIX": settings.queue_prefix,
        "BOT_API_KEYS": f"{KEY},{TG_KEY}=tg:",
        "LOG_LEVEL": "warning",
    }


async def test_a_failed_question_is_queued_and_the_shared_retry_worker_answers_it(
    settings: Settings, upstream: Upstream
) -> None:
    settings = replace(settings, retry_base_delay=0.05, retry_max_delay=0.2)
    user, question = f"sl-w-{uuid.uuid4().hex[:6]}", "what is a magnetar?"
    body = orjson.dumps({"user_id": user, "text": question, "message_id": "w-1"})
    upstream.faults(outage=True)
    async with container_for(settings) as container:
        res = await container.serve(api_event("POST", "/v1/messages", body, {**JSON, **AUTH}))
        assert res["statusCode"] == 202, res
        assert orjson.loads(res["body"]) == {"message_id": "w-1", "status": "queued"}
        assert await container.app[REDIS].xlen(outbox_key(settings.queue_prefix)) == 0
        depths = await container.broker.queue_depths()
        assert depths["work"] + depths["delay"] == 1, depths  # in RabbitMQ, not the outbox
        upstream.faults(outage=False)
        redis, http = container.app[REDIS], container.app[HTTP]
        answerer = build_answerer(settings, redis, http)
        async with running_worker(settings, Inbox(redis), answerer):
            replies = await _replies(container, user)
    drop_queues(settings)  # its own delay levels
    assert [r["message_id"] for r in replies] == ["w-1"]
    assert replies[0]["reply"]  # the stub's answer, delivered by the worker


async def test_a_failed_question_waits_in_the_outbox_while_rabbitmq_is_away(
    settings: Settings, upstream: Upstream
) -> None:
    away = replace(settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/")
    body = orjson.dumps({"user_id": "sl-outbox", "text": "what is a nova?", "message_id": "o-1"})
    upstream.faults(outage=True)
    try:
        async with container_for(away, broker_wait=0.2) as container:
            res = await container.serve(api_event("POST", "/v1/messages", body, {**JSON, **AUTH}))
            assert res["statusCode"] == 202, res
            key = outbox_key(settings.queue_prefix)
            assert await container.app[REDIS].xlen(key) == 1
            await container.app[REDIS].delete(key)
    finally:
        upstream.faults(outage=False)


async def _replies(container: Container, user: str) -> list[dict[str, Any]]:
    for _ in range(100):
        res = await container.serve(
            api_event("GET", f"/v1/users/{user}/replies", headers=AUTH, query="wait=0.2")
        )
        assert res["statusCode"] == 200, res
        replies: list[dict[str, Any]] = orjson.loads(res["body"])["replies"]
        if replies:
            return replies
    raise AssertionError("the worker never delivered the reply")


SERVER_MODULES = (
    "aiohttp.web",
    "aiohttp.web_app",
    "aiohttp.web_protocol",
    "aiohttp.web_request",
    "aiohttp.web_runner",
    "aiohttp.web_server",
    "aiohttp.web_urldispatcher",
)


def test_the_handler_module_imports_no_aiohttp_server() -> None:
    code = "import sys, bot.serverless; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert "bot.serverless" in out and "aiohttp" in out  # the client: upstream and platforms
    assert not set(SERVER_MODULES) & set(out), set(SERVER_MODULES) & set(out)
    # PyNaCl only when Discord is enabled (its key set), which this import has not seen.
    assert "nacl" not in out


async def test_the_handler_answers_through_the_aws_runtime_interface_client(
    settings: Settings, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """AWS's runtime interface client (awslambdaric, the one in AWS's base images) runs
    `bot.serverless.handler` in a process of its own, against a Runtime API served here."""
    events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    answers: dict[str, asyncio.Future[Any]] = {}

    async def next_invocation(_: web.Request) -> web.Response:
        rid, ev = await events.get()
        return web.Response(
            body=orjson.dumps(ev),
            content_type="application/json",  # as the Runtime API: no charset parameter
            headers={
                "Lambda-Runtime-Aws-Request-Id": rid,
                "Lambda-Runtime-Deadline-Ms": str(int(time.time() * 1000) + 30_000),
                "Lambda-Runtime-Invoked-Function-Arn": "arn:aws:lambda:eu-west-1:1:function:bot",
                "Lambda-Runtime-Trace-Id": "Root=1-0-0",
            },
        )

    async def response(request: web.Request) -> web.Response:
        answers[request.match_info["rid"]].set_result(await request.json())
        return web.json_response({"status": "OK"}, status=202)

    async def error(request: web.Request) -> web.Response:
        failure = RuntimeError(await request.text())
        if "rid" in request.match_info:
            answers[request.match_info["rid"]].set_exception(failure)
        return web.json_response({"status": "OK"}, status=202)

    api = web.Application()
    api.router.add_get("/2018-06-01/runtime/invocation/next", next_invocation)
    api.router.add_post("/2018-06-01/runtime/invocation/{rid}/response", response)
    api.router.add_post("/2018-06-01/runtime/invocation/{rid}/error", error)
    api.router.add_post("/2018-06-01/runtime/init/error", error)
    server = await aiohttp_server(api)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("BOT_", "AWS_"))},
        **_environ(settings),
        "AWS_LAMBDA_RUNTIME_API": f"127.0.0.1:{server.port}",
        "AWS_LAMBDA_FUNCTION_NAME": "bot",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "512",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/bot",
        "AWS_LAMBDA_LOG_STREAM_NAME": "test",
        "LAMBDA_TASK_ROOT": str(ROOT),
    }
    ric = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "awslambdaric", "bot.serverless.handler", cwd=ROOT, env=env
    )
    try:
        body = orjson.dumps({"user_id": "sl-ric", "text": "/echo via the RIC", "message_id": "c"})
        sent = [
            api_event("POST", "/v1/messages", body, {**JSON, **AUTH}),
            api_event("POST", "/v1/messages", body, {**JSON, **AUTH}),
            {"version": "1.0", "httpMethod": "GET", "path": "/healthz"},
        ]
        results = []
        for ev in sent:
            rid = uuid.uuid4().hex
            answers[rid] = asyncio.get_running_loop().create_future()
            await events.put((rid, ev))
            results.append(await asyncio.wait_for(answers[rid], 30))
    finally:
        ric.kill()
        await ric.wait()
    first, replay, rest = results
    assert first["statusCode"] == 200, first["body"]
    assert orjson.loads(first["body"])["reply"] == "via the RIC"
    assert replay["headers"]["idempotent-replayed"] == "true"
    assert rest["statusCode"] == 400


async def test_without_keys_only_loopback_sources_are_served_as_on_a_replica(
    settings: Settings,
) -> None:
    """The event's `sourceIp` is the client: with no BOT_API_KEYS (and BOT_OPEN_API off),
    an API Gateway caller from anywhere gets the replica's 403."""
    body = orjson.dumps({"user_id": "sl-open", "text": "/help"})
    async with container_for(replace(settings, api_keys=())) as container:
        ev = api_event("POST", "/v1/messages", body, JSON)
        ev["requestContext"]["http"]["sourceIp"] = "203.0.113.9"
        res = await container.serve(ev)
        assert res["statusCode"] == 403, res
        assert orjson.loads(res["body"])["error"]["code"] == "api_keys_required"
        ev["requestContext"]["http"]["sourceIp"] = "127.0.0.1"
        assert (await container.serve(ev))["statusCode"] == 200


# The settings that carry credentials (the URLs may too).
SECRETS = (
    "REDIS_URL",
    "AMQP_URL",
    "BOT_API_KEYS",
    "UPSTREAM_API_KEY",
    "TELEGRAM_BOT_TOKEN",
    "TELEGRAM_WEBHOOK_SECRET",
    "SLACK_SIGNING_SECRET",
    "SLACK_BOT_TOKEN",
    "DISCORD_BOT_TOKEN",
)


def test_the_sam_template_runs_this_handler_with_known_settings_and_secrets_by_reference() -> None:
    """`make lint` runs cfn-lint on it; this holds it to the code: the handler's path, only
    settings the bot reads, and every secret setting from Secrets Manager, never a value."""
    from cfnlint.decode import decode

    template, errors = decode(str(ROOT / "serverless" / "template.yaml"))
    assert not errors and template is not None
    function = template["Resources"]["BotFunction"]["Properties"]
    assert function["Handler"] == "bot.serverless.handler"
    assert template["Globals"]["Function"]["Runtime"] == "python3.11"
    variables = function["Environment"]["Variables"]
    assert set(variables) <= set(ENV_VARS), set(variables) - set(ENV_VARS)
    for name in SECRETS:  # each one there, each one a reference
        assert "resolve:secretsmanager" in orjson.dumps(variables[name]).decode(), name
    events = function["Events"]["Everything"]["Properties"]
    assert events["PayloadFormatVersion"] == "2.0"
    assert function["VpcConfig"] == {
        "SubnetIds": {"Ref": "SubnetIds"},
        "SecurityGroupIds": {"Ref": "SecurityGroupIds"},
    }
