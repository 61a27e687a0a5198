"""A batch's scripts: feed its lines, record a result line once, end it."""

from __future__ import annotations

from llmq.shared import keys
from llmq.shared.batch_records import BatchStatus
from llmq.shared.lua import Script
from llmq.shared.protocol import Band

_BATCH = {"IN_PROGRESS": BatchStatus.IN_PROGRESS.value}

# Feed the next lines of a batch that is in progress and not ending, if nobody fed them
# first (its ``next`` still ``expected_next``): any worker may run the feeder, a line is
# enqueued once, into the lowest band of its own model's queue. ``jobs``: job id / payload /
# model triples. The models' workers are woken.
FEED = Script(
    keys=("batch", "inflight", "queue"),
    args=("expected_next", "new_next", "job_ttl_ms", "score_ms", "wake", "tenant", "job_prefix",
          "model_prefix"),
    rest="jobs",
    consts={**_BATCH, "BAND_PART": keys.BAND_PART, "SEP": keys.BAND_QUEUE_SEP,
            "LOW": Band.LOW.value, "WAKE_MODEL": keys.WAKE_MODEL},
    body="""
local b = redis.call('HMGET', batch, 'status', 'next', 'ending')
if b[1] ~= IN_PROGRESS or b[2] ~= expected_next or (b[3] and b[3] ~= '') then return 0 end
local n, woken = 0, {}
for i = 1, #jobs, 3 do
  local id, model = jobs[i], jobs[i + 2]
  local index = model_prefix .. model .. BAND_PART .. LOW
  redis.call('SET', job_prefix .. id, jobs[i + 1], 'PX', job_ttl_ms)
  redis.call('ZADD', queue, score_ms, id)
  redis.call('ZADD', index .. SEP .. tenant, score_ms, id)
  redis.call('ZADD', index, 'NX', 0, tenant)
  redis.call('SADD', inflight, id)
  woken[model] = true
  n = n + 1
end
redis.call('HSET', batch, 'next', new_next)
for model in pairs(woken) do redis.call('PUBLISH', wake, WAKE_MODEL .. model) end
return n
""",
)  # fmt: skip

# A batch request's result line (``ok`` "1": the output file's, "0": the error file's),
# recorded and counted once: only while the job is in the batch's inflight set.
RESULT = Script(
    keys=("batch", "out", "err", "inflight"),
    args=("job_id", "index", "line", "ok"),
    body="""
if redis.call('SREM', inflight, job_id) == 0 then return 0 end
if ok == '1' then
  redis.call('HSET', out, index, line)
  redis.call('HINCRBY', batch, 'completed', 1)
else
  redis.call('HSET', err, index, line)
  redis.call('HINCRBY', batch, 'failed', 1)
end
return 1
""",
)

# A batch still running stops being fed (``why``: cancelled or expired); a cancel also
# shows ``cancelling`` (since ``now_s``). Returns the status it leaves.
END = Script(
    keys=("batch",),
    args=("why", "now_s"),
    consts={
        **_BATCH,
        "VALIDATING": BatchStatus.VALIDATING.value,
        "CANCELLED": BatchStatus.CANCELLED.value,
        "CANCELLING": BatchStatus.CANCELLING.value,
    },
    body="""
local status = redis.call('HGET', batch, 'status')
if status ~= IN_PROGRESS and status ~= VALIDATING then return status end
local ending = redis.call('HGET', batch, 'ending')
if ending and ending ~= '' then return status end
redis.call('HSET', batch, 'ending', why)
if why == CANCELLED then
  redis.call('HSET', batch, 'status', CANCELLING, 'cancelling_at', now_s)
  return CANCELLING
end
return status
""",
)
