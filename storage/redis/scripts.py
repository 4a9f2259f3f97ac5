"""The two Lua scripts (``EVAL``; they run with the user's ACL permissions, so the
commands inside them, HGET HSET EXPIRE EXISTS ZREM, are granted too)."""

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
