"""Lua sources of the Redis ledger's atomic steps (reserve, settle, renew, expired, record, book).

Rules every script follows, so the ledger is correct on Redis, Redis Cluster, Valkey and Dragonfly:

* Every key a script touches is passed in ``KEYS``, and all of them carry the same hash tag
  ``{prefix:org}``: one script = one slot = one atomic step on one shard.
* All checks run before the first write. Redis has no rollback, so a script that could fail
  half-way through its writes would leave a half-applied reservation behind.
* Time is the server's (``TIME``), never a client's, so every instance judges leases alike.
* Money is exact. Lua 5.1 numbers are doubles, exact only below 2^53 nano-units (~9 million
  in the budget currency), so amounts travel as decimal strings and are written with
  ``HINCRBY`` on the decimal strings. Strings of at most 15 characters (|x| < 10^15, a million
  in the budget currency) are added and compared as plain numbers: exact, since any sum of
  three of them stays below 2^53. Anything longer is added and compared as (high, low) pairs
  in base 10^9, exact across the whole int64 range. The plain path is for speed only (string
  to (high, low) conversion was a fifth of the reserve script's instructions); the two give
  the same answers, which a property test checks. The logic mirrors ``resgov.core.budget.first_misfit``
  and ``resgov.core.budget.settle`` line for line; the contract suite holds them to the same answers.
"""

from __future__ import annotations

#: Helpers shared by every script: exact big-integer arithmetic, server time, the audit sequence.
PRELUDE = r"""
-- Scripts that call TIME before writing need effects replication on Redis < 5
-- (the default since 5; a no-op, or absent, elsewhere).
if redis.replicate_commands then pcall(redis.replicate_commands) end

local BASE = 1000000000

-- {hi, lo} with 0 <= lo < BASE represents hi * BASE + lo, for any int64.
local function norm(hi, lo)
  if lo >= BASE then return {hi + 1, lo - BASE} end
  if lo < 0 then return {hi - 1, lo + BASE} end
  return {hi, lo}
end

local function big(s)
  if not s then return {0, 0} end
  local neg = string.sub(s, 1, 1) == '-'
  if neg then s = string.sub(s, 2) end
  local n = #s
  local hi, lo
  if n <= 9 then
    hi, lo = 0, tonumber(s)
  else
    hi, lo = tonumber(string.sub(s, 1, n - 9)), tonumber(string.sub(s, n - 8))
  end
  if neg then return norm(-hi, -lo) end
  return {hi, lo}
end

local function add(a, b) return norm(a[1] + b[1], a[2] + b[2]) end
local function sub(a, b) return norm(a[1] - b[1], a[2] - b[2]) end

local function cmp(a, b)
  if a[1] ~= b[1] then return (a[1] < b[1]) and -1 or 1 end
  if a[2] ~= b[2] then return (a[2] < b[2]) and -1 or 1 end
  return 0
end

-- Decimal string of a {hi, lo}.
local function str(a)
  if a[1] < 0 then
    local m = norm(-a[1], -a[2])
    if m[1] == 0 then return string.format('-%d', m[2]) end
    return string.format('-%d%09d', m[1], m[2])
  end
  if a[1] == 0 then return string.format('%d', a[2]) end
  return string.format('%d%09d', a[1], a[2])
end

-- An integral number as a decimal string (tostring would print 1.7e+15). %d goes through a
-- 64-bit integer, several times cheaper than %.0f's float printing and exact below 2^53.
local function fmt(x)
  if x > -9007199254740992 and x < 9007199254740992 then return string.format('%d', x) end
  return string.format('%.0f', x)
end

-- The plain-number fast path: the value of a decimal string of at most 15 characters, else nil.
local function num(s)
  if #s <= 15 then return tonumber(s) end
  return nil
end

-- Does spent + reserved + amount exceed limit (all decimal strings)? first_misfit's test.
local function over(spent, reserved, amount, limit)
  local a, b, c = num(spent), num(reserved), num(amount)
  if a and b and c then
    local l = num(limit)
    if l then return a + b + c > l end
    -- A limit of 17+ digits is at least 10^16, beyond any sum of three short values.
    if #limit >= 17 and string.byte(limit, 1) ~= 45 then return false end
  end
  return cmp(add(add(big(spent), big(reserved)), big(amount)), big(limit)) > 0
end

-- x + y as a decimal string.
local function plus(x, y)
  local a, b = num(x), num(y)
  if a and b then return fmt(a + b) end
  return str(add(big(x), big(y)))
end

-- x - y as a decimal string.
local function minus(x, y)
  local a, b = num(x), num(y)
  if a and b then return fmt(a - b) end
  return str(sub(big(x), big(y)))
end

-- x < y?
local function less(x, y)
  local a, b = num(x), num(y)
  if a and b then return a < b end
  return cmp(big(x), big(y)) < 0
end

local function now()
  local t = redis.call('TIME')
  local s, us = tonumber(t[1]), tonumber(t[2])
  return s * 1000 + math.floor(us / 1000), s * 1000000 + us, string.format('%d.%06d', s, us)
end

-- The audit sequence: strictly increasing per org, and equal to the server's clock in
-- microseconds whenever that is ahead, so sequences of different orgs interleave in time order
-- and the admin's cross-org view can merge them on one cursor (see ledger/redis.py).
local function next_seq(seq_key, now_us)
  local last = tonumber(redis.call('GET', seq_key) or '0')
  local seq = math.max(last + 1, now_us)
  redis.call('SET', seq_key, fmt(seq))
  return seq
end

local function line_states(first, n)
  local out = {}
  for i = 1, n do
    local st = redis.call('HMGET', KEYS[first + i], 'spent', 'reserved')
    out[#out + 1] = st[1] or '0'
    out[#out + 1] = st[2] or '0'
  end
  return out
end
"""

#: Reserve ``amount`` on every line or on none, write the lease and the in-flight audit record.
#:
#: KEYS: 1 reservation hash, 2 leases zset, 3 audit record hash, 4 org audit log zset,
#:       5 agent audit log zset, 6 org sequence, 7.. one hash per budget line (spent, reserved).
#: ARGV: 1 reservation id, 2 amount, 3 ttl in ms, 4 agent, 5 line keys joined by \x1f,
#:       6 number of lines n, 7..6+n the lines' limits, 7+n the audit record (JSON, opaque here).
#: Returns {1, states after...} reserved; {2, states...} this very reservation already exists (a retried
#: call: nothing written); {0, i, states...} line i refused (states before, nothing written);
#: {-1, why} a different reservation or audit record already uses this id.
RESERVE = (
    PRELUDE
    + r"""
local rid, amount_s = ARGV[1], ARGV[2]
local n = tonumber(ARGV[6])
local existing = redis.call('HMGET', KEYS[1], 'amount', 'keys')
if existing[1] then
  if existing[1] == amount_s and existing[2] == ARGV[5] then
    local out = {2}
    for _, v in ipairs(line_states(6, n)) do out[#out + 1] = v end
    return out
  end
  return {-1, 'reservation id already in use'}
end
if redis.call('EXISTS', KEYS[3]) == 1 then return {-1, 'audit record already exists'} end

-- Checks: first_misfit, exactly.
local before = line_states(6, n)
for i = 1, n do
  if over(before[2 * i - 1], before[2 * i], amount_s, ARGV[6 + i]) then
    local out = {0, i}
    for _, v in ipairs(before) do out[#out + 1] = v end
    return out
  end
end

-- Writes. The states returned are computed, not re-read: before + amount, as SQLite reports them.
local now_ms, now_us = now()
local out = {1}
for i = 1, n do
  redis.call('HINCRBY', KEYS[6 + i], 'reserved', amount_s)
  out[#out + 1] = before[2 * i - 1]
  out[#out + 1] = plus(before[2 * i], amount_s)
end
redis.call('HSET', KEYS[1], 'agent', ARGV[4], 'amount', amount_s, 'keys', ARGV[5], 'created_ms', fmt(now_ms))
redis.call('ZADD', KEYS[2], fmt(now_ms + tonumber(ARGV[3])), rid)
local seq = fmt(next_seq(KEYS[6], now_us))
redis.call('HSET', KEYS[3], 'entry', ARGV[7 + n], 'seq', seq)
redis.call('ZADD', KEYS[4], seq, rid)
redis.call('ZADD', KEYS[5], seq, rid)
return out
"""
)

#: Settle a reservation exactly once: the reservation hash is deleted by the first settlement.
#:
#: KEYS: 1 reservation hash, 2 leases zset, 3 audit record hash, 4.. one hash per budget line.
#: ARGV: 1 reservation id, 2 kind, 3 amount, 4 "1" when sweeping (settle only if the lease has
#:       expired by the server's clock), 5 the caller's line keys joined by \x1f, 6 audit status,
#:       7 count m of audit fields to set, then m field/value pairs ("" stands for None).
#: Returns {1, charged, refund, overage, reserved, states...} settled; {0} nothing to settle
#: (already settled, or never reserved); {3} still leased (a sweep raced a renewal);
#: {-2, keys} the caller declared the wrong line keys (nothing written; retry with these).
SETTLE = (
    PRELUDE
    + r"""
local rid, kind = ARGV[1], ARGV[2]
local res = redis.call('HMGET', KEYS[1], 'amount', 'keys')
if not res[1] then
  redis.call('ZREM', KEYS[2], rid)
  return {0}
end
if res[2] ~= ARGV[5] then return {-2, res[2]} end
local now_ms, _, now_s = now()
if ARGV[4] == '1' then
  local score = redis.call('ZSCORE', KEYS[2], rid)
  if score and tonumber(score) >= now_ms then return {3} end
end

-- settle(), exactly. Amounts are canonical decimal strings (no sign, no leading zeros).
local reserved_s, amount_s = res[1], ARGV[3]
local charged_s = '0'
if kind == 'actual' then
  charged_s = amount_s
elseif kind == 'estimated' then
  if less(amount_s, reserved_s) then charged_s = amount_s else charged_s = reserved_s end
elseif kind == 'expire_charge' then
  charged_s = reserved_s
end
-- refund = reserved - charged + overage: the rest when under the reservation, 0 when over it.
local overage_s, refund_s = '0', minus(reserved_s, charged_s)
if less(reserved_s, charged_s) then overage_s, refund_s = minus(charged_s, reserved_s), '0' end

-- Writes. HINCRBY rejects "-0", so zero amounts skip the call. The line states returned are
-- HINCRBY's answers where it ran and they are exact as Lua numbers (below 10^15), else re-read.
local n = #KEYS - 3
local states = {}
for i = 1, n do
  local key = KEYS[3 + i]
  local reserved, spent
  if res[1] ~= '0' then reserved = redis.call('HINCRBY', key, 'reserved', '-' .. res[1]) end
  if charged_s ~= '0' then spent = redis.call('HINCRBY', key, 'spent', charged_s) end
  if reserved and spent and math.abs(reserved) < 1e15 and math.abs(spent) < 1e15 then
    states[#states + 1] = fmt(spent)
    states[#states + 1] = fmt(reserved)
  else
    local st = redis.call('HMGET', key, 'spent', 'reserved')
    states[#states + 1] = st[1] or '0'
    states[#states + 1] = st[2] or '0'
  end
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], rid)
if redis.call('EXISTS', KEYS[3]) == 1 then
  local estimated = (kind == 'estimated') and '1' or '0'
  local expired = (string.sub(kind, 1, 6) == 'expire') and '1' or '0'
  local flagged = (overage_s ~= '0') and '1' or '0'
  local fields = {'status', ARGV[6], 'actual', charged_s, 'overage', flagged, 'estimated', estimated,
                  'expired', expired, 'finished_at', now_s}
  local m = tonumber(ARGV[7])
  for i = 8, 7 + 2 * m do fields[#fields + 1] = ARGV[i] end
  redis.call('HSET', KEYS[3], unpack(fields))
end
local out = {1, charged_s, refund_s, overage_s, res[1]}
for _, v in ipairs(states) do out[#out + 1] = v end
return out
"""
)

#: Push live leases forward by the server's clock; ids already settled are left alone (XX).
#:
#: KEYS: 1 leases zset. ARGV: 1 ttl in ms, 2.. reservation ids. Returns how many were renewed.
RENEW = (
    PRELUDE
    + r"""
local now_ms = now()
local score = fmt(now_ms + tonumber(ARGV[1]))
local renewed = 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[1], 'XX', 'CH', score, ARGV[i])
end
return renewed
"""
)

#: Reservation ids whose lease expired by the server's clock (read-only).
#:
#: KEYS: 1 leases zset. ARGV: 1 the most ids to return.
EXPIRED = (
    PRELUDE
    + r"""
local now_ms = now()
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. fmt(now_ms), 'LIMIT', 0, tonumber(ARGV[1]))
"""
)

#: Write the audit record of a request that reserved nothing (a refusal), with its sequence.
#:
#: KEYS: 1 audit record hash, 2 org audit log zset, 3 agent audit log zset, 4 org sequence.
#: ARGV: 1 request id, 2 the audit record (JSON). Returns 1, or 0 if the record already existed.
RECORD = (
    PRELUDE
    + r"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local _, now_us = now()
local seq = fmt(next_seq(KEYS[4], now_us))
redis.call('HSET', KEYS[1], 'entry', ARGV[2], 'seq', seq)
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
return 1
"""
)

#: Book a call that ran with no reservation (fail-open, see ledger/journal.py): charge every line
#: with no limit check and write its audit record, once per request id.
#:
#: KEYS: 1 audit record hash, 2 org audit log zset, 3 agent audit log zset, 4 org sequence,
#:       5.. one hash per budget line. ARGV: 1 request id, 2 amount, 3 the audit record (JSON).
#: Returns 1 booked, or 0 if the request id already has an audit record (nothing written).
BOOK = (
    PRELUDE
    + r"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[2] ~= '0' then
  for i = 5, #KEYS do redis.call('HINCRBY', KEYS[i], 'spent', ARGV[2]) end
end
local _, now_us = now()
local seq = fmt(next_seq(KEYS[4], now_us))
redis.call('HSET', KEYS[1], 'entry', ARGV[3], 'seq', seq)
redis.call('ZADD', KEYS[2], seq, ARGV[1])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
return 1
"""
)

ALL = {
    "reserve": RESERVE, "settle": SETTLE, "renew": RENEW, "expired": EXPIRED, "record": RECORD, "book": BOOK,
}  # fmt: skip

# --- governance (issue 5): idempotency keys of POST /api/v1/book --------------------------------
# These run with EVAL (not EVALSHA): they are off the LLM hot path, and EVAL cannot meet NOSCRIPT.

#: Claim an idempotency key. KEYS: 1 the key's hash. ARGV: 1 fingerprint, 2 owner, 3 lease ms,
#: 4 keep ms. Returns {'claimed', previous owner or ''}, {'mismatch'}, {'done', status, body} or
#: {'in_flight'}. A claim whose lease ran out (its process died) is taken over, naming the old owner.
IDEM_CLAIM = (
    PRELUDE
    + r"""
local now_ms = now()
local h = redis.call('HMGET', KEYS[1], 'fp', 'owner', 'state', 'lease', 'status', 'body')
if not h[1] then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'owner', ARGV[2], 'state', 'in_flight',
             'lease', fmt(now_ms + tonumber(ARGV[3])))
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return {'claimed', ''}
end
if h[1] ~= ARGV[1] then return {'mismatch'} end
if h[3] == 'done' then return {'done', h[5], h[6]} end
if tonumber(h[4]) > now_ms then return {'in_flight'} end
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'lease', fmt(now_ms + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {'claimed', h[2]}
"""
)

#: Store the answer of a claimed key. KEYS: 1 the key's hash. ARGV: 1 owner, 2 status, 3 body, 4 keep ms.
#: Returns 1, or 0 when ``owner`` no longer holds the key.
IDEM_COMPLETE = r"""
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'done', 'status', ARGV[2], 'body', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

#: Forget an unanswered claim. KEYS: 1 the key's hash. ARGV: 1 owner. Returns 1 if deleted.
IDEM_RELEASE = r"""
local h = redis.call('HMGET', KEYS[1], 'owner', 'state')
if h[1] ~= ARGV[1] or h[2] ~= 'in_flight' then return 0 end
return redis.call('DEL', KEYS[1])
"""
