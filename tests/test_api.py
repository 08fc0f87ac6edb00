"""The public API's contract on one replica in-process (`app_client`: `create_app` against the
real Redis and RabbitMQ, the stub upstream in-process); what needs NGINX in front of three
replicas uses the shared stack (marked `system`)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import orjson
import pytest

from bot.runtime import metrics_app
from tests.support import AppClient, Stack, Upstream, unique

GOOD = {"user_id": "u-good", "text": "/echo still fine"}

# (name, body bytes, content type, extra, expected status, expected error code)
BAD_INPUT = [
    ("not json", b"{nope", "application/json", 400, "invalid_json"),
    ("wrong content type", b'{"user_id":"u1","text":"hi"}', "text/plain", 415, None),
    ("form content type", b"user_id=u1&text=hi", "application/x-www-form-urlencoded", 415, None),
    ("empty body", b"", "application/json", 400, "invalid_json"),
    ("json array", b'[{"user_id":"u1","text":"hi"}]', "application/json", 400, "invalid_body"),
    ("json string", b'"hello"', "application/json", 400, "invalid_body"),
    ("missing user_id", b'{"text":"hi"}', "application/json", 400, "invalid_user_id"),
    ("missing text", b'{"user_id":"u1"}', "application/json", 400, "invalid_text"),
    ("empty text", b'{"user_id":"u1","text":"  \\n "}', "application/json", 400, "invalid_text"),
    (
        "text too long",
        json.dumps({"user_id": "u1", "text": "x" * 4097}).encode(),
        "application/json",
        400,
        "invalid_text",
    ),
    (
        "user_id too long",
        json.dumps({"user_id": "u" * 129, "text": "hi"}).encode(),
        "application/json",
        400,
        "invalid_user_id",
    ),
    (
        "user_id ill-formed",
        b'{"user_id":"u 1/..","text":"hi"}',
        "application/json",
        400,
        "invalid_user_id",
    ),
    ("null user_id", b'{"user_id":null,"text":"hi"}', "application/json", 400, "invalid_user_id"),
    ("null text", b'{"user_id":"u1","text":null}', "application/json", 400, "invalid_text"),
    (
        "nested object",
        b'{"user_id":{"id":"u1"},"text":"hi"}',
        "application/json",
        400,
        "invalid_user_id",
    ),
    ("text as list", b'{"user_id":"u1","text":["hi"]}', "application/json", 400, "invalid_text"),
    (
        "message_id ill-formed",
        b'{"user_id":"u1","text":"hi","message_id":"a b"}',
        "application/json",
        400,
        "invalid_message_id",
    ),
    (
        "unknown field",
        b'{"user_id":"u1","text":"hi","admin":true}',
        "application/json",
        400,
        "unknown_field",
    ),
    (
        "odd unicode: lone surrogate",
        b'{"user_id":"u1","text":"\\ud800"}',
        "application/json",
        400,
        None,
    ),
    (
        "odd unicode: control chars",
        b'{"user_id":"u1","text":"a\\u0000b"}',
        "application/json",
        400,
        "invalid_text",
    ),
    (
        "invalid utf-8",
        b'{"user_id":"u1","text":"\xff\xfe"}',
        "application/json",
        400,
        "invalid_json",
    ),
    (
        "prefs set without value",
        b'{"user_id":"u1","text":"/prefs set color"}',
        "application/json",
        400,
        "invalid_command",
    ),
    (
        "prefs bad key",
        b'{"user_id":"u1","text":"/prefs get a/b"}',
        "application/json",
        400,
        "invalid_pref_key",
    ),
    (
        "65 KiB body",
        json.dumps({"user_id": "u1", "text": "x" * 65 * 1024}).encode(),
        "application/json",
        413,
        None,
    ),
]


async def say(client: AppClient, body: dict[str, Any], **headers: str) -> tuple[int, Any, Any]:
    """POST a message; the status, the JSON body and the headers."""
    async with client.post("/v1/messages", data=orjson.dumps(body), headers={
        "Content-Type": "application/json", **headers}) as r:  # fmt: skip
        return r.status, await r.json(), r.headers


@pytest.mark.parametrize(
    ("name", "body", "ctype", "status", "code"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT]
)
async def test_bad_input_gets_json_4xx_and_next_request_works(
    app_client: AppClient, name: str, body: bytes, ctype: str, status: int, code: str | None
) -> None:
    r = await app_client.post("/v1/messages", data=body, headers={"Content-Type": ctype})
    text = await r.text()
    assert r.status == status, text
    assert r.headers["Content-Type"].startswith("application/json")
    err = json.loads(text)["error"]
    assert err["message"]
    if code:
        assert err["code"] == code
    assert "Traceback" not in text
    ok_status, ok, _ = await say(app_client, {**GOOD, "user_id": unique()})
    assert ok_status == 200
    assert ok["reply"] == "still fine"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nope", 404),
        ("GET", "/nope", 404),
        ("GET", "/metrics", 404),
        ("GET", "/v1/messages", 405),
        ("DELETE", "/v1/messages", 405),
    ],
)
async def test_unknown_routes_and_methods_are_json(
    app_client: AppClient, method: str, path: str, status: int
) -> None:
    r = await app_client.request(method, path)
    assert r.status == status
    assert (await r.json())["error"]["code"]


async def test_commands(app_client: AppClient) -> None:
    user = unique()

    async def reply(text: str) -> str:
        status, body, _ = await say(app_client, {"user_id": user, "text": text})
        assert status == 200, body
        assert body["status"] == "replied" and body["cached"] is False
        return str(body["reply"])

    assert "/prefs set" in await reply("/help")
    assert await reply("/echo  hello   world ") == "hello   world"
    assert await reply("/prefs") == "You have no preferences set."
    assert await reply("/prefs set lang en gb") == "lang = en gb"
    assert await reply("/prefs get lang") == "lang = en gb"
    assert await reply("/prefs get color") == "color is not set."
    assert await reply("/prefs") == "lang = en gb"
    assert await reply("/prefs del lang") == "lang removed."
    assert await reply("/prefs") == "You have no preferences set."


async def test_questions_go_upstream_with_context(
    app_client: AppClient, upstream: Upstream
) -> None:
    user = unique()
    for i in range(12):
        status, _, _ = await say(app_client, {"user_id": user, "text": f"/echo m{i}"})
        assert status == 200
    q = f"what is a pulsar {unique()}?"
    status, body, _ = await say(app_client, {"user_id": user, "text": q})
    assert status == 200, body
    assert q in body["reply"]
    last = upstream.stats().last
    assert last["q"] == q
    # the last 10 messages, oldest first, never more
    assert [c["q"] for c in last["context"]] == [f"/echo m{i}" for i in range(2, 12)]
    assert last["context"][-1]["a"] == "m11"


async def test_request_id_is_echoed_and_generated(app_client: AppClient) -> None:
    _, body, headers = await say(
        app_client, {"user_id": unique(), "text": "/help"}, **{"X-Request-ID": "my-req-1"}
    )
    assert headers["X-Request-ID"] == "my-req-1"
    assert body["message_id"] == "my-req-1"
    _, _, headers = await say(app_client, {"user_id": unique(), "text": "/help"})
    assert len(headers["X-Request-ID"]) >= 16


async def test_an_ill_formed_request_id_gives_every_attempt_one_id(
    app_client: AppClient, upstream: Upstream
) -> None:
    """An edge that passes the client's X-Request-ID as it is (ingress-nginx) resends a request
    to another replica after a failure: both attempts of a message without message_id must get
    the same id, so the second is a replay, not a second message."""
    body = {"user_id": unique(), "text": f"question {unique()}"}
    calls = upstream.stats().calls
    ids, replayed = set(), []
    for _ in range(2):
        status, answer, headers = await say(app_client, body, **{"X-Request-ID": "bad id!"})
        assert status == 200, answer
        ids.add(headers["X-Request-ID"])
        assert answer["message_id"] == headers["X-Request-ID"]
        replayed.append(headers.get("Idempotent-Replayed"))
    [rid] = ids
    assert rid != "bad id!" and rid.isascii() and " " not in rid
    assert replayed == [None, "true"]
    assert upstream.stats().calls == calls + 1
    # another ill-formed id is another request
    _, _, headers = await say(app_client, body, **{"X-Request-ID": "bad id?"})
    assert headers["X-Request-ID"] not in (rid, "bad id?")


async def test_replay_returns_first_body(app_client: AppClient, upstream: Upstream) -> None:
    body = {"user_id": unique(), "text": f"question {unique()}", "message_id": unique("m")}
    status, first, headers = await say(app_client, body)
    assert status == 200 and "Idempotent-Replayed" not in headers
    status, again, headers = await say(app_client, {**body, "text": "something else entirely"})
    assert status == 200
    assert headers["Idempotent-Replayed"] == "true"
    assert again == first
    assert upstream.stats().last["q"] == body["text"]
    assert upstream.stats().calls == 1


@pytest.mark.system
async def test_twenty_concurrent_duplicates_are_processed_once(stack: Stack) -> None:
    stack.reset_stub()
    body = {"user_id": unique(), "text": f"q {unique()}", "message_id": unique("m")}
    async with aiohttp.ClientSession() as session:

        async def send() -> tuple[int, str, bool]:
            async with session.post(stack.url + "/v1/messages", json=body) as r:
                return r.status, await r.text(), "Idempotent-Replayed" in r.headers

        results = await asyncio.gather(*(send() for _ in range(20)))
    assert {s for s, _, _ in results} == {200}
    assert len({text for _, text, _ in results}) == 1
    assert sum(not replayed for _, _, replayed in results) == 1
    assert stack.stub_stats()["calls"] == 1


async def test_healthz_readyz_and_build_info(app_client: AppClient, aiohttp_client: Any) -> None:
    assert (await app_client.get("/healthz")).status == 200
    r = await app_client.get("/readyz")
    assert r.status == 200 and (await r.json())["dependencies"]["redis"] is True
    metrics = await (await aiohttp_client(metrics_app())).get("/metrics")
    assert 'bot_build_info{version="' in await metrics.text()
