-- wrk script: stop after N responses (env N, default 20000), so a profile under valgrind or
-- strace covers a known number of requests. wrk still waits out -d; only the count matters.
-- Usage: N=20000 wrk -t1 -c8 -d120s -s bench/fixed-count.lua http://127.0.0.1:PORT/seldon-deploy/api/v1alpha1/x
local seen = 0
local limit = tonumber(os.getenv("N") or "20000")

function response(status, headers, body)
	seen = seen + 1
	if seen >= limit then
		wrk.thread:stop()
	end
end
