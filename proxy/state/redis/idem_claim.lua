-- KEYS: entry   ARGV: fingerprint, token, lease_until, ttl_ms
-- -> {} claimed now (or already by this token: a retried call); else
--    {fingerprint, lease_until, answer or ''}
local found = redis.call('HMGET', KEYS[1], 'fp', 'lease', 'answer', 'token')
if found[1] then
  if found[4] == ARGV[2] then return {} end
  return {found[1], found[2], found[3] or ''}
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'token', ARGV[2], 'lease', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {}
