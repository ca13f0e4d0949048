"""The job queue's Lua scripts: every change of a job's state is one of these.

Redis runs a script atomically, so a job id is always in exactly one of the `queue`,
`running` and `ended` sets even when a worker dies between two commands. Each script
starts with a header naming its KEYS and ARGV slots, so a reader never guesses one.

Redis hands every ARGV over as a string: an attempt compares equal to the `attempts`
field of the hash only as text ("3" == "3").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The fencing check, written once and put in front of every script that acts for one
# attempt of a running job. A worker presumed dead (its heartbeat deadline passed, the job
# was re-queued and claimed again) that comes back must not change the job: it no longer
# matches the owner the claim recorded. Each such script has the job hash in KEYS[1],
# the worker id in ARGV[1] and the attempt in ARGV[2].
_OWNS_ATTEMPT = """
-- Fencing: changes nothing and returns 0 unless worker ARGV[1] runs attempt ARGV[2].
if redis.call('HGET', KEYS[1], 'state') ~= 'running'
   or redis.call('HGET', KEYS[1], 'worker_id') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2] then
  return 0
end
"""


def _fenced(script: str) -> str:
    """`script` with the fencing check between its header comment and its body."""
    lines = script.lstrip("\n").splitlines(keepends=True)
    body = next(i for i, line in enumerate(lines) if not line.startswith("--"))
    return "".join(lines[:body]) + _OWNS_ATTEMPT.lstrip("\n") + "".join(lines[body:])


CLAIM = """
-- Claim the next queued job for a worker, counting the attempt before the job runs.
-- KEYS[1] = queue (sorted set), KEYS[2] = running (sorted set by heartbeat deadline)
-- ARGV[1] = job key prefix, ARGV[2] = worker id, ARGV[3] = now, ARGV[4] = deadline
-- Returns the job id, or nil when the queue is empty.
while true do
  local ids = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #ids == 0 then return false end
  local id = ids[1]
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[1] .. id
  if redis.call('HGET', key, 'state') == 'queued' then
    -- Not HINCRBY: on a value that is not a number (a hand-edited hash) it would
    -- raise after ZREM, and a script error does not roll back: the job would be lost.
    local attempts = (tonumber(redis.call('HGET', key, 'attempts')) or 0) + 1
    redis.call('HSET', key, 'attempts', attempts, 'state', 'running', 'worker_id', ARGV[2],
               'started_at', ARGV[3], 'error', '', 'cancel_requested', '0')
    redis.call('ZADD', KEYS[2], ARGV[4], id)
    return id
  end
end
"""

HEARTBEAT = _fenced("""
-- Renew a running job's heartbeat deadline.
-- KEYS[1] = job hash, KEYS[2] = running
-- ARGV[1] = worker id, ARGV[2] = attempt, ARGV[3] = new deadline, ARGV[4] = job id
-- Returns 1, or 0 when fenced off.
redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[4])
return 1
""")

END = _fenced("""
-- End a running attempt: succeeded, failed or cancelled.
-- KEYS[1] = job hash, KEYS[2] = running, KEYS[3] = ended, KEYS[4] = job log
-- ARGV[1] = worker id, ARGV[2] = attempt, ARGV[3] = new state, ARGV[4] = now,
-- ARGV[5] = result TTL (s), ARGV[6] = job id, ARGV[7..] = field, value pairs to set
-- Returns 1, or 0 when fenced off.
local id = ARGV[6]
redis.call('ZREM', KEYS[2], id)
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'ended_at', ARGV[4])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[3], ARGV[4], id)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[4], ARGV[5])
return 1
""")

REQUEUE_OWN = _fenced("""
-- Give a running attempt back to the queue (graceful worker shutdown, or a job process
-- killed by a signal).
-- KEYS[1] = job hash, KEYS[2] = running, KEYS[3] = queue, KEYS[4] = wake list
-- ARGV[1] = worker id, ARGV[2] = attempt, ARGV[3] = job id,
-- ARGV[4] = refund ('1': the attempt does not count), ARGV[5] = reason (the job's error)
-- Returns 1, or 0 when fenced off.
redis.call('ZREM', KEYS[2], ARGV[3])
if ARGV[4] == '1' then redis.call('HINCRBY', KEYS[1], 'attempts', -1) end
redis.call('HSET', KEYS[1], 'state', 'queued', 'worker_id', '', 'error', ARGV[5])
redis.call('ZADD', KEYS[3], redis.call('HGET', KEYS[1], 'score'), ARGV[3])
redis.call('LPUSH', KEYS[4], ARGV[3])
return 1
""")

REAP = """
-- Re-queue running jobs whose heartbeat deadline passed; fail them once their attempts
-- are used up, or end them cancelled when a cancel was asked for.
-- KEYS[1] = running, KEYS[2] = queue, KEYS[3] = ended, KEYS[4] = wake list
-- ARGV[1] = job key prefix, ARGV[2] = now, ARGV[3] = result TTL (s), ARGV[4] = log prefix
-- Returns a flat list of job id, action ('requeued', 'failed' or 'cancelled') pairs.
local out = {}
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[1] .. id
  if redis.call('HGET', key, 'state') == 'running' then
    local attempts = tonumber(redis.call('HGET', key, 'attempts'))
    local max = tonumber(redis.call('HGET', key, 'max_attempts'))
    local worker = redis.call('HGET', key, 'worker_id')
    if redis.call('HGET', key, 'cancel_requested') == '1' then
      redis.call('HSET', key, 'state', 'cancelled', 'ended_at', ARGV[2],
                 'error', 'cancelled; its worker ' .. worker .. ' stopped answering')
      redis.call('ZADD', KEYS[3], ARGV[2], id)
      redis.call('EXPIRE', key, ARGV[3])
      redis.call('EXPIRE', ARGV[4] .. id, ARGV[3])
      table.insert(out, id); table.insert(out, 'cancelled')
    elseif attempts >= max then
      redis.call('HSET', key, 'state', 'failed', 'ended_at', ARGV[2], 'error',
                 'worker ' .. worker .. ' stopped sending heartbeats (killed or out of memory)'
                 .. ' on attempt ' .. attempts .. ' of ' .. max .. '; giving up')
      redis.call('ZADD', KEYS[3], ARGV[2], id)
      redis.call('EXPIRE', key, ARGV[3])
      redis.call('EXPIRE', ARGV[4] .. id, ARGV[3])
      table.insert(out, id); table.insert(out, 'failed')
    else
      redis.call('HSET', key, 'state', 'queued', 'worker_id', '', 'error',
                 'attempt ' .. attempts .. ' lost: worker ' .. worker
                 .. ' stopped sending heartbeats')
      redis.call('ZADD', KEYS[2], redis.call('HGET', key, 'score'), id)
      redis.call('LPUSH', KEYS[4], id)
      table.insert(out, id); table.insert(out, 'requeued')
    end
  end
end
return out
"""

CANCEL = """
-- Cancel a job: a queued one ends now; a running one is flagged for its worker to stop.
-- KEYS[1] = queue, KEYS[2] = ended, KEYS[3] = job hash, KEYS[4] = job log
-- ARGV[1] = job id, ARGV[2] = now, ARGV[3] = result TTL (s)
-- Returns 'cancelled' (it was queued), 'cancelling' (it runs), 'ended:' .. state for a job
-- that already ended, or nil for no such job.
local state = redis.call('HGET', KEYS[3], 'state')
if not state then return false end
if state == 'queued' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HSET', KEYS[3], 'state', 'cancelled', 'ended_at', ARGV[2],
             'error', 'cancelled while queued')
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('EXPIRE', KEYS[4], ARGV[3])
  return 'cancelled'
elseif state == 'running' then
  redis.call('HSET', KEYS[3], 'cancel_requested', '1')
  return 'cancelling'
end
return 'ended:' .. state
"""

RETRY = """
-- Put an ended (failed or cancelled) job back in the queue with fresh attempts.
-- KEYS[1] = ended, KEYS[2] = queue, KEYS[3] = wake list, KEYS[4] = job hash,
-- KEYS[5] = job log
-- ARGV[1] = job id
-- Returns 1, the job's state when it is neither failed nor cancelled, or nil for no job.
local state = redis.call('HGET', KEYS[4], 'state')
if not state then return false end
if state ~= 'failed' and state ~= 'cancelled' then return state end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('PERSIST', KEYS[4])
redis.call('PERSIST', KEYS[5])
redis.call('HSET', KEYS[4], 'state', 'queued', 'attempts', '0', 'error', '', 'worker_id', '',
           'ended_at', '', 'started_at', '', 'cancel_requested', '0', 'result', '',
           'progress', '{"stage":"queued","fraction":0.0,"message":""}')
redis.call('ZADD', KEYS[2], redis.call('HGET', KEYS[4], 'score'), ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Scripts:
    """The scripts registered on one Redis client (each is sent once, then run by SHA)."""

    claim: Any
    heartbeat: Any
    end: Any
    requeue_own: Any
    reap: Any
    cancel: Any
    retry: Any

    @classmethod
    def register(cls, client: Any) -> Scripts:
        return cls(
            claim=client.register_script(CLAIM),
            heartbeat=client.register_script(HEARTBEAT),
            end=client.register_script(END),
            requeue_own=client.register_script(REQUEUE_OWN),
            reap=client.register_script(REAP),
            cancel=client.register_script(CANCEL),
            retry=client.register_script(RETRY),
        )
