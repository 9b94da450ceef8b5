"""A lean pipelined RESP2 connection for the Redis ledger's hot commands.

Why not redis-py here: its pipeline packs every argument through an encoder object and reads
every reply through a per-reply coroutine with its own timeout, about 17 µs of CPU per
ledger script call on this machine, against 3.4 µs for the same command packed in Python and
parsed by ``hiredis`` (``bench/README.md`` has the measurements); ``hiredis`` now packs too. A
reserve+settle pair is four commands, so that difference is most of the store's client-side cost.

What it does, and no more: one connection; each batch of commands goes out in one write and
its replies are matched in order (several batches may be in flight on the connection: RESP
answers in order). Replies are decoded as UTF-8 text, exactly like ``redis-py`` with
``decode_responses=True`` for the commands it is used for (``EVALSHA``, ``SET``, ``GET``,
``DEL``, ``SADD``, ``EXPIRE``, which have no reply conversion there that the ledger reads).
Error replies come back in place as ``ResponseError`` (``NoScriptError`` for ``NOSCRIPT``), as
``redis-py``'s ``raise_on_error=False`` gives them. A broken or timed-out connection fails every
batch in flight with ``redis.exceptions.ConnectionError`` / ``TimeoutError`` and is replaced
on the next call; a batch is sent again at most ``retries`` times, which the ledger allows
because its scripts are idempotent by reservation or request id.

It connects only to what :func:`lean_options` accepts (``redis://`` and ``unix://`` with a
password, user, database and timeouts); any other URL (TLS, client certificates, pool options)
keeps the ledger on ``redis-py`` for everything.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url
from redis.backoff import AbstractBackoff, ExponentialWithJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    ResponseError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

Command = Sequence[Any]

#: The commands whose raw replies are what the ledger reads from redis-py (no reply callback).
LEAN_COMMANDS = frozenset({"EVALSHA", "SET", "GET", "DEL", "SADD", "EXPIRE"})
_OPTIONS = frozenset({"host", "port", "db", "username", "password", "path", "socket_timeout",
                      "socket_connect_timeout", "connection_class"})  # fmt: skip


@dataclass(frozen=True, slots=True)
class LeanOptions:
    """Where and how to connect (from the ledger's Redis URL)."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    connect_timeout: float = 2.0
    reply_timeout: float = 10.0


def lean_options(url: str, *, connect_timeout: float, reply_timeout: float) -> LeanOptions | None:
    """Options for :class:`RespPipe` from a ``redis-py`` URL, or None when it needs more than this
    connection offers (TLS, pool or client options): then only ``redis-py`` is used."""
    try:
        kwargs = parse_url(url)
    except ValueError:
        return None
    if set(kwargs) - _OPTIONS:
        return None
    connect_s: Any = kwargs.get("socket_connect_timeout") or connect_timeout
    reply_s: Any = kwargs.get("socket_timeout") or reply_timeout
    cls = kwargs.get("connection_class")
    if cls is not None and cls is not UnixDomainSocketConnection:
        return None
    return LeanOptions(
        host=str(kwargs.get("host") or "localhost"),
        port=int(kwargs.get("port") or 6379),
        path=kwargs.get("path"),
        db=int(kwargs.get("db") or 0),
        username=kwargs.get("username"),
        password=kwargs.get("password"),
        connect_timeout=float(connect_s),
        reply_timeout=float(reply_s),
    )


def pack(commands: Sequence[Command]) -> bytes:
    """RESP2 arrays of bulk strings (``str`` as UTF-8, ``int``/``float`` as decimal, ``bytes`` as is).

    hiredis packs in C: 2.0 µs for a reserve-sized ``EVALSHA`` against 7.4 µs for the same
    loop in Python (``bench/README.md``, fifth look); it refuses what redis-py refuses.
    """
    pack_command = hiredis.pack_command
    return b"".join([pack_command(tuple(command)) for command in commands])


class _Batch:
    __slots__ = ("future", "left", "replies", "sent_at")

    def __init__(self, future: asyncio.Future[list[Any]], count: int, sent_at: float) -> None:
        self.future = future
        self.left = count
        self.replies: list[Any] = []
        self.sent_at = sent_at


class _Protocol(asyncio.Protocol):
    """One connection: batches in flight, in the order they were written."""

    def __init__(self, reply_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.reply_timeout = reply_timeout
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self.batches: collections.deque[_Batch] = collections.deque()
        self.broken: Exception | None = None
        # One timer watches the oldest batch in flight (moved forward when it fires early).
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, payload: bytes, count: int) -> asyncio.Future[list[Any]]:
        """Write one batch; its future gets its ``count`` replies (or the connection's failure)."""
        future: asyncio.Future[list[Any]] = self.loop.create_future()
        if self.broken is not None:
            future.set_exception(self.broken)
            return future
        now = self.loop.time()
        self.batches.append(_Batch(future, count, now))
        if self._timer is None:
            self._timer = self.loop.call_at(now + self.reply_timeout, self._check_timeout)
        assert self.transport is not None
        self.transport.write(payload)
        return future

    def _check_timeout(self) -> None:
        self._timer = None
        if not self.batches or self.broken is not None:
            return
        due = self.batches[0].sent_at + self.reply_timeout
        if self.loop.time() + 0.001 >= due:
            # Its replies may still come and would be read as the next batch's: drop the connection.
            self.fail(RedisTimeoutError(f"redis: no reply within {self.reply_timeout:g}s"))
        else:
            self._timer = self.loop.call_at(due, self._check_timeout)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        batches = self.batches
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"redis: malformed reply: {exc}"))
                return
            if reply is False:
                return
            if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
                reply = NoScriptError(str(reply))
            if not batches:
                self.fail(RedisConnectionError("redis: a reply nobody asked for"))
                return
            batch = batches[0]
            batch.replies.append(reply)
            batch.left -= 1
            if batch.left == 0:
                batches.popleft()
                if not batch.future.done():
                    batch.future.set_result(batch.replies)

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f": {exc}" if exc else ""
        self.fail(RedisConnectionError(f"redis: connection lost{detail}"), close=False)

    def fail(self, error: Exception, *, close: bool = True) -> None:
        """Fail every batch in flight and drop the connection (replies can no longer be matched)."""
        if self.broken is None:
            self.broken = error
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.batches:
            batch = self.batches.popleft()
            if not batch.future.done():
                batch.future.set_exception(error)
        if close and self.transport is not None:
            self.transport.abort()


class RespPipe:
    """The ledger's hot-path connection to Redis (see the module docstring)."""

    def __init__(
        self, options: LeanOptions, *, retries: int = 3, backoff: AbstractBackoff | None = None
    ) -> None:
        self.options = options
        self.retries = retries
        #: The pause before each retry (redis-py's own backoff; the ledger passes its policy).
        self.backoff = backoff or ExponentialWithJitterBackoff()
        self._conn: _Protocol | None = None
        self._connecting: asyncio.Future[_Protocol] | None = None
        self._closed = False
        #: Batches submitted and not answered yet (close() lets them finish).
        self._outstanding: set[asyncio.Future[list[Any]]] = set()

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` in one write; their replies (errors as exception objects), in order."""
        return await self.submit(commands)

    def submit(self, commands: Sequence[Command]) -> asyncio.Future[list[Any]]:
        """Like :meth:`execute`, without a coroutine: written now when connected (the hot path),
        else once connected. Every batch written is in flight at once; nothing waits for the
        replies of the one before."""
        result: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if not commands:
            result.set_result([])
        else:
            self._outstanding.add(result)
            result.add_done_callback(self._outstanding.discard)
            self._attempt(pack(commands), len(commands), result, 0)
        return result

    def _attempt(self, payload: bytes, count: int, result: asyncio.Future[list[Any]], attempt: int) -> None:
        if result.done():
            return  # its caller gave up
        conn = self._live()
        if conn is None:
            task = asyncio.ensure_future(self._connect_then(payload, count, result, attempt))
            task.add_done_callback(_consume)
            return
        conn.send(payload, count).add_done_callback(
            lambda sent: self._answered(sent, payload, count, result, attempt)
        )

    def _answered(
        self,
        sent: asyncio.Future[list[Any]],
        payload: bytes,
        count: int,
        result: asyncio.Future[list[Any]],
        attempt: int,
    ) -> None:
        if result.done():
            return
        error = sent.exception() if not sent.cancelled() else RedisConnectionError("redis: cancelled")
        if error is None:
            result.set_result(sent.result())
        else:
            self._retry_or_fail(error, payload, count, result, attempt)

    def _retry_or_fail(
        self,
        error: BaseException,
        payload: bytes,
        count: int,
        result: asyncio.Future[list[Any]],
        attempt: int,
    ) -> None:
        retriable = isinstance(error, RedisConnectionError | RedisTimeoutError) and not isinstance(
            error,
            AuthenticationError,  # wrong credentials do not fix themselves
        )
        if retriable and attempt < self.retries and not self._closed:
            delay = self.backoff.compute(attempt + 1)
            result.get_loop().call_later(delay, self._attempt, payload, count, result, attempt + 1)
        elif not result.done():
            result.set_exception(error)

    async def _connect_then(
        self, payload: bytes, count: int, result: asyncio.Future[list[Any]], attempt: int
    ) -> None:
        try:
            await self._connection()
        except Exception as exc:
            self._retry_or_fail(exc, payload, count, result, attempt)
        except BaseException:
            if not result.done():  # never leave a caller waiting
                result.set_exception(RedisConnectionError("redis: connecting was cancelled"))
            raise
        else:
            conn = self._live()
            if conn is None:  # broken again at once: counts as a failed attempt
                self._retry_or_fail(
                    RedisConnectionError("redis: connection lost"), payload, count, result, attempt
                )
            else:
                self._attempt(payload, count, result, attempt)

    def _live(self) -> _Protocol | None:
        conn = self._conn
        if conn is None or conn.broken is not None or self._closed:
            return None
        if conn.loop is not asyncio.get_running_loop():
            # Made on another event loop (a test, a CLI helper): it cannot be used from this one.
            self._conn = None
            return None
        return conn

    async def _connection(self) -> _Protocol:
        if self._closed:
            raise RedisConnectionError("redis: the connection was closed")
        conn = self._live()
        if conn is not None:
            return conn
        loop = asyncio.get_running_loop()
        if self._connecting is not None and self._connecting.get_loop() is not loop:
            self._connecting = None
        if self._connecting is None:
            # One connect for every caller that finds the connection gone.
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _connect(self) -> _Protocol:
        o = self.options
        loop = asyncio.get_running_loop()

        def protocol() -> _Protocol:
            return _Protocol(o.reply_timeout)

        try:
            async with asyncio.timeout(o.connect_timeout):
                if o.path is not None:
                    _, conn = await loop.create_unix_connection(protocol, o.path)
                else:
                    _, conn = await loop.create_connection(protocol, o.host, o.port)
                hello: list[Command] = []
                if o.password is not None:
                    hello.append(("AUTH", o.username, o.password) if o.username else ("AUTH", o.password))
                if o.db:
                    hello.append(("SELECT", o.db))
                if hello:
                    replies = await conn.send(pack(hello), len(hello))
                    for reply in replies:
                        if isinstance(reply, ResponseError):
                            conn.fail(RedisConnectionError("redis: handshake refused"))
                            text = str(reply)
                            if any(word in text for word in ("AUTH", "WRONGPASS", "NOAUTH", "NOPERM")):
                                raise AuthenticationError(text)
                            raise RedisConnectionError(f"redis: handshake refused: {text}")
        except TimeoutError:
            raise RedisTimeoutError(f"redis: connecting took longer than {o.connect_timeout:g}s") from None
        except OSError as exc:
            raise RedisConnectionError(f"redis: cannot connect: {exc}") from exc
        if self._closed:
            conn.fail(RedisConnectionError("redis: the connection was closed"))
            raise RedisConnectionError("redis: the connection was closed")
        self._conn = conn
        return conn

    async def close(self, drain_timeout: float = 10.0) -> None:
        """Wait (bounded) for the batches submitted so far, then drop the connection."""
        if self._outstanding:
            await asyncio.wait(set(self._outstanding), timeout=drain_timeout)
        self._closed = True
        for result in list(self._outstanding):
            if not result.done():
                result.set_exception(RedisConnectionError("redis: the connection was closed"))
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.fail(RedisConnectionError("redis: the connection was closed"), close=False)
            if conn.transport is not None:
                conn.transport.close()
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting


def _consume(task: asyncio.Future[None]) -> None:
    """Retrieve a finished task's outcome (its failures were delivered to its caller)."""
    if not task.cancelled():
        task.exception()
