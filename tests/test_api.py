"""The public API through a real NGINX and real replicas (the shared 3-replica stack)."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
import requests

from tests.support import Stack, post, unique

pytestmark = pytest.mark.system

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


@pytest.mark.parametrize(
    ("name", "body", "ctype", "status", "code"), BAD_INPUT, ids=[c[0] for c in BAD_INPUT]
)
def test_bad_input_gets_json_4xx_and_next_request_works(
    stack: Stack, name: str, body: bytes, ctype: str, status: int, code: str | None
) -> None:
    r = requests.post(
        stack.url + "/v1/messages", data=body, headers={"Content-Type": ctype}, timeout=10
    )
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    err = r.json()["error"]
    assert err["message"]
    if code:
        assert err["code"] == code
    assert "Traceback" not in r.text
    ok = post(stack.url + "/v1/messages", {**GOOD, "user_id": unique()})
    assert ok.status_code == 200
    assert ok.json()["reply"] == "still fine"


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
def test_unknown_routes_and_methods_are_json(
    stack: Stack, method: str, path: str, status: int
) -> None:
    r = requests.request(method, stack.url + path, timeout=10)
    assert r.status_code == status
    assert r.json()["error"]["code"]


def test_commands(stack: Stack) -> None:
    user = unique()

    def say(text: str) -> str:
        r = post(stack.url + "/v1/messages", {"user_id": user, "text": text})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "replied" and body["cached"] is False
        return str(body["reply"])

    assert "/prefs set" in say("/help")
    assert say("/echo  hello   world ") == "hello   world"
    assert say("/prefs") == "You have no preferences set."
    assert say("/prefs set lang en gb") == "lang = en gb"
    assert say("/prefs get lang") == "lang = en gb"
    assert say("/prefs get color") == "color is not set."
    assert say("/prefs") == "lang = en gb"
    assert say("/prefs del lang") == "lang removed."
    assert say("/prefs") == "You have no preferences set."


def test_questions_go_upstream_with_context(stack: Stack) -> None:
    user = unique()
    for i in range(12):
        r = post(stack.url + "/v1/messages", {"user_id": user, "text": f"/echo m{i}"})
        assert r.status_code == 200
    q = f"what is a pulsar {unique()}?"
    r = post(stack.url + "/v1/messages", {"user_id": user, "text": q})
    assert r.status_code == 200, r.text
    assert q in r.json()["reply"]
    last = stack.stub_stats()["last"]
    assert last["q"] == q
    # the last 10 messages, oldest first, never more
    assert [c["q"] for c in last["context"]] == [f"/echo m{i}" for i in range(2, 12)]
    assert last["context"][-1]["a"] == "m11"


def test_request_id_is_echoed_and_generated(stack: Stack) -> None:
    r = post(
        stack.url + "/v1/messages",
        {"user_id": unique(), "text": "/help"},
        headers={"X-Request-ID": "my-req-1"},
    )
    assert r.headers["X-Request-ID"] == "my-req-1"
    assert r.json()["message_id"] == "my-req-1"
    r = post(stack.url + "/v1/messages", {"user_id": unique(), "text": "/help"})
    assert len(r.headers["X-Request-ID"]) >= 16


def test_replay_returns_first_body(stack: Stack) -> None:
    body = {"user_id": unique(), "text": f"question {unique()}", "message_id": unique("m")}
    first = post(stack.url + "/v1/messages", body)
    assert first.status_code == 200 and "Idempotent-Replayed" not in first.headers
    again = post(stack.url + "/v1/messages", {**body, "text": "something else entirely"})
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert stack.stub_stats()["last"]["q"] == body["text"]


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


def test_healthz_and_readyz(stack: Stack) -> None:
    assert requests.get(stack.replica_url(1) + "/healthz", timeout=5).status_code == 200
    r = requests.get(stack.replica_url(1) + "/readyz", timeout=5)
    assert r.status_code == 200 and r.json()["dependencies"]["redis"] is True
    metrics = requests.get(stack.metrics_url(1), timeout=5).text
    assert 'bot_build_info{version="' in metrics
