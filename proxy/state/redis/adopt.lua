-- One spooled task handed to Redis, with the claim it carries, in one step.
-- KEYS: task, index, reconcile, claim, pending
-- ARGV: task_id, created_at, ttl, next_check ('' = none), status, final ('1' = no more
--       background polls), claim value ('' = none), claim at ('' = not pending),
--       field, value, ...
-- -> {1} written; {0, the claim in Redis} when another claim was there first
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 9))
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  local created = tonumber(ARGV[2])
  redis.call('ZADD', KEYS[2], created, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', created - tonumber(ARGV[3]))
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1]) end
else
  redis.call('HSET', KEYS[1], 'status', ARGV[5])
  if ARGV[6] == '1' then redis.call('ZREM', KEYS[3], ARGV[1]) end
end
local value = ARGV[7]
if value == '' then return {1} end
local have = redis.call('GET', KEYS[4])
if have and #value > 1 and string.sub(have, 2) == string.sub(value, 2) then
  -- this very claim, written by an earlier push that did not finish: keep the later state
  if string.sub(value, 1, 1) == 'd' then
    redis.call('SET', KEYS[4], value, 'EX', ARGV[3])
    redis.call('ZREM', KEYS[5], ARGV[1])
  end
  return {1}
end
if have then return {0, have} end
redis.call('SET', KEYS[4], value, 'EX', ARGV[3])
if ARGV[8] ~= '' then redis.call('ZADD', KEYS[5], ARGV[8], ARGV[1]) end
return {1}
