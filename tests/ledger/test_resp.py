"""The lean RESP connection (resgov.ledger.resp) against the machine's real Redis.

Its packing is held to redis-py's own packer; its replies to what redis-py reads from the same
server; its failures (a killed connection, a server that never answers, a refused handshake)
to what the ledger's error handling expects: redis-py's exception types, retries only where a
retry is safe, and never a hang.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
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

from resgov.ledger.resp import LeanOptions, RespPipe, lean_options, pack
from tests.ledger.conftest import REDIS_URL, require_redis

pytestmark = pytest.mark.redis

ARG = st.one_of(st.text(max_size=20), st.binary(max_size=20), st.integers(-(2**70), 2**70),
                st.floats(allow_nan=False, allow_infinity=False))  # fmt: skip


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["SET", "EVALSHA", "GET"]), st.lists(ARG, max_size=6))
                .map(lambda c: [c[0], *c[1]]), min_size=1, max_size=4))  # fmt: skip
def test_pack_is_what_redis_py_sends(commands: list[list[object]]) -> None:
    reference = Connection()
    want = b"".join(b"".join(reference.pack_command(*command)) for command in commands)
    assert pack(commands) == want


def test_pack_refuses_what_redis_py_refuses() -> None:
    for bad in (None, True, [1], {"a": 1}):
        with pytest.raises(TypeError):
            pack([("SET", "k", bad)])


def test_lean_options_take_plain_urls_only() -> None:
    o = lean_options("redis://u:pw@10.0.0.5:6380/3?socket_timeout=4", connect_timeout=2, reply_timeout=10)
    assert o == LeanOptions(host="10.0.0.5", port=6380, db=3, username="u", password="pw",
                            connect_timeout=2.0, reply_timeout=4.0)  # fmt: skip
    unix = lean_options("unix:///run/redis.sock?db=2", connect_timeout=2, reply_timeout=10)
    assert unix is not None and unix.path == "/run/redis.sock" and unix.db == 2
    # TLS and pool options stay with redis-py.
    assert lean_options("rediss://10.0.0.5:6380/0", connect_timeout=2, reply_timeout=10) is None
    assert lean_options("redis://h:1/0?max_connections=5", connect_timeout=2, reply_timeout=10) is None


@pytest_asyncio.fixture
async def pipe() -> AsyncIterator[RespPipe]:
    require_redis()
    options = lean_options(REDIS_URL, connect_timeout=2, reply_timeout=5)
    assert options is not None
    lean = RespPipe(options)
    yield lean
    await lean.close()


@pytest_asyncio.fixture
async def client() -> AsyncIterator[aioredis.Redis]:
    require_redis()
    c = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield c
    await c.aclose()


def key() -> str:
    return f"rgtest-resp-{uuid.uuid4().hex[:12]}"


async def test_replies_in_order_with_errors_in_place(pipe: RespPipe, client: aioredis.Redis) -> None:
    k, h = key(), key()
    try:
        await client.hset(h, "f", "v")
        replies = await pipe.execute([
            ("SET", k, "héllo €", "EX", 60),
            ("GET", k),
            ("GET", h),  # WRONGTYPE: an error in place, the rest still answered
            ("EVALSHA", "0" * 40, 0),
            ("EVAL", "return {1, 'two', {3}}", 0),
            ("DEL", k),
            ("GET", k),
        ])  # fmt: skip
        assert replies[0] == "OK" and replies[1] == "héllo €"
        assert isinstance(replies[2], ResponseError) and "WRONGTYPE" in str(replies[2])
        assert isinstance(replies[3], NoScriptError)
        assert replies[4:] == [[1, "two", [3]], 1, None]
    finally:
        await client.delete(k, h)


async def test_many_batches_in_flight_each_get_their_own_replies(
    pipe: RespPipe, client: aioredis.Redis
) -> None:
    k = key()
    try:
        futures = [pipe.submit([("INCR", k), ("GET", k)]) for _ in range(200)]
        results = await asyncio.gather(*futures)
        # Written in order on one connection, answered in order: batch i saw the i-th increment.
        assert [r[0] for r in results] == list(range(1, 201))
        assert all(int(r[1]) == r[0] for r in results)
        assert await pipe.execute([]) == []
    finally:
        await client.delete(k)


async def test_a_killed_connection_is_replaced(pipe: RespPipe, client: aioredis.Redis) -> None:
    k = key()
    try:
        assert await pipe.execute([("SET", k, "1")]) == ["OK"]
        conn = pipe._conn
        assert conn is not None and conn.transport is not None
        host, port = conn.transport.get_extra_info("sockname")[:2]
        assert await client.client_kill(f"{host}:{port}")
        # The next batch finds the connection gone (now or when its write fails) and is sent
        # again on a new one: it is idempotent, as every ledger command is.
        assert await pipe.execute([("GET", k)]) == ["1"]
        assert pipe._conn is not conn
    finally:
        await client.delete(k)


async def test_a_batch_cut_in_flight_is_sent_again_on_a_new_connection() -> None:
    """The first connection reads the command and hangs up unanswered; the retry gets the answer."""
    connections = 0

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\nv\r\n")
        if connections > 1:
            writer.write(b"+OK\r\n")
            await writer.drain()
            await reader.read()  # until the client leaves
        writer.close()

    server = await asyncio.start_server(flaky, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        lean = RespPipe(LeanOptions(host="127.0.0.1", port=port))
        assert await lean.execute([("SET", "k", "v")]) == ["OK"]
        assert connections == 2
        await lean.close()
        # Without retries the cut is the caller's error, a redis-py ConnectionError.
        connections = 0
        lean = RespPipe(LeanOptions(host="127.0.0.1", port=port), retries=0)
        with pytest.raises(RedisConnectionError):
            await lean.execute([("SET", "k", "v")])
        await lean.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_selects_the_database(client: aioredis.Redis) -> None:
    require_redis()
    k = key()
    options = lean_options(REDIS_URL, connect_timeout=2, reply_timeout=5)
    assert options is not None
    other = 14 if options.db != 14 else 13
    lean = RespPipe(LeanOptions(host=options.host, port=options.port, db=other))
    direct = aioredis.Redis(host=options.host, port=options.port, db=other, decode_responses=True)
    try:
        await lean.execute([("SET", k, "x", "EX", 60)])
        assert await direct.get(k) == "x" and await client.get(k) is None
    finally:
        await direct.delete(k)
        await direct.aclose()
        await lean.close()


async def test_refused_auth_is_not_retried() -> None:
    require_redis()
    options = lean_options(REDIS_URL, connect_timeout=2, reply_timeout=5)
    assert options is not None
    lean = RespPipe(LeanOptions(host=options.host, port=options.port, password="not-the-password"))
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(AuthenticationError):
            await lean.execute([("GET", "x")])
        assert asyncio.get_running_loop().time() - started < 1.0
    finally:
        await lean.close()


async def test_a_server_that_never_answers_times_out() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def mute(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lean = RespPipe(LeanOptions(host="127.0.0.1", port=port, reply_timeout=0.2), retries=1)
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(RedisTimeoutError):
            async with asyncio.timeout(5):  # a guard: the pipe's own timeout must fire first
                await lean.execute([("GET", "x")])
        assert 0.3 < asyncio.get_running_loop().time() - started < 2.0
        assert len(accepted) == 2  # dropped after the timeout, then tried once more on a new one
    finally:
        await lean.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_closed_pipe_fails_fast() -> None:
    lean = RespPipe(LeanOptions(host="127.0.0.1", port=1))
    await lean.close()
    with pytest.raises(Exception, match="closed"):
        await lean.execute([("GET", "x")])
