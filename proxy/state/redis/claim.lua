-- KEYS: task, claim, pending   ARGV: ttl, value, task_id, at ('' = counted: not pending)
-- -> 1 claimed now, 0 claimed before, -1 no such task
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EX', ARGV[1]) then
  -- The very same claim (owner and time): this call retried after its reply was lost.
  if #ARGV[2] > 1 and redis.call('GET', KEYS[2]) == ARGV[2] then return 1 end
  return 0
end
if ARGV[4] ~= '' then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3]) end
return 1
