"""Helpers for tests that need real services: private Redis DBs, free ports, private stacks.

Every test run claims its own Redis DB number (a lock key in DB 0) and starts stacks on free
ports in its own run directory, so test runs, `make up` and other sessions never collide.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import psutil
import redis
import requests
from aiohttp.test_utils import TestClient, TestServer

from bot.settings import load_settings
from infra import common, runner
from infra.common import Paths, drop_queues
from infra.common import free_port as free_port  # the tests take it from here
from infra.stub import FAULTS, LLM, STATS, LlmFaults, Stats
from infra.supervise import supervisorctl

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
# A client of the in-process replica (`app_client`, `make_app_client` in conftest).
AppClient = TestClient[Any, Any]


# Set in a claimed DB, so that one left behind by a run that died (its lock in DB 0 expired)
# may be claimed again; any other DB with keys is someone else's: never claimed nor flushed.
CLAIM_MARKER = "bot-tests:claimed"
CLAIM_TTL = 1800


def _lock_key(db: int) -> str:
    return f"bot-tests:db:{db}"


def _claimable(client: redis.Redis) -> bool:
    """Empty, or holding nothing but a test run's marker."""
    size = client.dbsize()
    return size == 0 or (size == 1 and client.exists(CLAIM_MARKER) == 1)


def claim_redis_db(owner: str, dbs: range = range(1, 16), rounds: int = 600) -> int:
    """Claim a Redis DB number (1-15) for this test run; released by `release_redis_db`.

    A DB is claimed only when its lock in DB 0 is free and it holds no key but a test run's
    marker: a DB in use by anything else is left alone, never flushed.
    """
    locks = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    for _ in range(rounds):
        for db in random.sample(dbs, len(dbs)):
            if not locks.set(_lock_key(db), owner, nx=True, ex=CLAIM_TTL):
                continue
            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
            if _claimable(client):
                reset_redis_db(db)
                return db
            locks.delete(_lock_key(db))  # someone else's data: not ours to touch
        if rounds > 1:
            time.sleep(1)
    raise RuntimeError("no free Redis DB for tests")


def reset_redis_db(db: int) -> None:
    """Empty a DB this run has claimed, keeping its marker."""
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    client.flushdb()
    client.set(CLAIM_MARKER, "1", ex=CLAIM_TTL)


def release_redis_db(db: int, owner: str) -> None:
    """Empty and unlock `db` if this run still holds its lock; otherwise touch nothing."""
    locks = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    if locks.get(_lock_key(db)) != owner.encode():
        return
    redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db).flushdb()
    locks.delete(_lock_key(db))


def unique(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# Every family of keys the bot writes in Redis, as docs/scaling.md's table spells it, the
# pattern of its names, and whether it expires. A key of no family here is undocumented.
_ID = r"[A-Za-z0-9_.:@-]+"  # a user or message id (bot.core.validation.ID_RE)
REDIS_KEY_FAMILIES: tuple[tuple[str, str, bool], ...] = (
    ("bot:{user}:msg:<id>", rf"bot:\{{{_ID}\}}:msg:.+", True),
    ("bot:{user}:ctx", rf"bot:\{{{_ID}\}}:ctx", True),
    ("bot:{user}:rl", rf"bot:\{{{_ID}\}}:rl", True),
    ("bot:{user}:prefs", rf"bot:\{{{_ID}\}}:prefs", True),
    ("bot:{user}:inbox", rf"bot:\{{{_ID}\}}:inbox", True),
    ("bot:{user}:inbox:ids", rf"bot:\{{{_ID}\}}:inbox:ids", True),
    ("bot:{user}:job:<id>", rf"bot:\{{{_ID}\}}:job:.+", True),
    ("bot:{apikey:<ident>}:gcra", r"bot:\{apikey:[0-9a-f]{16}\}:gcra", True),
    ("cache:{id}:a", r"cache:\{[0-9a-f]+\}:a", True),
    ("cache:{id}:lock", r"cache:\{[0-9a-f]+\}:lock", True),
    ("cache:{id}:err", r"cache:\{[0-9a-f]+\}:err", True),
    ("cache:{id}:s", r"cache:\{[0-9a-f]+\}:s", True),
    ("bot:hb:<replica>", r"bot:hb:[0-9a-f]+", True),
    ("bot:outbox:<prefix>", r"bot:outbox:.+", False),  # entries deleted once relayed
    ("chan:seen:<channel>:<update>", r"chan:seen:[a-z]+:.+", True),
    ("chan:route:<message id>", r"chan:route:.+", True),
    ("chan:sent:<channel>:<id>", r"chan:sent:[a-z]+:.+", True),
    ("chan:paused:<prefix>:<channel>", r"chan:paused:.+:[a-z]+", True),
    ("chan:polite:<user>", r"chan:polite:.+", True),
    ("chan:pace:<channel>:<bot>", r"chan:pace:[a-z]+:[0-9a-f]{16}", True),
    ("chan:pace:<channel>:<bot>:<conversation>", r"chan:pace:[a-z]+:[0-9a-f]{16}:.+", True),
)
_KEY_FAMILIES = [
    (name, re.compile(pattern), expires) for name, pattern, expires in REDIS_KEY_FAMILIES
]


def key_families(pttls: dict[str, int]) -> Counter[str]:
    """How many keys of each family `pttls` (key -> PTTL) holds; fails on a key of no family
    and on one without a TTL whose family must have one. The test harness's own marker and
    keys that expired while being listed (PTTL -2) are left out."""
    seen: Counter[str] = Counter()
    for key, pttl in pttls.items():
        if key == CLAIM_MARKER or pttl == -2:
            continue
        family = next((f for f in _KEY_FAMILIES if f[1].fullmatch(key)), None)
        assert family is not None, f"a key of no documented family: {key}"
        name, _, expires = family
        assert pttl > 0 or not expires, f"{key} ({name}) has no TTL"
        seen[name] += 1
    return seen


@dataclass
class Stack:
    """A private stack (NGINX, replicas, stub...) started with the native runner."""

    run_dir: Path
    env: dict[str, str]
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def settings(self) -> Any:
        return load_settings(self.env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['BOT_PUBLIC_PORT']}"

    @property
    def stub_url(self) -> str:
        return f"http://127.0.0.1:{self.env['BOT_STUB_PORT']}"

    @property
    def paths(self) -> Paths:
        return Paths(self.run_dir)

    def replica_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.settings.replica_port(i)}"

    def metrics_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.settings.replica_metrics_port(i)}/metrics"

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["REDIS_URL"], decode_responses=True)

    def start(self, timeout: float = 90) -> None:
        settings = load_settings(self.env)
        code = runner.up(settings, self.paths, self._process_env(), timeout=timeout)
        if code != 0:
            logs = "\n".join(
                f"--- {p.name}\n{p.read_text()[-2000:]}" for p in self.paths.logs.glob("*.log")
            )
            self.stop()
            raise RuntimeError(f"stack did not start:\n{logs}")

    def _process_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        env["PATH"] = f"{common.VENV_BIN}:{env.get('PATH', '')}"
        env["BOT_DOTENV"] = "/dev/null"
        return env

    def stop(self) -> None:
        """Stop every process, then delete the stack's retry queues (its own prefix)."""
        runner.down(self.paths)
        drop_queues(self.settings)

    def ctl(self, *args: str) -> str:
        return supervisorctl(self.paths, *args).stdout

    def pid(self, name: str) -> int:
        out = self.ctl("pid", name).strip()
        return int(out) if out.isdigit() else 0

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pid(name)
        assert pid, f"{name} is not running"
        os.kill(pid, sig)
        return pid

    def wait_ready(self, name: str, timeout: float = 30) -> None:
        i = int(name.split("-")[1])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.replica_url(i) + "/readyz", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready")

    def faults(self, **faults: Any) -> None:
        requests.post(self.stub_url + "/admin/faults", json=faults, timeout=5).raise_for_status()

    def stub_stats(self) -> dict[str, Any]:
        result: dict[str, Any] = requests.get(self.stub_url + "/admin/stats", timeout=5).json()
        return result

    def reset_stub(self) -> None:
        requests.post(self.stub_url + "/admin/reset", timeout=5).raise_for_status()
        self.faults(error_rate=0.0, latency_ms=int(self.extra.get("latency_ms", 300)), outage=False)

    def access_log(self) -> list[dict[str, Any]]:
        """NGINX's JSON access log (flushed every second).

        `escape=json` leaves bytes above 0x7f as they came (a hostile client's raw bytes in
        the target): they are read as U+FFFD, so one such line cannot hide all the others."""
        path = self.paths.logs / "nginx-access.log"
        if not path.exists():
            return []
        # NGINX's escape=json leaves bytes >= 0x80 of a decoded $uri as they are: a hostile
        # client's %C0 makes a line that is not UTF-8. Readers of the log must cope.
        text = path.read_bytes().decode("utf-8", "replace")
        return [orjson.loads(line) for line in text.splitlines() if line.strip()]

    def logs(self, name: str) -> str:
        path = self.paths.logs / f"{name}.log"
        return path.read_text() if path.exists() else ""


@dataclass
class Upstream:
    """The stub upstream (`infra.stub`) served in-process: its URL, counters and faults."""

    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def stats(self) -> Stats:
        stats: Stats = self.server.app[STATS]["now"]
        return stats

    def faults(self, **faults: Any) -> None:
        self.server.app[FAULTS]["now"] = replace(self.server.app[FAULTS]["now"], **faults)

    def llm(self, **faults: Any) -> None:
        """How the next chat completions misbehave (`infra.stub.LlmFaults`)."""
        self.server.app[LLM]["now"] = LlmFaults(**faults)


@contextlib.contextmanager
def stack_dir(prefix: str = "bot-stack-") -> Iterator[Path]:
    """A fresh directory for a stack's run dir that others may traverse (deleted after).

    Run as root, the runner starts the stack's processes as an unprivileged user, which cannot
    reach pytest's private temp dirs (it would keep them as root).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def stack_env(db: int, **overrides: str) -> dict[str, str]:
    """Settings for a private stack on free ports, using Redis DB `db`."""
    return common.stack_env(f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}", AMQP_URL, **overrides)


@contextlib.contextmanager
def running_stack(tmp: Path, db: int, **overrides: str) -> Iterator[Stack]:
    stack = Stack(tmp / "run", stack_env(db, **overrides))
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def parse_events(raw: str) -> list[tuple[str, Any]]:
    """A whole Server-Sent Events body as (event, data) pairs."""
    events = []
    for block in raw.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], orjson.loads(fields["data"])))
    return events


def post(url: str, body: Any, **kw: Any) -> requests.Response:
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    data = body if isinstance(body, (bytes, str)) else orjson.dumps(body)
    return requests.post(url, data=data, headers=headers, timeout=kw.pop("timeout", 15), **kw)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


class PrivateRedis:
    """A redis-server of the test's own on a free port, that the test may stop and restart."""

    def __init__(self, data_dir: Path, *, appendonly: bool = True) -> None:
        self.port = free_port()
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "always" if self.appendonly else "no",
        ]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError, redis.BusyLoadingError):
                if client.ping():
                    return
            time.sleep(0.05)
        raise RuntimeError("private redis did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=10)
            self.proc = None


class HoldingProxy:
    """A TCP proxy of the test's own in front of a port; while `hold` is set it accepts
    connections but forwards nothing, so the test can act on the client in between. A client
    that goes away while held is never forwarded. `cut` drops every connection and refuses
    new ones: the service behind it is gone, as far as its clients can tell."""

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self.hold = threading.Event()
        self.held: list[int] = []  # client-side ports of held connections
        self.held_data: dict[int, bytes] = {}  # what each held connection sent so far
        self.forwarded = 0
        self._open: list[socket.socket] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, addr = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client, addr[1]), daemon=True).start()

    def _serve(self, client: socket.socket, peer_port: int) -> None:
        buffered = b""
        if self.hold.is_set():
            self.held.append(peer_port)
            client.settimeout(0.05)
            while self.hold.is_set():
                try:
                    data = client.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    data = b""
                if not data:  # the client died while held: forward nothing
                    client.close()
                    return
                buffered += data
                self.held_data[peer_port] = buffered
        client.settimeout(None)
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        self._open += [client, upstream]
        self.forwarded += 1
        if buffered:
            upstream.sendall(buffered)
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        # Shut down first: closing alone leaves the port listening while the accepting
        # thread waits in accept(), which then takes (and forwards) one more connection.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def cut(self) -> None:
        self.close()
        for s in self._open:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


class Gate:
    """A service behind a TCP proxy of the test's own (`HoldingProxy`), which the test can
    `close` (every connection dropped, new ones refused: the service is gone, as far as its
    clients can tell) and `open` again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._proxy = HoldingProxy(target_port)
        self.port = self._proxy.port

    def close(self) -> None:
        self._proxy.cut()

    def open(self) -> None:
        self._proxy.cut()
        self._proxy = HoldingProxy(self.target_port, port=self.port)


def held_request(proxy: HoldingProxy, start: bytes, timeout: float = 10) -> int:
    """The client port of the first held connection whose request begins with `start` (a
    replica's question, not its upstream health probe, which goes through the proxy too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for port, data in list(proxy.held_data.items()):
            if data.startswith(start):
                return port
        time.sleep(0.02)
    raise AssertionError(f"no held request starting {start!r}: {proxy.held_data}")


@dataclass
class Resent:
    """A question NGINX resent after the replica holding it was killed mid-call."""

    stack: Stack
    body: dict[str, Any]
    response: requests.Response


def kill_replica_mid_question(
    make_stack: Callable[..., Stack], headers: dict[str, str] | None = None
) -> Resent:
    """Two replicas behind a proxy that holds upstream calls: the replica asking the upstream
    a question (no `message_id`) is SIGKILLed before the call goes out, then the hold ends and
    NGINX's resend is answered by the other replica."""
    proxy_port = free_port()
    # The call's timeout outlasts the kill, so the victim cannot give up and queue it first.
    stack = make_stack(
        BOT_REPLICAS="2", UPSTREAM_URL=f"http://127.0.0.1:{proxy_port}", BOT_UPSTREAM_TIMEOUT="5"
    )
    proxy = HoldingProxy(stack.settings.stub_port, port=proxy_port)
    try:
        stack.reset_stub()
        proxy.hold.set()
        result: dict[str, requests.Response] = {}
        body = {"user_id": unique(), "text": f"who are you {unique()}?"}

        def send() -> None:
            result["r"] = post(stack.url + "/v1/messages", body, timeout=40, headers=headers or {})

        sender = threading.Thread(target=send)
        sender.start()
        victim = pid_of_client_port(held_request(proxy, b"POST "))
        assert victim in (stack.pid("bot-1"), stack.pid("bot-2"))
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.3)
        proxy.hold.clear()
        sender.join(timeout=40)
        return Resent(stack, body, result["r"])
    finally:
        proxy.close()


def pid_of_client_port(port: int) -> int:
    """The pid of the local process whose TCP socket uses `port`."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    raise LookupError(port)
