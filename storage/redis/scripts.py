"""The Lua scripts (``EVAL``; they run with the user's ACL permissions, so the
commands inside them, HGET HSET EXPIRE EXISTS ZREM RPUSH LPOP LREM, are granted too)."""

from __future__ import annotations

# claim_replay: KEYS[1] = mark hash; ARGV = claim id, ttl, topic1, high1, ...
# Returns the previous marks ("" = none). A retry of the same call (same claim id,
# e.g. redis-py re-sending after a lost reply) gets the same answer again.
CLAIM_LUA = """
local key = KEYS[1]
if redis.call('HGET', key, '\\0claim') == ARGV[1] then
  local prev = redis.call('HGET', key, '\\0prev')
  if prev then return cjson.decode(prev) end
end
local out = {}
for i = 3, #ARGV, 2 do
  local prev = redis.call('HGET', key, ARGV[i])
  if prev and tonumber(prev) >= tonumber(ARGV[i + 1]) then
    out[#out + 1] = prev
  else
    out[#out + 1] = prev or ''
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
  end
end
redis.call('HSET', key, '\\0claim', ARGV[1], '\\0prev', cjson.encode(out))
redis.call('EXPIRE', key, ARGV[2])
return out
"""

# single/sentinel topic clean-up: KEYS[1] = a topic's zset, KEYS[2] = topic index, ARGV[1] = topic
REMOVE_TOPIC_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.call('ZREM', KEYS[2], ARGV[1])
end
return 0
"""

# The v2 pending-replay registry (bookkeeping.py): each call leaves a record, so that
# a re-send of it (redis-py, after a lost reply) changes nothing.
# register: KEYS[1] = registry list, KEYS[2] = the call's record; ARGV = list ttl,
# record ttl, ids. A record that exists means this call ran (or was undone) already.
REGISTER_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
for i = 3, #ARGV do redis.call('RPUSH', KEYS[1], ARGV[i]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'n', #ARGV - 2)
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

# undo a register (same keys and ARGV): remove what the call added, once; before the
# call ran (a send still on its way), leave a record that makes it change nothing
UNDO_LUA = """
if redis.call('HGET', KEYS[2], 'n') ~= '0' then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    for i = #ARGV, 3, -1 do redis.call('LREM', KEYS[1], -1, ARGV[i]) end
  end
  redis.call('HSET', KEYS[2], 'n', 0)
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

# take: KEYS[1] = registry list, KEYS[2] = the call's record; ARGV[1] = record ttl.
# The first run pops and records what it popped; a re-send answers that. A take that
# found nothing (an application's own REST publish, the common case) writes no record:
# a re-send of it could at worst take an entry registered meanwhile, whose replay is
# then stored once more (a duplicate, never a loss).
TAKE_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return redis.call('HGET', KEYS[2], 'v') end
local v = redis.call('LPOP', KEYS[1])
if not v then return '' end
redis.call('HSET', KEYS[2], 'v', v)
redis.call('EXPIRE', KEYS[2], ARGV[1])
return v
"""
