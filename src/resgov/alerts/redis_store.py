"""The alerts state on Redis, shared by every ResGov instance of one ledger.

Every key lives under one hash tag, ``{<prefix>:alerts}``, so the Lua scripts work on
Redis Cluster (one slot) and on Valkey/Dragonfly (every key a script touches is declared):

* ``…:claim:<event id>``: the dedupe claim, ``SET NX PX <ttl>``: exactly one instance wins.
* ``…:outbox``: sorted set of item ids scored by due time (ms). A sorted set rather than a
  list because retries are scheduled in the future (backoff) and leased items must come
  back by themselves when their worker dies.
* ``…:items``: hash item id → item JSON.
* ``…:dead``: list of dead letters (newest first, trimmed to 1000).
* ``…:webhooks``: hash webhook id → record JSON (with its signing secret).

Times are this instance's clock in ms; they only order retries, so skew between
instances delays a retry by the skew at worst.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis

from resgov.alerts.store import MAX_DEAD_LETTERS, DeadLetter, Destination, OutboxItem
from resgov.config.redis_url import split_redis_url

_ENQUEUE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[i])
end
return 1
"""
_LEASE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, id in ipairs(ids) do
  local item = redis.call('HGET', KEYS[2], id)
  if item then
    redis.call('ZADD', KEYS[1], until_ms, id)
    table.insert(out, item)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""
_RESCHEDULE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""
_DEAD = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[2])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
return 1
"""


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class RedisAlertStore:
    """Claims, outbox and webhooks in Redis (see the module docstring for the keys)."""

    name = "redis"

    def __init__(self, url: str, *, prefix: str | None = None) -> None:
        conn_url, self.prefix = split_redis_url(url, prefix or None)
        tag = "{" + self.prefix + ":alerts}"
        self._claim = tag + ":claim:"
        self._outbox = tag + ":outbox"
        self._items = tag + ":items"
        self._dead = tag + ":dead"
        self._webhooks = tag + ":webhooks"
        self._client: aioredis.Redis = aioredis.Redis.from_url(
            conn_url, decode_responses=True, socket_connect_timeout=2.0, socket_timeout=5.0
        )
        # redis-py's Script objects run EVALSHA and reload the script on NOSCRIPT by themselves.
        self._enqueue = self._client.register_script(_ENQUEUE)
        self._lease = self._client.register_script(_LEASE)
        self._reschedule = self._client.register_script(_RESCHEDULE)
        self._dead_script = self._client.register_script(_DEAD)

    @property
    def keys_pattern(self) -> str:
        """A SCAN pattern matching every key of this store (for clean-up tools and tests)."""
        return "{" + self.prefix + ":alerts}*"

    async def open(self) -> None:
        """Nothing to create; a first PING surfaces a wrong URL early (an outage is handled per call)."""
        await self._client.ping()

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()

    async def claim(self, event_id: str, ttl_seconds: float) -> bool:
        """``SET NX PX``: one winner across every instance."""
        return bool(await self._client.set(self._claim + event_id, "1", nx=True, px=max(1, _ms(ttl_seconds))))

    async def claim_and_enqueue(self, event_id: str, ttl_seconds: float, items: Sequence[OutboxItem]) -> bool:
        """One Lua script: the claim and the items, or nothing."""
        args: list[Any] = [max(1, _ms(ttl_seconds)), _ms(items[0].created_at if items else 0)]
        for item in items:
            args.extend([item.item_id, item.to_json().decode()])
        won = await self._enqueue(keys=[self._claim + event_id, self._outbox, self._items], args=args)
        return bool(int(won))

    async def lease(self, now: float, lease_seconds: float, limit: int) -> list[OutboxItem]:
        """Due items, leased atomically (two workers never lease the same item at once)."""
        raw = await self._lease(keys=[self._outbox, self._items], args=[_ms(now), _ms(lease_seconds), limit])
        return [OutboxItem.from_json(r) for r in raw]

    async def ack(self, item_id: str) -> None:
        """Remove a delivered item."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zrem(self._outbox, item_id)
            pipe.hdel(self._items, item_id)
            await pipe.execute()

    async def reschedule(self, item: OutboxItem, due: float) -> None:
        """Update the item and its due time, unless it was deleted meanwhile."""
        await self._reschedule(
            keys=[self._outbox, self._items], args=[item.item_id, item.to_json().decode(), _ms(due)]
        )

    async def dead_letter(self, item: OutboxItem, error: str, now: float) -> None:
        """Outbox → dead list."""
        record = orjson.dumps({"item": orjson.loads(item.to_json()), "error": error, "dead_at": now}).decode()
        await self._dead_script(
            keys=[self._outbox, self._items, self._dead], args=[item.item_id, record, MAX_DEAD_LETTERS]
        )

    async def next_due(self) -> float | None:
        """Lowest score."""
        first = await self._client.zrange(self._outbox, 0, 0, withscores=True)
        return float(first[0][1]) / 1000 if first else None

    async def counts(self) -> tuple[int, int]:
        """``(pending, dead)``."""
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.zcard(self._outbox)
            pipe.llen(self._dead)
            pending, dead = await pipe.execute()
        return int(pending), int(dead)

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        """Newest first."""
        raw = await self._client.lrange(self._dead, 0, max(0, limit - 1))
        out = []
        for r in raw:
            rec = orjson.loads(r)
            out.append(
                DeadLetter(OutboxItem.from_json(orjson.dumps(rec["item"])), rec["error"], rec["dead_at"])
            )
        return out

    async def drop_destination(self, dest_id: str) -> int:
        """Scan the items hash (small: pending alerts only) for the destination's items."""
        items = await self._client.hgetall(self._items)
        doomed = [item_id for item_id, raw in items.items() if orjson.loads(raw).get("dest_id") == dest_id]
        if doomed:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zrem(self._outbox, *doomed)
                pipe.hdel(self._items, *doomed)
                await pipe.execute()
        return len(doomed)

    async def put_webhook(self, dest: Destination) -> None:
        """Upsert."""
        await self._client.hset(self._webhooks, dest.id, orjson.dumps(dest.to_record()).decode())

    async def get_webhook(self, webhook_id: str) -> Destination | None:
        """By id."""
        raw = await self._client.hget(self._webhooks, webhook_id)
        return Destination.from_record(orjson.loads(raw)) if raw else None

    async def list_webhooks(self) -> list[Destination]:
        """Oldest first."""
        raw = await self._client.hgetall(self._webhooks)
        dests = [Destination.from_record(orjson.loads(v)) for v in raw.values()]
        return sorted(dests, key=lambda d: (d.created_at, d.id))

    async def delete_webhook(self, webhook_id: str) -> bool:
        """By id."""
        return bool(await self._client.hdel(self._webhooks, webhook_id))
