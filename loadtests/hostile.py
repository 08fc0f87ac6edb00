"""Hostile clients of the `hostile` scenario: what a careless or malicious client sends.

Each kind runs in greenlets of its own from its own loopback address (127.0.0.2, .3 ...), so
NGINX's per-address guard treats it as the separate client it is and never charges the
well-behaved users (127.0.0.1) for it. Requests are written on raw sockets: the point is to
send what no well-behaved HTTP library would (bytes that are not UTF-8, bodies dribbled a
byte at a time, methods nobody defined).

Every answer is recorded in the run's `Tally` under the current phase: per kind and status,
and against the contract (no 500/502/504, every error JSON `{"error": {"code", "message"}}`,
a 405 with `Allow`). The clients are paced (`hostile_rate` requests/s each; long polls and
refused requests honour `Retry-After`): the load generator shares the machine with the
stack, and a client hammering as fast as one core allows would measure the machine, not the
stack. The address guard's rate limit has its own scenario (`abuse`).
"""

from __future__ import annotations

import itertools
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import gevent
import orjson
from gevent.pool import Group

from loadtests.config import HOSTILE_KINDS, LoadConfig
from loadtests.tally import Tally

# Outcome names (beside `hostile:<kind>:<status>` per kind).
REQUESTS = "hostile_requests"
GATEWAY = "hostile_gateway"  # 502 or 504: NGINX found no replica to answer
SERVER_ERROR = "hostile_5xx"  # a 5xx that is not a 503 with Retry-After (500 above all)
BAD_ERROR = "hostile_bad_error"  # an error that is not JSON per the contract, or 405 w/o Allow
CLOSED = "hostile_closed"  # the connection ended without an answer
LONG_POLLS_HELD = "hostile_long_polls_held"  # `wait=30` polls the stack held open >= 5 s
POLLS_OPEN_PEAK = "hostile_long_polls_open_peak"  # a note: most long polls open at once

MAX_READ = 1 << 20
SLOW_BODY_SECONDS = 5.0  # a slow-body client takes this long to send its body


@dataclass
class Answer:
    """What came back on one connection (status 0: nothing did)."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str = ""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def request(
    method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    """An HTTP/1.1 request as bytes (`Connection: close`: one request per connection)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    hdrs = dict(headers or {})
    if body and "Content-Length" not in hdrs and "Transfer-Encoding" not in hdrs:
        hdrs["Content-Length"] = str(len(body))
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse(raw: bytes) -> Answer:
    """Status, headers and body of a raw HTTP/1.1 answer (read to the connection's end)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return Answer(error=f"not HTTP: {raw[:60]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return Answer(int(parts[1]), headers, body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def exchange(
    target: tuple[str, int],
    addr: str,
    payload: bytes | Iterator[tuple[bytes, float]],
    timeout: float = 10.0,
) -> Answer:
    """One request on a fresh connection from source address `addr`, read to its end."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.bind((addr, 0))
            sock.connect(target)
            try:
                if isinstance(payload, bytes):
                    sock.sendall(payload)
                else:
                    for chunk, pause in payload:
                        sock.sendall(chunk)
                        time.sleep(pause)  # gevent's under locust (monkey-patched)
            except OSError:
                pass  # the server may answer (413, 400) and close before it all went out
            raw = b""
            while len(raw) < MAX_READ:
                data = sock.recv(65536)
                if not data:
                    break
                raw += data
        return parse(raw) if raw else Answer(error="closed without an answer")
    except OSError as exc:
        return Answer(error=f"{type(exc).__name__}: {exc}")


def contract_problem(answer: Answer) -> str | None:
    """Why an answer breaks the contract for any input, hostile or not; None if it does not."""
    if answer.status in (502, 504):
        return "gateway error"
    if answer.status >= 500 and not (answer.status == 503 and answer.header("Retry-After")):
        return "server error"
    if answer.status >= 400:
        try:
            data = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            return "error body is not JSON"
        err = data.get("error") if isinstance(data, dict) else None
        if not (isinstance(err, dict) and "code" in err and "message" in err):
            return "error body is not {error: {code, message}}"
        if answer.status == 405 and not answer.header("Allow"):
            return "405 without Allow"
    return None


class HostileClients:
    """Starts every hostile kind on entering the attack; `stop` kills them all at once."""

    def __init__(self, cfg: LoadConfig, tally: Tally, phase: Callable[[], str]) -> None:
        self.cfg = cfg
        self.tally = tally
        self.phase = phase
        self.target = cfg.target_address
        self.auth = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.group = Group()
        self.kinds: dict[str, tuple[str, Callable[[str], None]]] = {}
        runs: dict[str, Callable[[str], None]] = {
            "bad_params": self._bad_params,
            "long_polls": self._long_polls,
            "duplicates": self._duplicates,
            "malformed": self._malformed,
            "big_headers": self._big_headers,
            "odd_methods": self._odd_methods,
            "rotating_ids": self._rotating_ids,
            "slow_bodies": self._slow_bodies,
        }
        # One loopback address per kind (the same whichever run): NGINX sees distinct clients.
        for i, kind in enumerate(HOSTILE_KINDS):
            if not cfg.hostile_kinds or kind in cfg.hostile_kinds:
                self.kinds[kind] = (f"127.0.0.{i + 2}", runs[kind])
        self.polls_open = 0

    @property
    def addresses(self) -> list[str]:
        return [addr for addr, _ in self.kinds.values()]

    def start(self) -> None:
        for kind, (addr, run) in self.kinds.items():
            self.group.spawn(self._guard, kind, addr, run)
        self.group.spawn(self._count_polls)

    def _count_polls(self) -> None:
        """The peak of long polls open at once (a poll held 30 s never completes in a
        short attack, so counting completions would not show them)."""
        while True:
            peak = self.tally.notes.get(POLLS_OPEN_PEAK, 0)
            self.tally.notes[POLLS_OPEN_PEAK] = max(peak, self.polls_open)
            gevent.sleep(0.5)

    def stop(self) -> None:
        self.group.kill(block=True, timeout=10)

    def _guard(self, kind: str, addr: str, run: Callable[[str], None]) -> None:
        try:
            run(addr)
        except gevent.GreenletExit:
            raise
        except Exception as exc:  # a broken client must say so, not vanish
            self.tally.example(f"hostile {kind} stopped: {type(exc).__name__}: {exc}")
            self.tally.notes.setdefault("hostile_broken", []).append(kind)

    # One exchange.

    def send(
        self,
        kind: str,
        addr: str,
        payload: bytes | Iterator[tuple[bytes, float]],
        timeout: float = 10.0,
    ) -> Answer:
        """Send one request from `addr` (bytes, or (chunk, pause) pieces), read, record."""
        answer = exchange(self.target, addr, payload, timeout)
        self.record(kind, payload if isinstance(payload, bytes) else b"(dribbled)", answer)
        return answer

    def record(self, kind: str, sent: bytes, answer: Answer) -> None:
        phase = self.phase()
        self.tally.count(phase, REQUESTS)
        self.tally.count(phase, f"hostile:{kind}:{answer.status or 'closed'}")
        if not answer.status:
            self.tally.count(phase, CLOSED)
            return
        problem = contract_problem(answer)
        if problem is None:
            return
        outcome = {"gateway error": GATEWAY, "server error": SERVER_ERROR}.get(problem, BAD_ERROR)
        self.tally.count(phase, outcome)
        line = sent.split(b"\r\n", 1)[0][:80].decode("latin-1")
        self.tally.example(
            f"hostile {kind}: {line} -> {answer.status} {problem}: {answer.body[:80]!r}"
        )

    def paced(self, kind: str, addr: str, payloads: Iterator[bytes]) -> None:
        """Send the next payload `hostile_rate` times a second, until killed."""
        period = 1 / max(0.1, self.cfg.hostile_rate)
        for payload in payloads:
            started = time.monotonic()
            self.send(kind, addr, payload)
            gevent.sleep(max(0.0, period - (time.monotonic() - started)))

    def message(self, user_id: str, text: str, message_id: str | None = None) -> bytes:
        body: dict[str, str] = {"user_id": user_id, "text": text}
        if message_id:
            body["message_id"] = message_id
        headers = {"Content-Type": "application/json", **self.auth}
        return request("POST", "/v1/messages", headers, orjson.dumps(body))

    # The kinds.

    def _bad_params(self, addr: str) -> None:
        """Cursors Redis rejects, numbers that are not ASCII digits, bytes that are not UTF-8."""
        get = {"Accept": "application/json", **self.auth}
        bad = [
            request("GET", "/v1/users/u1/replies?after=99999999999999999999-0", get),
            request("GET", "/v1/users/u1/replies?limit=%C2%B2", get),
            request("GET", "/v1/users/u1/replies?wait=abc", get),
            request("GET", "/v1/users/u1/replies?limit=-1&wait=1e9", get),
            request("GET", "/v1/users/u1/replies?after=0-0-0", get),
            # The raw superscript two, not percent-encoded: NGINX passes it on as it came.
            "GET /v1/users/u1/replies?limit=\u00b2 HTTP/1.1\r\nHost: x\r\n"
            "Connection: close\r\n\r\n".encode(),
            b"GET /v1/users/u1/replies HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer \xff\xfe\r\n\r\n",
            request("GET", "/v1/users/" + "x" * 300 + "/prefs", get),
        ]
        self.paced("bad_params", addr, itertools.cycle(bad))

    def _long_polls(self, addr: str) -> None:
        """`wait=30` polls up to NGINX's per-address connection limit, held as long as allowed."""
        n = self.cfg.hostile_long_polls
        group = Group()
        for i in range(n):
            # An eighth wait on one user's inbox (the per-user bound), the rest on their own.
            user = "hostile-poll" if i % 8 == 0 else f"hostile-poll-{i}"
            group.spawn(self._one_long_poll, addr, user)
            if i % 50 == 49:
                gevent.sleep(0.05)  # a few hundred connections a second, not all at once
        try:
            group.join()
        finally:
            group.kill(block=True, timeout=10)

    def _one_long_poll(self, addr: str, user: str) -> None:
        payload = request("GET", f"/v1/users/{user}/replies?wait=30", self.auth)
        refusals = 0
        while True:
            started = time.monotonic()
            self.polls_open += 1
            try:
                answer = self.send("long_polls", addr, payload, timeout=40)
            finally:
                self.polls_open -= 1
            if answer.status == 200 and time.monotonic() - started >= 5:
                self.tally.count(self.phase(), LONG_POLLS_HELD)
                refusals = 0
                continue
            # Refused: back after Retry-After, doubling while refused (up to 8 s). A refused
            # poll holds nothing; retrying a thousand of them every second would load the
            # machine the stack shares with us, not the stack's bounds.
            refusals += 1
            gevent.sleep(
                min(8.0, _retry_after(answer) * 2 ** (refusals - 1)) * random.uniform(1, 1.5)
            )

    def _duplicates(self, addr: str) -> None:
        """Floods of one message_id: a slow (never asked) question while it is being answered,
        then again once it was."""
        while True:
            started = time.monotonic()
            tag = uuid.uuid4().hex[:12]
            payload = self.message(
                f"hostile-dup-{tag}", f"what is hostile question {tag}?", f"dup-{tag}"
            )
            for _ in range(2):  # in flight, then replayed
                flood = Group()
                for _ in range(self.cfg.hostile_duplicates):
                    flood.spawn(self.send, "duplicates", addr, payload)
                flood.join()
            gevent.sleep(max(0.0, 1.0 - (time.monotonic() - started)))

    def _malformed(self, addr: str) -> None:
        """Bodies that are not what `POST /v1/messages` takes."""
        json_ct = {"Content-Type": "application/json", **self.auth}
        big = orjson.dumps({"user_id": "h1", "text": "x" * 70_000})
        chunk = b"x" * 8192
        chunked = b"".join(b"2000\r\n" + chunk + b"\r\n" for _ in range(10)) + b"0\r\n\r\n"
        bad = [
            request("POST", "/v1/messages", json_ct, b'{"user_id": "h1", "text": '),
            request("POST", "/v1/messages", json_ct, b"[1, 2, 3]"),
            request("POST", "/v1/messages", json_ct, b'{"user_id": "h1", "text": "\xff\xfe"}'),
            request("POST", "/v1/messages", json_ct, b'{"user_id": "h 1!", "text": "hi"}'),
            request("POST", "/v1/messages", json_ct, b'{"user_id": "h1", "text": "   "}'),
            request("POST", "/v1/messages", json_ct, big),
            request("POST", "/v1/messages", {**json_ct, "Transfer-Encoding": "chunked"}, chunked),
            request(
                "POST",
                "/v1/messages",
                {"Content-Type": "text/plain", **self.auth},
                b'{"user_id": "h1", "text": "hi"}',
            ),
            request(
                "POST",
                "/v1/messages",
                {"Content-Type": "application/x-www-form-urlencoded", **self.auth},
                b"user_id=h1&text=hi",
            ),
            request("POST", "/v1/messages", json_ct),
            request("PUT", "/v1/users/h1/prefs", json_ct, b'{"prefs": {"k": ["not", "a string"]}}'),
        ]
        self.paced("malformed", addr, itertools.cycle(bad))

    def _big_headers(self, addr: str) -> None:
        """Headers and URLs larger than any buffer meant for them."""
        bad = [
            request("GET", "/v1/users/u1/prefs", {"X-Big": "a" * 10_000, **self.auth}),
            request("GET", "/v1/users/u1/prefs", {"Cookie": "c=" + "b" * 40_000, **self.auth}),
            request("GET", "/v1/users/u1/prefs", {f"X-H{i}": "v" * 100 for i in range(300)}),
            request("GET", "/v1/users/u1/replies?after=" + "9" * 12_000, self.auth),
            request("GET", "/healthz", {"X-Big": "a" * 10_000}),
        ]
        self.paced("big_headers", addr, itertools.cycle(bad))

    def _odd_methods(self, addr: str) -> None:
        """Methods no route takes, NGINX's TRACE above all."""
        bad = [
            request(method, path, self.auth)
            for method in ("TRACE", "PATCH", "FOO", "DELETE", "PUT")
            for path in ("/v1/messages", "/", "/healthz")
        ]
        self.paced("odd_methods", addr, itertools.cycle(bad))

    def _rotating_ids(self, addr: str) -> None:
        """A fresh user_id for every message: around the per-user limit."""
        fresh = (
            self.message(f"hostile-rot-{uuid.uuid4().hex[:12]}", "/echo rotating")
            for _ in itertools.count()
        )
        self.paced("rotating_ids", addr, fresh)

    def _slow_bodies(self, addr: str) -> None:
        """Headers at once, then the body a byte at a time; half of them never finish it."""
        group = Group()
        for i in range(self.cfg.hostile_slow_bodies):
            group.spawn(self._one_slow_body, addr, finish=i % 2 == 0)
        try:
            group.join()
        finally:
            group.kill(block=True, timeout=10)

    def _one_slow_body(self, addr: str, finish: bool) -> None:
        while True:
            payload = self.message(f"hostile-slow-{uuid.uuid4().hex[:12]}", "/echo slowly")
            head, _, body = payload.partition(b"\r\n\r\n")
            pause = SLOW_BODY_SECONDS / len(body)
            sent = body if finish else body[: len(body) // 2]
            pieces = [(head + b"\r\n\r\n", pause)] + [
                (sent[i : i + 1], pause) for i in range(len(sent))
            ]
            if not finish:
                pieces.append((b"", 3600.0))  # and then nothing, until killed
            self.send("slow_bodies", addr, iter(pieces), timeout=120)


def _retry_after(answer: Answer) -> float:
    """Seconds to wait before the next attempt: the answer's Retry-After, at least 1 s."""
    try:
        return max(1.0, float(answer.header("Retry-After") or 1))
    except ValueError:
        return 1.0
