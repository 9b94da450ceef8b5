"""Tests for the pooled upstream client (resgov.providers.http_client).

Two kinds of peers, both on 127.0.0.1 only:

* the simulated provider (``SimUpstreamThread``) for real OpenAI-shaped JSON and SSE;
* ``RawServer``, a few lines of asyncio + httptools in this file, scripted per test for the
  edge cases a well-behaved simulator never produces (closing idle connections, cuts,
  malformed answers), and counting connections and requests server-side, which is how
  "reused" and "sent exactly once" are checked.

Every scenario runs on the default asyncio loop (pytest-asyncio) and again under uvloop,
which is what ResGov serves on (``test_scenario_under_uvloop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import importlib.util
import ipaddress
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httptools
import orjson
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from resgov.providers.http_client import (
    Headers,
    UpstreamBodyTooLarge,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResponse,
    _Connection,
)
from resgov.simulator.upstream import SimConfig, SimUpstreamThread

CHAT = b'{"model":"sim-model","messages":[{"role":"user","content":"hello there"}]}'
CHAT_STREAM = (
    b'{"model":"sim-model","stream":true,"stream_options":{"include_usage":true},'
    b'"messages":[{"role":"user","content":"hello there"}]}'
)
JSON_CT = {"content-type": "application/json"}
#: Bound for every "wait until" loop in this file.
WAIT_S = 5.0


# ------------------------------------------------------------------- scripted server


@dataclass
class Req:
    """One request as RawServer parsed it."""

    method: bytes
    path: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    conn: ServerConn

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n.lower() == name), None)


Handler = Callable[[Req], Awaitable[None] | None]


class ServerConn(asyncio.Protocol):
    """Server side of one connection: parses requests, hands each to the handler."""

    def __init__(self, server: RawServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.raw = bytearray()
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self.server.connections += 1
        self.server.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.open.discard(self)

    def data_received(self, data: bytes) -> None:
        self.raw += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.abort()

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        req = Req(self.parser.get_method(), self._url, self._headers, b"".join(self._body), self)
        self.server.requests.append(req)
        result = self.server.handler(req)
        if result is not None:
            task = asyncio.ensure_future(result)
            self.server.tasks.add(task)
            task.add_done_callback(self.server.tasks.discard)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


@dataclass
class RawServer:
    """A scripted HTTP/1.1 server on 127.0.0.1 that counts connections and requests."""

    handler: Handler
    ssl_context: ssl.SSLContext | None = None
    connections: int = 0
    requests: list[Req] = field(default_factory=list)
    open: set[ServerConn] = field(default_factory=set)
    tasks: set[asyncio.Future[None]] = field(default_factory=set)
    port: int = 0
    _server: asyncio.Server | None = None

    def url(self, path: str = "/v1/chat/completions") -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> RawServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ServerConn(self), "127.0.0.1", 0, ssl=self.ssl_context
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for conn in list(self.open):
            conn.abort()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self._server.wait_closed()


def answer(
    body: bytes = b"{}",
    status: int = 200,
    headers: tuple[tuple[bytes, bytes], ...] = ((b"Content-Type", b"application/json"),),
) -> bytes:
    """A complete response with Content-Length."""
    head = b"HTTP/1.1 %d X\r\n" % status + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def chunked(payload: bytes, sizes: Iterator[int], *, trailer: bool = False) -> bytes:
    """``payload`` in chunked transfer-coding, chunk sizes from ``sizes``, some with extensions."""
    out = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"]
    pos = 0
    while pos < len(payload):
        size = next(sizes)
        piece = payload[pos : pos + size]
        ext = b";ext=1" if pos % 3 == 0 else b""
        out.append(b"%X%s\r\n%s\r\n" % (len(piece), ext, piece))
        pos += size
    out.append(b"0\r\nX-Trailer: yes\r\n\r\n" if trailer else b"0\r\n\r\n")
    return b"".join(out)


async def ok_json(req: Req) -> None:
    req.conn.write(answer(b'{"ok":true,"n":%d}' % len(req.conn.server.requests)))


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def client_for(**kwargs: Any) -> AsyncIterator[UpstreamClient]:
    client = UpstreamClient(**kwargs)
    try:
        yield client
    finally:
        await client.close()


async def post(
    client: UpstreamClient, url: str, body: bytes = CHAT, headers: dict[str, str] | None = None
) -> UpstreamResponse:
    return await client.request("POST", url, {**JSON_CT, **(headers or {})}, body, connect_timeout=2.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------ simulator


@pytest.fixture
def sim() -> Iterator[SimUpstreamThread]:
    with SimUpstreamThread(SimConfig(chunks=16)) as upstream:
        yield upstream


async def test_json_response(sim: SimUpstreamThread) -> None:
    async with client_for() as client:
        resp = await post(client, sim.base_url + "/v1/chat/completions")
        assert resp.status == 200
        assert resp.headers.get("Content-Type") == "application/json"
        assert resp.headers.get("X-REQUEST-ID", "").startswith("req_sim")
        doc = orjson.loads(await resp.read())
        assert doc["usage"]["completion_tokens"] == 16
        assert resp.complete and await resp.readany() == b""
        assert client.idle_count() == 1, "a complete keep-alive response returns its connection"


async def test_sse_stream(sim: SimUpstreamThread) -> None:
    async with client_for() as client:
        for attempt in range(2):
            resp = await post(client, sim.base_url + "/v1/chat/completions", CHAT_STREAM)
            assert resp.status == 200 and resp.reused == (attempt == 1)
            assert resp.headers.get("content-type") == "text/event-stream"
            body = await resp.read()
            events = [e for e in body.split(b"\n\n") if e]
            assert events[-1] == b"data: [DONE]"
            chunks = [orjson.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
            assert chunks[-1]["usage"]["completion_tokens"] == 16
            resp.close()  # what the proxy's stream loop does at its end: the connection stays pooled
            assert client.idle_count() == 1
        assert sim.stats.received_total == 2 and sim.upstream._conns.__len__() == 1


def _normalise(body: bytes) -> bytes:
    return re.sub(rb'"created":\d+', b'"created":0', re.sub(rb"sim[0-9a-f]{24}", b"sim", body))


async def test_chunked_split_across_packets_matches_unsplit(sim: SimUpstreamThread) -> None:
    """The simulator writes every SSE event as tiny HTTP chunks with loop yields in between."""
    async with client_for() as client:
        url = sim.base_url + "/v1/chat/completions"
        whole = await (await post(client, url, CHAT_STREAM)).read()
        resp = await post(client, url, CHAT_STREAM, headers={"x-sim-split-sse": "true"})
        pieces = []
        for _ in range(100_000):
            piece = await resp.readany()
            if not piece:
                break
            pieces.append(piece)
        # How many pieces arrive depends on scheduling (a loaded machine coalesces them);
        # the bytes must not.
        assert _normalise(b"".join(pieces)) == _normalise(whole)


async def test_upstream_error_status_passes_through(sim: SimUpstreamThread) -> None:
    async with client_for() as client:
        resp = await post(
            client, sim.base_url + "/v1/chat/completions", headers={"x-sim-error-status": "429"}
        )
        assert resp.status == 429
        assert orjson.loads(await resp.read())["error"]["code"] == "rate_limit_exceeded"


async def test_stream_cut_by_simulator(sim: SimUpstreamThread) -> None:
    async with client_for() as client:
        url = sim.base_url + "/v1/chat/completions"
        resp = await post(client, url, CHAT_STREAM, headers={"x-sim-cut-after-chunks": "3"})
        got = b""
        with pytest.raises(UpstreamDisconnected):
            for _ in range(10_000):
                got += await resp.readany()
        assert got.count(b"data: ") >= 1
        assert client.idle_count() == 0 and client.open_count == 0


async def test_concurrent_requests_over_pool_simulator(sim: SimUpstreamThread) -> None:
    async with client_for() as client:
        url = sim.base_url + "/v1/chat/completions"

        async def one(i: int) -> bytes:
            resp = await post(client, url, CHAT_STREAM if i % 2 else CHAT)
            return await resp.read()

        bodies = await asyncio.gather(*(one(i) for i in range(100)))
        assert all(b.endswith(b"data: [DONE]\n\n") for b in bodies[1::2])
        assert all(orjson.loads(b)["object"] == "chat.completion" for b in bodies[0::2])
        assert sim.stats.completed_total == 100
        assert client.idle_count() == client.open_count <= 100


# --------------------------------------------------------------------- keep-alive


async def test_keepalive_reuse_counts_one_connection() -> None:
    async with RawServer(ok_json) as srv, client_for() as client:
        for i in range(5):
            resp = await post(client, srv.url())
            assert resp.reused == (i > 0)
            assert orjson.loads(await resp.read())["n"] == i + 1
        assert srv.connections == 1 and len(srv.requests) == 5


async def test_server_closing_idle_connection_gets_a_new_one_sent_once() -> None:
    async def answer_then_close(req: Req) -> None:
        req.conn.write(answer())
        await asyncio.sleep(0.02)
        req.conn.close()  # an idle timeout on the server's side

    async with RawServer(answer_then_close) as srv, client_for() as client:
        await (await post(client, srv.url())).read()
        await wait_until(lambda: client.idle_count() == 0, "the client to notice the close")
        resp = await post(client, srv.url())
        assert resp.status == 200 and not resp.reused
        assert srv.connections == 2 and len(srv.requests) == 2


async def test_idle_connection_found_closed_at_checkout_is_skipped() -> None:
    """EOF seen (eof_received) but the connection still pooled: checkout must skip it."""
    async with RawServer(ok_json) as srv, client_for() as client:
        await (await post(client, srv.url())).read()
        (conn,) = next(iter(client._idle.values()))
        conn.eof = True  # as eof_received sets it, before connection_lost runs
        resp = await post(client, srv.url())
        assert not resp.reused and srv.connections == 2 and len(srv.requests) == 2


async def test_disconnect_after_write_is_never_retried() -> None:
    """The server takes the request and closes: the request may have been billed, so it
    must surface as UpstreamDisconnected, and the server must see it exactly once."""

    async def first_ok_then_hang_up(req: Req) -> None:
        if len(req.conn.server.requests) == 1:
            req.conn.write(answer())
        else:
            req.conn.abort()

    async with RawServer(first_ok_then_hang_up) as srv, client_for() as client:
        await (await post(client, srv.url())).read()
        with pytest.raises(UpstreamDisconnected):
            await post(client, srv.url())  # over the reused connection
        await asyncio.sleep(0.05)
        assert len(srv.requests) == 2 and srv.connections == 1
        # A fresh connection that is hung up on: also once.
        with pytest.raises(UpstreamDisconnected):
            await post(client, srv.url())
        await asyncio.sleep(0.05)
        assert len(srv.requests) == 3 and srv.connections == 2


class _RefusingTransport:
    """Wraps a transport whose first send the kernel refuses (the peer had reset it)."""

    def __init__(self, real: asyncio.Transport) -> None:
        self._real = real
        self._refused = False

    def write(self, data: bytes) -> None:
        self._refused = True  # what asyncio does when sock.send raises: close, drop the data
        self._real.abort()

    def is_closing(self) -> bool:
        return self._refused or self._real.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


async def test_write_refused_on_pooled_connection_retries_once() -> None:
    async with RawServer(ok_json) as srv, client_for() as client:
        await (await post(client, srv.url())).read()
        (conn,) = next(iter(client._idle.values()))
        assert conn.transport is not None
        conn.transport = typing.cast(asyncio.Transport, _RefusingTransport(conn.transport))
        resp = await post(client, srv.url())
        assert orjson.loads(await resp.read())["n"] == 2
        assert not resp.reused and srv.connections == 2 and len(srv.requests) == 2


async def test_connection_close_response_is_not_reused() -> None:
    async def close_after(req: Req) -> None:
        req.conn.write(answer(b'{"bye":1}', headers=((b"Connection", b"close"),)))
        req.conn.close()

    async with RawServer(close_after) as srv, client_for() as client:
        for _ in range(2):
            resp = await post(client, srv.url())
            assert await resp.read() == b'{"bye":1}' and not resp.reused
        assert srv.connections == 2 and client.idle_count() == 0


async def test_connection_close_without_server_closing() -> None:
    """``Connection: close`` alone is enough: the client closes the connection itself."""

    async def say_close(req: Req) -> None:
        req.conn.write(answer(headers=((b"connection", b"close"),)))

    async with RawServer(say_close) as srv, client_for() as client:
        await (await post(client, srv.url())).read()
        await wait_until(lambda: not srv.open, "the client to close")
        await (await post(client, srv.url())).read()
        assert srv.connections == 2


async def test_read_until_close_body() -> None:
    async def http10(req: Req) -> None:
        req.conn.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
        await asyncio.sleep(0.01)
        req.conn.write(b"part two")
        req.conn.close()

    async with RawServer(http10) as srv, client_for() as client:
        resp = await post(client, srv.url())
        assert await resp.read() == b"part one, part two"
        assert client.idle_count() == 0


async def test_keepalive_timeout_expires_idle_connections() -> None:
    async with RawServer(ok_json) as srv, client_for(keepalive_timeout=0.05) as client:
        await (await post(client, srv.url())).read()
        await asyncio.sleep(0.1)
        resp = await post(client, srv.url())
        assert not resp.reused and srv.connections == 2


async def test_max_idle_per_host() -> None:
    async def slow_ok(req: Req) -> None:
        await asyncio.sleep(0.02)
        req.conn.write(answer())

    async with RawServer(slow_ok) as srv, client_for(max_idle_per_host=2) as client:
        resps = await asyncio.gather(*(post(client, srv.url()) for _ in range(5)))
        for resp in resps:
            await resp.read()
        assert srv.connections == 5 and client.idle_count() == 2
        await wait_until(lambda: len(srv.open) == 2, "the surplus connections to close")


async def test_release_before_complete_drops_the_connection() -> None:
    async def half(req: Req) -> None:
        req.conn.write(answer(b"x" * 100)[:-50])  # 50 bytes of body still to come

    async with RawServer(half) as srv, client_for() as client:
        resp = await post(client, srv.url())
        assert len(await resp.readany()) == 50
        resp.release()
        with pytest.raises(UpstreamDisconnected):
            await resp.readany()
        await wait_until(lambda: not srv.open, "the dropped connection to close")
        assert client.open_count == 0 and client.idle_count() == 0


async def test_close_while_reader_waits_wakes_it() -> None:
    """The proxy closes the response from another task when its client disconnects."""

    async def never_finish(req: Req) -> None:
        req.conn.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")

    async with RawServer(never_finish) as srv, client_for() as client:
        resp = await post(client, srv.url())
        assert await resp.readany() == b"hello"
        reader = asyncio.ensure_future(resp.readany())
        await asyncio.sleep(0.01)
        resp.close()
        with pytest.raises(UpstreamDisconnected):
            await asyncio.wait_for(reader, WAIT_S)


class _EarlyAnswer(asyncio.Protocol):
    """Answers (keep-alive) on the first bytes of a request and stops reading its body."""

    def __init__(self, seen: list[int]) -> None:
        self.seen = seen

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self.seen.append(1)

    def data_received(self, data: bytes) -> None:
        if len(self.seen) == 1:
            self.seen.append(2)
            self.transport.write(answer(b'{"error":"too large"}', 413))
            self.transport.pause_reading()


async def test_early_answer_with_unsent_body_is_not_reused() -> None:
    """A 413 sent before our body left: the rest of the body must not prefix the next request."""
    seen: list[int] = []
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _EarlyAnswer(seen), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client_for() as client:
            big = b"b" * (64 * 1024 * 1024)  # more than the socket buffers can absorb
            resp = await client.request("POST", f"http://127.0.0.1:{port}/x", {}, big, connect_timeout=2)
            assert resp.status == 413 and await resp.read() == b'{"error":"too large"}'
            assert client.idle_count() == 0
            await wait_until(lambda: client.open_count == 0, "the connection to be dropped")
    finally:
        server.close()
        await server.wait_closed()


async def test_unsolicited_bytes_on_idle_connection_drop_it() -> None:
    async def ok_then_408(req: Req) -> None:
        req.conn.write(answer())
        await asyncio.sleep(0.02)
        req.conn.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")

    async with RawServer(ok_then_408) as srv, client_for() as client:
        await (await post(client, srv.url())).read()
        await wait_until(lambda: client.open_count == 0, "the idle connection to be dropped")
        assert (await post(client, srv.url())).status == 200 and srv.connections == 2


async def test_cancelled_while_waiting_for_headers_drops_the_connection() -> None:
    async def slow(req: Req) -> None:
        if len(req.conn.server.requests) == 1:
            await asyncio.sleep(1.0)
        req.conn.write(answer())

    async with RawServer(slow) as srv, client_for() as client:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):  # the proxy's first-byte timeout
                await post(client, srv.url())
        resp = await post(client, srv.url())
        assert resp.status == 200 and not resp.reused and srv.connections == 2


async def test_head_timeout_raises_and_drops_the_connection() -> None:
    async def slow(req: Req) -> None:
        if len(req.conn.server.requests) == 1:
            await asyncio.sleep(1.0)
        req.conn.write(answer())

    async with RawServer(slow) as srv, client_for() as client:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await client.request("POST", srv.url(), JSON_CT, CHAT, connect_timeout=2, head_timeout=0.1)
        assert asyncio.get_running_loop().time() - started < 0.9
        resp = await client.request("POST", srv.url(), JSON_CT, CHAT, connect_timeout=2, head_timeout=2)
        assert resp.status == 200 and not resp.reused and srv.connections == 2
        assert await resp.read() == b"{}" and resp._timer is None


async def test_idle_timeout_bounds_each_wait_not_the_whole_body() -> None:
    """A stream that drips a byte every 50 ms outlives an idle bound of 300 ms; one that stops does not."""

    async def drip(req: Req) -> None:
        req.conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n")
        for _ in range(12):
            await asyncio.sleep(0.05)
            req.conn.write(b"x")
        if req.body != b"stall":
            req.conn.write(b"!")

    async with RawServer(drip) as srv, client_for() as client:
        resp = await post(client, srv.url(), b"go")
        resp.set_timeouts(idle=0.3)
        assert await resp.read() == b"x" * 12 + b"!"
        assert resp._timer is None  # complete: no timer left behind

        resp = await post(client, srv.url(), b"stall")
        resp.set_timeouts(idle=0.3)
        got = b""
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(3):  # a guard: the client's own bound must fire well before
                while chunk := await resp.readany():
                    got += chunk
        assert got == b"x" * 12 and asyncio.get_running_loop().time() - started < 2
        resp.close()
        assert resp._timer is None


async def test_total_timeout_bounds_the_whole_body() -> None:
    async def drip(req: Req) -> None:
        req.conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n")
        for _ in range(40):
            await asyncio.sleep(0.02)
            req.conn.write(b"x")

    async with RawServer(drip) as srv, client_for() as client:
        resp = await post(client, srv.url())
        resp.set_timeouts(total=0.2)
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(3):  # a guard, as above
                await resp.read()
        assert 0.15 < asyncio.get_running_loop().time() - started < 0.6
        resp.close()
        # Lifting the bounds: the next response reads to its end, however slow.
        resp = await post(client, srv.url())
        resp.set_timeouts()
        assert await resp.read() == b"x" * 40


async def test_no_body_status_and_reuse() -> None:
    async def no_content(req: Req) -> None:
        req.conn.write(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")

    async with RawServer(no_content) as srv, client_for() as client:
        for _ in range(2):
            resp = await post(client, srv.url())
            assert resp.status == 204 and await resp.read() == b""
        assert srv.connections == 1


async def test_interim_responses_are_skipped() -> None:
    async def early_hints(req: Req) -> None:
        req.conn.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        req.conn.write(answer(b'{"final":1}'))

    async with RawServer(early_hints) as srv, client_for() as client:
        resp = await post(client, srv.url())
        assert resp.status == 200 and "link" not in resp.headers
        assert await resp.read() == b'{"final":1}'


async def test_client_close_fails_in_flight_and_refuses_new_requests() -> None:
    async def stall(req: Req) -> None:
        req.conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    async with RawServer(stall) as srv:
        client = UpstreamClient()
        resp = await post(client, srv.url())
        await client.close()
        with pytest.raises(UpstreamDisconnected):
            await resp.read()
        with pytest.raises(RuntimeError):
            await post(client, srv.url())
        await wait_until(lambda: not srv.open, "the server to see the close")


# ---------------------------------------------------------------------- responses


async def test_chunked_across_arbitrary_packets() -> None:
    rng = random.Random(7)
    payload = bytes(rng.randrange(256) for _ in range(64 * 1024))

    async def dribble(req: Req) -> None:
        wire = chunked(payload, iter(lambda: rng.randint(1, 5000), None), trailer=True)
        pos = 0
        while pos < len(wire):
            step = rng.choice((1, 2, 3, 7, 64, 1000, 4096))
            req.conn.write(wire[pos : pos + step])
            pos += step
            if rng.random() < 0.3:
                await asyncio.sleep(0)

    async with RawServer(dribble) as srv, client_for() as client:
        resp = await post(client, srv.url())
        assert await resp.read() == payload
        assert (await post(client, srv.url())).reused, "trailers must not break keep-alive"


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(min_size=0, max_size=3000),
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=20),
    cuts=st.lists(st.integers(1, 50), min_size=1, max_size=30),
)
def test_chunked_decoding_property(payload: bytes, sizes: list[int], cuts: list[int]) -> None:
    """Any chunking of any body, fed in any packet sizes, decodes to the body exactly."""
    from itertools import cycle

    wire = chunked(payload, cycle(sizes), trailer=bool(len(payload) % 2))
    conn = _Connection(UpstreamClient(), ("http", "h", 80))
    transport = _FakeTransport()
    conn.connection_made(typing.cast(asyncio.Transport, transport))
    resp = UpstreamResponse(conn, False)
    conn.send(resp, b"POST / HTTP/1.1\r\n\r\n")
    pos = 0
    for step in cycle(cuts):
        if pos >= len(wire):
            break
        conn.data_received(wire[pos : pos + step])
        pos += step
    assert resp.complete and resp.status == 200
    assert b"".join(resp._chunks) == payload


class _FakeTransport:
    """Just enough transport for feeding a _Connection by hand."""

    def __init__(self) -> None:
        self.written = b""
        self.closing = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_write_buffer_size(self) -> int:
        return 0


async def test_cut_mid_body_content_length() -> None:
    async def cut(req: Req) -> None:
        req.conn.write(answer(b"y" * 1000)[:-400])
        await asyncio.sleep(0.01)
        req.conn.close()

    async with RawServer(cut) as srv, client_for() as client:
        resp = await post(client, srv.url())
        got = b""
        with pytest.raises(UpstreamDisconnected):
            for _ in range(1000):
                got += await resp.readany()
        assert got == b"y" * 600


async def test_cut_before_headers() -> None:
    async def partial_head(req: Req) -> None:
        req.conn.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        req.conn.close()

    async with RawServer(partial_head) as srv, client_for() as client:
        with pytest.raises(UpstreamDisconnected):
            await post(client, srv.url())


async def test_malformed_response() -> None:
    async def garbage(req: Req) -> None:
        req.conn.write(b"SPDY/9 nonsense\r\n\r\n")

    async with RawServer(garbage) as srv, client_for() as client:
        with pytest.raises(UpstreamProtocolError) as info:
            await post(client, srv.url())
        assert not isinstance(info.value, UpstreamDisconnected)
        assert client.open_count == 0


async def test_bad_chunk_framing_mid_body() -> None:
    async def bad_chunk(req: Req) -> None:
        req.conn.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nZZ\r\n")

    async with RawServer(bad_chunk) as srv, client_for() as client:
        resp = await post(client, srv.url())
        assert await resp.readany() == b"abc"
        with pytest.raises(UpstreamProtocolError):
            await resp.readany()


async def test_huge_headers_are_refused() -> None:
    async def many_headers(req: Req) -> None:
        req.conn.write(b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"p" * 4000 + b"\r\n")
        for _ in range(100):
            req.conn.write(b"X-Pad: " + b"p" * 4000 + b"\r\n")

    async with RawServer(many_headers) as srv, client_for() as client:
        with pytest.raises(UpstreamProtocolError, match="headers exceed"):
            await post(client, srv.url())


async def test_headers_multi_values_and_case() -> None:
    async def cookies(req: Req) -> None:
        req.conn.write(
            answer(headers=((b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"X-Request-ID", b"r1")))
        )

    async with RawServer(cookies) as srv, client_for() as client:
        resp = await post(client, srv.url())
        h = resp.headers
        assert h.getall("SET-COOKIE") == ["a=1", "b=2"]
        assert h.get("set-cookie") == "a=1" and h["x-request-id"] == "r1" and "X-Request-Id" in h
        assert h.get("missing") is None and h.get("missing", "d") == "d"
        assert ("set-cookie", "b=2") in h.items() and len(h) == 4 == len(h.raw)
        assert list(h) == h.keys() == ["Set-Cookie", "set-cookie", "X-Request-ID", "Content-Length"]
        assert (b"X-Request-ID", b"r1") in h.raw


def test_headers_get_answers_alike_before_and_after_the_index() -> None:
    # get() scans the raw pairs until something builds the index (a [] or an `in`), then uses it.
    h = Headers([(b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"X-Request-ID", b"r1"), (b"X-E", b"")])
    names = ["SET-COOKIE", "x-request-id", "x-e", "missing", "caf\u00e9", "\u2603"]
    expected = ["a=1", "r1", "", None, None, None]
    assert [h.get(n) for n in names] == expected
    assert h.get("missing", "d") == "d" and h.get("\u2603", "d") == "d"
    assert "x-e" in h  # builds the index
    assert [h.get(n) for n in names] == expected


def test_headers_empty() -> None:
    h = Headers([])
    assert h.get("a") is None and h.items() == [] and len(h) == 0 and "a" not in h


async def test_content_encoding_passed_through() -> None:
    packed = gzip.compress(b'{"hello":"world"}')

    async def gzipped(req: Req) -> None:
        req.conn.write(answer(packed, headers=((b"Content-Encoding", b"gzip"),)))

    async with RawServer(gzipped) as srv, client_for() as client:
        resp = await post(client, srv.url())
        assert resp.headers.get("content-encoding") == "gzip"
        assert await resp.read() == packed


async def test_large_bodies_both_ways() -> None:
    big = os.urandom(8 * 1024 * 1024)

    async def echo_size_then_big(req: Req) -> None:
        assert req.body == big
        if req.path == b"/chunked":
            req.conn.write(chunked(big, iter(lambda: 300_000, None)))
        else:
            req.conn.write(answer(big))

    async with RawServer(echo_size_then_big) as srv, client_for() as client:
        for path in ("/plain", "/chunked"):
            resp = await client.request("POST", srv.url(path), {}, big, connect_timeout=2.0)
            assert await resp.read() == big
        assert srv.connections == 1


async def test_read_limit() -> None:
    async def big(req: Req) -> None:
        req.conn.write(answer(b"z" * 10_000))

    async with RawServer(big) as srv, client_for(read_high_water=1024) as client:
        resp = await post(client, srv.url())
        with pytest.raises(UpstreamBodyTooLarge):
            await resp.read(limit=2000)
        resp = await post(client, srv.url())
        assert len(await resp.read(limit=10_000)) == 10_000


async def test_flow_control_pauses_and_resumes() -> None:
    size = 32 * 1024 * 1024
    high = 256 * 1024
    server_backlog: list[int] = []

    async def flood(req: Req) -> None:
        req.conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"f" * (1024 * 1024)
        for _ in range(size // len(block)):
            req.conn.write(block)
        await asyncio.sleep(0.2)
        assert req.conn.transport is not None
        server_backlog.append(req.conn.transport.get_write_buffer_size())

    async with RawServer(flood) as srv, client_for(read_high_water=high) as client:
        resp = await post(client, srv.url())
        conn = resp._conn
        assert conn is not None
        await wait_until(lambda: conn.paused, "reading to pause")
        await asyncio.sleep(0.3)
        # Paused: what is buffered stays near the mark instead of growing to the whole body.
        assert high < resp._buffered < high + 1024 * 1024
        assert server_backlog and server_backlog[0] > 0, "back-pressure must reach the server"
        total = 0
        for _ in range(100_000):
            piece = await resp.readany()
            if not piece:
                break
            assert len(piece) < high + 1024 * 1024
            total += len(piece)
        assert total == size and not conn.paused
        assert client.idle_count() == 1


async def test_concurrent_requests_over_pool() -> None:
    async def later(req: Req) -> None:
        await asyncio.sleep(0.01)
        req.conn.write(answer(req.body))

    async with RawServer(later) as srv, client_for() as client:
        for wave in range(2):
            bodies = [b'{"i":%d}' % i for i in range(100)]
            resps = await asyncio.gather(*(post(client, srv.url(), b) for b in bodies))
            assert [await r.read() for r in resps] == bodies
            assert srv.connections == 100, f"wave {wave} must reuse the 100 pooled connections"
        assert len(srv.requests) == 200 and client.idle_count() == 100


# ------------------------------------------------------------------------ requests


async def test_request_head_on_the_wire() -> None:
    async with RawServer(ok_json) as srv, client_for() as client:
        url = srv.url("/v1/messages?beta=true")
        headers = {
            "Host": "evil.example",
            "Content-Length": "1",
            "Transfer-Encoding": "chunked",
            "Connection": "upgrade",
            "x-api-key": "k",
            "anthropic-version": "2023-06-01",
        }
        await (await client.request("POST", url, headers, b'{"a":1}', connect_timeout=2)).read()
        raw_pairs = [(b"X-Raw", b"v"), (b"content-length", b"99"), (b"host", b"h")]
        await (await client.request("POST", url, raw_pairs, b"", connect_timeout=2)).read()
        (conn,) = srv.open
        # head 1, body 1 + head 2 (body 2 is empty)
        first, rest, _ = bytes(conn.raw).split(b"\r\n\r\n")
        second = rest.removeprefix(b'{"a":1}')
        lines = first.split(b"\r\n")
        assert lines[0] == b"POST /v1/messages?beta=true HTTP/1.1"
        assert lines[1] == b"Host: 127.0.0.1:%d" % srv.port
        assert set(lines[2:]) == {
            b"x-api-key: k",
            b"anthropic-version: 2023-06-01",
            b"Content-Length: 7",
        }
        assert b"chunked" not in bytes(conn.raw) and b"evil" not in bytes(conn.raw)
        assert srv.requests[0].body == b'{"a":1}'
        assert second.startswith(b"POST /v1/messages?beta=true HTTP/1.1\r\nHost: 127.0.0.1:")
        # (not just "99": the port in the Host line may contain it)
        assert b"X-Raw: v\r\nContent-Length: 0" in second and b"length: 99" not in second.lower()


async def test_request_is_one_write() -> None:
    async with RawServer(ok_json) as srv, client_for() as client:
        await (await post(client, srv.url())).read()
        (conn,) = next(iter(client._idle.values()))
        assert conn.transport is not None
        writes: list[bytes] = []
        real = conn.transport

        class Recording(_RefusingTransport):
            def write(self, data: bytes) -> None:
                writes.append(data)
                real.write(data)

            def is_closing(self) -> bool:
                return real.is_closing()

        conn.transport = typing.cast(asyncio.Transport, Recording(real))
        await (await post(client, srv.url(), b'{"body":1}')).read()
        assert len(writes) == 1 and writes[0].endswith(b'\r\n\r\n{"body":1}')


@pytest.mark.parametrize(
    "headers",
    [
        {"x-evil": "a\r\nX-Injected: 1"},
        {"x-evil\r\nX-Injected": "1"},
        [(b"x-evil", b"a\nb")],
        {"x-nul": "a\x00b"},
    ],
)
async def test_header_injection_is_refused_before_sending(headers: Any) -> None:
    async with RawServer(ok_json) as srv, client_for() as client:
        with pytest.raises(ValueError):
            await client.request("POST", srv.url(), headers, b"", connect_timeout=2)
        assert srv.connections == 0


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/x", "http:///nohost", "http://127.0.0.1/a b", "http://127.0.0.1/\r\nX: y"]
)
async def test_bad_urls(url: str) -> None:
    async with client_for() as client:
        with pytest.raises(ValueError):
            await client.request("POST", url, {}, b"", connect_timeout=1)


async def test_bad_method() -> None:
    async with client_for() as client:
        with pytest.raises(ValueError):
            await client.request("PO ST", "http://127.0.0.1:1/", {}, b"", connect_timeout=1)


# ------------------------------------------------------------------------- connect


async def test_connection_refused() -> None:
    async with client_for() as client:
        with pytest.raises(UpstreamConnectError) as info:
            await post(client, f"http://127.0.0.1:{free_port()}/v1/chat/completions")
        assert not isinstance(info.value, UpstreamConnectTimeout)
        assert not isinstance(info.value, TimeoutError), "a TimeoutError reads as 'sent' to the proxy"


async def test_connect_timeout_tls_handshake_never_answered() -> None:
    """A real connect timeout on loopback: TCP accepts, the TLS handshake never completes."""

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # hold the connection open until the client gives up
        writer.close()

    server = await asyncio.start_server(never, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client_for() as client:
            with pytest.raises(UpstreamConnectTimeout):
                await client.request("POST", f"https://127.0.0.1:{port}/x", {}, b"", connect_timeout=0.2)
    finally:
        server.close()
        await server.wait_closed()


async def test_connect_timeout_and_dns_failure_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Monkeypatched loop (asyncio only): a connect that hangs, and a failed name lookup."""
    loop = asyncio.get_running_loop()

    async def hang(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(WAIT_S)

    async def no_such_host(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async with client_for() as client:
        monkeypatch.setattr(loop, "create_connection", hang)
        with pytest.raises(UpstreamConnectTimeout):
            await client.request("POST", "http://127.0.0.1:9/x", {}, b"", connect_timeout=0.05)
        monkeypatch.setattr(loop, "create_connection", no_such_host)
        with pytest.raises(UpstreamConnectError, match="Name or service"):
            await client.request("POST", "http://upstream.invalid/x", {}, b"", connect_timeout=1)


async def test_outer_timeout_during_connect_stays_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller's own asyncio.timeout firing first is the caller's TimeoutError, not ours."""
    loop = asyncio.get_running_loop()

    async def hang(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(WAIT_S)

    monkeypatch.setattr(loop, "create_connection", hang)
    async with client_for() as client:
        with pytest.raises(TimeoutError) as info:
            async with asyncio.timeout(0.05):
                await client.request("POST", "http://127.0.0.1:9/x", {}, b"", connect_timeout=1.0)
        assert not isinstance(info.value, UpstreamConnectError)


async def test_server_closing_right_after_accept_is_a_connect_error() -> None:
    """Nothing was written: the reservation can be released (UpstreamConnectError)."""

    def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client_for() as client:
            outcomes = []
            for _ in range(5):
                try:
                    await post(client, f"http://127.0.0.1:{port}/x")
                except UpstreamError as exc:
                    outcomes.append(type(exc))
            # The close races our write: before it, a connect error; after it, a disconnect.
            assert set(outcomes) <= {UpstreamConnectError, UpstreamDisconnected} and len(outcomes) == 5
    finally:
        server.close()
        await server.wait_closed()


# ----------------------------------------------------------------------------- TLS


@dataclass
class Cert:
    cert: Path
    key: Path


def _make_cert(tmp: Path) -> Cert | None:
    """A self-signed certificate for IP 127.0.0.1: with `cryptography` if importable, else
    with the openssl command; None if neither is there."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    if importlib.util.find_spec("cryptography") is not None:
        from cryptography import x509  # type: ignore[import-not-found,unused-ignore]
        from cryptography.hazmat.primitives import hashes, serialization  # type: ignore[import-not-found,unused-ignore]
        from cryptography.hazmat.primitives.asymmetric import ec  # type: ignore[import-not-found,unused-ignore]
        from cryptography.x509.oid import NameOID  # type: ignore[import-not-found,unused-ignore]

        pkey = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "resgov-test")])
        now = datetime.now(UTC)
        built = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(pkey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(pkey, hashes.SHA256())
        )
        cert.write_bytes(built.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(
            pkey.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return Cert(cert, key)
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=resgov-test",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return Cert(cert, key)


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    made = _make_cert(tmp_path_factory.mktemp("tls"))
    if made is None:
        pytest.skip("neither the cryptography package nor the openssl command is available")
    return made


async def test_tls_request_and_reuse(tls_cert: Cert) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls_cert.cert, tls_cert.key)
    client_ctx = ssl.create_default_context(cafile=str(tls_cert.cert))
    async with (
        RawServer(ok_json, ssl_context=server_ctx) as srv,
        client_for(ssl_context=client_ctx) as client,
    ):
        for i in range(3):
            resp = await post(client, srv.url())
            assert orjson.loads(await resp.read()) == {"ok": True, "n": i + 1}
        assert srv.connections == 1
        stream = await client.request("POST", srv.url(), {}, b"x" * 300_000, connect_timeout=2)
        assert stream.status == 200 and srv.requests[-1].body == b"x" * 300_000
        await stream.read()


async def test_tls_untrusted_certificate_is_a_connect_error(tls_cert: Cert) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tls_cert.cert, tls_cert.key)
    async with RawServer(ok_json, ssl_context=server_ctx) as srv, client_for() as client:
        with pytest.raises(UpstreamConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await post(client, srv.url())
        assert not srv.requests


# -------------------------------------------------------------------------- uvloop

#: Scenarios that do not patch the event loop's methods (uvloop's Loop is a C type).
_UVLOOP_SCENARIOS: list[Callable[..., Coroutine[Any, Any, None]]] = [
    test_keepalive_reuse_counts_one_connection,
    test_server_closing_idle_connection_gets_a_new_one_sent_once,
    test_idle_connection_found_closed_at_checkout_is_skipped,
    test_disconnect_after_write_is_never_retried,
    test_write_refused_on_pooled_connection_retries_once,
    test_connection_close_response_is_not_reused,
    test_connection_close_without_server_closing,
    test_read_until_close_body,
    test_keepalive_timeout_expires_idle_connections,
    test_max_idle_per_host,
    test_release_before_complete_drops_the_connection,
    test_close_while_reader_waits_wakes_it,
    test_unsolicited_bytes_on_idle_connection_drop_it,
    test_early_answer_with_unsent_body_is_not_reused,
    test_cancelled_while_waiting_for_headers_drops_the_connection,
    test_head_timeout_raises_and_drops_the_connection,
    test_idle_timeout_bounds_each_wait_not_the_whole_body,
    test_total_timeout_bounds_the_whole_body,
    test_no_body_status_and_reuse,
    test_interim_responses_are_skipped,
    test_client_close_fails_in_flight_and_refuses_new_requests,
    test_chunked_across_arbitrary_packets,
    test_cut_mid_body_content_length,
    test_cut_before_headers,
    test_malformed_response,
    test_bad_chunk_framing_mid_body,
    test_huge_headers_are_refused,
    test_content_encoding_passed_through,
    test_large_bodies_both_ways,
    test_read_limit,
    test_flow_control_pauses_and_resumes,
    test_concurrent_requests_over_pool,
    test_request_head_on_the_wire,
    test_request_is_one_write,
    test_connection_refused,
    test_connect_timeout_tls_handshake_never_answered,
    test_server_closing_right_after_accept_is_a_connect_error,
]
_UVLOOP_SIM_SCENARIOS: list[Callable[..., Coroutine[Any, Any, None]]] = [
    test_json_response,
    test_sse_stream,
    test_chunked_split_across_packets_matches_unsplit,
    test_stream_cut_by_simulator,
    test_concurrent_requests_over_pool_simulator,
]
_UVLOOP_TLS_SCENARIOS: list[Callable[..., Coroutine[Any, Any, None]]] = [
    test_tls_request_and_reuse,
    test_tls_untrusted_certificate_is_a_connect_error,
]


def _run_uvloop(coro: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(coro, 60))


@pytest.mark.parametrize("scenario", _UVLOOP_SCENARIOS, ids=lambda f: f.__name__)
def test_scenario_under_uvloop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    _run_uvloop(scenario())


@pytest.mark.parametrize("scenario", _UVLOOP_SIM_SCENARIOS, ids=lambda f: f.__name__)
def test_sim_scenario_under_uvloop(
    scenario: Callable[[SimUpstreamThread], Coroutine[Any, Any, None]], sim: SimUpstreamThread
) -> None:
    _run_uvloop(scenario(sim))


@pytest.mark.parametrize("scenario", _UVLOOP_TLS_SCENARIOS, ids=lambda f: f.__name__)
def test_tls_scenario_under_uvloop(
    scenario: Callable[[Cert], Coroutine[Any, Any, None]], tls_cert: Cert
) -> None:
    _run_uvloop(scenario(tls_cert))
