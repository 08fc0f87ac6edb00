"""A bare aiohttp replica for `make bench`: the same request and answer shape, no work.

python -m loadtests.bench.hello PORT
"""

from __future__ import annotations

import sys

import orjson
import uvloop
from aiohttp import web


async def message(request: web.Request) -> web.Response:
    data = orjson.loads(await request.read())
    body = {
        "message_id": data.get("message_id", ""),
        "status": "replied",
        "reply": str(data.get("text", "")).removeprefix("/echo "),
        "cached": False,
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def ok(_: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_post("/v1/messages", message)
    app.router.add_get("/healthz", ok)
    app.router.add_get("/readyz", ok)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
