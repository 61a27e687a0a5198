"""Where a job stands in its model's queue and when it will start: the Lua shared by the
admit script (``queue.jobs``: predictive admission, Retry-After, a fair share of places) and
the position script (``queue.readings``: a waiting job's position and ETA).

The model: a worker serves the highest band first, and within a band its keys in turn (one
job each, least recently served first: ``PICK``). So the ``k``-th waiting job of a key in a
band starts after every waiting job of the bands above, its own key's ``k - 1`` before it,
and up to ``k`` jobs of each other key in the band. Slots free one at a time: with ``C``
slots busy and ``D`` the model's service time (how long one job holds a slot, smoothed over
its completed jobs, kept in ``model_service_key`` by the workers), one frees every ``D / C``
on average, so the ``p``-th job in line starts in about ``p * D / C`` (0 while a slot is
free). Before any job of the model completed, ``D`` is unknown: no ETA, no prediction.
"""

from __future__ import annotations

from llmq.shared.protocol import Band
from llmq.shared.queue import names

# Lua constants the snippets below need (add them to a script's consts).
QUEUE_CONSTS: dict[str, str | int | tuple[str, ...]] = {
    "BANDS": tuple(b.value for b in Band),  # highest first
    "SEP": names.BAND_QUEUE_SEP,
    "BATCH_JOB_PREFIX": names.BATCH_JOB_PREFIX,
}

# queue_view(prefix, band, tenant, k): jobs ahead of the k-th waiting job (1-based) of
# ``tenant`` in ``band``; all waiting jobs of the model; the key holding the most waiting
# jobs, with that count; and each key's count.
# eta(position, waiting, admitted, capacity, service_ms): ms until the job at ``position``
# (1-based) in line starts; -1 when unknown (no service time yet, or no slot at all).
QUEUE_LUA = """
local function queue_view(prefix, band, tenant, k)
  local ahead, waiting, before = 0, 0, true
  local per_key, top_key, top = {}, '', 0
  for _, b in ipairs(BANDS) do
    local index = prefix .. b
    for _, t in ipairs(redis.call('ZRANGE', index, 0, -1)) do
      local q = redis.call('ZCARD', index .. SEP .. t)
      waiting = waiting + q
      if before then
        if b ~= band then ahead = ahead + q
        elseif t ~= tenant then ahead = ahead + math.min(q, k) end
      end
      per_key[t] = (per_key[t] or 0) + q
    end
    if b == band then before = false end
  end
  for t, q in pairs(per_key) do
    if q > top then top_key, top = t, q end
  end
  return ahead + k - 1, waiting, top_key, top, per_key
end

local function eta(position, waiting, admitted, capacity, service_ms)
  if service_ms <= 0 or capacity <= 0 then return -1 end
  local free = capacity - (admitted - waiting)
  if position <= free then return 0 end
  return math.floor((position - math.max(free, 0)) * service_ms / capacity)
end
"""
