"""Integrations: the preferences service, API keys, data that survives a Redis restart (on the
in-process replica), NGINX resends and the OpenAPI document (through NGINX)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import yaml
from aiohttp import ClientResponse
from openapi_core import OpenAPI
from openapi_core.contrib.requests import RequestsOpenAPIRequest, RequestsOpenAPIResponse
from structlog.testing import capture_logs

from bot.app import create_app
from bot.runtime import metrics_app
from bot.settings import load_settings
from tests.support import (
    AppClient,
    PrivateRedis,
    Stack,
    kill_replica_mid_question,
    unique,
)

ROOT = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())


def _prefs(user: str, key: str | None = None) -> str:
    return f"/v1/users/{user}/prefs" + (f"/{key}" if key else "")


async def _json(r: ClientResponse) -> Any:
    return orjson.loads(await r.read())


async def _say(client: AppClient, body: dict[str, Any], **headers: str) -> ClientResponse:
    return await client.post("/v1/messages", json=body, headers=headers)


async def test_prefs_round_trip(app_client: AppClient) -> None:
    c, user = app_client, unique()
    assert await _json(await c.get(_prefs(user))) == {"prefs": {}}
    r = await c.put(_prefs(user), json={"prefs": {"lang": "en", "tz": "UTC"}})
    assert r.status == 200 and await _json(r) == {"prefs": {"lang": "en", "tz": "UTC"}}
    r = await c.put(_prefs(user), json={"prefs": {"lang": "fr"}})
    assert await _json(r) == {"prefs": {"lang": "fr", "tz": "UTC"}}  # merged
    # the chat commands see the same hash
    say = await _say(c, {"user_id": user, "text": "/prefs get lang"})
    assert (await _json(say))["reply"] == "lang = fr"
    assert (await _say(c, {"user_id": user, "text": "/prefs del tz"})).ok
    assert await _json(await c.get(_prefs(user))) == {"prefs": {"lang": "fr"}}
    r = await c.delete(_prefs(user, "lang"))
    assert r.status == 204 and not await r.read()
    assert (await c.delete(_prefs(user, "lang"))).status == 204
    await c.put(_prefs(user), json={"prefs": {"a": "1", "b": "2"}})
    assert (await c.delete(_prefs(user))).status == 204
    assert await _json(await c.get(_prefs(user))) == {"prefs": {}}


BAD_PREFS: list[tuple[str, Any, str, int]] = [
    ("bad key", {"prefs": {"a b": "x"}}, "application/json", 400),
    ("key too long", {"prefs": {"k" * 65: "x"}}, "application/json", 400),
    ("value not a string", {"prefs": {"k": 5}}, "application/json", 400),
    ("null value", {"prefs": {"k": None}}, "application/json", 400),
    ("value too long", {"prefs": {"k": "v" * 1025}}, "application/json", 400),
    ("prefs not an object", {"prefs": ["k", "v"]}, "application/json", 400),
    ("missing prefs", {"k": "v"}, "application/json", 400),
    ("extra field", {"prefs": {}, "more": 1}, "application/json", 400),
    ("array body", [1], "application/json", 400),
    ("not json", b"{", "application/json", 400),
    ("empty", b"", "application/json", 400),
    ("text body", b'{"prefs":{}}', "text/plain", 415),
    ("huge", {"prefs": {"k": "v" * 70_000}}, "application/json", 413),
]


@pytest.mark.parametrize(
    ("name", "body", "ctype", "status"), BAD_PREFS, ids=[b[0] for b in BAD_PREFS]
)
async def test_bad_prefs_are_refused(
    app_client: AppClient, name: str, body: Any, ctype: str, status: int
) -> None:
    user = unique()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = await app_client.put(_prefs(user), data=data, headers={"Content-Type": ctype})
    assert r.status == status, await r.text()
    assert (await _json(r))["error"]["code"]
    assert await _json(await app_client.get(_prefs(user))) == {"prefs": {}}


async def test_bad_user_or_key_in_path(app_client: AppClient) -> None:
    assert (await app_client.get("/v1/users/a%20b/prefs")).status == 400
    r = await app_client.delete("/v1/users/u1/prefs/a%20b")
    assert r.status == 400 and (await _json(r))["error"]["code"] == "invalid_pref_key"


async def test_more_than_100_keys_is_refused_and_stores_nothing(app_client: AppClient) -> None:
    c, user = app_client, unique()
    too_many = {f"k{i}": "v" for i in range(101)}
    r = await c.put(_prefs(user), json={"prefs": too_many})
    assert r.status == 400 and (await _json(r))["error"]["code"] == "too_many_prefs"
    assert await _json(await c.get(_prefs(user))) == {"prefs": {}}
    # 100 is fine; one more key on top is refused atomically, an update of an existing is not
    hundred = {f"k{i}": "v" for i in range(100)}
    assert (await c.put(_prefs(user), json={"prefs": hundred})).ok
    r = await c.put(_prefs(user), json={"prefs": {"k0": "w", "new": "x"}})
    assert r.status == 409 and (await _json(r))["error"]["code"] == "too_many_prefs"
    stored = (await _json(await c.get(_prefs(user))))["prefs"]
    assert len(stored) == 100 and stored["k0"] == "v"
    r = await _say(c, {"user_id": user, "text": "/prefs set new x"})
    assert r.status == 400 and (await _json(r))["error"]["code"] == "too_many_prefs"
    assert (await c.put(_prefs(user), json={"prefs": {"k0": "w"}})).ok


async def test_api_keys(
    make_app_client: Callable[..., Awaitable[AppClient]], aiohttp_client: Any
) -> None:
    keys = [f"key-{unique()}", f"key-{unique()}"]
    body = {"user_id": unique(), "text": "/echo hi"}
    with capture_logs() as events:
        c = await make_app_client(BOT_API_KEYS=",".join(keys))
        for headers in (
            {},
            {"Authorization": "Bearer wrong-key"},
            {"Authorization": f"Bearer {keys[0]}x"},
            {"Authorization": f"Basic {keys[0]}"},
            {"Authorization": "Bearer"},
            {"Authorization": keys[0]},
        ):
            r = await _say(c, body, **headers)
            assert r.status == 401, (headers, await r.text())
            assert (await _json(r))["error"]["code"] in ("missing_api_key", "invalid_api_key")
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        for key in keys:
            r = await _say(c, body, Authorization=f"Bearer {key}")
            assert r.status == 200, await r.text()
        assert (await c.get("/v1/users/u1/prefs")).status == 401
        # health and readiness stay open (NGINX does not route them), metrics too
        assert (await c.get("/healthz")).ok
        assert (await c.get("/readyz")).ok
        assert (await (await aiohttp_client(metrics_app())).get("/metrics")).ok
    logged = repr(events)
    assert "api_keys_unset" not in logged
    for key in keys:
        assert key not in logged


async def test_open_api_warns_once_at_start(
    make_app_client: Callable[..., Awaitable[AppClient]],
) -> None:
    with capture_logs() as events:
        await make_app_client()
    assert [e["event"] for e in events].count("api_keys_unset") == 1


@pytest.mark.system
def test_nginx_resend_after_a_replica_dies_is_processed_once(
    make_stack: Callable[..., Stack],
) -> None:
    """A replica claims a message without message_id and dies before its upstream call goes
    out; NGINX resends it to the other replica, which answers it: one upstream call."""
    resent = kill_replica_mid_question(make_stack)
    r, stack = resent.response, resent.stack
    assert r.status_code == 200, r.text
    assert resent.body["text"] in r.json()["reply"]
    assert r.json()["message_id"] == r.headers["X-Request-ID"]
    assert stack.stub_stats()["calls"] == 1
    time.sleep(1.2)  # NGINX's access log flushes every second
    entry = [e for e in stack.access_log() if e["uri"] == "/v1/messages"][-1]
    assert "," in entry["upstream_addr"], entry  # NGINX tried a second replica


async def test_prefs_and_records_survive_a_redis_restart(
    make_app_client: Callable[..., Awaitable[AppClient]], tmp_path: Path
) -> None:
    redis = PrivateRedis(tmp_path / "redis", appendonly=True)
    redis.start()
    try:
        with capture_logs() as events:
            c = await make_app_client(REDIS_URL=redis.url)
        assert "redis_persistence_off" not in [e["event"] for e in events]
        user = unique()
        prefs = {"lang": "en", "tz": "Europe/Paris", "emoji": "🦜"}
        assert (await c.put(_prefs(user), json={"prefs": prefs})).ok
        body = {"user_id": user, "text": "/echo keep me", "message_id": unique("m")}
        first = await _say(c, body)
        assert first.ok
        redis.stop()
        redis.start()
        deadline = time.monotonic() + 10
        r = await c.get(_prefs(user))
        while r.status != 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            r = await c.get(_prefs(user))
        assert await _json(r) == {"prefs": prefs}
        again = await _say(c, body)
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert await _json(again) == await _json(first)
    finally:
        redis.stop()


@pytest.mark.parametrize(("appendonly", "warnings"), [(False, 1), (True, 0)])
async def test_a_replica_warns_once_at_start_when_redis_keeps_nothing_on_disk(
    make_app_client: Callable[..., Awaitable[AppClient]],
    tmp_path: Path,
    appendonly: bool,
    warnings: int,
) -> None:
    """Against a Redis of the test's own, so the machine's persistence setting is no input."""
    redis = PrivateRedis(tmp_path / "redis", appendonly=appendonly)
    redis.start()
    try:
        with capture_logs() as events:
            client = await make_app_client(REDIS_URL=redis.url)
            assert (await client.get("/healthz")).status == 200
        names = [e["event"] for e in events]
        assert names.count("redis_persistence_off") == warnings, names
    finally:
        redis.stop()


def _openapi(stack: Stack) -> OpenAPI:
    spec = {**SPEC, "servers": [{"url": stack.url}]}
    return OpenAPI.from_dict(spec)


def _check(api: OpenAPI, method: str, url: str, **kw: Any) -> requests.Response:
    req = requests.Request(method, url, **kw)
    resp = requests.Session().send(req.prepare(), timeout=10)
    api.validate_response(RequestsOpenAPIRequest(req), RequestsOpenAPIResponse(resp))
    return resp


@pytest.mark.system
def test_every_documented_route_answers_as_documented(stack: Stack) -> None:
    api = _openapi(stack)
    user = unique()
    seen = set()
    chat = requests.post(stack.url + "/chat/session", timeout=10).cookies
    cases: list[tuple[str, str, dict[str, Any], int]] = [
        ("POST", "/v1/messages", {"json": {"user_id": user, "text": "/echo hi"}}, 200),
        (
            "POST",
            "/v1/messages",
            {"json": {"user_id": user, "text": "q?", "message_id": "m1"}},
            200,
        ),
        (
            "POST",
            "/v1/messages",
            {"json": {"user_id": user, "text": "q?", "message_id": "m1"}},
            200,
        ),
        ("POST", "/v1/messages", {"json": {"user_id": "bad id", "text": "hi"}}, 400),
        ("POST", "/v1/messages", {"data": "x", "headers": {"Content-Type": "text/plain"}}, 415),
        ("POST", "/v1/messages", {"json": {"user_id": user, "text": "x" * 70000}}, 413),
        ("GET", f"/v1/users/{user}/replies", {}, 200),
        ("GET", f"/v1/users/{user}/prefs", {}, 200),
        ("PUT", f"/v1/users/{user}/prefs", {"json": {"prefs": {"lang": "en"}}}, 200),
        ("PUT", f"/v1/users/{user}/prefs", {"json": {"prefs": {"a b": "x"}}}, 400),
        ("DELETE", f"/v1/users/{user}/prefs/lang", {}, 204),
        ("DELETE", f"/v1/users/{user}/prefs", {}, 204),
        ("GET", "/v1/openapi.json", {}, 200),
        ("GET", "/healthz", {}, 200),
        ("GET", "/readyz", {}, 200),
        ("POST", "/chat/session", {}, 200),
        ("POST", "/chat/messages", {"json": {"text": "/echo hi"}, "cookies": chat}, 200),
        ("POST", "/chat/messages", {"json": {"text": "/echo hi"}}, 401),
        ("POST", "/chat/messages", {"json": {"text": ""}, "cookies": chat}, 400),
        (
            "POST",
            "/chat/messages",
            {"json": {"text": "hi"}, "cookies": chat, "headers": {"Origin": "http://a.example"}},
            403,
        ),
        ("GET", "/chat/events", {}, 401),  # with a cookie it streams: tests/test_webchat.py
        # The chat channels: this stack sets no platform secrets, so each answers 404 JSON.
        ("POST", "/channels/telegram", {"json": {"update_id": 1}}, 404),
        ("POST", "/channels/slack/events", {"json": {"type": "event_callback"}}, 404),
        (
            "POST",
            "/channels/slack/commands",
            {
                "data": "team_id=T&user_id=U&channel_id=C&trigger_id=t&response_url=x",
                "headers": {"Content-Type": "application/x-www-form-urlencoded"},
            },
            404,
        ),
        ("POST", "/channels/discord/interactions", {"json": {"type": 1}}, 404),
    ]
    for method, path, kw, status in cases:
        r = _check(api, method, stack.url + path, **kw)
        assert r.status_code == status, (method, path, r.text)
        template = path.replace(user, "{user_id}").replace("/lang", "/{key}")
        seen.add((method, template))
    documented = {
        (m.upper(), p) for p, item in SPEC["paths"].items() for m in item if m != "parameters"
    }
    assert documented <= seen, documented - seen
    assert requests.get(stack.url + "/v1/openapi.json", timeout=5).json() == SPEC


def test_every_served_route_is_documented() -> None:
    app = create_app(load_settings({}))
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {
        (m.upper(), p) for p, item in SPEC["paths"].items() for m in item if m != "parameters"
    }
    assert served == documented
