"""Lua scripts of the Redis guard state (see :mod:`resgov.guard.redis` for the key layout).

Each script is one atomic step: every check first, then every write, so a refused call
leaves nothing behind (Redis has no rollback). Every key a script touches is declared in
``KEYS`` and all of them share the org's hash tag (Redis Cluster, Valkey, Dragonfly).
Time is the Redis server's ``TIME`` in milliseconds, never an instance's clock (``ARGV[1]``
may override it, for tests with a simulated clock). Money stays integral: sums are kept
with ``HINCRBY`` and Lua doubles are exact below 2^53 nano-units (9 million currency units),
far above what one minute of one agent can reserve.

The semantics are those of :mod:`resgov.guard.state`, and the same contract suite runs
against this and the in-process implementation.
"""

from __future__ import annotations

_COMMON = r"""
local function num(x) return tonumber(x) or 0 end
local function opt(x)
  local v = tonumber(x)
  if v and v > 0 then return v end
  return nil
end
local function int(x) return string.format('%d', x) end
local function clock(arg)
  local v = tonumber(arg)
  if v then return v end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function r3(x) return math.floor(x * 1000 + 0.5) / 1000 end
local WIN = 60000
local WIN_TTL = 120000
"""

#: KEYS per scope: pause, win, winv, sums, inflight, loop, loopn, min, session.
#: ARGV: now|'', rid, tokens, amount, lease_ms, scope count, baseline minutes, min active minutes,
#: session idle ms; then per scope: kind, fingerprint|'', has session '1'|'0', rpm, tpm, max
#: concurrent, loop repeats, loop window ms, max spend/min, velocity multiple, cooldown ms,
#: session budget, max calls/session ('' or 0 = off).
#: Reply: {outcome, kind, reason, retry_ms|-1, until_ms|-1, paused_at_ms|-1, evidence k, v, ...}.
ADMIT = (
    _COMMON
    + r"""
local now = clock(ARGV[1])
local rid = ARGV[2]
local tokens = num(ARGV[3])
local amount = num(ARGV[4])
local lease = num(ARGV[5])
local n = tonumber(ARGV[6])
local BASELINE = tonumber(ARGV[7])
local MIN_ACTIVE = tonumber(ARGV[8])
local SESSION_TTL = tonumber(ARGV[9])
local KS, AS, A0 = 9, 13, 9

local scopes = {}
for i = 1, n do
  local k = (i - 1) * KS
  local a = A0 + (i - 1) * AS
  scopes[i] = {
    pause = KEYS[k + 1], win = KEYS[k + 2], winv = KEYS[k + 3], sums = KEYS[k + 4],
    inflight = KEYS[k + 5], loop = KEYS[k + 6], loopn = KEYS[k + 7], min = KEYS[k + 8],
    sess = KEYS[k + 9],
    kind = ARGV[a + 1], fp = ARGV[a + 2], session = ARGV[a + 3] == '1',
    rpm = opt(ARGV[a + 4]), tpm = opt(ARGV[a + 5]), conc = opt(ARGV[a + 6]),
    loop_n = opt(ARGV[a + 7]), loop_ms = num(ARGV[a + 8]), spm = opt(ARGV[a + 9]),
    mult = opt(ARGV[a + 10]), cooldown = opt(ARGV[a + 11]), sbudget = opt(ARGV[a + 12]),
    scalls = opt(ARGV[a + 13]),
  }
  if scopes[i].fp == '' then scopes[i].fp = nil end
end

local function reply(outcome, s, reason, retry, till, at, ev)
  local out = {outcome, s.kind, reason, int(retry or -1), int(till or -1), int(at or -1)}
  for i = 1, #ev do out[#out + 1] = tostring(ev[i]) end
  return out
end

-- Ages out the 60 s window, keeping the running sums equal to what is left in it.
local function trim(s)
  local cutoff = now - WIN
  local old = redis.call('ZRANGEBYSCORE', s.win, '-inf', cutoff)
  if #old > 0 then
    local dt, ds, dd = 0, 0, 0
    for _, r in ipairs(old) do
      local v = redis.call('HMGET', s.winv, 't:' .. r, 's:' .. r, 'd:' .. r)
      dt = dt + num(v[1])
      ds = ds + num(v[2])
      if v[3] == '1' then dd = dd + num(v[2]) end
      redis.call('HDEL', s.winv, 't:' .. r, 's:' .. r, 'd:' .. r)
    end
    redis.call('ZREMRANGEBYSCORE', s.win, '-inf', cutoff)
    redis.call('HINCRBY', s.sums, 'tok', int(-dt))
    redis.call('HINCRBY', s.sums, 'spend', int(-ds))
    redis.call('HINCRBY', s.sums, 'done', int(-dd))
  end
  local sums = redis.call('HMGET', s.sums, 'tok', 'spend', 'done')
  s.tok, s.spend, s.done = num(sums[1]), num(sums[2]), num(sums[3])
  s.count = redis.call('ZCARD', s.win)
  redis.call('ZREMRANGEBYSCORE', s.inflight, '-inf', now)
  if s.loop_n then
    local lcut = now - s.loop_ms
    local gone = redis.call('ZRANGEBYSCORE', s.loop, '-inf', lcut)
    for _, m in ipairs(gone) do
      local bar = string.find(m, '|', 1, true)
      local fp = bar and string.sub(m, 1, bar - 1) or m
      if redis.call('HINCRBY', s.loopn, fp, -1) <= 0 then redis.call('HDEL', s.loopn, fp) end
    end
    if #gone > 0 then redis.call('ZREMRANGEBYSCORE', s.loop, '-inf', lcut) end
  end
end

local function paused(s)
  local p = redis.call('HGETALL', s.pause)
  if #p == 0 then return nil end
  local h, ev = {}, {}
  for i = 1, #p, 2 do
    h[p[i]] = p[i + 1]
    if string.sub(p[i], 1, 3) == 'ev:' then
      ev[#ev + 1] = string.sub(p[i], 4)
      ev[#ev + 1] = p[i + 1]
    end
  end
  local till = tonumber(h['till'])
  if till and till <= now then
    redis.call('DEL', s.pause)  -- the cooldown is over
    return nil
  end
  return reply('paused', s, h['reason'], till and (till - now) or nil, till, num(h['at']), ev)
end

local function trip(s, reason, ev)
  redis.call('DEL', s.pause)
  local fields = {'reason', reason, 'at', int(now)}
  local till = nil
  if s.cooldown then
    till = now + s.cooldown
    fields[#fields + 1] = 'till'
    fields[#fields + 1] = int(till)
  end
  for i = 1, #ev, 2 do
    fields[#fields + 1] = 'ev:' .. ev[i]
    fields[#fields + 1] = tostring(ev[i + 1])
  end
  redis.call('HSET', s.pause, unpack(fields))
  if s.cooldown then redis.call('PEXPIRE', s.pause, int(s.cooldown + WIN)) end
  -- The evidence is in the audit trail; the next allowance starts from zero.
  redis.call('DEL', s.loop, s.loopn)
  return reply('tripped', s, reason, s.cooldown, till, now, ev)
end

-- Mean actual spend per active minute of the baseline, or nil with too little history.
local function norm(s)
  local stop = math.floor((now - WIN) / 60000)
  local flat = redis.call('HGETALL', s.min)
  local total, active = 0, 0
  for i = 1, #flat, 2 do
    local m, v = tonumber(flat[i]), num(flat[i + 1])
    if m and m >= stop - BASELINE and m < stop and v > 0 then
      total = total + v
      active = active + 1
    end
  end
  if active < MIN_ACTIVE then return nil end
  return total / active, active
end

for i = 1, n do
  trim(scopes[i])
  local p = paused(scopes[i])
  if p then return p end
end

for i = 1, n do
  local s = scopes[i]
  if s.loop_n and s.fp then
    local seen = num(redis.call('HGET', s.loopn, s.fp))
    if seen >= s.loop_n then
      return trip(s, 'loop_detected', {
        'count', seen + 1, 'limit', s.loop_n, 'window_seconds', s.loop_ms / 1000,
        'rate_per_minute', r3((seen + 1) * 60000 / s.loop_ms), 'fingerprint', string.sub(s.fp, 1, 16)})
    end
  end
  if s.spm and s.spend + amount > s.spm then
    return trip(s, 'spend_velocity_exceeded', {
      'spend_last_minute_nano', int(s.spend), 'required_nano', int(amount),
      'limit_per_minute_nano', int(s.spm), 'window_seconds', WIN / 1000, 'calls_last_minute', s.count})
  end
  if s.mult then
    local mean, active = norm(s)
    if mean and mean > 0 and s.done > s.mult * mean then
      return trip(s, 'spend_velocity_exceeded', {
        'spend_last_minute_nano', int(s.done), 'norm_per_minute_nano', int(math.floor(mean + 0.5)),
        'ratio', r3(s.done / mean), 'multiple', ARGV[A0 + (i - 1) * AS + 10],
        'active_minutes', active, 'window_seconds', WIN / 1000, 'calls_last_minute', s.count})
    end
  end
end

for i = 1, n do
  local s = scopes[i]
  if s.conc then
    local busy = redis.call('ZCARD', s.inflight)
    if busy >= s.conc then
      return reply('refused', s, 'concurrency_exceeded', 1000, nil, nil, {'in_flight', busy, 'limit', s.conc})
    end
  end
  if s.rpm and s.count >= s.rpm then
    local oldest = redis.call('ZRANGE', s.win, s.count - s.rpm, s.count - s.rpm, 'WITHSCORES')
    return reply('refused', s, 'rpm_exceeded', tonumber(oldest[2]) + WIN - now, nil, nil,
      {'count', s.count, 'limit', s.rpm, 'window_seconds', WIN / 1000})
  end
  if s.tpm and s.tok + tokens > s.tpm then
    local ev = {'tokens_last_minute', int(s.tok), 'required_tokens', int(tokens), 'limit', int(s.tpm),
                'window_seconds', WIN / 1000}
    if tokens > s.tpm then return reply('refused', s, 'tpm_request_too_large', nil, nil, nil, ev) end
    local retry = WIN
    local freed = 0
    local all = redis.call('ZRANGE', s.win, 0, -1, 'WITHSCORES')
    for j = 1, #all, 2 do
      freed = freed + num(redis.call('HGET', s.winv, 't:' .. all[j]))
      if s.tok - freed + tokens <= s.tpm then
        retry = tonumber(all[j + 1]) + WIN - now
        break
      end
    end
    return reply('refused', s, 'tpm_exceeded', retry, nil, nil, ev)
  end
end

for i = 1, n do
  local s = scopes[i]
  if s.session then
    local v = redis.call('HMGET', s.sess, 'calls', 'reserved', 'spent')
    local calls, reserved, spent = num(v[1]), num(v[2]), num(v[3])
    if s.scalls and calls >= s.scalls then
      return reply('refused', s, 'session_calls_exceeded', nil, nil, nil, {'calls', calls, 'limit', s.scalls})
    end
    if s.sbudget and spent + reserved + amount > s.sbudget then
      return reply('refused', s, 'session_budget_exceeded', nil, nil, nil, {
        'limit_nano', int(s.sbudget), 'spent_nano', int(spent), 'reserved_nano', int(reserved),
        'required_nano', int(amount)})
    end
  end
end

-- Every check passed: admit on every scope.
for i = 1, n do
  local s = scopes[i]
  if redis.call('ZADD', s.win, 'NX', now, rid) == 1 then
    redis.call('HSET', s.winv, 't:' .. rid, int(tokens), 's:' .. rid, int(amount))
    redis.call('HINCRBY', s.sums, 'tok', int(tokens))
    redis.call('HINCRBY', s.sums, 'spend', int(amount))
  end
  redis.call('PEXPIRE', s.win, WIN_TTL)
  redis.call('PEXPIRE', s.winv, WIN_TTL)
  redis.call('PEXPIRE', s.sums, WIN_TTL)
  if s.conc then
    redis.call('ZADD', s.inflight, now + lease, rid)
    redis.call('PEXPIRE', s.inflight, int(lease * 2))
  end
  if s.loop_n and s.fp then
    if redis.call('ZADD', s.loop, 'NX', now, s.fp .. '|' .. rid) == 1 then
      redis.call('HINCRBY', s.loopn, s.fp, 1)
    end
    redis.call('PEXPIRE', s.loop, int(s.loop_ms + 1000))
    redis.call('PEXPIRE', s.loopn, int(s.loop_ms + 1000))
  end
  if s.session then
    if redis.call('HSETNX', s.sess, 'h:' .. rid, int(amount)) == 1 then
      redis.call('HINCRBY', s.sess, 'calls', 1)
      redis.call('HINCRBY', s.sess, 'reserved', int(amount))
    end
    redis.call('PEXPIRE', s.sess, int(SESSION_TTL))
  end
end
return {'ok', '', '', '-1', '-1', '-1'}
"""
)

#: KEYS per scope: win, winv, sums, inflight, min, session.
#: ARGV: now|'', rid, tokens|'' (keep the reserved bound), cost, sent '1'|'0', scope count,
#: baseline minutes; then per scope: has session '1'|'0'.
SETTLE = (
    _COMMON
    + r"""
local now = clock(ARGV[1])
local rid = ARGV[2]
local tokens = tonumber(ARGV[3])
local cost = num(ARGV[4])
local sent = ARGV[5] == '1'
local n = tonumber(ARGV[6])
local BASELINE = tonumber(ARGV[7])
if not sent then cost = 0 end
for i = 1, n do
  local k = (i - 1) * 6
  local win, winv, sums, inflight, min, sess = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5], KEYS[k + 6]
  redis.call('ZREM', inflight, rid)
  local v = redis.call('HMGET', winv, 't:' .. rid, 's:' .. rid, 'd:' .. rid)
  if v[1] and v[3] ~= '1' then
    local t_old, s_old = num(v[1]), num(v[2])
    local t_new = tokens or t_old
    if not sent then t_new = 0 end
    redis.call('HSET', winv, 't:' .. rid, int(t_new), 's:' .. rid, int(cost), 'd:' .. rid, '1')
    redis.call('HINCRBY', sums, 'tok', int(t_new - t_old))
    redis.call('HINCRBY', sums, 'spend', int(cost - s_old))
    redis.call('HINCRBY', sums, 'done', int(cost))
    local at = tonumber(redis.call('ZSCORE', win, rid)) or now
    local minute = math.floor(at / 60000)
    redis.call('HINCRBY', min, tostring(minute), int(cost))
    for _, m in ipairs(redis.call('HKEYS', min)) do
      local mv = tonumber(m)
      if mv and mv < minute - BASELINE - 2 then redis.call('HDEL', min, m) end
    end
    redis.call('PEXPIRE', min, (BASELINE + 3) * 60000)
  end
  if ARGV[7 + i] == '1' then
    local hold = redis.call('HGET', sess, 'h:' .. rid)
    if hold then
      redis.call('HDEL', sess, 'h:' .. rid)
      redis.call('HINCRBY', sess, 'reserved', int(-num(hold)))
      if sent then
        redis.call('HINCRBY', sess, 'spent', int(cost))
      else
        redis.call('HINCRBY', sess, 'calls', -1)  -- refused after admission: it never was a call
      end
    end
  end
end
return 1
"""
)

#: KEYS: in-flight sets. ARGV: now|'', lease ms, then (key index, rid) pairs.
RENEW = (
    _COMMON
    + r"""
local now = clock(ARGV[1])
local lease = num(ARGV[2])
for i = 3, #ARGV, 2 do
  local key = KEYS[tonumber(ARGV[i])]
  redis.call('ZADD', key, 'XX', now + lease, ARGV[i + 1])
end
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('PEXPIRE', KEYS[i], int(lease * 2)) end
end
return 1
"""
)

#: KEYS: pause, win, winv, sums, loop, loopn. ARGV: now|''.
#: Reply: the pause that was lifted as {reason, at_ms, until_ms|-1, k, v, ...}, or {} if none.
RESUME = (
    _COMMON
    + r"""
local now = clock(ARGV[1])
local p = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
if #p == 0 then return {} end
local h, ev = {}, {}
for i = 1, #p, 2 do
  h[p[i]] = p[i + 1]
  if string.sub(p[i], 1, 3) == 'ev:' then
    ev[#ev + 1] = string.sub(p[i], 4)
    ev[#ev + 1] = p[i + 1]
  end
end
local till = tonumber(h['till'])
if till and till <= now then return {} end
local out = {h['reason'], h['at'], till and int(till) or '-1'}
for i = 1, #ev do out[#out + 1] = ev[i] end
return out
"""
)

#: KEYS: pause. ARGV: now|''. Reply like RESUME's, without lifting anything.
PAUSE_INFO = (
    _COMMON
    + r"""
local now = clock(ARGV[1])
local p = redis.call('HGETALL', KEYS[1])
if #p == 0 then return {} end
local h, ev = {}, {}
for i = 1, #p, 2 do
  h[p[i]] = p[i + 1]
  if string.sub(p[i], 1, 3) == 'ev:' then
    ev[#ev + 1] = string.sub(p[i], 4)
    ev[#ev + 1] = p[i + 1]
  end
end
local till = tonumber(h['till'])
if till and till <= now then return {} end
local out = {h['reason'], h['at'], till and int(till) or '-1'}
for i = 1, #ev do out[#out + 1] = ev[i] end
return out
"""
)
