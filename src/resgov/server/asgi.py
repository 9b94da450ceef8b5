"""Small raw-ASGI helpers for the hot path (no framework objects per request)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from resgov.core.errors import PayloadTooLarge, ResGovError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON_CT = (b"content-type", b"application/json")


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes with 413."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Request body exceeds {limit} bytes.", reason="request_too_large")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def error_payload(err: ResGovError, route_format: str = "openai") -> bytes:
    """The JSON body of a refusal in the calling route's envelope."""
    if route_format == "anthropic":
        return orjson.dumps({"type": "error", "error": err.body()})
    return orjson.dumps({"error": err.body()})


async def send_bytes(send: Send, status: int, body: bytes, headers: Headers) -> None:
    """A complete response in two ASGI messages."""
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Send, err: ResGovError, extra: Headers, route_format: str = "openai") -> None:
    """A refusal as JSON, with its headers (``Retry-After``…) and ours."""
    headers: Headers = [JSON_CT, *extra]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send_bytes(send, err.status, error_payload(err, route_format), headers)
