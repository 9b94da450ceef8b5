"""Loopback HTTP server that imitates the OpenAI and Anthropic HTTP APIs.

The simulator exists so the demo, the test suite and the benchmark can drive the
proxy against something that speaks the real wire formats (the official SDKs parse
its answers) while being fast, deterministic and able to misbehave on demand.

It is deliberately built on a bare :class:`asyncio.Protocol` plus ``httptools``
instead of a web framework: the benchmark needs the upstream to be much faster
than the proxy under test, otherwise it would be measuring the simulator.

Token accounting is honest and bounded so the proxy's budget tests can rely on it:

* input tokens  = ceil(UTF-8 bytes of the prompt text / 4), where the prompt text is
  every string value found in ``messages`` / ``system`` / ``input`` /
  ``instructions`` (skipping structural keys such as ``role`` or ``type``) plus the
  compact JSON of ``tools``; this can never exceed the request body size;
* output tokens = content chunks produced x ``tokens_per_chunk``, never more than the
  request's output cap (``max_tokens``, ``max_completion_tokens`` or
  ``max_output_tokens``) per choice, summed over ``n`` choices.

Only ``usage_multiplier`` (simulating a provider that over-bills) breaks those bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import itertools
import math
import signal
import sys
import threading
import time
import typing
from array import array
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

import httptools
import orjson

__all__ = [
    "RecordedRequest",
    "SimConfig",
    "SimStats",
    "SimUpstream",
    "SimUpstreamThread",
    "main",
]

DEFAULT_MODEL: Final = "sim-model"
#: Text of one content chunk per token; four ASCII bytes is about one real token.
CHUNK_WORD: Final = "tok "
MAX_RECORDED: Final = 1000
#: Suffix keys used by the stats counters; the prefix before them is free-form.
ROUTE_CHAT: Final = "/chat/completions"
ROUTE_MESSAGES: Final = "/messages"
ROUTE_COUNT_TOKENS: Final = "/messages/count_tokens"
ROUTE_EMBEDDINGS: Final = "/embeddings"
ROUTE_RESPONSES: Final = "/responses"
ROUTE_UNKNOWN: Final = "unknown"

# Order matters: the longer "/messages/count_tokens" must win over "/messages".
_ROUTES: Final[tuple[tuple[bytes, str], ...]] = (
    (b"/chat/completions", ROUTE_CHAT),
    (b"/messages/count_tokens", ROUTE_COUNT_TOKENS),
    (b"/messages", ROUTE_MESSAGES),
    (b"/embeddings", ROUTE_EMBEDDINGS),
    (b"/responses", ROUTE_RESPONSES),
)

# Strings under these keys are protocol structure, not text the model would read,
# so they are left out of the input-token estimate.
_STRUCTURAL_KEYS: Final = frozenset(
    {
        "role",
        "type",
        "id",
        "tool_call_id",
        "tool_use_id",
        "call_id",
        "cache_control",
        "status",
        "media_type",
        "detail",
    }
)

# Piece sizes used by split_sse; small primes-ish so the cuts land at varying
# offsets inside "data:" prefixes, JSON strings and the blank-line terminator.
_SPLIT_SIZES: Final = (1, 2, 5, 3, 8, 1, 13, 4, 7)

_STATUS_LINES: Final[dict[int, bytes]] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("ascii") for s in HTTPStatus
}
_SSE_HEAD_FMT: Final = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n%s\r\n"
)
_JSON_HEAD_FMT: Final = b"%scontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_DONE_EVENT: Final = b"data: [DONE]\n\n"

# OpenAI error "type"/"code" per status, as the real API reports them.
_OPENAI_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Simulated invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided (simulated)."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden (simulated)."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist (simulated)."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached (simulated)."),
    500: ("server_error", None, "The server had an error processing your request (simulated)."),
    502: ("server_error", None, "Bad gateway (simulated)."),
    503: ("server_error", None, "The engine is currently overloaded (simulated)."),
}
_ANTHROPIC_ERRORS: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# Real providers tell clients when to come back on these; proxies may forward it.
_RETRY_AFTER_STATUSES: Final = frozenset({429, 503, 529})

_Json = dict[str, Any]


# --------------------------------------------------------------------------- config


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _parse_int(text: str) -> int:
    return int(text.strip())


def _parse_float(text: str) -> float:
    return float(text.strip())


_SCALAR_PARSERS: Final[dict[type, Callable[[str], Any]]] = {
    bool: _parse_bool,
    int: _parse_int,
    float: _parse_float,
}


@dataclass
class SimConfig:
    """Behaviour of the simulated provider; shared and mutable while serving.

    Every field can also be overridden for a single request with a header named
    ``X-Sim-<Field-Name>`` (``error_status`` -> ``X-Sim-Error-Status: 429``); values
    of optional fields accept ``none``/``off`` to clear them.
    """

    #: Content chunks per choice (before the output cap is applied).
    chunks: int = 16
    #: Output tokens accounted for each content chunk.
    tokens_per_chunk: int = 1
    #: Delay before the first response byte.
    latency_ms: float = 0.0
    #: Delay before each streamed content chunk.
    chunk_delay_ms: float = 0.0
    #: Answer every request with this status and the provider's error body.
    error_status: int | None = None
    #: Drop usage from JSON answers and from the end of streams.
    omit_usage: bool = False
    #: Multiply reported usage, to simulate a provider billing more than asked.
    usage_multiplier: float = 1.0
    #: Close the connection after this many content chunks (no terminating chunk).
    cut_after_chunks: int | None = None
    #: Stop sending (connection stays open) after this many content chunks.
    stall_after_chunks: int | None = None
    #: Write every SSE event as many tiny HTTP chunks with loop yields in between.
    split_sse: bool = False
    #: When the request offers tools, answer with a call to the first one.
    tool_call: bool = False
    #: Length of the vectors returned by the embeddings endpoint (unless requested).
    embedding_dims: int = 8

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` if a field holds a value the simulator cannot honour."""
        if self.chunks < 0:
            raise ValueError("chunks must be >= 0")
        if self.tokens_per_chunk < 1:
            raise ValueError("tokens_per_chunk must be >= 1")
        if self.latency_ms < 0 or self.chunk_delay_ms < 0:
            raise ValueError("delays must be >= 0")
        if self.usage_multiplier < 0:
            raise ValueError("usage_multiplier must be >= 0")
        if self.error_status is not None and not 100 <= self.error_status <= 599:
            raise ValueError("error_status must be an HTTP status code")
        if self.cut_after_chunks is not None and self.cut_after_chunks < 0:
            raise ValueError("cut_after_chunks must be >= 0")
        if self.stall_after_chunks is not None and self.stall_after_chunks < 0:
            raise ValueError("stall_after_chunks must be >= 0")
        if self.embedding_dims < 1:
            raise ValueError("embedding_dims must be >= 1")

    def with_overrides(self, overrides: dict[str, Any]) -> SimConfig:
        """Return a validated copy with ``overrides`` (field name -> str or JSON value)."""
        changes = {name: _coerce_field(name, value) for name, value in overrides.items()}
        return dataclasses.replace(self, **changes)

    def update(self, overrides: dict[str, Any]) -> None:
        """Apply ``overrides`` in place, atomically: nothing changes if one is invalid."""
        candidate = self.with_overrides(overrides)
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(candidate, f.name))

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict."""
        return dataclasses.asdict(self)


def _build_field_parsers() -> dict[str, tuple[Callable[[str], Any], type, bool]]:
    """Map each SimConfig field to (string parser, scalar type, optional?)."""
    hints = typing.get_type_hints(SimConfig)
    out: dict[str, tuple[Callable[[str], Any], type, bool]] = {}
    for f in dataclasses.fields(SimConfig):
        tp = hints[f.name]
        args = typing.get_args(tp)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else tp
        if base not in _SCALAR_PARSERS:
            raise TypeError(f"SimConfig.{f.name}: unsupported type {tp!r}")
        out[f.name] = (_SCALAR_PARSERS[base], base, optional)
    return out


_FIELD_PARSERS: Final = _build_field_parsers()
#: "x-sim-error-status" -> "error_status", for per-request overrides.
_OVERRIDE_HEADERS: Final[dict[str, str]] = {
    "x-sim-" + name.replace("_", "-"): name for name in _FIELD_PARSERS
}


def _coerce_field(name: str, value: Any) -> Any:
    """Convert a header string or JSON value to the type of SimConfig field ``name``."""
    try:
        parse, base, optional = _FIELD_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown simulator setting {name!r}") from None
    if isinstance(value, str):
        if optional and value.strip().lower() in ("", "none", "null", "off"):
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if value is None and optional:
        return None
    # bool is an int subclass; keep JSON true/false out of numeric fields and back.
    if base is bool and isinstance(value, bool):
        return value
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{name}: expected {base.__name__}, got {value!r}")


# ---------------------------------------------------------------------------- stats


@dataclass(slots=True)
class RecordedRequest:
    """One request as the simulator saw it (header names are lower-case)."""

    method: str
    path: str
    headers: dict[str, str]
    #: Parsed JSON body, or None when the body was empty or not JSON.
    body: Any


class SimStats:
    """Counters per route suffix plus the most recent requests, for assertions."""

    def __init__(self) -> None:
        self.received: dict[str, int] = {}
        self.completed: dict[str, int] = {}
        #: Responses that did not finish: cut, stalled, or the client went away.
        self.aborted: dict[str, int] = {}
        self.requests: deque[RecordedRequest] = deque(maxlen=MAX_RECORDED)

    @property
    def received_total(self) -> int:
        """Requests received on all simulated routes."""
        return sum(self.received.values())

    @property
    def completed_total(self) -> int:
        """Responses fully written on all simulated routes."""
        return sum(self.completed.values())

    def reset(self) -> None:
        """Zero every counter and forget recorded requests (in place)."""
        self.received.clear()
        self.completed.clear()
        self.aborted.clear()
        self.requests.clear()

    def to_dict(self) -> dict[str, Any]:
        """Counters as a JSON-ready dict (recorded requests are only counted)."""
        return {
            "received": dict(self.received),
            "completed": dict(self.completed),
            "aborted": dict(self.aborted),
            "received_total": self.received_total,
            "completed_total": self.completed_total,
            "recorded": len(self.requests),
        }


# ------------------------------------------------------------------------- helpers


def _text_bytes(obj: object) -> int:
    """UTF-8 size of every non-structural string inside ``obj``."""
    if isinstance(obj, str):
        return len(obj) if obj.isascii() else len(obj.encode("utf-8", "surrogatepass"))
    if isinstance(obj, list):
        return sum(_text_bytes(item) for item in obj)
    if isinstance(obj, dict):
        return sum(_text_bytes(v) for k, v in obj.items() if k not in _STRUCTURAL_KEYS)
    return 0


def _tools_bytes(tools: object) -> int:
    # Tool schemas are mostly dict keys, which the string walk would skip.
    return len(orjson.dumps(tools)) if tools else 0


def _tokens(nbytes: int) -> int:
    return (nbytes + 3) // 4


def _bill(tokens: int, multiplier: float) -> int:
    if multiplier == 1.0:
        return tokens
    return math.ceil(tokens * multiplier)


def _plan_output(cfg: SimConfig, cap: int | None) -> tuple[int, int, bool]:
    """Return (chunks, tokens, truncated) for one choice under output cap ``cap``."""
    full = cfg.chunks * cfg.tokens_per_chunk
    if cap is None or cap >= full:
        return cfg.chunks, full, False
    # Emit enough chunks to reach the cap, but bill no more than the cap.
    chunks = min(cfg.chunks, -(-cap // cfg.tokens_per_chunk))
    return chunks, min(chunks * cfg.tokens_per_chunk, cap), True


def _first_tool_name(tools: object) -> str | None:
    """Name of the first tool in OpenAI chat, Responses or Anthropic tool format."""
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return None
    tool = tools[0]
    fn = tool.get("function")
    name = fn.get("name") if isinstance(fn, dict) else tool.get("name")
    return name if isinstance(name, str) else "tool"


def _tool_fragments(count: int, piece: str) -> list[str]:
    """``count`` argument fragments whose concatenation is a valid JSON object."""
    if count == 0:
        return []
    frags = [piece] * count
    frags[0] = '{"input":"' + frags[0]
    frags[-1] = frags[-1] + '"}'
    return frags


def _split(data: bytes) -> Iterator[bytes]:
    sizes = itertools.cycle(_SPLIT_SIZES)
    pos = 0
    while pos < len(data):
        step = next(sizes)
        yield data[pos : pos + step]
        pos += step


def _frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _sse(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _named_sse(event: str, obj: object) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def _cap_of(body: _Json, *names: str) -> int | None:
    """First present output cap among ``names``; ValueError if it is not an int >= 0."""
    for name in names:
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"Invalid '{name}': expected a non-negative integer.")
        return value
    return None


class _BadRequest(Exception):
    """Raised by endpoint handlers to answer 400 in the provider's error shape."""


# Event kinds inside a stream: cut/stall points are computed from them.
_PRE: Final = 0
_CONTENT: Final = 1
_POST: Final = 2


class _Reply:
    """A response fully computed up front; only its delivery may be asynchronous."""

    __slots__ = (
        "body",
        "delay",
        "events",
        "head",
        "keep_alive",
        "key",
        "latency",
        "split",
        "stall",
        "stop_at",
    )

    def __init__(
        self,
        key: str | None,
        head: bytes,
        body: bytes = b"",
        events: list[tuple[bytes, int]] | None = None,
        keep_alive: bool = True,
    ) -> None:
        self.key = key
        self.head = head
        self.body = body
        self.events = events
        self.keep_alive = keep_alive
        self.latency = 0.0
        self.delay = 0.0
        self.split = False
        #: Content chunks after which delivery stops (cut or stall); None = never.
        self.stop_at: int | None = None
        self.stall = False

    @property
    def immediate(self) -> bool:
        """True when the reply can be written synchronously in one transport.write."""
        return (
            self.latency <= 0.0
            and self.stop_at is None
            and (self.events is None or (self.delay <= 0.0 and not self.split))
        )

    def wire(self) -> bytes:
        """The whole response as a single buffer (only valid if ``immediate``)."""
        if self.events is None:
            return self.head + self.body
        parts = [self.head]
        parts.extend(_frame(ev) for ev, _ in self.events)
        parts.append(_LAST_CHUNK)
        return b"".join(parts)


# ----------------------------------------------------------------------- protocol


class _Conn(asyncio.Protocol):
    """One client connection: parses requests and writes replies in order."""

    __slots__ = (
        "_body",
        "_closed",
        "_draining",
        "_headers",
        "_lost",
        "_parser",
        "_pending",
        "_srv",
        "_task",
        "_transport",
        "_url",
    )

    def __init__(self, server: SimUpstream) -> None:
        self._srv = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        # Pipelined requests wait here while an asynchronous reply is in flight.
        self._pending: deque[_Reply] = deque()
        self._task: asyncio.Task[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._closed = False
        # Set once a reply asked to close the connection; later requests are ignored.
        self._draining = False

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, so cast, not check.
        self._transport = typing.cast(asyncio.Transport, transport)
        self._srv._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._srv._conns.discard(self)
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(400, "Upgrade not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"Malformed HTTP request: {exc}")

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        # curl sends "Expect: 100-continue" for bodies over 1 KiB and would otherwise
        # wait a full second before sending the body.
        if len(name) == 6 and name.lower() == b"expect" and value.lower() == b"100-continue":
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._draining:
            return
        keep_alive = self._parser.should_keep_alive()
        method = self._parser.get_method()
        try:
            reply = self._srv._dispatch(method, self._url, self._headers, self._body, keep_alive)
        except Exception as exc:  # a simulator bug must not hang the client
            reply = _Reply(None, b"", keep_alive=False)
            body = orjson.dumps({"error": {"message": f"simulator error: {exc!r}", "type": "server_error"}})
            reply.head = _json_head(500, len(body), False)
            reply.body = body
        if not reply.keep_alive:
            self._draining = True
        if self._task is None and reply.immediate:
            self._write_now(reply)
        elif self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._deliver_all(reply))
        else:
            self._pending.append(reply)

    # delivery

    def _fail(self, status: int, message: str) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        body = orjson.dumps({"error": {"message": message, "type": "invalid_request_error"}})
        transport.write(_json_head(status, len(body), False) + body)
        transport.close()

    def _write_now(self, reply: _Reply) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        transport.write(reply.wire())
        self._srv._count(self._srv.stats.completed, reply.key)
        if not reply.keep_alive:
            transport.close()

    async def _deliver_all(self, first: _Reply) -> None:
        try:
            reply: _Reply | None = first
            while reply is not None and not self._closed:
                if reply.immediate:
                    self._write_now(reply)
                else:
                    await self._deliver(reply)
                reply = self._pending.popleft() if self._pending else None
        finally:
            self._task = None

    async def _wait_lost(self) -> None:
        if self._closed:
            return
        if self._lost is None:
            self._lost = asyncio.get_running_loop().create_future()
        await self._lost

    async def _deliver(self, reply: _Reply) -> None:
        transport = self._transport
        assert transport is not None
        stats = self._srv.stats
        if reply.latency > 0.0:
            await asyncio.sleep(reply.latency)
            if self._closed:
                self._srv._count(stats.aborted, reply.key)
                return
        if reply.events is None:
            if reply.stop_at is None:
                self._write_now(reply)
                return
            # A non-streamed body can only be broken halfway through.
            transport.write(reply.head + reply.body[: len(reply.body) // 2])
            await self._halt(reply)
            return

        buf: list[bytes] = [reply.head]
        content_sent = 0
        for payload, kind in reply.events:
            if self._closed:
                break
            if kind == _CONTENT:
                if reply.stop_at is not None and content_sent >= reply.stop_at:
                    break
                if reply.delay > 0.0:
                    transport.write(b"".join(buf))
                    buf.clear()
                    await asyncio.sleep(reply.delay)
                    if self._closed:
                        break
                content_sent += 1
            elif kind == _POST and reply.stop_at is not None:
                # Cuts and stalls always happen before the terminating events.
                break
            if reply.split:
                transport.write(b"".join(buf))
                buf.clear()
                for piece in _split(payload):
                    if self._closed:
                        break
                    transport.write(_frame(piece))
                    await asyncio.sleep(0)
            else:
                buf.append(_frame(payload))
        if self._closed:
            self._srv._count(stats.aborted, reply.key)
            return
        if reply.stop_at is not None:
            if buf:
                transport.write(b"".join(buf))
            await self._halt(reply)
            return
        buf.append(_LAST_CHUNK)
        transport.write(b"".join(buf))
        self._srv._count(stats.completed, reply.key)
        if not reply.keep_alive:
            transport.close()

    async def _halt(self, reply: _Reply) -> None:
        """Finish a cut (close now) or a stall (wait until the peer or server quits)."""
        transport = self._transport
        assert transport is not None
        self._srv._count(self._srv.stats.aborted, reply.key)
        self._draining = True
        if reply.stall:
            await self._wait_lost()
        else:
            # close() flushes what was written, then FIN: the client sees the body
            # end before the last chunk, which every HTTP client reports as an error.
            transport.close()

    def abort(self) -> None:
        """Drop the connection immediately (used when the server stops)."""
        if self._transport is not None:
            self._transport.abort()
        if self._task is not None:
            self._task.cancel()


def _json_head(status: int, length: int, keep_alive: bool, extra: bytes = b"") -> bytes:
    line = _STATUS_LINES.get(status) or b"HTTP/1.1 %d Status %d\r\n" % (status, status)
    if not keep_alive:
        extra += b"connection: close\r\n"
    return _JSON_HEAD_FMT % (line, length, extra)


# --------------------------------------------------------------------------- server


class SimUpstream:
    """Simulated LLM provider served with asyncio on a loopback port.

    ``config`` is read on every request, so tests may mutate it between calls.
    """

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config: SimConfig = config if config is not None else SimConfig()
        self.stats: SimStats = SimStats()
        self.port: int = 0
        self.host: str = "127.0.0.1"
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._ids = itertools.count(1)

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` without any path prefix."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start listening on ``host:port`` (0 picks a free port); return the port."""
        if self._server is not None:
            raise RuntimeError("simulator already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self), host, port, backlog=2048, reuse_address=True
        )
        self.host = host
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop listening and drop every open connection, including stalled streams."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        conns = list(self._conns)
        tasks = [c._task for c in conns if c._task is not None]
        for conn in conns:
            conn.abort()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    # request handling (runs on the event loop thread, synchronously)

    def _count(self, counters: dict[str, int], key: str | None) -> None:
        if key is not None:
            counters[key] = counters.get(key, 0) + 1

    def _next_id(self) -> str:
        return f"{next(self._ids):024x}"

    def _dispatch(
        self,
        method: bytes,
        url: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        body_parts: list[bytes],
        keep_alive: bool,
    ) -> _Reply:
        qpos = url.find(b"?")
        path = url if qpos < 0 else url[:qpos]
        if len(path) > 1 and path.endswith(b"/"):
            path = path[:-1]
        raw = b"".join(body_parts)

        if b"/_sim/" in path:
            return self._control(method, path, raw, keep_alive)

        key = ROUTE_UNKNOWN
        for suffix, name in _ROUTES:
            if path.endswith(suffix):
                key = name
                break

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        body: Any = None
        if raw:
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = None
        stats = self.stats
        stats.received[key] = stats.received.get(key, 0) + 1
        stats.requests.append(RecordedRequest(method.decode("latin-1"), url.decode("latin-1"), headers, body))
        anthropic = key in (ROUTE_MESSAGES, ROUTE_COUNT_TOKENS)

        cfg = self.config
        overrides = {_OVERRIDE_HEADERS[h]: v for h, v in headers.items() if h in _OVERRIDE_HEADERS}
        if overrides:
            try:
                cfg = cfg.with_overrides(overrides)
            except ValueError as exc:
                return self._error(key, 400, f"Bad X-Sim header: {exc}", anthropic, keep_alive, cfg)

        if key == ROUTE_UNKNOWN:
            return self._error(
                key,
                404,
                f"Invalid URL ({method.decode('latin-1')} {path.decode('latin-1')})",
                False,
                keep_alive,
                cfg,
            )
        if method != b"POST":
            return self._error(
                key, 405, f"Method {method.decode('latin-1')} not allowed", anthropic, keep_alive, cfg
            )
        if cfg.error_status is not None:
            return self._error(key, cfg.error_status, None, anthropic, keep_alive, cfg)
        if not isinstance(body, dict):
            return self._error(key, 400, "Request body must be a JSON object.", anthropic, keep_alive, cfg)

        try:
            if key == ROUTE_CHAT:
                reply = self._chat(body, cfg)
            elif key == ROUTE_MESSAGES:
                reply = self._messages(body, cfg)
            elif key == ROUTE_RESPONSES:
                reply = self._responses(body, cfg)
            elif key == ROUTE_EMBEDDINGS:
                reply = self._embeddings(body, cfg)
            else:
                reply = self._count_tokens(body)
        except _BadRequest as exc:
            return self._error(key, 400, str(exc), anthropic, keep_alive, cfg)

        reply.key = key
        reply.keep_alive = keep_alive
        if not keep_alive:
            reply.head = reply.head[:-2] + b"connection: close\r\n\r\n"
        reply.latency = cfg.latency_ms / 1000.0
        reply.delay = cfg.chunk_delay_ms / 1000.0
        reply.split = cfg.split_sse
        if cfg.cut_after_chunks is not None:
            reply.stop_at = cfg.cut_after_chunks
        elif cfg.stall_after_chunks is not None:
            reply.stop_at = cfg.stall_after_chunks
            reply.stall = True
        return reply

    def _control(self, method: bytes, path: bytes, raw: bytes, keep_alive: bool) -> _Reply:
        """The ``/_sim/*`` endpoints: introspection and runtime reconfiguration."""
        status = 200
        result: Any
        if path.endswith(b"/_sim/stats") and method == b"GET":
            result = self.stats.to_dict()
        elif path.endswith(b"/_sim/reset") and method == b"POST":
            self.stats.reset()
            result = {"ok": True}
        elif path.endswith(b"/_sim/requests") and method == b"GET":
            result = list(self.stats.requests)
        elif path.endswith(b"/_sim/config") and method in (b"GET", b"POST", b"PATCH"):
            if method != b"GET":
                try:
                    changes = orjson.loads(raw) if raw else {}
                    if not isinstance(changes, dict):
                        raise ValueError("expected a JSON object")
                    self.config.update(changes)
                except ValueError as exc:  # JSONDecodeError is a ValueError
                    status, result = 400, {"error": {"message": str(exc), "type": "invalid_request_error"}}
            if status == 200:
                result = self.config.to_dict()
        else:
            status, result = (
                404,
                {"error": {"message": "unknown control endpoint", "type": "invalid_request_error"}},
            )
        body = orjson.dumps(result)
        return _Reply(None, _json_head(status, len(body), keep_alive), body, keep_alive=keep_alive)

    def _error(
        self,
        key: str,
        status: int,
        message: str | None,
        anthropic: bool,
        keep_alive: bool,
        cfg: SimConfig,
    ) -> _Reply:
        """An error answer in the shape the addressed provider would use."""
        if anthropic:
            etype = _ANTHROPIC_ERRORS.get(status) or (
                "api_error" if status >= 500 else "invalid_request_error"
            )
            text = message or f"Simulated {etype} ({status})."
            payload: _Json = {"type": "error", "error": {"type": etype, "message": text}}
            extra = b"request-id: req_sim%s\r\n" % self._next_id().encode()
        else:
            default = (
                "server_error" if status >= 500 else "invalid_request_error",
                None,
                f"Simulated error ({status}).",
            )
            etype, code, text = _OPENAI_ERRORS.get(status, default)
            if message is not None:
                # Validation errors carry no machine code on the real API either.
                text, code = message, None
            payload = {"error": {"message": text, "type": etype, "param": None, "code": code}}
            extra = b"x-request-id: req_sim%s\r\n" % self._next_id().encode()
        if status in _RETRY_AFTER_STATUSES:
            extra += b"retry-after: 1\r\n"
        body = orjson.dumps(payload)
        reply = _Reply(key, _json_head(status, len(body), keep_alive, extra), body, keep_alive=keep_alive)
        reply.latency = cfg.latency_ms / 1000.0
        return reply

    # ---------------------------------------------------------------- OpenAI chat

    def _chat(self, body: _Json, cfg: SimConfig) -> _Reply:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _BadRequest("'messages' must be a non-empty array.")
        n = body.get("n")
        if n is None:
            n = 1
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
            raise _BadRequest("Invalid 'n': expected an integer between 1 and 128.")
        try:
            cap = _cap_of(body, "max_completion_tokens", "max_tokens")
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None
        tools = body.get("tools")
        model = body.get("model") or DEFAULT_MODEL
        prompt = _bill(_tokens(_text_bytes(messages) + _tools_bytes(tools)), cfg.usage_multiplier)
        count, per_choice, truncated = _plan_output(cfg, cap)
        completion = _bill(per_choice * n, cfg.usage_multiplier)
        tool = _first_tool_name(tools) if cfg.tool_call else None
        finish = "length" if truncated else ("tool_calls" if tool else "stop")
        piece = CHUNK_WORD * cfg.tokens_per_chunk
        frags = _tool_fragments(count, piece) if tool else [piece] * count
        rid = self._next_id()
        cid = "chatcmpl-sim" + rid
        call_id = "call_sim" + rid
        created = int(time.time())
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }
        extra = b"x-request-id: req_sim%s\r\n" % rid.encode()

        if body.get("stream") is not True:
            message: _Json
            if tool:
                fn = {"name": tool, "arguments": "".join(frags) or "{}"}
                message = {
                    "role": "assistant",
                    "content": None,
                    "refusal": None,
                    "tool_calls": [{"id": call_id, "type": "function", "function": fn}],
                }
            else:
                message = {"role": "assistant", "content": "".join(frags), "refusal": None, "annotations": []}
            result: _Json = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                    for i in range(n)
                ],
                "service_tier": "default",
                "system_fingerprint": "fp_sim",
            }
            if not cfg.omit_usage:
                result["usage"] = usage
            data = orjson.dumps(result)
            return _Reply(None, _json_head(200, len(data), True, extra), data)

        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        base: _Json = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_sim",
            "choices": None,
        }
        if include_usage:
            # The real API marks every chunk with usage=null when usage is requested.
            base["usage"] = None

        def chunk(choices: list[_Json]) -> bytes:
            base["choices"] = choices
            return _sse(base)

        events: list[tuple[bytes, int]] = []
        for i in range(n):
            if tool:
                start_call = {
                    "index": 0,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": tool, "arguments": "" if frags else "{}"},
                }
                delta: _Json = {"role": "assistant", "content": None, "tool_calls": [start_call]}
            else:
                delta = {"role": "assistant", "content": "", "refusal": None}
            events.append(
                (chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]), _PRE)
            )
        for frag in frags:
            if tool:
                delta = {"tool_calls": [{"index": 0, "function": {"arguments": frag}}]}
            else:
                delta = {"content": frag}
            for i in range(n):
                events.append(
                    (chunk([{"index": i, "delta": delta, "logprobs": None, "finish_reason": None}]), _CONTENT)
                )
        for i in range(n):
            events.append(
                (chunk([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}]), _POST)
            )
        if include_usage and not cfg.omit_usage:
            base["usage"] = usage
            events.append((chunk([]), _POST))
        events.append((_DONE_EVENT, _POST))
        return _Reply(None, _SSE_HEAD_FMT % extra, events=events)

    # ----------------------------------------------------------- Anthropic messages

    def _messages(self, body: _Json, cfg: SimConfig) -> _Reply:
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            raise _BadRequest("max_tokens: Field required")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise _BadRequest("max_tokens: Input should be a valid integer greater than or equal to 1")
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise _BadRequest("messages: Field required")
        tools = body.get("tools")
        model = body.get("model") or DEFAULT_MODEL
        prompt_raw = _tokens(_text_bytes(messages) + _text_bytes(body.get("system")) + _tools_bytes(tools))
        prompt = _bill(prompt_raw, cfg.usage_multiplier)
        count, out_raw, truncated = _plan_output(cfg, max_tokens)
        output = _bill(out_raw, cfg.usage_multiplier)
        tool = _first_tool_name(tools) if cfg.tool_call else None
        stop_reason = "max_tokens" if truncated else ("tool_use" if tool else "end_turn")
        piece = CHUNK_WORD * cfg.tokens_per_chunk
        frags = _tool_fragments(count, piece) if tool else [piece] * count
        rid = self._next_id()
        msg_id = "msg_sim" + rid
        tool_id = "toolu_sim" + rid
        extra = b"request-id: req_sim%s\r\n" % rid.encode()

        if body.get("stream") is not True:
            block: _Json
            if tool:
                block = {
                    "type": "tool_use",
                    "id": tool_id,
                    "name": tool,
                    "input": orjson.loads("".join(frags)) if frags else {},
                }
            else:
                block = {"type": "text", "text": "".join(frags)}
            result: _Json = {
                "id": msg_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [block],
                "stop_reason": stop_reason,
                "stop_sequence": None,
            }
            if not cfg.omit_usage:
                result["usage"] = {
                    "input_tokens": prompt,
                    "output_tokens": output,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                }
            data = orjson.dumps(result)
            return _Reply(None, _json_head(200, len(data), True, extra), data)

        start_msg: _Json = {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
        }
        if not cfg.omit_usage:
            start_msg["usage"] = {
                "input_tokens": prompt,
                "output_tokens": 1,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            }
        if tool:
            first_block: _Json = {"type": "tool_use", "id": tool_id, "name": tool, "input": {}}
        else:
            first_block = {"type": "text", "text": ""}
        events: list[tuple[bytes, int]] = [
            (_named_sse("message_start", {"type": "message_start", "message": start_msg}), _PRE),
            (
                _named_sse(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": first_block},
                ),
                _PRE,
            ),
            (_named_sse("ping", {"type": "ping"}), _PRE),
        ]
        for frag in frags:
            delta = (
                {"type": "input_json_delta", "partial_json": frag}
                if tool
                else {"type": "text_delta", "text": frag}
            )
            events.append(
                (
                    _named_sse(
                        "content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}
                    ),
                    _CONTENT,
                )
            )
        events.append((_named_sse("content_block_stop", {"type": "content_block_stop", "index": 0}), _POST))
        message_delta: _Json = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        }
        if not cfg.omit_usage:
            message_delta["usage"] = {"output_tokens": output}
        events.append((_named_sse("message_delta", message_delta), _POST))
        events.append((_named_sse("message_stop", {"type": "message_stop"}), _POST))
        return _Reply(None, _SSE_HEAD_FMT % extra, events=events)

    def _count_tokens(self, body: _Json) -> _Reply:
        nbytes = (
            _text_bytes(body.get("messages"))
            + _text_bytes(body.get("system"))
            + _tools_bytes(body.get("tools"))
        )
        data = orjson.dumps({"input_tokens": _tokens(nbytes)})
        return _Reply(None, _json_head(200, len(data), True), data)

    # ------------------------------------------------------------- OpenAI embeddings

    def _embeddings(self, body: _Json, cfg: SimConfig) -> _Reply:
        inp = body.get("input")
        items: list[Any]
        if isinstance(inp, str):
            items = [inp]
        elif isinstance(inp, list) and inp and all(isinstance(x, int) for x in inp):
            items = [inp]  # a single pre-tokenised input
        elif isinstance(inp, list) and inp:
            items = inp
        else:
            raise _BadRequest("'input' must be a non-empty string or array.")
        dims = body.get("dimensions") or cfg.embedding_dims
        if not isinstance(dims, int) or isinstance(dims, bool) or dims < 1:
            raise _BadRequest("Invalid 'dimensions': expected a positive integer.")
        tokens = 0
        for item in items:
            if isinstance(item, str):
                tokens += _tokens(_text_bytes(item))
            elif isinstance(item, list) and all(isinstance(x, int) for x in item):
                tokens += len(item)  # already tokens
            else:
                raise _BadRequest("'input' items must be strings or arrays of integers.")
        as_base64 = body.get("encoding_format") == "base64"
        data: list[_Json] = []
        for index in range(len(items)):
            vec = [((j * 37 + index * 11) % 100 + 1) / 100.0 for j in range(dims)]
            emb: Any = base64.b64encode(array("f", vec).tobytes()).decode() if as_base64 else vec
            data.append({"object": "embedding", "index": index, "embedding": emb})
        result: _Json = {"object": "list", "data": data, "model": body.get("model") or DEFAULT_MODEL}
        if not cfg.omit_usage:
            billed = _bill(tokens, cfg.usage_multiplier)
            result["usage"] = {"prompt_tokens": billed, "total_tokens": billed}
        out = orjson.dumps(result)
        extra = b"x-request-id: req_sim%s\r\n" % self._next_id().encode()
        return _Reply(None, _json_head(200, len(out), True, extra), out)

    # ------------------------------------------------------------ OpenAI responses

    def _responses(self, body: _Json, cfg: SimConfig) -> _Reply:
        inp = body.get("input")
        if inp is None:
            raise _BadRequest("Missing required parameter: 'input'.")
        try:
            cap = _cap_of(body, "max_output_tokens")
        except ValueError as exc:
            raise _BadRequest(str(exc)) from None
        tools = body.get("tools")
        instructions = body.get("instructions")
        model = body.get("model") or DEFAULT_MODEL
        prompt = _bill(
            _tokens(_text_bytes(inp) + _text_bytes(instructions) + _tools_bytes(tools)), cfg.usage_multiplier
        )
        count, out_raw, truncated = _plan_output(cfg, cap)
        output = _bill(out_raw, cfg.usage_multiplier)
        tool = _first_tool_name(tools) if cfg.tool_call else None
        piece = CHUNK_WORD * cfg.tokens_per_chunk
        frags = _tool_fragments(count, piece) if tool else [piece] * count
        full_text = "".join(frags)
        rid = self._next_id()
        resp_id = "resp_sim" + rid
        item_id = ("fc_sim" if tool else "msg_sim") + rid
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output,
        }
        extra = b"x-request-id: req_sim%s\r\n" % rid.encode()
        created = int(time.time())

        def item(done: bool) -> _Json:
            status = "completed" if done else "in_progress"
            if tool:
                return {
                    "id": item_id,
                    "type": "function_call",
                    "status": status,
                    "arguments": (full_text or "{}") if done else "",
                    "call_id": "call_sim" + rid,
                    "name": tool,
                }
            content = [{"type": "output_text", "text": full_text, "annotations": []}] if done else []
            return {
                "id": item_id,
                "type": "message",
                "status": status,
                "role": "assistant",
                "content": content,
            }

        def response(state: str) -> _Json:
            final = state != "in_progress"
            return {
                "id": resp_id,
                "object": "response",
                "created_at": created,
                "status": state,
                "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if state == "incomplete" else None,
                "instructions": instructions,
                "max_output_tokens": cap,
                "model": model,
                "output": [item(True)] if final else [],
                "parallel_tool_calls": True,
                "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None},
                "store": True,
                "temperature": 1.0,
                "text": {"format": {"type": "text"}},
                "tool_choice": "auto",
                "tools": tools if isinstance(tools, list) else [],
                "top_p": 1.0,
                "truncation": "disabled",
                "usage": usage if final and not cfg.omit_usage else None,
                "user": None,
                "metadata": {},
            }

        end_state = "incomplete" if truncated else "completed"
        if body.get("stream") is not True:
            data = orjson.dumps(response(end_state))
            return _Reply(None, _json_head(200, len(data), True, extra), data)

        seq = itertools.count()

        def ev(kind: int, name: str, payload: _Json) -> tuple[bytes, int]:
            payload = {"type": name, "sequence_number": next(seq), **payload}
            return _named_sse(name, payload), kind

        loc = {"item_id": item_id, "output_index": 0}
        part_loc = {**loc, "content_index": 0}
        events = [
            ev(_PRE, "response.created", {"response": response("in_progress")}),
            ev(_PRE, "response.in_progress", {"response": response("in_progress")}),
            ev(_PRE, "response.output_item.added", {"output_index": 0, "item": item(False)}),
        ]
        if tool:
            events.extend(
                ev(_CONTENT, "response.function_call_arguments.delta", {**loc, "delta": f}) for f in frags
            )
            events.append(
                ev(_POST, "response.function_call_arguments.done", {**loc, "arguments": full_text or "{}"})
            )
        else:
            empty_part = {"type": "output_text", "text": "", "annotations": []}
            events.append(ev(_PRE, "response.content_part.added", {**part_loc, "part": empty_part}))
            events.extend(
                ev(_CONTENT, "response.output_text.delta", {**part_loc, "delta": f, "logprobs": []})
                for f in frags
            )
            done_part = {"type": "output_text", "text": full_text, "annotations": []}
            events.append(
                ev(_POST, "response.output_text.done", {**part_loc, "text": full_text, "logprobs": []})
            )
            events.append(ev(_POST, "response.content_part.done", {**part_loc, "part": done_part}))
        events.append(ev(_POST, "response.output_item.done", {"output_index": 0, "item": item(True)}))
        events.append(ev(_POST, f"response.{end_state}", {"response": response(end_state)}))
        return _Reply(None, _SSE_HEAD_FMT % extra, events=events)


# --------------------------------------------------------------------- thread runner


def _new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class SimUpstreamThread:
    """Run a :class:`SimUpstream` on its own event loop in a daemon thread.

    Meant for synchronous tests and clients::

        with SimUpstreamThread(SimConfig(chunks=4)) as sim:
            httpx.post(sim.base_url + "/v1/chat/completions", json=...)
    """

    def __init__(self, config: SimConfig | None = None, port: int = 0, host: str = "127.0.0.1") -> None:
        self.upstream = SimUpstream(config)
        self._host = host
        self._requested_port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def config(self) -> SimConfig:
        """The live configuration of the running simulator."""
        return self.upstream.config

    @property
    def stats(self) -> SimStats:
        """The live counters of the running simulator."""
        return self.upstream.stats

    @property
    def port(self) -> int:
        """Bound port (valid once started)."""
        return self.upstream.port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` (valid once started)."""
        return self.upstream.base_url

    def start(self) -> SimUpstreamThread:
        """Start the thread and block until the port is bound."""
        if self._thread is not None:
            raise RuntimeError("simulator thread already started")
        self._thread = threading.Thread(target=self._run, name="resgov-sim-upstream", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("simulator failed to start") from self._error
        return self

    def stop(self) -> None:
        """Stop the server and join the thread."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> SimUpstreamThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = _new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self.upstream.start(self._host, self._requested_port))
            except BaseException as exc:
                self._error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
            loop.run_until_complete(self.upstream.stop())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


# ------------------------------------------------------------------------------ CLI


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m resgov.simulator.upstream",
        description="Serve simulated OpenAI/Anthropic endpoints for demos, tests and benchmarks.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port (printed on start)")
    defaults = SimConfig()
    for f in dataclasses.fields(SimConfig):
        flag = "--" + f.name.replace("_", "-")
        parse, base, _optional = _FIELD_PARSERS[f.name]
        if base is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=getattr(defaults, f.name))
        else:
            parser.add_argument(flag, dest=f.name, type=parse, default=getattr(defaults, f.name))
    return parser


async def _serve(config: SimConfig, host: str, port: int) -> None:
    sim = SimUpstream(config)
    await sim.start(host, port)
    print(f"resgov simulator listening on {sim.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not available on every platform/loop; Ctrl-C still ends asyncio.run there.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await sim.stop()


def _run_coroutine(coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional
        asyncio.run(coro)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: serve until SIGINT/SIGTERM."""
    args = _arg_parser().parse_args(argv)
    try:
        config = SimConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SimConfig)})
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    _run_coroutine(_serve(config, args.host, args.port))


if __name__ == "__main__":
    main()
