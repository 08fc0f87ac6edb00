"""The edge: NGINX's own errors, its retries of shed requests, one request id per request, and
what the runner and the test suite may touch (process users, Redis limits, claimed DBs)."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support import (
    REDIS_HOST,
    REDIS_PORT,
    Stack,
    claim_redis_db,
    release_redis_db,
    unique,
)

pytestmark = pytest.mark.system
ROOT = Path(__file__).resolve().parent.parent


def raw(stack: Stack, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send `data` as it is (a request no HTTP client would send); the parsed answer."""
    with socket.create_connection(("127.0.0.1", stack.settings.public_port), timeout) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def access_entries(stack: Stack, **match: Any) -> list[dict[str, Any]]:
    """NGINX's access log entries with these fields, once it has flushed (every second)."""
    time.sleep(1.2)
    return [e for e in stack.access_log() if all(e.get(k) == v for k, v in match.items())]


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
