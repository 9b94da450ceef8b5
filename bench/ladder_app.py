"""Stripped-down servers that isolate what each layer of ResGov's hot path costs.

Each variant serves ``POST /v1/chat/completions`` from uvicorn with exactly the settings
``resgov serve`` uses (uvloop, httptools, no access log), so the differences between
rungs of this ladder are the cost of one layer:

==========================  ===============================================================
``uvicorn-static``          raw ASGI app: read the body, answer canned JSON (server floor)
``fastapi-static``          the same answer from a FastAPI route (+ FastAPI/Starlette)
``uvicorn-aiohttp``         raw ASGI forward to the upstream with ResGov's pooled aiohttp
                            client settings (+ the upstream client)
``fastapi-aiohttp``         the same forward from a FastAPI route
``uvicorn-aiohttp-sqlite``  raw forward plus a durable SQLiteStore reserve before the call
                            and a settle after it (+ the ledger, no policy logic)
==========================  ===============================================================

ResGov itself is the next rung: auth, policy, pricing, audit and cost headers on top.

    python bench/ladder_app.py --variant uvicorn-aiohttp --port 8100 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import orjson
import uvicorn
from fastapi import FastAPI, Request, Response

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

VARIANTS = (
    "uvicorn-static",
    "fastapi-static",
    "uvicorn-aiohttp",
    "fastapi-aiohttp",
    "uvicorn-aiohttp-sqlite",
)
ROUTE = "/v1/chat/completions"

#: A chat completion the size of the simulator's (16 chunks of "tok ").
CANNED = orjson.dumps(
    {
        "id": "chatcmpl-ladder",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "tok " * 16, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 16, "total_tokens": 23},
    }
)
JSON_HEADERS = [(b"content-type", b"application/json")]


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(send: Send, status: int, body: bytes) -> None:
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Forwarder:
    """A pooled aiohttp session configured like ResGov's runtime."""

    def __init__(self, upstream: str) -> None:
        self.url = upstream.rstrip("/") + ROUTE  # upstream: the simulator's base URL, without /v1
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",)
        )

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def forward(self, body: bytes) -> tuple[int, bytes]:
        assert self.session is not None
        headers = {"content-type": "application/json", "accept-encoding": "identity"}
        async with self.session.post(self.url, data=body, headers=headers, allow_redirects=False) as resp:
            return resp.status, await resp.read()


class Ledger:
    """A durable reserve before the call and a settle after it, straight on SQLiteStore."""

    def __init__(self) -> None:
        from resgov.core.budget import lines_for
        from resgov.ledger.sqlite import SQLiteStore

        self._dir = tempfile.mkdtemp(prefix="resgov-ladder-")
        self.store = SQLiteStore(os.path.join(self._dir, "ladder.db"))
        self.ids = itertools.count()
        limit = 10**18
        self.lines = lines_for(
            "bench", "bench", {"daily": limit}, {"daily": limit}, datetime.now(UTC), ZoneInfo("UTC")
        )

    async def reserve(self) -> str:
        from resgov.ledger.store import AuditEntry, ReserveRequest

        rid = f"lad_{next(self.ids)}"
        audit = AuditEntry(request_id=rid, org="bench", agent="bench", route=ROUTE, model="sim/gpt-bench")
        outcome = await self.store.reserve(
            ReserveRequest(rid, "bench", "bench", 421_000, self.lines, 300.0, audit)
        )
        assert outcome.ok
        return rid

    async def settle(self, rid: str) -> None:
        from resgov.ledger.store import SettleRequest

        await self.store.settle(SettleRequest(rid, "actual", 65_000, "completed"))


def raw_app(variant: str, upstream: str) -> ASGIApp:
    """The raw-ASGI rungs (what ResGov's hot path is built on)."""
    forwarder = Forwarder(upstream) if "aiohttp" in variant else None
    ledger = Ledger() if variant.endswith("sqlite") else None

    async def lifespan(receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        if forwarder is not None:
            await forwarder.start()
        if ledger is not None:
            await ledger.store.open()
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        if forwarder is not None:
            await forwarder.stop()
        if ledger is not None:
            await ledger.store.close()
        await send({"type": "lifespan.shutdown.complete"})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http" or scope["path"] != ROUTE or scope["method"] != "POST":
            await _answer(send, 404, b'{"error":"not found"}')
            return
        body = await _read_body(receive)
        if forwarder is None:
            await _answer(send, 200, CANNED)
            return
        rid = await ledger.reserve() if ledger is not None else None
        status, answer = await forwarder.forward(body)
        if ledger is not None and rid is not None:
            await ledger.settle(rid)
        await _answer(send, status, answer)

    return app


def fastapi_app(variant: str, upstream: str) -> FastAPI:
    """The FastAPI rungs: the same work from a framework route."""
    forwarder = Forwarder(upstream) if "aiohttp" in variant else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if forwarder is not None:
            await forwarder.start()
        try:
            yield
        finally:
            if forwarder is not None:
                await forwarder.stop()

    api = FastAPI(lifespan=lifespan)

    @api.post(ROUTE)
    async def chat(request: Request) -> Response:
        body = await request.body()
        if forwarder is None:
            return Response(content=CANNED, media_type="application/json")
        status, answer = await forwarder.forward(body)
        return Response(content=answer, status_code=status, media_type="application/json")

    return api


def build(variant: str, upstream: str) -> Any:
    """The ASGI app of one ladder rung."""
    if variant not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    return fastapi_app(variant, upstream) if variant.startswith("fastapi") else raw_app(variant, upstream)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", required=True, choices=VARIANTS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="http://127.0.0.1:9000", help="simulator base URL (no /v1)")
    args = parser.parse_args()
    app = build(args.variant, args.upstream)
    uvicorn.run(app, host=args.host, port=args.port, loop="uvloop", http="httptools", lifespan="on",
                log_level="warning", access_log=False)  # fmt: skip


if __name__ == "__main__":
    main()
