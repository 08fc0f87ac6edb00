"""Hostile input and overload at the API (issue 15, items 2, 4, 7 and 10).

Odd bytes in every part of a request, long polls beyond the in-flight bound, API keys limited
to a user prefix and rate limited per key, and the loopback-only default. Through NGINX where
it is an HTTP behaviour. (Item 13, readiness that does not follow a dependency outage, is
tested on real replica processes in tests/test_edge.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
import requests
from aiohttp import web

from bot.app import create_app
from bot.inbox import valid_cursor
from bot.settings import ApiKey, SettingsError, load_settings, parse_api_keys
from infra.common import drop_queues
from tests.support import (
    AMQP_URL,
    Stack,
    free_port,
    key_families,
    post,
    unique,
)

pytestmark = pytest.mark.system


# Raw HTTP, so a test controls every byte ------------------------------------------------------


def raw(
    port: int, request: bytes, *, host: str = "127.0.0.1", source: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as is; the status, headers (lower-case names) and body."""
    with socket.create_connection(
        (host, port), timeout=15, source_address=(source, 0) if source else None
    ) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return int(lines[0].split()[1]), headers, body


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2 :]
    return out


def get(path: bytes, *headers: bytes) -> bytes:
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: bot", b"Connection: close", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def send_json(path: bytes, body: bytes, ctype: bytes = b"application/json") -> bytes:
    head = b"POST " + path + b" HTTP/1.1\r\nHost: bot\r\nConnection: close\r\n"
    return head + b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (ctype, len(body), body)


def assert_json_error(status: int, body: bytes, expected: int, code: str | None = None) -> None:
    assert status == expected, (status, body[:300])
    error = orjson.loads(body)["error"]
    assert set(error) == {"code", "message"}, error
    if code is not None:
        assert error["code"] == code, error


# Item 2: numeric parameters and cursors --------------------------------------------------------

BAD_REPLIES_QUERIES = [
    # (query, error code): Unicode digits pass str.isdigit() and float(), not Redis or int()
    (b"limit=%C2%B2", "invalid_limit"),  # superscript two
    (b"limit=%D9%A3", "invalid_limit"),  # Arabic-Indic three
    (b"limit=%EF%BC%95", "invalid_limit"),  # fullwidth five
    (b"limit=1e2", "invalid_limit"),
    (b"limit=+5", "invalid_limit"),
    (b"limit=%205", "invalid_limit"),
    (b"limit=0", "invalid_limit"),
    (b"limit=101", "invalid_limit"),
    (b"limit=99999999999999999999999", "invalid_limit"),
    (b"wait=%D9%A3", "invalid_wait"),
    (b"wait=1_0", "invalid_wait"),
    (b"wait=nan", "invalid_wait"),
    (b"wait=inf", "invalid_wait"),
    (b"wait=-1", "invalid_wait"),
    (b"wait=31", "invalid_wait"),
    (b"wait=%205", "invalid_wait"),
    (b"after=99999999999999999999-0", "invalid_cursor"),  # over 2**64-1: Redis refuses it
    (b"after=18446744073709551616-0", "invalid_cursor"),
    (b"after=0-18446744073709551616", "invalid_cursor"),
    (b"after=%D9%A1-%D9%A1", "invalid_cursor"),
    (b"after=%C2%B9-0", "invalid_cursor"),
    (b"after=1-", "invalid_cursor"),
    (b"after=-1", "invalid_cursor"),
    (b"after=%00", "invalid_cursor"),
    (b"after=" + b"1" * 5000, "invalid_cursor"),
]


@pytest.mark.parametrize(("query", "code"), BAD_REPLIES_QUERIES, ids=lambda v: str(v)[:40])
def test_bad_replies_parameters_get_400_json_through_nginx(
    stack: Stack, query: bytes, code: str
) -> None:
    port = stack.settings.public_port
    status, _, body = raw(port, get(b"/v1/users/" + unique().encode() + b"/replies?" + query))
    assert_json_error(status, body, 400, code)


def test_largest_cursor_redis_takes_and_valid_parameters_answer_200(stack: Stack) -> None:
    top = 2**64 - 1
    for query in (f"after={top}-{top}", "after=0-0", "limit=100&wait=0.0", "wait=0&limit=1"):
        r = requests.get(f"{stack.url}/v1/users/{unique()}/replies?{query}", timeout=10)
        assert r.status_code == 200, (query, r.text)
        assert r.json()["replies"] == []


def test_cursor_validation_matches_redis_stream_ids() -> None:
    top = 2**64 - 1
    assert valid_cursor("0") and valid_cursor(f"{top}-{top}") and valid_cursor("1-0")
    for bad in (
        f"{top + 1}-0",
        f"0-{top + 1}",
        "\u0661-\u0661",
        "\u00b2-0",
        "",
        "00",
        "1",
        "1-2-3",
        "a-b",
    ):
        assert not valid_cursor(bad), bad


# Item 2: no input makes a replica answer 5xx ---------------------------------------------------

ODD_REQUESTS = [
    get(b"/v1/users/%FF%FE/replies"),
    get(b"/v1/users/%00/replies"),
    get(b"/v1/users/%C0%AF/prefs"),
    get(b"/v1/users/" + b"u" * 3000 + b"/prefs"),
    get(b"/v1/users/u1/replies?limit=1&limit=%C2%B2&wait=0&wait=x"),
    get(b"/v1/users/u1/replies?" + b"&".join(b"a%d=%d" % (i, i) for i in range(400))),
    get(b"/v1/users/u1/replies?after=0&" + b"%FF=%FF"),
    get(b"/v1/users/u1/prefs", b"X-Request-ID: \xff\xfe\xc3\x28"),
    get(b"/v1/users/u1/prefs", b"X-Request-ID: " + b"a" * 5000),
    get(b"/v1/users/u1/prefs", b"Authorization: Bearer \xff\xfe"),
    get(b"/v1/users/u1/prefs", b"X-Real-IP: 127.0.0.1"),
    b"DELETE /v1/users/u1/prefs/%FF%FE HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    b"DELETE /v1/users/u1/prefs/"
    + b"k" * 2000
    + b" HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    send_json(b"/v1/users/u1/prefs", b"{}", b"application/json; charset=\xff").replace(
        b"POST", b"PUT", 1
    ),
    send_json(b"/v1/messages", b'{"user_id":"\xff","text":"x"}'),
    send_json(b"/v1/messages", b'{"user_id":"u1","text":"\\ud800"}'),
    send_json(b"/v1/messages", b'{"user_id":"u1","text":"\xed\xa0\x80"}'),
    send_json(b"/v1/messages", b'{"user_id":"u1","text":"/echo \x00"}'),
    send_json(b"/v1/messages", b'{"user_id":"u1","text":"x","text":"y"}'),
    send_json(b"/v1/messages", b'{"user_id":"u1","text":' + b"[" * 5000 + b"]" * 5000 + b"}"),
    send_json(b"/v1/messages", b'{"user_id":"u1","text":1e999999}'),
    send_json(b"/v1/messages", b"\xef\xbb\xbf{}"),
    send_json(b"/v1/messages", b"{}", b"application/json; charset=latin-1; x=\xff"),
    send_json(b"/v1/messages?x=%FF", b"[]"),
    # a corrupt compressed body failed aiohttp's inflating read: 500
    send_json(b"/v1/messages", b"not gzip").replace(b"Host:", b"Content-Encoding: gzip\r\nHost:"),
    send_json(b"/v1/users/u1/prefs", b"xx")
    .replace(b"POST", b"PUT", 1)
    .replace(b"Host:", b"Content-Encoding: deflate\r\nHost:"),
    send_json(b"/v1/users/u1/prefs/k", b"{}").replace(b"POST", b"PATCH", 1),
]


@pytest.mark.parametrize("request_bytes", ODD_REQUESTS, ids=lambda v: repr(v[:50]))
def test_odd_bytes_anywhere_never_make_a_replica_answer_5xx(
    stack: Stack, request_bytes: bytes
) -> None:
    """Straight to a replica (no NGINX to filter anything): a JSON 4xx; through NGINX (whose
    own error pages are the edge's business) never a 5xx either."""
    status, headers, body = raw(stack.settings.replica_port(1), request_bytes)
    assert status < 500, (status, body[:300])
    if status >= 400:
        assert headers.get("content-type", "").startswith("application/json"), headers
        assert set(orjson.loads(body)["error"]) == {"code", "message"}
    status, _, body = raw(stack.settings.public_port, request_bytes)
    assert status < 500, (status, body[:300])


# Item 10: secure by default --------------------------------------------------------------------


def _non_loopback_address() -> str:
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return str(a.address)
    pytest.skip("this machine has no non-loopback IPv4 address")


def test_without_keys_v1_answers_only_loopback_clients(stack: Stack) -> None:
    """A client on the machine's network address gets 403 naming BOT_API_KEYS, even when it
    claims to be the loopback; health stays reachable and loopback clients are served."""
    address = _non_loopback_address()
    port = stack.settings.public_port
    user = unique().encode()
    for claim in (b"X-Forwarded-For: 127.0.0.1", b"X-Real-IP: 127.0.0.1"):
        status, _, body = raw(
            port, get(b"/v1/users/" + user + b"/prefs", claim), host=address, source=address
        )
        assert_json_error(status, body, 403, "api_keys_required")
        assert "BOT_API_KEYS" in orjson.loads(body)["error"]["message"]
    status, _, body = raw(
        port,
        send_json(b"/v1/messages", b'{"user_id":"u1","text":"/echo hi"}'),
        host=address,
        source=address,
    )
    assert_json_error(status, body, 403, "api_keys_required")
    status, _, _ = raw(port, get(b"/healthz"), host=address, source=address)
    assert status == 200
    assert requests.get(f"{stack.url}/v1/users/{user.decode()}/prefs", timeout=5).ok


@pytest.mark.parametrize(
    ("real_ip", "status"),
    [(None, 200), ("127.0.0.1", 200), ("::1", 200), ("203.0.113.7", 403), ("garbage", 403)],
)
def test_replica_believes_x_real_ip_from_its_loopback_proxy(
    stack: Stack, real_ip: str | None, status: int
) -> None:
    headers = {} if real_ip is None else {"X-Real-IP": real_ip}
    r = requests.get(
        f"{stack.replica_url(1)}/v1/users/{unique()}/prefs", headers=headers, timeout=5
    )
    assert r.status_code == status, r.text


def test_the_replica_says_once_at_start_who_v1_answers(stack: Stack) -> None:
    lines = [line for line in stack.logs("bot-1").splitlines() if '"api_keys_unset"' in line]
    assert len(lines) == 1 and orjson.loads(lines[0])["serving"] == "loopback_only"


@contextlib.contextmanager
def served_app(env: dict[str, str], host: str) -> Iterator[str]:
    """`create_app` served on `host` in a thread of its own: a replica a non-loopback peer
    can reach (the stacks bind replicas to the loopback)."""
    settings = load_settings(env, dotenv=Path("/dev/null"))
    port = free_port()
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(create_app(settings), access_log=None)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()

    loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        drop_queues(settings)


@pytest.mark.parametrize(
    ("trusted", "real_ip", "status"),
    [
        ("", "127.0.0.1", 403),  # an untrusted peer's claim is ignored: the peer is the client
        ("{addr}/32", "127.0.0.1", 200),  # a trusted proxy's X-Real-IP names the client
        ("{addr}/32", "203.0.113.9", 403),
        ("{addr}/32", None, 403),  # no header: the proxy itself is the client
    ],
)
def test_x_real_ip_counts_only_from_trusted_proxies(
    redis_url: str, trusted: str, real_ip: str | None, status: int
) -> None:
    addr = _non_loopback_address()
    env = {
        "REDIS_URL": redis_url,
        "AMQP_URL": AMQP_URL,
        "BOT_QUEUE_PREFIX": f"test-{uuid.uuid4().hex[:8]}",
        "BOT_TRUSTED_PROXIES": trusted.format(addr=addr),
    }
    headers = {} if real_ip is None else {"X-Real-IP": real_ip}
    with served_app(env, addr) as url, requests.Session() as s:
        s.mount("http://", _SourceAdapter(addr))
        r = s.get(f"{url}/v1/users/{unique()}/prefs", headers=headers, timeout=10)
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["error"]["code"] == "api_keys_required"


class _SourceAdapter(requests.adapters.HTTPAdapter):
    """Connect from a given local address."""

    def __init__(self, source: str) -> None:
        self._source = source
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self._source, 0)
        super().init_poolmanager(*args, **kwargs)


def test_open_api_serves_every_address(redis_url: str) -> None:
    addr = _non_loopback_address()
    env = {
        "REDIS_URL": redis_url,
        "AMQP_URL": AMQP_URL,
        "BOT_QUEUE_PREFIX": f"test-{uuid.uuid4().hex[:8]}",
        "BOT_OPEN_API": "1",
    }
    with served_app(env, addr) as url, requests.Session() as s:
        s.mount("http://", _SourceAdapter(addr))
        assert s.get(f"{url}/v1/users/{unique()}/prefs", timeout=10).status_code == 200


# Items 10 and 7: keys limited to a user prefix, rate limited per key ---------------------------


def test_api_keys_parse_prefixes_once_and_keep_base64_padding() -> None:
    keys = parse_api_keys(" k1, k2=tg: ,abc==,x/y+z===slack:T1:")
    assert keys == (
        ApiKey("k1"),
        ApiKey("k2", "tg:"),
        ApiKey("abc=="),
        ApiKey("x/y+z==", "slack:T1:"),
    )
    assert keys[1].allows("tg:42") and not keys[1].allows("discord:42")
    assert keys[0].allows("anyone")
    for bad in ("k1,k1=tg:", "kéy", "k 1", "k1;x"):
        with pytest.raises(SettingsError) as err:
            load_settings({"BOT_API_KEYS": bad}, dotenv=Path("/dev/null"))
        assert "BOT_API_KEYS" in str(err.value) and bad not in str(err.value)


KEY_ALL, KEY_TG, KEY_FLOOD = (f"key-{uuid.uuid4().hex}" for _ in range(3))
KEY_RATE = {"BOT_KEY_RATE_LIMIT": "10/minute", "BOT_KEY_RATE_BURST": "19"}  # 20 at once


@pytest.fixture(scope="module")
def keyed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from tests.conftest import OWNER
    from tests.support import claim_redis_db, release_redis_db, stack_env

    owner = f"{OWNER}-keyed"
    db = claim_redis_db(owner)
    env = stack_env(
        db,
        BOT_API_KEYS=f"{KEY_ALL},{KEY_TG}=tg:,{KEY_FLOOD}",
        BOT_REPLICAS="2",
        **KEY_RATE,
    )
    s = Stack(tmp_path_factory.mktemp("keyed") / "run", env)
    s.start()
    yield s
    s.stop()
    release_redis_db(db, owner)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_non_ascii_authorization_gets_401_json_not_500(keyed_stack: Stack) -> None:
    for port in (keyed_stack.settings.public_port, keyed_stack.settings.replica_port(1)):
        for value in (
            b"Bearer \xff\xfe",
            b"Bearer k\xc3\xa9y",
            b"\xff",
            b"Bearer " + KEY_ALL.encode() + b"\x80",
        ):
            status, headers, body = raw(
                port, get(b"/v1/users/u1/prefs", b"Authorization: " + value)
            )
            assert_json_error(status, body, 401)
            assert headers["www-authenticate"].startswith("Bearer")


def test_a_key_limited_to_a_prefix_gets_403_for_other_users(keyed_stack: Stack) -> None:
    url = keyed_stack.url
    tg, other = f"tg:{uuid.uuid4().int % 10**9}", unique("discord:")
    ok = post(f"{url}/v1/messages", {"user_id": tg, "text": "/echo hi"}, headers=bearer(KEY_TG))
    assert ok.status_code == 200, ok.text
    refused = [
        post(f"{url}/v1/messages", {"user_id": other, "text": "/echo hi"}, headers=bearer(KEY_TG)),
        requests.get(f"{url}/v1/users/{other}/replies", headers=bearer(KEY_TG), timeout=5),
        requests.get(f"{url}/v1/users/{other}/prefs", headers=bearer(KEY_TG), timeout=5),
        requests.put(
            f"{url}/v1/users/{other}/prefs",
            json={"prefs": {"a": "b"}},
            headers=bearer(KEY_TG),
            timeout=5,
        ),
        requests.delete(f"{url}/v1/users/{other}/prefs", headers=bearer(KEY_TG), timeout=5),
        requests.delete(f"{url}/v1/users/{other}/prefs/a", headers=bearer(KEY_TG), timeout=5),
    ]
    for r in refused:
        assert r.status_code == 403, (r.request.method, r.request.url, r.text)
        assert r.json()["error"]["code"] == "user_not_allowed"
        assert "tg:" in r.json()["error"]["message"]
    assert requests.get(f"{url}/v1/users/{tg}/prefs", headers=bearer(KEY_TG), timeout=5).ok
    # the unlimited key acts for everyone; nothing was stored for the refused user
    r = requests.get(f"{url}/v1/users/{other}/prefs", headers=bearer(KEY_ALL), timeout=5)
    assert r.status_code == 200 and r.json() == {"prefs": {}}


def test_rotating_user_ids_meets_the_per_key_rate_limit(keyed_stack: Stack) -> None:
    url = keyed_stack.url + "/v1/messages"
    statuses = []
    limited: requests.Response | None = None
    for _ in range(26):  # a fresh user each time: the per-user limit never bites
        r = post(url, {"user_id": unique(), "text": "/echo hi"}, headers=bearer(KEY_FLOOD))
        statuses.append(r.status_code)
        if r.status_code == 429:
            limited = r
    assert set(statuses) == {200, 429}, statuses
    assert 18 <= statuses.count(200) <= 21, statuses  # burst 19 + 1, give or take the refill
    assert limited is not None
    assert limited.json()["error"]["code"] == "key_rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.headers["RateLimit-Policy"] == '"key";q=20;w=120'
    # another key has its own bucket
    other = post(url, {"user_id": unique(), "text": "/echo hi"}, headers=bearer(KEY_ALL))
    assert other.status_code == 200
    # the bucket expires once it is full again: Redis keeps nothing forever for it
    ident = ApiKey(KEY_FLOOD).ident
    ttl: int = keyed_stack.redis().pttl(f"bot:{{apikey:{ident}}}:gcra")  # type: ignore[assignment]
    assert ttl > 0
    # and every key in the keyed stack's DB is of a family docs/scaling.md lists, with a TTL
    # unless its family has none
    db = keyed_stack.redis()
    families = key_families({key: db.pttl(key) for key in db.scan_iter()})
    assert "bot:{apikey:<ident>}:gcra" in families, families


def test_api_keys_reach_no_log_of_the_stack(keyed_stack: Stack) -> None:
    """After the keyed tests above sent every key through NGINX: neither NGINX's logs nor a
    replica's name one, and no replica says it serves without keys."""
    assert post(
        keyed_stack.url + "/v1/messages",
        {"user_id": unique(), "text": "/echo hi"},
        headers=bearer(KEY_ALL),
    ).ok
    time.sleep(1.2)  # NGINX's access log flushes every second
    logs = "".join(p.read_text(errors="replace") for p in keyed_stack.paths.logs.glob("*.log"))
    assert "nginx-access" in " ".join(p.name for p in keyed_stack.paths.logs.glob("*.log"))
    assert "api_keys_unset" not in logs
    for key in (KEY_ALL, KEY_TG, KEY_FLOOD):
        assert key not in logs


# Item 4: long polls have their own bounds; probes are never shed --------------------------------


async def test_long_polls_beyond_max_inflight_leave_messages_and_health_alone(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(
        BOT_REPLICAS="1",
        BOT_MAX_INFLIGHT="4",
        BOT_LONGPOLL_MAX="12",
        BOT_LONGPOLL_PER_USER="2",
    )
    users = [unique() for _ in range(6)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def poll(user: str, wait: int = 25) -> tuple[int, Any, float]:
            started = time.monotonic()
            async with http.get(f"{stack.url}/v1/users/{user}/replies?wait={wait}") as r:
                return r.status, await r.json(), time.monotonic() - started

        polls = [asyncio.create_task(poll(u)) for u in users for _ in range(2)]  # 12 > 4
        await asyncio.sleep(2)
        assert not any(p.done() for p in polls), [p.result() for p in polls if p.done()]
        # messages, prefs and the probes are served beside them
        for _ in range(3):
            r = await http.post(
                f"{stack.url}/v1/messages", json={"user_id": unique(), "text": "/echo hi"}
            )
            assert r.status == 200, await r.text()
        for url in (f"{stack.url}/healthz", f"{stack.replica_url(1)}/healthz"):
            assert (await http.get(url)).status == 200
        assert (await http.get(f"{stack.replica_url(1)}/readyz")).status == 200
        # requests that do take the 4 slots (slow questions) shed others, never the probes
        stack.faults(latency_ms=1500)
        replica = stack.replica_url(1)
        questions = [
            asyncio.create_task(
                http.post(
                    f"{replica}/v1/messages", json={"user_id": unique(), "text": f"q {unique()}?"}
                )
            )
            for _ in range(8)
        ]
        await asyncio.sleep(0.5)
        for probe in ("/healthz", "/readyz"):
            assert (await http.get(replica + probe)).status == 200, probe
        assert not all(q.done() for q in questions)
        shed = [r.status for r in await asyncio.gather(*questions)]
        assert 503 in shed and set(shed) <= {200, 202, 503}, shed
        # a user's third long poll is its own doing: 429; a thirteenth on the replica: 503
        status, body, _ = await poll(users[0], 5)
        assert status == 429 and body["error"]["code"] == "too_many_long_polls", body
        status, body, _ = await poll(unique(), 5)
        assert status == 503 and body["error"]["code"] == "overloaded", body
        # SIGTERM: the drain ends the long polls at once, with what there is (nothing)
        stack.kill("bot-1", signal.SIGTERM)
        results = await asyncio.gather(*polls)
    for status, body, elapsed in results:
        assert status == 200 and body["replies"] == [], body
        assert elapsed < 15, elapsed  # they asked for 25 s
