"""The web chat's API: signed session cookies, the cross-site check, and replies over SSE.

In-process (one replica, the real Redis) for the HTTP contract; through NGINX for what the
edge adds: the static page and its headers, the Origin NGINX forwards, an unbuffered stream,
and ``Last-Event-ID`` resuming on whichever replica the reconnect lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
import pytest
import requests

from bot.api import webchat
from bot.api.keys import STATE
from bot.websession import COOKIE, SessionSigner, user_id
from tests.support import AppClient, Stack, Upstream, parse_events

SECRET = "webchat-test-secret-0123456789"
Events = list[tuple[str, dict[str, Any]]]


# --- the cookie -------------------------------------------------------------------------------


def test_a_signed_session_verifies_and_a_tampered_one_does_not() -> None:
    signer = SessionSigner(SECRET)
    session = signer.new_session()
    cookie = signer.cookie(session)
    assert signer.session(cookie) == session
    assert user_id(session) == f"web:{session}"
    body, _, sig = cookie.partition(".")
    flipped = body[:-1] + ("A" if body[-1] != "A" else "B")
    assert signer.session(f"{flipped}.{sig}") is None  # another session, the old signature
    assert signer.session(f"{body}.{sig[:-1]}") is None  # a signature cut short
    assert signer.session(body) is None  # no signature
    assert signer.session(f"{body}.{sig}x") is None
    assert signer.session("") is None and signer.session(None) is None
    assert signer.session(f"{body}.{sig}\u00e9") is None
    # Another secret's cookie is not ours.
    assert SessionSigner(SECRET + "-other").session(cookie) is None
    assert SessionSigner(SECRET).session(cookie) == session


# --- in-process: one replica ------------------------------------------------------------------


@pytest.fixture
async def chat(make_app_client: Callable[..., Awaitable[AppClient]]) -> AppClient:
    return await make_app_client(BOT_WEBCHAT_SECRET=SECRET, BOT_SSE_PER_SESSION="2")


def _origin(client: AppClient) -> str:
    return str(client.make_url("")).rstrip("/")


async def _session(client: AppClient) -> str:
    r = await client.post("/chat/session", headers={"Origin": _origin(client)})
    assert r.status == 200, await r.text()
    assert (await r.json())["status"] == "created"
    header = r.headers["Set-Cookie"]
    for attr in ("HttpOnly", "SameSite=Strict", "Path=/chat/"):
        assert attr.lower() in header.lower(), header
    return r.cookies[COOKIE].value


async def test_session_cookie_is_kept_and_a_forged_one_replaced(chat: AppClient) -> None:
    cookie = await _session(chat)
    r = await chat.post("/chat/session", headers={"Origin": _origin(chat)})
    assert (await r.json())["status"] == "resumed"
    assert r.cookies[COOKIE].value == cookie
    chat.session.cookie_jar.clear()
    chat.session.cookie_jar.update_cookies({COOKIE: cookie[:-2] + "xx"})
    r = await chat.post("/chat/session")
    assert (await r.json())["status"] == "created"
    assert r.cookies[COOKIE].value != cookie


async def test_messages_and_events_need_a_session(chat: AppClient) -> None:
    r = await chat.post("/chat/messages", json={"text": "/echo hi"})
    assert r.status == 401
    assert (await r.json())["error"]["code"] == "no_session"
    r = await chat.get("/chat/events")
    assert r.status == 401
    cookie = await _session(chat)
    chat.session.cookie_jar.clear()
    chat.session.cookie_jar.update_cookies({COOKIE: cookie + "A"})  # tampered
    assert (await chat.post("/chat/messages", json={"text": "/echo hi"})).status == 401


async def test_a_cross_site_request_is_refused(chat: AppClient) -> None:
    await _session(chat)
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": _origin(chat).replace("127.0.0.1", "localhost")},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        r = await chat.post("/chat/messages", json={"text": "/echo hi"}, headers=headers)
        assert r.status == 403, headers
        assert (await r.json())["error"]["code"] == "cross_site"
        assert (await chat.post("/chat/session", headers=headers)).status == 403
    r = await chat.post(
        "/chat/messages", json={"text": "/echo hi"}, headers={"Origin": _origin(chat)}
    )
    assert r.status == 200, await r.text()


async def test_without_a_secret_the_web_chat_is_off(
    make_app_client: Callable[..., Awaitable[AppClient]],
) -> None:
    client = await make_app_client()
    for method, path in (
        ("POST", "/chat/session"),
        ("POST", "/chat/messages"),
        ("GET", "/chat/events"),
    ):
        r = await client.request(method, path)
        assert r.status == 404
        assert (await r.json())["error"]["code"] == "webchat_disabled"


async def test_a_message_is_answered_as_the_sessions_user(chat: AppClient) -> None:
    await _session(chat)
    bodies: list[Any] = [{"text": "hi", "user_id": "someone-else"}, {"text": ""}, [], {"text": 1}]
    for body in bodies:
        r = await chat.post("/chat/messages", json=body)
        assert r.status == 400, body
    r = await chat.post("/chat/messages", json={"text": "/echo hi there", "message_id": "m-1"})
    assert r.status == 200
    assert await r.json() == {
        "message_id": "m-1",
        "status": "replied",
        "reply": "hi there",
        "cached": False,
    }
    again = await chat.post("/chat/messages", json={"text": "/echo hi there", "message_id": "m-1"})
    assert again.headers["Idempotent-Replayed"] == "true"


async def _events(response: Any, count: int, timeout: float = 10) -> Events:
    """The next `count` events of an open SSE response: (id, data)."""
    events: Events = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(timeout):
        while len(events) < count:
            raw = await response.content.readline()
            assert raw, "the stream ended"
            text = raw.decode().rstrip("\n")
            if text == "":
                if "data" in fields:
                    events.append((fields.get("id", ""), orjson.loads(fields["data"])))
                fields = {}
            elif not text.startswith(":"):
                name, _, value = text.partition(": ")
                fields[name] = value
    return events


async def test_events_stream_every_reply_once_and_resume_after_the_last_id(chat: AppClient) -> None:
    await _session(chat)
    for i in range(3):
        r = await chat.post("/chat/messages", json={"text": f"/echo n{i}", "message_id": f"m{i}"})
        assert r.status == 200
    # The replayed message adds nothing.
    await chat.post("/chat/messages", json={"text": "/echo n0", "message_id": "m0"})
    async with chat.get("/chat/events") as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"] == "text/event-stream"
        assert stream.headers["X-Accel-Buffering"] == "no"
        first = await _events(stream, 3)
        assert [d["reply"] for _, d in first] == ["n0", "n1", "n2"]
        assert [d["message_id"] for _, d in first] == ["m0", "m1", "m2"]
        # Live: a message sent while the stream is open arrives on it.
        await chat.post("/chat/messages", json={"text": "/echo live", "message_id": "m3"})
        ((live_id, live),) = await _events(stream, 1)
        assert live["reply"] == "live"
    async with chat.get("/chat/events", headers={"Last-Event-ID": first[1][0]}) as stream:
        resumed = await _events(stream, 2)
    assert [d["message_id"] for _, d in resumed] == ["m2", "m3"]
    assert resumed[1][0] == live_id
    r = await chat.get("/chat/events", headers={"Last-Event-ID": "not-a-cursor"})
    assert r.status == 400


async def test_a_streamed_message_grows_then_is_in_the_inbox_once(
    make_app_client: Callable[..., Awaitable[AppClient]], upstream: Upstream
) -> None:
    """`Accept: text/event-stream`: `delta` events then the `done` body, as `/v1/messages`
    gives; the answer reaches `/chat/events` once, however often the message is resent."""
    chat = await make_app_client(
        BOT_WEBCHAT_SECRET=SECRET, UPSTREAM_KIND="openai", UPSTREAM_MODEL="stub-model"
    )
    await _session(chat)
    stream = {"Accept": "text/event-stream"}
    body = {"text": "name three stars please", "message_id": "w-1"}
    r = await chat.post("/chat/messages", json=body, headers=stream)
    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
    events = parse_events(await r.text())
    deltas = [data["text"] for name, data in events if name == "delta"]
    assert len(deltas) == 7 and [name for name, _ in events][-1] == "done"
    reply = "[1] You asked: name three stars please"
    assert "".join(deltas) == reply
    assert events[-1][1] == {"message_id": "w-1", "status": "replied", "reply": reply,
                             "cached": False}  # fmt: skip
    # Resent (a stream cut before its end): the same answer, the `done` event alone.
    again = await chat.post("/chat/messages", json=body, headers=stream)
    assert parse_events(await again.text()) == [("done", events[-1][1])]
    assert again.headers["Idempotent-Replayed"] == "true"
    async with chat.get("/chat/events") as live:
        ((_, data),) = await _events(live, 1)
    assert (data["message_id"], data["reply"]) == ("w-1", reply)
    assert upstream.stats().calls == 1
    # A bad message is still a JSON error, not a stream.
    bad = await chat.post("/chat/messages", json={"text": ""}, headers=stream)
    assert bad.status == 400 and bad.content_type == "application/json"


async def test_event_streams_are_bounded_per_session(chat: AppClient) -> None:
    await _session(chat)
    async with chat.get("/chat/events") as one, chat.get("/chat/events") as two:
        assert one.status == two.status == 200
        r = await chat.get("/chat/events")
        assert r.status == 429
        assert (await r.json())["error"]["code"] == "too_many_streams"
        # The message path is not held up by them.
        assert (await chat.post("/chat/messages", json={"text": "/echo ok"})).status == 200


async def test_an_idle_stream_gets_keep_alives_and_a_draining_replica_closes_it(
    chat: AppClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(webchat, "KEEPALIVE_S", 0.2)
    await _session(chat)
    async with chat.get("/chat/events") as stream:
        assert await stream.content.readline() == b"retry: 1000\n"
        assert await stream.content.readline() == b"\n"
        async with asyncio.timeout(5):
            assert await stream.content.readline() == b": keep-alive\n"
        chat.app[STATE].draining = True
        started = time.monotonic()
        async with asyncio.timeout(5):
            await stream.content.read()  # the end of the stream
        assert time.monotonic() - started < 2


# --- through NGINX ------------------------------------------------------------------------


def _http_session(stack: Stack) -> requests.Session:
    http = requests.Session()
    http.headers["Origin"] = stack.url
    r = http.post(stack.url + "/chat/session", timeout=10)
    assert r.status_code == 200, r.text
    return http


@contextlib.contextmanager
def _stream(http: requests.Session, url: str, **headers: str) -> Iterator[Iterator[str]]:
    with http.get(url, headers=headers, stream=True, timeout=10) as r:
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"] == "text/event-stream"
        yield r.iter_lines(decode_unicode=True)


def _next_events(lines: Iterator[str], count: int) -> Events:
    events: Events = []
    fields: dict[str, str] = {}
    for text in lines:
        if text == "":
            if "data" in fields:
                events.append((fields.get("id", ""), orjson.loads(fields["data"])))
                if len(events) == count:
                    return events
            fields = {}
        elif not text.startswith(":"):
            name, _, value = text.partition(": ")
            fields[name] = value
    raise AssertionError("the stream ended")


@pytest.mark.system
def test_the_page_is_served_by_nginx_with_a_strict_policy(stack: Stack) -> None:
    r = requests.get(stack.url + "/chat/", timeout=10)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    csp = r.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert 'role="log"' in r.text and "<script>" not in r.text  # no inline script
    js = requests.get(stack.url + "/chat/chat.js", headers={"Accept-Encoding": "gzip"}, timeout=10)
    assert js.headers["Content-Type"].startswith("text/javascript")
    assert js.headers.get("Content-Encoding") == "gzip"
    assert "ETag" in js.headers
    again = requests.get(
        stack.url + "/chat/chat.js", headers={"If-None-Match": js.headers["ETag"]}, timeout=10
    )
    assert again.status_code == 304
    assert requests.get(stack.url + "/chat", allow_redirects=False, timeout=10).status_code == 301
    missing = requests.get(stack.url + "/chat/nothing-here", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


@pytest.mark.system
def test_origin_check_and_cookie_through_nginx(stack: Stack) -> None:
    http = _http_session(stack)
    cookie = http.cookies[COOKIE]
    r = http.post(stack.url + "/chat/messages", json={"text": "/echo via nginx"}, timeout=10)
    assert r.status_code == 200 and r.json()["reply"] == "via nginx"
    evil = http.post(
        stack.url + "/chat/messages",
        json={"text": "/echo hi"},
        headers={"Origin": "http://evil.example"},
        timeout=10,
    )
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "cross_site"
    bare = requests.post(stack.url + "/chat/messages", json={"text": "/echo hi"}, timeout=10)
    assert bare.status_code == 401
    forged = requests.post(
        stack.url + "/chat/messages",
        json={"text": "/echo hi"},
        cookies={COOKIE: cookie[:-1] + ("A" if cookie[-1] != "A" else "B")},
        timeout=10,
    )
    assert forged.status_code == 401


@pytest.mark.system
def test_last_event_id_resumes_without_gap_or_duplicate_on_any_replica(stack: Stack) -> None:
    """Each reconnect may land on another replica (least_conn over three): every one resumes
    exactly after the id it names, and an event sent while the stream is open arrives at once
    (NGINX does not buffer it)."""
    http = _http_session(stack)
    events_url = stack.url + "/chat/events"
    sent = [f"m{i}" for i in range(6)]
    for i, mid in enumerate(sent[:2]):
        http.post(stack.url + "/chat/messages", json={"text": f"/echo {i}", "message_id": mid})
    seen: Events = []
    with _stream(http, events_url) as lines:
        seen += _next_events(lines, 2)
        started = time.monotonic()
        http.post(stack.url + "/chat/messages", json={"text": "/echo 2", "message_id": sent[2]})
        seen += _next_events(lines, 1)
        assert time.monotonic() - started < 3  # unbuffered
    for i in range(3, 6):
        http.post(stack.url + "/chat/messages", json={"text": f"/echo {i}", "message_id": sent[i]})
        with _stream(http, events_url, **{"Last-Event-ID": seen[-1][0]}) as lines:
            seen += _next_events(lines, 1)
    assert [d["message_id"] for _, d in seen] == sent
    assert [d["reply"] for _, d in seen] == [str(i) for i in range(6)]
    # From an id in the middle: exactly what came after it.
    with _stream(http, events_url, **{"Last-Event-ID": seen[1][0]}) as lines:
        assert [d["message_id"] for _, d in _next_events(lines, 4)] == sent[2:]
    deadline = time.monotonic() + 5  # NGINX flushes its access log every second
    while True:
        log = [e for e in stack.access_log() if e["uri"] == "/chat/events"]
        if len(log) >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    replicas = {e["upstream_addr"] for e in log}
    assert len(replicas) >= 2, replicas


@pytest.mark.system
def test_a_replica_draining_on_sigterm_closes_its_streams_and_the_browser_resumes(
    stack: Stack,
) -> None:
    """A stream held on replica 1 ends when it is told to stop (not after the drain timeout),
    and a reconnect through NGINX resumes after the last id it got."""
    http = _http_session(stack)
    http.post(stack.url + "/chat/messages", json={"text": "/echo a", "message_id": "d1"})
    direct = stack.replica_url(1)  # past NGINX: the replica's own origin
    with _stream(http, direct + "/chat/events", Origin=direct) as lines:
        ((last_id, first),) = _next_events(lines, 1)
        assert first["message_id"] == "d1"
        http.post(stack.url + "/chat/messages", json={"text": "/echo b", "message_id": "d2"})
        _next_events(lines, 1)  # the live one, so the stream is surely held now
        started = time.monotonic()
        stack.kill("bot-1", signal.SIGTERM)
        assert list(lines) is not None  # read to the end: the replica closed it
        closed_after = time.monotonic() - started
    assert closed_after < 5, closed_after
    http.post(stack.url + "/chat/messages", json={"text": "/echo c", "message_id": "d3"})
    with _stream(http, stack.url + "/chat/events", **{"Last-Event-ID": last_id}) as lines:
        assert [d["message_id"] for _, d in _next_events(lines, 2)] == ["d2", "d3"]
    stack.wait_ready("bot-1")
