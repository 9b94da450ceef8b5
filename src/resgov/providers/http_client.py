"""A small pooled HTTP/1.1 client for ResGov's upstream calls.

Why not aiohttp: the benchmark's profile (bench/results/latest.md) shows aiohttp's client as
the largest single layer of a proxied call, about 100 µs of CPU each. Upstreams are a handful
of known, trusted providers, so the client side is the side worth hand-writing: a bare
:class:`asyncio.Protocol` plus ``httptools.HttpResponseParser`` (llhttp, the parser Node.js
uses), the same pattern as the simulator's server (:mod:`resgov.simulator.upstream`).

What it does, and no more:

* ``request()`` writes one ``transport.write`` of head + body (``Content-Length``, never
  ``Transfer-Encoding``), ``Host`` taken from the URL, and returns once the status line and
  headers arrived. The body is then read with ``readany()`` / ``read()``; chunked encoding
  is decoded by llhttp, ``Content-Length`` honoured, read-until-close accepted.
* Connections are pooled per (scheme, host, port), most recently used first. A connection
  goes back to the pool the moment its response is complete on the wire and the server
  allowed keep-alive; anything else (a response dropped half-read, ``Connection: close``,
  an error) closes it.
* A request is never sent twice (each one may cost money): an idle connection the server
  closed is detected at checkout and skipped, and a fresh connection found dead before a
  single byte was written is replaced once. After the write, every failure is reported
  (:class:`UpstreamDisconnected`), never retried.
* Flow control: reading pauses while more than ``read_high_water`` bytes of body wait to be
  consumed, so a slow client cannot make ResGov buffer a whole stream.
* Bodies are passed through as received; ``Content-Encoding`` is not undone (ResGov asks
  upstreams for ``identity``).
* Deadlines: ``request(head_timeout=…)`` bounds the wait for the headers, connecting included,
  and :meth:`UpstreamResponse.set_timeouts` the body (in all, or per wait for data); past one,
  ``TimeoutError``. One timer per response rather than an ``asyncio.timeout`` per await.

Errors: :class:`UpstreamConnectError` (nothing was sent: refused, timed out, DNS, TLS
handshake) and :class:`UpstreamProtocolError` / its subclass :class:`UpstreamDisconnected`
(the request was sent, then the connection broke or the answer was malformed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import typing
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import httptools

__all__ = [
    "Headers",
    "UpstreamBodyTooLarge",
    "UpstreamClient",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamResponse",
]

#: Pause reading a response once this much body is buffered and unread.
DEFAULT_HIGH_WATER: Final = 1 << 20
#: A provider's headers are a few hundred bytes; this only stops a broken peer from growing
#: the header list without end (llhttp itself sets no limit).
MAX_HEADER_BYTES: Final = 256 * 1024
#: Parsed URLs kept (the proxy calls a few fixed URLs; parsing one costs microseconds).
_URL_CACHE_SIZE: Final = 1024
#: Set by the client from the URL and the body; a caller's copy would contradict them.
_RESERVED: Final = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_RESERVED_B: Final = frozenset(name.encode() for name in _RESERVED)
#: Statuses that never carry a body (a HEAD answer would too, but only POST/GET are sent).
_NO_BODY: Final = frozenset({204, 304})


# ---------------------------------------------------------------------------- errors


class UpstreamError(Exception):
    """Base of every error this client raises about the upstream."""


class UpstreamConnectError(UpstreamError):
    """No connection could be made: refused, DNS, TLS handshake, timeout. Nothing was sent."""


class UpstreamConnectTimeout(UpstreamConnectError):
    """The connection (TCP + TLS handshake) took longer than ``connect_timeout``.

    Deliberately not a ``TimeoutError``: callers treat a ``TimeoutError`` around the request
    as "sent, the provider may bill", and here nothing was sent.
    """


class UpstreamProtocolError(UpstreamError):
    """The request was sent and the answer is unusable (malformed, or see the subclass)."""


class UpstreamDisconnected(UpstreamProtocolError):
    """The connection broke after the request was sent, before the response was complete."""


class UpstreamBodyTooLarge(UpstreamProtocolError):
    """``read(limit)`` found a body longer than ``limit`` (the connection is dropped)."""


# --------------------------------------------------------------------------- headers


class Headers:
    """Response headers: a case-insensitive multi-mapping, in the order received.

    ``raw`` holds the pairs exactly as received (bytes, original case) for callers that
    forward them without decoding; the str views decode as latin-1, as HTTP/1.1 does.
    ``len()`` and ``items()`` count every pair, as ``multidict.CIMultiDict`` does.
    """

    __slots__ = ("_first", "_pairs", "raw")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw
        # Built on first use: many responses are forwarded without a single lookup.
        self._pairs: list[tuple[str, str]] | None = None
        self._first: dict[str, str] | None = None

    def _index(self) -> dict[str, str]:
        first = self._first
        if first is None:
            pairs = self.items()
            first = {}
            for name, value in pairs:
                first.setdefault(name.lower(), value)
            self._first = first
        return first

    def items(self) -> list[tuple[str, str]]:
        """Every (name, value) pair, repeated names included, in order."""
        pairs = self._pairs
        if pairs is None:
            pairs = self._pairs = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.raw]
        return pairs

    def keys(self) -> list[str]:
        """Every name, repeated names included, in order."""
        return [name for name, _ in self.items()]

    def values(self) -> list[str]:
        """Every value, in order."""
        return [value for _, value in self.items()]

    @typing.overload
    def get(self, name: str) -> str | None: ...
    @typing.overload
    def get(self, name: str, default: str) -> str: ...
    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name`` (any case), or ``default``."""
        if self._first is not None:
            return self._first.get(name.lower(), default)
        # A response is looked up once or twice (the proxy reads its request id): comparing the
        # raw names costs less than decoding and indexing every header (~2 % of a proxied call,
        # bench/README.md). Header names are ASCII tokens (the parser refuses anything else).
        try:
            key = name.lower().encode("latin-1")
        except UnicodeEncodeError:
            return default
        for raw_name, value in self.raw:
            if raw_name.lower() == key:
                return value.decode("latin-1")
        return default

    def getall(self, name: str) -> list[str]:
        """Every value of ``name`` (any case), in order; empty if absent."""
        key = name.lower()
        return [value for n, value in self.items() if n.lower() == key]

    def __getitem__(self, name: str) -> str:
        return self._index()[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.raw)

    def __repr__(self) -> str:
        return f"Headers({self.items()!r})"


# ------------------------------------------------------------------------------ URL


@dataclass(frozen=True, slots=True)
class _Target:
    """A URL split once into what a request needs."""

    key: tuple[str, str, int]
    host: str
    port: int
    tls: bool
    #: Request line start after the method: b" /path?query HTTP/1.1\r\nHost: host\r\n".
    line: bytes


def _parse_url(url: str) -> _Target:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in URL {url!r}")
    tls = scheme == "https"
    port = parts.port or (443 if tls else 80)
    # Host as written in the URL (brackets of an IPv6 literal kept), without any userinfo.
    authority = parts.netloc.rpartition("@")[2]
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # A space or a control character would split the request line or the Host header.
    if any(c <= " " or c == "\x7f" for c in path) or any(c < " " or c == "\x7f" for c in authority):
        raise ValueError(f"invalid characters in URL {url!r}")
    # Non-ASCII raises here (UnicodeEncodeError is a ValueError): URLs must be encoded already.
    line = f" {path} HTTP/1.1\r\nHost: {authority}\r\n".encode("ascii")
    return _Target((scheme, host, port), host, port, tls, line)


def _header_block(headers: Mapping[str, str] | list[tuple[bytes, bytes]]) -> bytes:
    """``name: value\\r\\n`` lines, minus the headers the client sets itself.

    A CR, LF or NUL inside a name or value would let a forwarded header inject others (or
    a second request): the count of line ends must equal the count of headers.
    """
    parts: list[bytes] = []
    if isinstance(headers, list):
        for name, value in headers:
            if name.lower() in _RESERVED_B:
                continue
            parts += (name, b": ", value, b"\r\n")
    else:
        for sname, svalue in headers.items():
            if sname.lower() in _RESERVED:
                continue
            parts += (sname.encode("latin-1"), b": ", svalue.encode("latin-1"), b"\r\n")
    block = b"".join(parts)
    count = len(parts) // 4
    # find, not `in`: a bytes `in` formats a TypeError first (~1,800 instructions, every call).
    if block.count(b"\n") != count or block.count(b"\r") != count or block.find(b"\0") >= 0:
        raise ValueError("a request header name or value contains CR, LF or NUL")
    return block


# ------------------------------------------------------------------------- response


class UpstreamResponse:
    """One upstream response: status and headers at once, the body as it arrives.

    The connection returns to the pool by itself as soon as the response is complete on
    the wire, whether or not the body has been consumed (it is buffered here); ``close()``
    and ``release()`` only matter before that, and then drop the connection.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_complete",
        "_conn",
        "_deadline",
        "_error",
        "_idle",
        "_timer",
        "_wait_started",
        "_waiter",
        "headers",
        "reused",
        "status",
    )

    def __init__(self, conn: _Connection, reused: bool) -> None:
        #: 0 until the status line arrived.
        self.status = 0
        self.headers: Headers = _EMPTY_HEADERS
        #: True when the request went over a pooled keep-alive connection.
        self.reused = reused
        self._conn: _Connection | None = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        # Deadlines (loop time) without asyncio.timeout: that costs a Timeout object, a timer
        # and a task lookup per await (~4 µs), once per chunk of a stream. Here one timer per
        # response is armed lazily and moved forward only when it fires (see _on_timer).
        self._deadline: float | None = None
        self._idle: float | None = None
        self._wait_started = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def complete(self) -> bool:
        """True once the whole body was received (it may still be buffered here)."""
        return self._complete

    def set_timeouts(self, *, total: float | None = None, idle: float | None = None) -> None:
        """Bound the waits that follow: all of them together end within ``total`` seconds from
        now, and each single wait for data (one ``readany``) within ``idle`` seconds. A wait
        past either raises ``TimeoutError``. ``None`` lifts that bound."""
        self._cancel_timer()  # re-armed, at the new due time, by the next wait
        self._deadline = None if total is None else asyncio.get_running_loop().time() + total
        self._idle = idle

    async def readany(self) -> bytes:
        """The body received since the last call (at least one byte); ``b""`` at its end.

        Waits for data when none is buffered. Raises :class:`UpstreamDisconnected` if the
        connection broke first, :class:`UpstreamProtocolError` if the body was malformed,
        ``TimeoutError`` past a bound set by :meth:`set_timeouts`.
        """
        while True:
            chunks = self._chunks
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                conn = self._conn
                if conn is not None and conn.paused:
                    conn.resume()
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()

    async def read(self, limit: int | None = None) -> bytes:
        """The rest of the body. Past ``limit`` bytes, drop the connection and raise
        :class:`UpstreamBodyTooLarge` rather than buffer without bound."""
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await self.readany()
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
            if limit is not None and size > limit:
                self.close()
                raise UpstreamBodyTooLarge(f"upstream body exceeds {limit} bytes")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Drop the connection unless the response is already complete (then it was pooled)."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            if conn.resp is self:
                conn.resp = None
            conn.abort()
        if not self._complete and self._error is None:
            self._error = UpstreamDisconnected("the response was closed before it was complete")
        self._cancel_timer()
        self._wake()

    def release(self) -> None:
        """Done with the response: a complete one already went back to the pool, anything
        else cannot be reused and is closed."""
        if not self._complete:
            self.close()

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "complete" if self._complete else "error" if self._error else "open"
        return f"<UpstreamResponse {self.status} {state}>"

    # -- used by the connection

    async def _wait(self) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        if self._deadline is not None or self._idle is not None:
            self._wait_started = loop.time()
            if self._timer is None:
                self._timer = loop.call_at(self._due(), self._on_timer)
        await waiter

    def _due(self) -> float:
        idle, deadline = self._idle, self._deadline
        due = self._wait_started + idle if idle is not None else float("inf")
        return due if deadline is None else min(due, deadline)

    def _on_timer(self) -> None:
        """The timer fired: time out the wait in progress if it is due, else move the timer to
        when it will be (a wait that started after the timer was armed ends later)."""
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or (self._deadline is None and self._idle is None):
            return  # nobody waits now; the next wait arms a timer again
        loop = waiter.get_loop()
        due = self._due()
        # Timers may fire up to the clock's resolution early.
        if loop.time() + 0.001 >= due:
            self._waiter = None
            waiter.set_exception(TimeoutError("the upstream sent nothing in time"))
        else:
            self._timer = loop.call_at(due, self._on_timer)

    def _cancel_timer(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()

    def _wake(self) -> None:
        if self._complete or self._error is not None:
            self._cancel_timer()  # nothing left to wait for
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait_head(self) -> None:
        while not self.status:
            if self._error is not None:
                raise self._error
            await self._wait()


_EMPTY_HEADERS: Final = Headers([])


# ----------------------------------------------------------------------- connection


class _Connection(asyncio.Protocol):
    """One upstream connection; at most one request in flight (no pipelining)."""

    __slots__ = (
        "_header_bytes",
        "_interim",
        "_keep_alive",
        "_lost_waiter",
        "_raw",
        "client",
        "eof",
        "idle_since",
        "key",
        "lost",
        "parser",
        "paused",
        "resp",
        "transport",
    )

    def __init__(self, client: UpstreamClient, key: tuple[str, str, int]) -> None:
        self.client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        #: The response being received; None while idle.
        self.resp: UpstreamResponse | None = None
        self.lost = False
        self.eof = False
        self.paused = False
        self.idle_since = 0.0
        self._raw: list[tuple[bytes, bytes]] | None = None
        self._header_bytes = 0
        self._interim = False
        self._keep_alive = False
        self._lost_waiter: asyncio.Future[None] | None = None

    # -- state used by the client

    @property
    def alive(self) -> bool:
        """Open, and the server has not said it is closing (EOF) as far as we know."""
        transport = self.transport
        return not self.lost and not self.eof and transport is not None and not transport.is_closing()

    def send(self, resp: UpstreamResponse, data: bytes) -> None:
        """Start ``resp`` and write the whole request in one call."""
        self.resp = resp
        self._raw = []
        self._header_bytes = 0
        transport = self.transport
        assert transport is not None
        transport.write(data)

    def resume(self) -> None:
        """Reading was paused for flow control; the reader caught up."""
        self.paused = False
        transport = self.transport
        if transport is not None and not self.lost:
            transport.resume_reading()

    def close(self) -> None:
        """Close gracefully when nothing is in flight; abort if request bytes are still
        queued (a graceful close would wait for a peer that may never read them)."""
        self.resp = None
        transport = self.transport
        if transport is not None:
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()

    def abort(self) -> None:
        """Drop now: a response is being abandoned (a reset also tells the provider to stop)."""
        self.resp = None
        if self.transport is not None:
            self.transport.abort()

    def lost_future(self) -> asyncio.Future[None]:
        """Resolved by ``connection_lost`` (used by ``UpstreamClient.close``)."""
        if self._lost_waiter is None:
            self._lost_waiter = asyncio.get_running_loop().create_future()
            if self.lost:
                self._lost_waiter.set_result(None)
        return self._lost_waiter

    def fail(self, error: UpstreamError) -> None:
        """Abort, failing the response in flight (if any) with ``error``."""
        resp = self.resp
        if resp is not None and not resp._complete and resp._error is None:
            resp._error = error
        self.abort()
        if resp is not None:
            resp._conn = None
            resp._wake()

    # -- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: cast, do not check.
        self.transport = typing.cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:
            # Idle, nothing asked: a server sends this (a 408, say) just before closing.
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamProtocolError("the upstream switched protocols"))
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc.__context__, UpstreamError) else None
            self.fail(cause or UpstreamProtocolError(f"malformed response from the upstream: {exc}"))
            return
        if resp._complete:
            # Complete on the wire: the connection is free whether or not the body was read.
            self.resp = None
            resp._conn = None
            transport = self.transport
            assert transport is not None
            # An early answer (a 413 before the body was taken) can leave part of our request
            # unsent: the next request would follow those bytes, so never reuse such a
            # connection.
            if self._keep_alive and not transport.get_write_buffer_size():
                self.client._put(self)
            else:
                self.close()
        resp._wake()

    def eof_received(self) -> bool | None:
        self.eof = True
        # Returning a false value lets the transport close itself; connection_lost follows.
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.client._forget(self)
        resp = self.resp
        self.resp = None
        if resp is not None and not resp._complete:
            resp._conn = None
            if resp.status and exc is None and _ends_at_close(resp):
                resp._complete = True
            elif resp._error is None:
                where = "after the response began" if resp.status else "before the response"
                detail = f": {exc}" if exc is not None else ""
                resp._error = UpstreamDisconnected(f"the upstream closed the connection {where}{detail}")
            resp._wake()
        waiter = self._lost_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        resp = self.resp
        if resp is None or resp._complete:
            raise UpstreamProtocolError("the upstream sent data after its response")

    def on_header(self, name: bytes, value: bytes) -> None:
        raw = self._raw
        if raw is None:
            return  # trailers of a chunked body: nothing in ResGov reads them
        self._header_bytes += len(name) + len(value)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise UpstreamProtocolError(f"upstream headers exceed {MAX_HEADER_BYTES} bytes")
        raw.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status == 101:
            raise UpstreamProtocolError("the upstream switched protocols (101)")
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._interim = True
            self._raw = []
            self._header_bytes = 0
            return
        resp = self.resp
        assert resp is not None and self._raw is not None
        resp.headers = Headers(self._raw)
        resp.status = status
        self._raw = None

    def on_body(self, body: bytes) -> None:
        resp = self.resp
        assert resp is not None
        resp._chunks.append(body)
        resp._buffered += len(body)
        if resp._buffered > self.client.read_high_water and not self.paused:
            self.paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        resp = self.resp
        assert resp is not None
        resp._complete = True
        self._keep_alive = self.parser.should_keep_alive()


def _ends_at_close(resp: UpstreamResponse) -> bool:
    """True when the body is delimited by the connection's end (no length, not chunked)."""
    if resp.status in _NO_BODY:
        return False
    for name, value in resp.headers.raw:
        lname = name.lower()
        if lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value.lower()):
            return False
    return True


# --------------------------------------------------------------------------- client


class UpstreamClient:
    """Pooled HTTP/1.1 client for the upstream providers (one per event loop).

    ``max_idle_per_host`` caps the idle connections kept per (scheme, host, port);
    ``keepalive_timeout`` is how long an idle one may be reused (keep it below the
    providers' own idle timeouts, or a request may race a server closing its side);
    ``ssl_context`` verifies https upstreams (default: the system's trust store);
    ``read_high_water`` is the unread body after which reading pauses.
    """

    def __init__(
        self,
        *,
        max_idle_per_host: int = 256,
        keepalive_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        read_high_water: int = DEFAULT_HIGH_WATER,
    ) -> None:
        if max_idle_per_host < 0 or keepalive_timeout < 0 or read_high_water < 1:
            raise ValueError("max_idle_per_host and keepalive_timeout must be >= 0, read_high_water >= 1")
        self.max_idle_per_host = max_idle_per_host
        self.keepalive_timeout = keepalive_timeout
        self.read_high_water = read_high_water
        self._ssl = ssl_context
        self._idle: dict[tuple[str, str, int], deque[_Connection]] = {}
        #: Every open connection, idle or busy, so close() can end them all.
        self._conns: set[_Connection] = set()
        self._targets: dict[str, _Target] = {}
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def idle_count(self, url: str | None = None) -> int:
        """Idle pooled connections, for ``url``'s origin or in all."""
        if url is None:
            return sum(len(q) for q in self._idle.values())
        return len(self._idle.get(self._target(url).key, ()))

    @property
    def open_count(self) -> int:
        """Connections open now, idle or busy."""
        return len(self._conns)

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | list[tuple[bytes, bytes]],
        body: bytes,
        *,
        connect_timeout: float,
        head_timeout: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; return once the response's status and headers arrived.

        ``Host``, ``Content-Length``, ``Transfer-Encoding`` and ``Connection`` in
        ``headers`` are ignored (the client sets the first two). ``head_timeout`` bounds the
        whole call, connecting included: past it, ``TimeoutError`` (the deadline then goes on
        bounding the body until :meth:`UpstreamResponse.set_timeouts` replaces it). Cancelling
        the call drops the connection. Raises :class:`UpstreamConnectError` when nothing was
        sent, :class:`UpstreamProtocolError` (or :class:`UpstreamDisconnected`) after the
        request was written, ``ValueError`` for a bad URL, method or header.
        """
        started = time.monotonic()
        if head_timeout is not None:
            connect_timeout = min(connect_timeout, head_timeout)
        if self._closed:
            raise RuntimeError("UpstreamClient is closed")
        target = self._target(url)
        if not method.isascii() or not method.isalpha():
            raise ValueError(f"invalid HTTP method {method!r}")
        data = b"".join(
            (
                method.encode(),
                target.line,
                _header_block(headers),
                b"Content-Length: %d\r\n\r\n" % len(body),
                body,
            )
        )
        # Idle connections the server closed are skipped here, before anything is written.
        conn = self._checkout(target.key)
        reused = conn is not None
        if conn is None:
            conn = await self._connect(target, connect_timeout)
        resp = UpstreamResponse(conn, reused)
        conn.send(resp, data)
        if reused and not conn.alive:
            # The transport closed inside write(): the kernel refused the first send (the
            # server had already reset this idle connection), so not one byte left and a
            # fresh connection is safe. A send that got through never lands here.
            conn.abort()
            conn = await self._connect(target, connect_timeout)
            resp = UpstreamResponse(conn, False)
            conn.send(resp, data)
        if head_timeout is not None:
            resp.set_timeouts(total=head_timeout - (time.monotonic() - started))
        try:
            await resp._wait_head()
        except BaseException:
            # Cancelled (a first-byte timeout) or failed: the connection is in an unknown
            # state, never reuse it.
            resp.close()
            raise
        return resp

    async def close(self) -> None:
        """Close every connection (in-flight responses fail with UpstreamDisconnected)."""
        self._closed = True
        self._idle.clear()
        conns = list(self._conns)
        for conn in conns:
            conn.fail(UpstreamDisconnected("the upstream client was closed"))
        if conns:
            # Let connection_lost run so no transport outlives the client; bounded wait.
            await asyncio.wait([c.lost_future() for c in conns], timeout=1.0)

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- internals

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            target = _parse_url(url)
            if len(self._targets) >= _URL_CACHE_SIZE:
                self._targets.clear()
            self._targets[url] = target
        return target

    def _ssl_context(self) -> ssl.SSLContext:
        # Loading the trust store takes milliseconds: only on the first https connection.
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def _connect(self, target: _Target, connect_timeout: float) -> _Connection:
        """A new connection, ready to write on; UpstreamConnectError if there is none."""
        loop = asyncio.get_running_loop()
        ctx = self._ssl_context() if target.tls else None
        where = f"{target.host}:{target.port}"
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, target.key),
                    target.host,
                    target.port,
                    ssl=ctx,
                    server_hostname=target.host if ctx is not None else None,
                )
        except TimeoutError as exc:
            raise UpstreamConnectTimeout(
                f"connecting to {where} took longer than {connect_timeout:g}s"
            ) from exc
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            raise UpstreamConnectError(f"cannot connect to {where}: {exc}") from exc
        if self._closed:
            conn.abort()
            raise RuntimeError("UpstreamClient is closed")
        if not conn.alive:
            # Accepted, then closed before we wrote (a server at its connection limit does
            # this): nothing was sent, so it is a connect failure.
            conn.abort()
            raise UpstreamConnectError(f"{where} closed the connection before the request was sent")
        self._conns.add(conn)
        return conn

    def _checkout(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        deadline = time.monotonic() - self.keepalive_timeout
        # The oldest are at the left: expire them here rather than with a timer per release.
        while idle and idle[0].idle_since < deadline:
            idle.popleft().close()
        while idle:
            conn = idle.pop()
            if conn.alive:
                return conn
            conn.close()
        return None

    def _put(self, conn: _Connection) -> None:
        """A connection whose response is complete and allowed keep-alive."""
        if conn.paused:
            conn.resume()
        if self._closed or not conn.alive:
            conn.close()
            return
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = deque()
        if len(idle) >= self.max_idle_per_host:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        """``connection_lost``: drop every reference to ``conn``."""
        self._conns.discard(conn)
        idle = self._idle.get(conn.key)
        if idle:
            # Rare (a server closing an idle connection); O(n) over at most max_idle_per_host.
            with contextlib.suppress(ValueError):
                idle.remove(conn)
