-- KEYS: rpm, conc, resv, resvn, resvs, used_d, used_m
--   resvs: token -> images reserved, and their sum in field '#' (kept by every script that
--   changes it, so admission reads one field); resvn: the same without a sum, as gateways
--   before the sum wrote it (read while it drains, during and after a rolling update)
-- ARGV: rpm_limit, conc_limit, day_limit, month_limit (-1: none), images, token,
--       lease_ms, window_ms, hold_ms
-- -> {code (0 admitted, else _LIMIT_CODES), now_ms, recent, oldest_ms, inflight,
--     used_d, used_m, reserved}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm_limit, conc_limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local day_limit, month_limit = tonumber(ARGV[3]), tonumber(ARGV[4])
local images, token = tonumber(ARGV[5]), ARGV[6]
local lease, window, hold = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  redis.call('HDEL', KEYS[4], unpack(expired))
  local freed = 0
  for _, v in ipairs(redis.call('HMGET', KEYS[5], unpack(expired))) do
    if v then freed = freed + tonumber(v) end
  end
  if freed > 0 then
    redis.call('HDEL', KEYS[5], unpack(expired))
    redis.call('HINCRBY', KEYS[5], '#', -freed)
  end
end
local recent = redis.call('ZCARD', KEYS[1])
local oldest = -1
if recent > 0 then oldest = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]) end
local inflight = redis.call('ZCARD', KEYS[2])
local used_d = tonumber(redis.call('GET', KEYS[6]) or '0')
local used_m = tonumber(redis.call('GET', KEYS[7]) or '0')
local reserved = tonumber(redis.call('HGET', KEYS[5], '#') or '0')
if redis.call('HLEN', KEYS[4]) > 0 then
  for _, v in ipairs(redis.call('HVALS', KEYS[4])) do reserved = reserved + tonumber(v) end
end
local code = 0
if rpm_limit >= 0 and recent >= rpm_limit then code = 1
elseif conc_limit >= 0 and inflight >= conc_limit then code = 2
elseif day_limit >= 0 and used_d + reserved + images > day_limit then code = 3
elseif month_limit >= 0 and used_m + reserved + images > month_limit then code = 4
end
if code == 0 then
  if rpm_limit >= 0 then
    redis.call('ZADD', KEYS[1], now, token)
    redis.call('PEXPIRE', KEYS[1], window)
  end
  redis.call('ZADD', KEYS[2], now + lease, token)
  redis.call('PEXPIRE', KEYS[2], lease)
  if images > 0 and (day_limit >= 0 or month_limit >= 0) then
    redis.call('ZADD', KEYS[3], now + lease, token)
    local prior = tonumber(redis.call('HGET', KEYS[5], token) or '0')
    redis.call('HSET', KEYS[5], token, images)
    redis.call('HINCRBY', KEYS[5], '#', images - prior)
    redis.call('PEXPIRE', KEYS[3], hold)
    redis.call('PEXPIRE', KEYS[5], hold)
  end
end
return {code, now, recent, oldest, inflight, used_d, used_m, reserved}
