"""The `webchat` scenario's idle browsers: web chat sessions holding `/chat/events` open.

Each stream is a session of its own (``POST /chat/session``, then ``GET /chat/events`` with its
cookie) that sends nothing and only reads the keep-alive comments, as an open browser tab
does. They come from loopback addresses of their own (127.0.2.1, .2 ...), each kept below
NGINX's per-address connection limit, so NGINX sees them as the many clients they stand for
and the well-behaved users (127.0.0.1) are never charged for them. A stream the stack ends or
refuses while it should be held is counted (a drop) and opened again after a pause, as
`EventSource` would.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable

import gevent
from gevent.pool import Group

from loadtests.config import LoadConfig
from loadtests.hostile import exchange, request
from loadtests.tally import Tally

# Outcome names and notes.
OPENED = "webchat_streams_opened"  # streams the stack accepted (200 text/event-stream)
DROPS = "webchat_stream_drops"  # streams ended or refused while they were to be held
KEEPALIVES = "webchat_keepalives"  # keep-alive comments read: the streams were alive
OPEN_PEAK = "webchat_streams_open_peak"  # a note: most streams open at once
OPEN_AT_END = "webchat_streams_open_at_end"  # a note: streams open when the run ended
TARGET = "webchat_streams_target"  # a note: streams asked for

_HEADROOM = 16  # connections per address left below NGINX's limit
_READ_TIMEOUT = 40.0  # seconds without a byte (keep-alives come every 15 s) before giving up


class IdleStreams:
    """Opens `cfg.webchat_streams` event streams, paced, and holds them until `stop`."""

    def __init__(self, cfg: LoadConfig, tally: Tally, phase: Callable[[], str]) -> None:
        self.cfg = cfg
        self.tally = tally
        self.phase = phase
        self.target = cfg.target_address
        per_address = max(1, cfg.stack.edge_conn - _HEADROOM)
        count = max(1, math.ceil(cfg.webchat_streams / per_address))
        self.addresses = [f"127.0.2.{i + 1}" for i in range(count)]
        self.group = Group()
        self.open = 0

    def start(self) -> None:
        self.tally.notes[TARGET] = self.cfg.webchat_streams
        self.group.spawn(self._open_all)
        self.group.spawn(self._count_open)

    def stop(self) -> None:
        self.tally.notes[OPEN_AT_END] = self.open
        self.group.kill(block=True, timeout=10)

    def _open_all(self) -> None:
        # Spread over `webchat_open` seconds: browsers arrive, not all in one instant.
        n = self.cfg.webchat_streams
        pause = self.cfg.webchat_open / max(1, n)
        for i in range(n):
            self.group.spawn(self._hold, self.addresses[i % len(self.addresses)])
            gevent.sleep(pause)

    def _count_open(self) -> None:
        while True:
            peak = self.tally.notes.get(OPEN_PEAK, 0)
            self.tally.notes[OPEN_PEAK] = max(peak, self.open)
            gevent.sleep(0.5)

    def _session(self, addr: str) -> str | None:
        answer = exchange(self.target, addr, request("POST", "/chat/session"), timeout=10)
        cookie = answer.header("set-cookie") or ""
        return cookie.split(";", 1)[0] if answer.status == 200 and cookie else None

    def _hold(self, addr: str) -> None:
        """One browser tab: a session, its stream held open; opened again when it ends."""
        cookie = None
        while True:
            cookie = cookie or self._session(addr)
            if cookie is not None:
                self._stream(addr, cookie)
            self.tally.count(self.phase(), DROPS)
            gevent.sleep(1.0)  # EventSource's retry, as the stack asks

    def _stream(self, addr: str, cookie: str) -> None:
        payload = request("GET", "/chat/events", {"Cookie": cookie, "Accept": "text/event-stream"})
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(_READ_TIMEOUT)
                sock.bind((addr, 0))
                sock.connect(self.target)
                sock.sendall(payload)
                head = b""
                while b"\r\n\r\n" not in head:
                    data = sock.recv(4096)
                    if not data:
                        return
                    head += data
                if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
                    return
                self.tally.count(self.phase(), OPENED)
                self.open += 1
                try:
                    while data := sock.recv(4096):
                        keepalives = data.count(b": keep-alive")
                        if keepalives:
                            self.tally.count(self.phase(), KEEPALIVES, keepalives)
                finally:
                    self.open -= 1
        except OSError:
            return
