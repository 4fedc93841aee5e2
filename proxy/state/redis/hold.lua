-- KEYS: resv, resvn, resvs (see admit.lua)   ARGV: token, task_token, hold_ms
-- The request's reservation moves to its task, in the hash that holds it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hold = tonumber(ARGV[3])
local n = redis.call('HGET', KEYS[3], ARGV[1])
if n then
  -- the sum keeps n (moved, not freed), less what the task token held before, if anything
  local prior = tonumber(redis.call('HGET', KEYS[3], ARGV[2]) or '0')
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[2], n)
  if prior > 0 then redis.call('HINCRBY', KEYS[3], '#', -prior) end
  redis.call('PEXPIRE', KEYS[3], hold)
else
  n = redis.call('HGET', KEYS[2], ARGV[1])
  if not n then return 0 end
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HSET', KEYS[2], ARGV[2], n)
  redis.call('PEXPIRE', KEYS[2], hold)
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + hold, ARGV[2])
redis.call('PEXPIRE', KEYS[1], hold)
return 1
