-- KEYS: used   ARGV: images, ttl  (usage spooled during an outage, added on recovery)
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return n
