"""The edge: NGINX's own errors, its retries of shed requests, one request id per request, and
what the runner and the test suite may touch (process users, Redis limits, claimed DBs)."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import redis
import requests
import yaml
from yarl import URL

from bot.settings import DEFAULT_REDIS_MAXMEMORY, load_settings
from bot.store import record_key
from infra import programs, users
from infra.common import VENV_BIN, Paths
from tests.support import (
    AMQP_URL,
    REDIS_HOST,
    REDIS_PORT,
    Gate,
    PrivateRedis,
    Stack,
    claim_redis_db,
    free_port,
    kill_replica_mid_question,
    post,
    release_redis_db,
    running_stack,
    stack_dir,
    unique,
)

pytestmark = pytest.mark.system
ROOT = Path(__file__).resolve().parent.parent


def raw(stack: Stack, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send `data` as it is (a request no HTTP client would send); the parsed answer."""
    answer = b""
    with socket.create_connection(("127.0.0.1", stack.settings.public_port), timeout) as s:
        s.sendall(data)
        while (chunk := s.recv(65536)) and not _complete(answer := answer + chunk):
            pass
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _complete(answer: bytes) -> bool:
    """Whether `answer` holds a whole response (NGINX may linger for a body it refused)."""
    head, sep, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return bool(sep and length and len(body) >= int(length.group(1)))


def access_entries(stack: Stack, **match: Any) -> list[dict[str, Any]]:
    """NGINX's access log entries with these fields, once it has flushed (every second)."""
    time.sleep(1.2)
    return [e for e in stack.access_log() if all(e.get(k) == v for k, v in match.items())]


# ------------------------------------------------------------------ NGINX's own errors: JSON

CHUNKED = "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
NGINX_ERRORS: list[tuple[str, bytes, int, str]] = [
    ("garbage request line", b"GARBAGE\r\n\r\n", 400, "bad_request"),
    ("bad content length", b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: x\r\n\r\n", 400,
     "bad_request"),
    ("malformed chunked body", (CHUNKED + "Transfer-Encoding: chunked\r\n\r\nZZ\r\n\r\n").encode(),
     400, "bad_request"),
    ("unknown route", b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404,
     "not_found"),
    ("TRACE", b"TRACE /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
    ("unknown method", b"FOO /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n", 405,
     "method_not_allowed"),
    ("body over 64 KiB", (CHUNKED + "Content-Length: 70000\r\n\r\n").encode(), 413,
     "payload_too_large"),
    ("huge URI", b"GET /v1/" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414,
     "uri_too_long"),
    ("huge header", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
     431, "request_header_too_large"),
    ("unknown transfer encoding", (CHUNKED + "Transfer-Encoding: gzip\r\n\r\n").encode(), 501,
     "not_implemented"),
    ("HTTP/2.0 request line", b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n", 505,
     "http_version_not_supported"),
    ("raw non-ASCII byte in the query", "GET /v1/users/u1/replies?limit=\u00b2 HTTP/1.1\r\n"
     "Host: x\r\n\r\n".encode(), 400, "bad_request"),
    ("control byte in the path", b"GET /v1/users/u\x01/prefs HTTP/1.1\r\nHost: x\r\n\r\n", 400,
     "bad_request"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [case[1:] for case in NGINX_ERRORS],
    ids=[case[0] for case in NGINX_ERRORS],
)
def test_every_error_nginx_answers_itself_is_json(
    stack: Stack, request_bytes: bytes, status: int, code: str
) -> None:
    got, headers, body = raw(stack, request_bytes)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    error = orjson.loads(body)["error"]
    assert error["code"] == code and error["message"]
    if status == 405:
        assert "POST" in headers["allow"]


def test_many_small_headers_nginx_accepts_are_parsed_by_the_replica(stack: Stack) -> None:
    """aiohttp refuses more than 128 headers with a plain-text 400 by default; whatever NGINX
    lets through, the replica must parse and answer as JSON."""
    extra = "".join(f"X-H{i}: v\r\n" for i in range(300))
    request = f"GET /v1/users/u1/prefs HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode()
    status, _, body = raw(stack, request)
    assert status == 200, body
    assert "prefs" in orjson.loads(body)


def test_an_http_1_0_request_without_host_reaches_the_replicas(stack: Stack) -> None:
    status, _, body = raw(stack, b"GET /v1/users/u1/prefs HTTP/1.0\r\n\r\n")
    assert status == 200 and "prefs" in orjson.loads(body), body


def test_a_client_trickling_its_body_is_cut_off_in_seconds_not_a_minute(stack: Stack) -> None:
    """A slow-body client holds a connection for client_body_timeout (10 s), then NGINX logs a
    408 and closes it (NGINX sends no answer on a timed-out connection)."""
    marker = unique("slow")
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", stack.settings.public_port), 60) as s:
        s.sendall(
            f"POST /v1/messages?{marker} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            '\r\nContent-Length: 100\r\n\r\n{"user_id"'.encode()
        )
        while s.recv(65536):
            pass
    assert time.monotonic() - started < 30
    entries = [e for e in access_entries(stack, uri="/v1/messages") if e["status"] == 408]
    assert entries, "no 408 logged"


def test_nginx_429_and_502_are_json_and_a_replicas_429_and_probes_pass_untouched(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(
        BOT_REPLICAS="1",
        BOT_EDGE_RATE="2",
        BOT_EDGE_BURST="1",
        BOT_RATE_LIMIT="1/minute",
        BOT_RATE_BURST="0",
    )
    user = unique()
    time.sleep(1.1)  # the per-address bucket is full again
    assert post(stack.url + "/v1/messages", {"user_id": user, "text": "/help"}).ok
    time.sleep(1.1)
    own = post(stack.url + "/v1/messages", {"user_id": user, "text": "/help"})
    # The replica's own 429 passes through NGINX as it is, with its RateLimit headers.
    assert own.status_code == 429 and "RateLimit-Policy" in own.headers, own.headers
    statuses = Counter[int]()
    for _ in range(10):
        r = post(stack.url + "/v1/messages", {"user_id": unique(), "text": "/help"})
        statuses[r.status_code] += 1
        if r.status_code == 429:
            assert r.json()["error"] == {
                "code": "rate_limited",
                "message": "too many requests from this address",
            }
            assert r.headers["Retry-After"] == "1"
            assert "RateLimit-Policy" not in r.headers
    assert statuses[429] >= 5, statuses
    # Probes are never limited by the per-address guard.
    probes = [requests.get(stack.url + path, timeout=5).status_code for path in ["/healthz"] * 20]
    assert probes == [200] * 20
    assert requests.get(stack.url + "/readyz", timeout=5).status_code == 200
    # No replica left: NGINX's 502, as JSON, with the request id it logged.
    stack.ctl("stop", "bot-1")
    time.sleep(1.1)
    r = post(stack.url + "/v1/messages", {"user_id": unique(), "text": "/help"})
    assert r.status_code == 502 and r.headers["Content-Type"] == "application/json"
    assert r.json()["error"]["code"] == "bad_gateway" and r.headers["Retry-After"] == "1"
    [entry] = access_entries(stack, request_id=r.headers["X-Request-ID"])
    assert entry["status"] == 502
    # A replica's 503 is tried once more (`@reroute`); NGINX's own 502 there is JSON too.
    with _one_answer_then_gone(stack.settings.replica_port(1), SHED_503):
        r = post(stack.url + "/v1/messages", {"user_id": unique(), "text": "/help"})
    assert r.status_code == 502 and r.headers["Content-Type"] == "application/json", r.text
    assert r.json()["error"]["code"] == "bad_gateway" and r.headers["Retry-After"] == "1"
    [entry] = access_entries(stack, request_id=r.headers["X-Request-ID"])
    assert entry["upstream_status"].startswith("503 : "), entry


_SHED_BODY = b'{"error":{"code":"overloaded","message":"shed"}}\n'
SHED_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_SHED_BODY), _SHED_BODY)
)


@contextlib.contextmanager
def _one_answer_then_gone(port: int, answer: bytes) -> Iterator[None]:
    """A replica of the test's own on `port`: it answers one request with `answer`, then
    stops listening, so NGINX's next try there is refused."""
    listener = socket.create_server(("127.0.0.1", port))

    def serve() -> None:
        conn, _ = listener.accept()
        listener.close()
        with conn:
            request = b""
            while not _complete(request):  # the whole request: no reset for unread bytes
                if not (chunk := conn.recv(65536)):
                    return
                request += chunk
            conn.sendall(answer)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield
    finally:
        server.join(timeout=10)
        listener.close()


# -------------------------------------- a replica's 503 is an answer, never a failed replica


Shedding = tuple[Stack, PrivateRedis, Gate]


@pytest.fixture(scope="module")
def shedding(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shedding]:
    """Three replicas that shed beyond 4 requests each, on a Redis the tests may stop, and
    reaching RabbitMQ through a gate the tests may close."""
    store = PrivateRedis(tmp_path_factory.mktemp("shed-redis"))
    store.start()
    broker = Gate(URL(AMQP_URL).port or 5672)
    try:
        with (
            stack_dir() as base,
            running_stack(
                base,
                0,
                REDIS_URL=store.url,
                AMQP_URL=str(URL(AMQP_URL).with_port(broker.port)),
                BOT_MAX_INFLIGHT="4",
                BOT_UPSTREAM_TIMEOUT="15",
                BOT_RATE_LIMIT="1000/second",
                BOT_RATE_BURST="1000",
            ) as stack,
        ):
            yield stack, store, broker
    finally:
        store.stop()
        broker.close()


def _dependencies_become(url: str, expected: dict[str, bool]) -> dict[str, bool]:
    """Poll `url`/readyz, which must answer 200 every time, until it reports `expected`;
    what it reported last."""
    deadline = time.monotonic() + 20
    while True:
        r = requests.get(url + "/readyz", timeout=5)
        assert r.status_code == 200, (url, r.text)
        deps: dict[str, bool] = r.json()["dependencies"]
        if deps == expected or time.monotonic() > deadline:
            return deps
        time.sleep(0.3)


def test_with_redis_and_rabbitmq_down_replicas_stay_ready_and_in_rotation_for_everyone_else(
    shedding: Shedding,
) -> None:
    """Redis and RabbitMQ away, which every replica sees at once (issue 15, item 13): each
    `bot serve` process stays ready and alive, probed directly (as Kubernetes probes a pod)
    and through NGINX, and says both are down; questions and /help are answered, prefs get
    503. A loop of such 503s used to mark every replica failed, and /help got NGINX's 502."""
    stack, store, broker = shedding
    replicas = [stack.replica_url(i) for i in range(1, stack.settings.replicas + 1)]
    store.stop()
    broker.close()
    try:
        down = {"redis": False, "rabbitmq": False}
        for url in [*replicas, stack.url]:
            assert _dependencies_become(url, down) == down, url
            assert requests.get(url + "/healthz", timeout=5).status_code == 200, url
        question = f"what is {unique('q')}?"
        r = post(stack.url + "/v1/messages", {"user_id": unique(), "text": question})
        assert r.status_code == 200 and question in r.json()["reply"], r.text
        hostile, helped = Counter[int](), Counter[int]()
        deadline = time.monotonic() + 4

        def hammer() -> None:
            with requests.Session() as s:
                while time.monotonic() < deadline:
                    hostile[s.get(stack.url + "/v1/users/u1/prefs", timeout=10).status_code] += 1

        def ask_help() -> None:
            with requests.Session() as s:
                while time.monotonic() < deadline:
                    body = {"user_id": unique(), "text": "/help"}
                    r = s.post(stack.url + "/v1/messages", json=body, timeout=10)
                    helped[r.status_code] += 1
                    time.sleep(0.05)

        threads = [threading.Thread(target=hammer) for _ in range(2)]
        threads.append(threading.Thread(target=ask_help))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        broker.open()
        store.start()
    print(f"replicas' 503s {dict(hostile)}, other users' /help {dict(helped)}")
    assert set(hostile) == {503} and hostile[503] > 50, hostile
    assert set(helped) == {200} and helped[200] >= 20, helped
    up = {"redis": True, "rabbitmq": True}
    for url in replicas:  # back by themselves, with no restart
        assert _dependencies_become(url, up) == up, url


def _chunks(body: bytes) -> Iterator[bytes]:
    """`body` in two pieces: requests sends a generator with Transfer-Encoding: chunked."""
    yield body[:10]
    yield body[10:]


def test_a_shed_post_is_tried_once_more_on_another_replica_with_its_body(
    shedding: Shedding,
) -> None:
    stack, _, _ = shedding
    stack.reset_stub()
    stack.faults(latency_ms=4000)
    url = stack.replica_url(1) + "/v1/messages"
    # Replica 1's four slots are taken by slow questions sent to it directly (NGINX does not
    # count them: least_conn still sends it its share).
    hogs = [
        threading.Thread(target=post, args=(url, {"user_id": unique(), "text": f"slow {unique()}"}))
        for _ in range(4)
    ]
    try:
        for t in hogs:
            t.start()
        time.sleep(1)
        texts = [unique("echo") for _ in range(16)]
        with requests.Session() as s:
            answers = [
                s.post(
                    stack.url + "/v1/messages",
                    # the second half chunked: NGINX reads either body whole before it proxies
                    data=_chunks(body) if i >= 8 else body,
                    headers={"Content-Type": "application/json"},
                    timeout=10,
                )
                for i, text in enumerate(texts)
                for body in [orjson.dumps({"user_id": unique(), "text": f"/echo {text}"})]
            ]
        assert [a.status_code for a in answers] == [200] * 16, [a.text for a in answers]
        assert [a.json()["reply"] for a in answers] == texts
        rerouted = [
            e
            for e in access_entries(stack, uri="/v1/messages")
            if e["upstream_status"] == "503 : 200"
        ]
        shed_port = str(stack.settings.replica_port(1))
        assert rerouted and all(
            e["upstream_addr"].split(" : ")[0].endswith(shed_port) for e in rerouted
        )
    finally:
        for t in hogs:
            t.join()
        stack.reset_stub()


def test_a_draining_replica_is_not_ready_while_nginx_serves_on(shedding: Shedding) -> None:
    """SIGTERM: while the replica finishes what it holds, its own /readyz fails (it stops
    listening at once; a request it still reads gets 503 `draining`), and NGINX answers the
    probe and messages from the others."""
    stack, _, _ = shedding
    victim = stack.replica_url(3)
    stack.faults(latency_ms=2500)
    held: dict[str, requests.Response] = {}

    def ask() -> None:
        held["r"] = post(victim + "/v1/messages", {"user_id": unique(), "text": f"{unique()}?"})

    asker = threading.Thread(target=ask)
    try:
        asker.start()
        time.sleep(0.5)
        pid = stack.kill("bot-3", signal.SIGTERM)
        time.sleep(0.2)
        assert psutil.pid_exists(pid)  # still draining: it holds the question
        try:
            status = requests.get(victim + "/readyz", timeout=5).status_code
        except requests.ConnectionError:
            status = 0  # refused: it no longer listens
        assert status in (0, 503), status
        assert requests.get(stack.url + "/readyz", timeout=5).status_code == 200
        for _ in range(6):
            body = {"user_id": unique(), "text": "/help"}
            assert post(stack.url + "/v1/messages", body).status_code == 200
        asker.join(timeout=20)
    finally:
        stack.reset_stub()
    assert held["r"].status_code == 200, held["r"].text  # it finished what it held
    assert "replica_draining" in stack.logs("bot-3")
    stack.wait_ready("bot-3")  # supervised: back in rotation


# ---------------------------------------------------------- one request id for every attempt


def test_an_invalid_client_request_id_becomes_the_one_id_nginx_logs_and_the_replica_uses(
    stack: Stack,
) -> None:
    bad = "not an id!"
    r = post(stack.url + "/v1/messages", {"user_id": unique(), "text": "/help"},
             headers={"X-Request-ID": bad})  # fmt: skip
    rid = r.headers["X-Request-ID"]
    assert r.ok and rid != bad and r.json()["message_id"] == rid
    assert [e["status"] for e in access_entries(stack, request_id=rid)] == [200]
    good = unique("rid")
    r = post(stack.url + "/v1/messages", {"user_id": unique(), "text": "/help"},
             headers={"X-Request-ID": good})  # fmt: skip
    assert r.headers["X-Request-ID"] == good == r.json()["message_id"]


def test_a_resend_after_a_replica_dies_keeps_the_id_nginx_chose_for_an_invalid_one(
    make_stack: Callable[..., Stack],
) -> None:
    """A message without message_id and with an X-Request-ID the replicas refuse: the replica
    that claimed it dies, NGINX resends it, and the second replica sees the same id: one
    upstream call, one message_id, the one NGINX logged."""
    resent = kill_replica_mid_question(make_stack, headers={"X-Request-ID": "bad id"})
    r, stack, body = resent.response, resent.stack, resent.body
    assert r.status_code == 200, r.text
    rid = r.headers["X-Request-ID"]
    assert r.json()["message_id"] == rid != "bad id"
    assert stack.stub_stats()["calls"] == 1
    [entry] = access_entries(stack, uri="/v1/messages")
    assert entry["request_id"] == rid and "," in entry["upstream_addr"], entry
    # one record for the message: the dead replica's claim was taken over, not duplicated
    records = stack.redis().keys(record_key(body["user_id"], "*"))
    assert records == [record_key(body["user_id"], rid)], records


# ------------------------------------------------------------------- the runner's processes


def _uids(pid: int) -> set[int]:
    return set(psutil.Process(pid).uids())


@pytest.mark.skipif(os.geteuid() != 0, reason="the unprivileged user applies when run as root")
def test_processes_that_need_no_root_run_unprivileged_when_started_as_root(stack: Stack) -> None:
    if not users.reaches(users.RUN_USER, VENV_BIN / "python"):
        pytest.skip(
            "this venv's interpreter is private to root (a pyenv Python under /root): "
            "`make install PY=/usr/bin/python3` in a fresh venv, as .ci/run does"
        )
    for name in ("bot-1", "bot-2", "bot-3", "stub", "worker"):
        assert 0 not in _uids(stack.pid(name)), name
        assert psutil.Process(stack.pid(name)).username() == users.RUN_USER
    nginx = psutil.Process(stack.pid("nginx"))
    workers = nginx.children()
    assert workers and all(0 not in set(w.uids()) for w in workers)
    # and they still serve
    assert post(stack.url + "/v1/messages", {"user_id": unique(), "text": "/help"}).ok


def test_a_redis_the_runner_starts_is_bounded_and_refuses_writes_rather_than_evict(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {"REDIS_URL": f"redis://127.0.0.1:{port}/0", "BOT_REDIS_MAXMEMORY": "3mb"}
    settings = load_settings(env, dotenv=Path("/dev/null"))
    [program] = [
        p for p in programs.data_programs(settings, Paths(tmp_path), env) if p.name == "redis"
    ]
    proc = subprocess.Popen(shlex.split(program.command), stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis did not start"
                time.sleep(0.05)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("maxmemory") == {"maxmemory": str(3 * 1024 * 1024)}
        value = b"x" * 10_000
        stored = 0
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for stored in range(10_000):
                client.set(f"k{stored}", value)
        assert all(client.get(f"k{i}") == value for i in range(stored))  # nothing evicted
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # compose's Redis: the same flags, the same default
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    flags = compose["services"]["redis"]["command"]
    native = shlex.split(program.command)
    for flag in ("--maxmemory", "--maxmemory-policy"):
        assert flag in flags and flag in native, flag
    assert flags[flags.index("--maxmemory-policy") + 1] == "noeviction"
    assert flags[flags.index("--maxmemory") + 1] == (
        f"${{BOT_REDIS_MAXMEMORY:-{DEFAULT_REDIS_MAXMEMORY}}}"
    )


def test_ci_never_kills_a_process_it_did_not_start() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert not re.search(r"\b(pkill|killall|kill)\b", script), "CI must not kill processes"


# --------------------------------------------------- tests touch only the Redis DBs they claim


def test_a_db_holding_someone_elses_keys_is_never_claimed_nor_flushed() -> None:
    owner = unique("claim")
    db = claim_redis_db(owner)
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    locks = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        client.set("someone:else", "theirs")
        locks.delete(f"bot-tests:db:{db}")  # the DB looks free, but holds a foreign key
        with pytest.raises(RuntimeError):
            claim_redis_db(unique("other"), dbs=range(db, db + 1), rounds=1)
        assert client.get("someone:else") == b"theirs"
        assert locks.get(f"bot-tests:db:{db}") is None
        # a lock held by another owner: releasing touches nothing
        locks.set(f"bot-tests:db:{db}", "another-run", ex=60)
        release_redis_db(db, owner)
        assert client.get("someone:else") == b"theirs"
    finally:
        client.delete("someone:else")
        locks.set(f"bot-tests:db:{db}", owner, ex=60)
        release_redis_db(db, owner)
