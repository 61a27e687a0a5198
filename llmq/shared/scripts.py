"""The Lua scripts behind ``shared.store``: every multi-key step that must be atomic.

Times come from Redis' own clock (``TIME``), so hosts with different clocks agree. Scripts
that build key names inside Lua (a worker's records, a tenant's queue) need one Redis, not
a cluster: the deployment has one Redis with AOF. KEYS/ARGV are listed above each script;
``Store`` is the only caller.
"""

from __future__ import annotations

NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000)\n"

# A token bucket holding up to ``cap`` units, refilled continuously at cap per minute
# (60 000 ms): what rpm and tpm limits are measured with. cap 0 = unlimited. Returns
# ok (1/0), tokens left (after taking ``cost`` when ok), ms until ``cost`` fits (when not),
# ms until the bucket is full again.
_BUCKET = """
local function bucket(key, cap, cost, take)
  if cap <= 0 then return 1, -1, 0, 0 end
  local h = redis.call('HMGET', key, 't', 'ts')
  local tokens = tonumber(h[1]) or cap
  local ts = tonumber(h[2]) or now
  tokens = math.min(cap, tokens + (now - ts) * cap / 60000)
  cost = math.min(cost, cap)
  local ok = tokens >= cost
  if ok and take then
    tokens = tokens - cost
    redis.call('HSET', key, 't', tokens, 'ts', now)
    redis.call('PEXPIRE', key, 120000)
  end
  local wait = 0
  if not ok then wait = math.ceil((cost - tokens) * 60000 / cap) end
  return ok and 1 or 0, math.floor(tokens), wait, math.ceil((cap - tokens) * 60000 / cap)
end
"""

# KEYS: admitted, queue, job key, tenant admitted, tenant rpm bucket, tenant tpm bucket,
# band index, band queue of the tenant, stored record, idempotency key, the tenant's index
# of stored jobs.
# ARGV: limit, hold_ms, payload, expire_ms, job_id, score_ms, wake channel, tenant,
# max_concurrent, rpm, tpm, token estimate, store ttl ms (0: not stored), idempotency value
# ("": no key), the stored index's horizon ms (older entries are dropped: their records
# are gone), then the stored record's field/value pairs.
# Returns {status, N, rpm left, rpm reset ms, tpm left, tpm reset ms, retry ms}; status 1
# admitted, 0 global bound reached, -1 duplicate id, 2 tenant concurrency, 3 rpm, 4 tpm,
# -2 the idempotency key is taken (an 8th element: its value, "<job id> <body digest>").
# An idempotent retry is answered before any limit: it starts nothing.
# Per-key limits are checked first (the tenant's own), then the global bound; tokens are
# taken from the buckets only when the job is admitted.
# Nothing is written before the decision, and the first write (a bucket HSET or a ZADD) is
# one that Redis refuses when over maxmemory. Redis refuses a script's first write whole,
# but lets every later one through, so a full Redis refuses admissions (503) with nothing
# written. (The expired-place cleanup used to come first: that deletion let admissions grow
# a full Redis without bound.) Expired places are not counted, and removed after the ZADDs.
ADMIT = (
    NOW
    + _BUCKET
    + """
local live = '(' .. now
local n = redis.call('ZCOUNT', KEYS[1], live, '+inf')
local rpm, tpm, cost = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
local r_ok, r_left, r_wait, r_reset = bucket(KEYS[5], rpm, 1, false)
local t_ok, t_left, t_wait, t_reset = bucket(KEYS[6], tpm, cost, false)
local function answer(status, retry)
  return {status, n, r_left, r_reset, t_left, t_reset, retry}
end
if ARGV[14] ~= '' then
  local prior = redis.call('GET', KEYS[10])
  if prior then
    local a = answer(-2, 0)
    table.insert(a, prior)
    return a
  end
end
local maxc = tonumber(ARGV[9])
if maxc > 0 and redis.call('ZCOUNT', KEYS[4], live, '+inf') >= maxc then return answer(2, 0) end
if r_ok == 0 then return answer(3, r_wait) end
if t_ok == 0 then return answer(4, t_wait) end
if n >= tonumber(ARGV[1]) then return answer(0, 0) end
if redis.call('EXISTS', KEYS[3]) == 1 then return answer(-1, 0) end
r_ok, r_left, r_wait, r_reset = bucket(KEYS[5], rpm, 1, true)
t_ok, t_left, t_wait, t_reset = bucket(KEYS[6], tpm, cost, true)
local deadline = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], deadline, ARGV[5])
redis.call('ZADD', KEYS[4], deadline, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
redis.call('ZADD', KEYS[8], ARGV[6], ARGV[5])
redis.call('ZADD', KEYS[7], 'NX', 0, ARGV[8])
local ttl = tonumber(ARGV[13])
if ttl > 0 then
  redis.call('HSET', KEYS[9], unpack(ARGV, 16))
  redis.call('PEXPIRE', KEYS[9], ttl)
  redis.call('ZADD', KEYS[11], ARGV[6], ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[11], '-inf', tonumber(ARGV[6]) - tonumber(ARGV[15]))
  if ARGV[14] ~= '' then redis.call('SET', KEYS[10], ARGV[14], 'PX', ttl) end
end
redis.call('PUBLISH', ARGV[7], ARGV[5])
n = n + 1
return answer(1, 0)
"""
)

# KEYS: admitted, queue, job key, in-progress key, abort, tenant admitted, band queue,
# outcome key, stored record, event log. ARGV: job_id, now_ms, wake channel, outcome
# record, outcome ttl ms, events channel, the out-of-band error event telling why, the
# stored status it leaves, store ttl ms, "1" to leave a running job alone.
# Not started -> removed everywhere, it can never run (1); whoever follows its events (a
# resumed stream) gets the error event, and a stored job's record and log say so. Running ->
# arq abort requested (0): its worker ends it; or left alone (2).
CANCEL = """
if redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('DEL', KEYS[3])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
  redis.call('ZREM', KEYS[7], ARGV[1])
  redis.call('SET', KEYS[8], ARGV[4], 'PX', ARGV[5])
  local status = redis.call('HGET', KEYS[9], 'status')
  if status == 'queued' then
    redis.call('HSET', KEYS[9], 'status', ARGV[8])
    redis.call('XADD', KEYS[10], '*', 'e', ARGV[7])
    redis.call('PEXPIRE', KEYS[9], ARGV[9])
    redis.call('PEXPIRE', KEYS[10], ARGV[9])
  end
  if status == false or status == 'queued' then redis.call('PUBLISH', ARGV[6], ARGV[7]) end
  return 1
end
if ARGV[10] == '1' then return 2 end
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 0
"""

# KEYS: admitted, tenant admitted, the worker's jobs, stored record, job key (arq's payload).
# ARGV: job_id, hold_ms, tenant. A job starts: re-arm its deadlines (self-healing N) and
# record which worker runs it, and for whom (what the reaper needs if the worker dies); a
# stored job is in progress. Its payload, which expired QUEUE_TIMEOUT_S after the enqueue
# (a job that never starts never runs), now lives as long as the job may run (arq deletes
# it when the job ends): what operators read (llmq-jobs show, GET arq:job:<id>) is there
# while the job runs. A longer expiry (a batch request's window) is kept.
START = (
    NOW
    + """
if redis.call('HGET', KEYS[4], 'status') == 'queued' then
  redis.call('HSET', KEYS[4], 'status', 'in_progress')
end
local keep = tonumber(ARGV[2]) + 10000  -- arq's own job timeout is the hold + 5 s
local ttl = redis.call('PTTL', KEYS[5])
if ttl >= 0 and ttl < keep then redis.call('PEXPIRE', KEYS[5], keep) end
local deadline = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], 'XX', deadline, ARGV[1])
return redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[1])
"""
)

# KEYS: admitted, tenant admitted, the worker's jobs, tenant tpm bucket, outcome key,
# stored record, event log.
# ARGV: job_id, tokens used beyond the admission estimate (may be negative), tpm, outcome
# record, outcome ttl ms, stored status ("": not stored), store ttl ms.
# A job ended, whatever the outcome: its places go, the tenant's token bucket is corrected
# with the exact usage; a stored job's record and log are kept STORE_TTL_S from now.
RELEASE = (
    NOW
    + """
if ARGV[6] ~= '' and redis.call('EXISTS', KEYS[6]) == 1 then
  redis.call('HSET', KEYS[6], 'status', ARGV[6])
  redis.call('PEXPIRE', KEYS[6], ARGV[7])
  redis.call('PEXPIRE', KEYS[7], ARGV[7])
end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[5])
local cap, extra = tonumber(ARGV[3]), tonumber(ARGV[2])
if cap > 0 and extra ~= 0 then
  local h = redis.call('HMGET', KEYS[4], 't', 'ts')
  local tokens = (tonumber(h[1]) or cap) + (now - (tonumber(h[2]) or now)) * cap / 60000
  redis.call('HSET', KEYS[4], 't', math.min(cap, math.min(cap, tokens) - extra), 'ts', now)
  redis.call('PEXPIRE', KEYS[4], 120000)
end
return redis.call('ZREM', KEYS[1], ARGV[1])
"""
)

# KEYS: admitted, tenant admitted, the worker's jobs, queue, job key, in-progress key,
# outcome key. ARGV: job_id, outcome record, outcome ttl ms. A job that ended while Redis
# was unreachable: every trace arq and the worker could not remove.
FORGET = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('SET', KEYS[7], ARGV[2], 'PX', ARGV[3])
return redis.call('DEL', KEYS[5], KEYS[6])
"""

# KEYS: workers index, admitted, queue. ARGV: worker key prefix, worker-jobs prefix, job key
# prefix, in-progress prefix, events prefix, the out-of-band error event's head ("0 error "),
# its JSON body, tenant key prefix, outcome key prefix, outcome record, outcome ttl ms,
# stored record prefix, event log prefix, store ttl ms, batch job id prefix, batch key
# prefix.
# Workers whose heartbeat expired are dead: each job they had started loses its places,
# queue entry, in-progress marker and payload (it never runs again: at most once), gets the
# outcome record worker_lost, and its client is told (an out-of-band error event, logged
# too for a stored job, whose status becomes failed; a batch request gets a worker_lost
# error line in its batch, counted as failed, and is not run again).
# Idempotent; any process may run it. Returns {dead worker ids..., reaped job count}.
REAP = (
    NOW
    + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
local jobs = 0
for _, w in ipairs(dead) do
  local records = ARGV[2] .. w
  local pairs_ = redis.call('HGETALL', records)
  for i = 1, #pairs_, 2 do
    local id, tenant = pairs_[i], pairs_[i + 1]
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', ARGV[8] .. tenant .. ':admitted', id)
    redis.call('ZREM', KEYS[3], id)
    local bid, index = string.match(id, '^' .. ARGV[15] .. '(.+)_(%d+)$')
    if bid and redis.call('SREM', ARGV[16] .. bid .. ':inflight', id) == 1 then
      local custom = ''
      local payload = redis.call('GET', ARGV[3] .. id)
      if payload then
        local ok, job = pcall(cjson.decode, payload)
        if ok then custom = job['a'][1]['custom_id'] or '' end
      end
      local line = cjson.encode({id = id, custom_id = custom, response = cjson.null,
        error = {code = 'worker_lost', message = 'the worker running it stopped'}})
      redis.call('HSET', ARGV[16] .. bid .. ':err', index, line)
      redis.call('HINCRBY', ARGV[16] .. bid, 'failed', 1)
    end
    redis.call('DEL', ARGV[3] .. id, ARGV[4] .. id)
    redis.call('SET', ARGV[9] .. id, ARGV[10], 'PX', ARGV[11])
    redis.call('PUBLISH', ARGV[5] .. id, ARGV[6] .. ARGV[7])
    if redis.call('EXISTS', ARGV[12] .. id) == 1 then
      redis.call('HSET', ARGV[12] .. id, 'status', 'failed')
      redis.call('XADD', ARGV[13] .. id, '*', 'e', ARGV[6] .. ARGV[7])
      redis.call('PEXPIRE', ARGV[12] .. id, ARGV[14])
      redis.call('PEXPIRE', ARGV[13] .. id, ARGV[14])
    end
    jobs = jobs + 1
  end
  redis.call('DEL', records, ARGV[1] .. w)
  redis.call('ZREM', KEYS[1], w)
end
table.insert(dead, jobs)
return dead
"""
)

# KEYS: queue. ARGV: in-progress prefix, job key prefix, band key prefix, now_ms, limit,
# in-progress ms, bands from the highest. Up to ``limit`` waiting jobs to start: the highest
# non-empty band first; within a band, the tenant served least recently (scores are a
# counter, llmq:band:served, so ties cannot happen; a tenant that just got work queued
# counts as never served: score 0), that tenant's oldest job. Jobs that expired, already
# run or left the queue are dropped on the way. Each job returned is claimed in the same
# step (arq's in-progress key, as arq's start_jobs would set it in four round trips of its
# own). Returns {id, queue score, id, queue score, ...}. (The queue score is the gateway's
# enqueue time: unlike arq, never compared with now, as nothing here is deferred and the
# gateway's clock may be ahead of the worker's; a job dropped for that was lost.)
PICK = """
local out = {}
local limit = tonumber(ARGV[5]) * 2
for b = 7, #ARGV do
  local index = ARGV[3] .. ARGV[b]
  while #out < limit do
    local first = redis.call('ZRANGE', index, 0, 0)
    if #first == 0 then break end
    local tenant = first[1]
    local queue = index .. ':' .. tenant
    local head = redis.call('ZRANGE', queue, 0, 0)
    if #head > 0 then
      local id = head[1]
      redis.call('ZREM', queue, id)
      local score = tonumber(redis.call('ZSCORE', KEYS[1], id))
      if score and redis.call('EXISTS', ARGV[2] .. id) == 1
          and redis.call('EXISTS', ARGV[1] .. id) == 0 then
        redis.call('PSETEX', ARGV[1] .. id, ARGV[6], '1')
        table.insert(out, id)
        table.insert(out, score)
        redis.call('ZADD', index, 'XX', redis.call('INCR', ARGV[3] .. 'served'), tenant)
      end
    end
    if redis.call('ZCARD', queue) == 0 then redis.call('ZREM', index, tenant) end
  end
  if #out >= limit then break end
end
return out
"""

# ARGV: band key prefix, bands. Waiting jobs per band (as many numbers as bands).
DEPTH_BY_BAND = """
local out = {}
for b = 2, #ARGV do
  local index = ARGV[1] .. ARGV[b]
  local waiting = 0
  for _, tenant in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    waiting = waiting + redis.call('ZCARD', index .. ':' .. tenant)
  end
  table.insert(out, waiting)
end
return out
"""

# KEYS: worker hash, workers index. ARGV: worker_id, ttl_ms, field, value, field, value, ...
HEARTBEAT = (
    NOW
    + """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)

# KEYS: workers index. ARGV: worker key prefix. Hashes of live workers (expired ones are left
# in the index for the reaper, which needs them to find their jobs).
LIVE_WORKERS = (
    NOW
    + """
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
  local h = redis.call('HGETALL', ARGV[1] .. id)
  if #h > 0 then table.insert(out, h) end
end
return out
"""
)

# KEYS: queue. ARGV: in-progress prefix, scan limit. Jobs in the queue that are not running.
QUEUE_DEPTH = """
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local waiting = 0
for _, id in ipairs(ids) do
  if redis.call('EXISTS', ARGV[1] .. id) == 0 then waiting = waiting + 1 end
end
return waiting
"""
