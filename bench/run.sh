#!/usr/bin/env bash
# bench/run.sh: the benchmark behind issue 7 ("faster than nginx with a hard-coded header").
#
# Starts, on loopback ports, an nginx upstream that answers a small JSON body, nginx (and
# haproxy when installed) injecting a hard-coded Authorization header, the test IdP
# (tests/idp/keycloak-mock.js) and seldon-auth-proxy fetching real tokens from it with
# client_credentials. Then it runs wrk against the upstream directly, the peers and the proxy,
# interleaved over several rounds, and prints medians, ratios, the latency the 1-connection
# case adds, the CPU each proxy spends per request and the token requests the IdP saw.
# With --memory it measures the proxy's RSS instead: idle, at 1000 connections, and while
# 1 GiB streams through it each way.
#
# Everything it starts is stopped, and its temporary directory removed, when it exits.
# Run `bench/run.sh --help` for the options; bench/README.md has figures and how to read them.
set -euo pipefail

readonly API=/seldon-deploy/api/v1alpha1
readonly SMALL_PATH=$API/namespaces/staging/seldondeployments
readonly SMALL_BODY='{"kind":"SeldonDeploymentList","apiVersion":"machinelearning.seldon.io/v1","items":[]}'
readonly STATIC_TOKEN='eyJhbGciOiJSUzI1NiJ9.static.token'
readonly CLIENT_ID=sdk CLIENT_SECRET=s3cret
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO

usage() {
	cat <<'EOF'
Usage: bench/run.sh [options] [-- PROXY_FLAGS...]

Throughput and latency (default):
  -c N                connections for the throughput runs (default 64)
  -d SECONDS          length of each throughput run (default 5)
  -r ROUNDS           interleaved rounds (default 5)
  -1 SECONDS          length of each 1-connection run (default 3; 0 skips them)
  --variant 'FLAGS'   benchmark a proxy started with these extra flags; repeatable, all variants
                      run side by side in the same rounds (default: one proxy at its defaults)
  --no-haproxy        leave haproxy out even when installed
Memory:
  --memory            measure RSS instead: idle, peak at 1000 connections, 1 GiB up and down
  --memory-conns N    connections for the peak (default 1000)
Common:
  --hold              start everything, print the addresses and PIDs, and wait (for profiling
                      with perf or strace by hand); Ctrl-C stops it all
  --token-lifetime S  lifetime of the IdP's tokens, so refreshes happen during the run (default 60)
  --proxy-bin PATH    benchmark this binary instead of building target/release/seldon-auth-proxy
  --keep-logs DIR     copy the proxies' and servers' logs there before cleaning up
  PROXY_FLAGS         after --, added to every proxy variant (e.g. -- --workers 1)
EOF
}

# ---------------------------------------------------------------- options and prerequisites

conns=64 duration=5 rounds=5 one_conn_duration=3 memory_mode=0 memory_conns=1000
token_lifetime=60 proxy_bin='' use_haproxy=1 keep_logs='' hold=0
variants=() common_flags=()

parse_options() {
	while (($#)); do
		case $1 in
		-c) conns=$2; shift 2 ;;
		-d) duration=$2; shift 2 ;;
		-r) rounds=$2; shift 2 ;;
		-1) one_conn_duration=$2; shift 2 ;;
		--variant) variants+=("$2"); shift 2 ;;
		--no-haproxy) use_haproxy=0; shift ;;
		--memory) memory_mode=1; shift ;;
		--hold) hold=1; shift ;;
		--memory-conns) memory_conns=$2; shift 2 ;;
		--token-lifetime) token_lifetime=$2; shift 2 ;;
		--proxy-bin) proxy_bin=$2; shift 2 ;;
		--keep-logs) keep_logs=$2; shift 2 ;;
		-h | --help) usage; exit 0 ;;
		--) shift; common_flags=("$@"); break ;;
		*) echo "run.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
		esac
	done
	((${#variants[@]})) || variants=('')
	for n in "$conns" "$duration" "$rounds" "$one_conn_duration" "$memory_conns" "$token_lifetime"; do
		[[ $n =~ ^[0-9]+$ ]] || { echo "run.sh: $n is not a whole number" >&2; exit 2; }
	done
	((rounds > 0 && duration > 0 && conns > 0)) || { echo "run.sh: -c, -d and -r must be positive" >&2; exit 2; }
}

check_tools() {
	local missing=() tool
	for tool in nginx wrk curl node awk ss; do
		command -v "$tool" >/dev/null || missing+=("$tool")
	done
	if ((${#missing[@]})); then
		echo "run.sh: missing ${missing[*]}. On Debian/Ubuntu:" >&2
		echo "  apt-get update && apt-get install -y nginx wrk curl nodejs npm haproxy iproute2 gawk" >&2
		exit 2
	fi
	if ((use_haproxy)) && ! command -v haproxy >/dev/null; then
		echo "note: haproxy not installed (apt-get install -y haproxy); comparing with nginx only" >&2
		use_haproxy=0
	fi
	if [[ -z $proxy_bin ]] && ! command -v cargo >/dev/null; then
		echo "run.sh: cargo is needed to build the proxy (or pass --proxy-bin)" >&2
		exit 2
	fi
}

# Builds the release binary; cargo does nothing when it is up to date.
build_proxy() {
	if [[ -n $proxy_bin ]]; then
		[[ -x $proxy_bin ]] || { echo "run.sh: $proxy_bin is not executable" >&2; exit 2; }
		return
	fi
	echo "building the release binary (cargo build --release) ..." >&2
	(cd "$REPO" && cargo build --release --quiet)
	local target_dir=${CARGO_TARGET_DIR:-target}
	[[ $target_dir == /* ]] || target_dir=$REPO/$target_dir
	proxy_bin=$target_dir/release/seldon-auth-proxy
}

install_idp_dependencies() {
	if [[ ! -d $REPO/tests/idp/node_modules ]]; then
		echo "installing the test IdP's dependencies (npm ci in tests/idp) ..." >&2
		(cd "$REPO/tests/idp" && npm ci --no-audit --no-fund --silent)
	fi
}

# 1000 connections need 1000 sockets in wrk and about 2000 in the proxy.
raise_open_file_limit() {
	local hard
	hard=$(ulimit -Hn)
	[[ $hard == unlimited ]] && hard=65536
	((hard > 65536)) && hard=65536
	ulimit -n "$hard"
	if ((memory_mode && hard < 2 * memory_conns + 100)); then
		echo "run.sh: the open-file hard limit is $hard; $memory_conns connections need $((2 * memory_conns + 100)) (raise it: ulimit -Hn, limits.conf)" >&2
		exit 2
	fi
}

# ---------------------------------------------------------------- processes, ports and cleanup

work='' pids=() idp_fd=''
upstream_port='' nginx_port='' haproxy_port='' sink_port='' idp_port='' idp_issuer=''
upstream_pid='' nginx_pid='' haproxy_pid='' sampler_pid=''
proxy_ports=() admin_ports=() proxy_pids=()

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
	local pid
	[[ -n $idp_fd ]] && exec {idp_fd}>&-
	for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
	for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
	if [[ -n $work ]]; then
		if [[ -n $keep_logs ]] && mkdir -p "$keep_logs"; then
			cp "$work"/*.log "$work"/*.err "$keep_logs"/ 2>/dev/null || true
		fi
		rm -rf "$work"
	fi
}

picked_ports=' '
# Sets the variable named $1 to a free loopback port, never one picked before. Ports come from
# below the kernel's ephemeral range, so no outgoing connection (ours or anyone's) holds one.
# shellcheck disable=SC2034
pick_port() {
	local -n picked=$1 # a nameref: assigning it sets the caller's variable
	local candidate first last ephemeral_first ephemeral_last
	read -r ephemeral_first ephemeral_last </proc/sys/net/ipv4/ip_local_port_range
	if ((ephemeral_first > 12000)); then
		first=10000 last=$((ephemeral_first - 1))
	else
		first=$((ephemeral_last + 1)) last=65535
	fi
	while :; do
		candidate=$((first + RANDOM % (last - first + 1)))
		[[ $picked_ports == *" $candidate "* ]] && continue
		[[ -z $(ss -Htan "sport = :$candidate") ]] || continue
		picked_ports+="$candidate "
		picked=$candidate
		return
	done
}

# Waits until URL answers with the expected status code.
wait_for_http() {
	local url=$1 want=${2:-200} what=$3 i code
	for i in $(seq 300); do
		code=$(curl -s -o /dev/null -w '%{http_code}' "$url" || true)
		[[ $code == "$want" ]] && return 0
		sleep 0.1
	done
	echo "run.sh: $what did not answer $want at $url (last: $code)" >&2
	return 1
}

# The PIDs whose CPU time counts for a target: the process and its children (nginx workers).
process_tree() {
	local pid=$1
	echo "$pid"
	ps -o pid= --ppid "$pid" | tr -d ' '
}

# utime+stime of the given processes, in clock ticks (threads are included).
cpu_ticks() {
	local pid total=0 stat fields
	for pid in "$@"; do
		stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
		stat=${stat##*) } # fields from the 3rd on; utime and stime are the 14th and 15th
		read -r -a fields <<<"$stat"
		total=$((total + fields[11] + fields[12]))
	done
	echo "$total"
}

# ---------------------------------------------------------------- the servers

# nginx's directives shared by every instance: its files in the work directory, many sockets.
nginx_common() {
	local name=$1
	cat <<C
worker_rlimit_nofile $(ulimit -n); daemon off; pid $work/$name.pid; error_log $work/$name.err warn;
user $(id -un) $(id -gn);
C
}

nginx_temp_paths() {
	local name=$1
	mkdir -p "$work/$name-tmp"
	echo "client_body_temp_path $work/$name-tmp/body; proxy_temp_path $work/$name-tmp/proxy;
  fastcgi_temp_path $work/$name-tmp/fcgi; uwsgi_temp_path $work/$name-tmp/uwsgi; scgi_temp_path $work/$name-tmp/scgi;"
}

# The upstream: the small JSON body everywhere; in memory mode also a 1 GiB download (a
# sparse file) and an upload location streamed unbuffered to the sink.
start_upstream() {
	local extra=''
	if ((memory_mode)); then
		truncate -s 1G "$work/big"
		chmod 644 "$work/big"
		extra="
  location = $API/download { alias $work/big; default_type application/octet-stream; }
  location = $API/upload { client_max_body_size 0; proxy_request_buffering off; proxy_buffering off;
    proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_pass http://127.0.0.1:$sink_port; }"
	fi
	cat >"$work/upstream.conf" <<C
$(nginx_common upstream)
worker_processes 1;
events { worker_connections 8192; }
http { access_log off; $(nginx_temp_paths upstream)
  server { listen 127.0.0.1:$upstream_port backlog=4096; keepalive_requests 1000000;
  location = $API/whoami { default_type text/plain; return 200 '\$http_authorization'; }
  location / { default_type application/json; return 200 '$SMALL_BODY'; }$extra } }
C
	nginx -p "$work" -e "$work/upstream.err" -c "$work/upstream.conf" &
	pids+=($!) upstream_pid=$!
}

# The peer: nginx adding a hard-coded header, as in a hand-written sidecar.
start_nginx_proxy() {
	cat >"$work/nginx.conf" <<C
$(nginx_common nginx)
worker_processes 2;
events { worker_connections 8192; }
http { access_log off; $(nginx_temp_paths nginx)
  upstream u { server 127.0.0.1:$upstream_port; keepalive 128; keepalive_requests 1000000; }
  server { listen 127.0.0.1:$nginx_port backlog=4096; keepalive_requests 1000000;
  location $API/ { proxy_pass http://u; proxy_http_version 1.1;
    proxy_set_header Connection ""; proxy_set_header Authorization "Bearer $STATIC_TOKEN"; } } }
C
	nginx -p "$work" -e "$work/nginx.err" -c "$work/nginx.conf" &
	pids+=($!) nginx_pid=$!
}

start_haproxy() {
	cat >"$work/haproxy.cfg" <<C
global
  nbthread 2
  maxconn 8192
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend f
  bind 127.0.0.1:$haproxy_port
  http-request set-header Authorization "Bearer $STATIC_TOKEN"
  default_backend b
backend b
  http-reuse always
  server s1 127.0.0.1:$upstream_port
C
	haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
	pids+=($!) haproxy_pid=$!
}

# The upload sink behind the upstream: reads and drops the body, answers the byte count.
start_sink() {
	node -e '
		const http = require("node:http");
		http.createServer((req, res) => {
			let n = 0;
			req.on("data", (chunk) => { n += chunk.length; });
			req.on("end", () => { res.setHeader("content-type", "application/json"); res.end(JSON.stringify({ received: n })); });
		}).listen(Number(process.argv[1]), "127.0.0.1");
	' "$sink_port" >"$work/sink.log" 2>&1 &
	pids+=($!)
}

# The test IdP; it exits when its stdin (a fifo held open here) closes.
start_idp() {
	local config i
	config=$(printf '{"clients":[{"id":"%s","secret":"%s"}],"users":[{"username":"alice","password":"pw"}],"tokenLifetimeSeconds":%d}' \
		"$CLIENT_ID" "$CLIENT_SECRET" "$token_lifetime")
	mkfifo "$work/idp.stdin"
	node "$REPO/tests/idp/keycloak-mock.js" "$config" <"$work/idp.stdin" >"$work/idp.out" 2>"$work/idp.err" &
	pids+=($!)
	exec {idp_fd}>"$work/idp.stdin"
	for i in $(seq 300); do
		[[ -s $work/idp.out ]] && break
		sleep 0.1
	done
	idp_port=$(sed -n 's/.*"port":\([0-9]*\).*/\1/p' "$work/idp.out")
	[[ -n $idp_port ]] || { echo "run.sh: the IdP did not start:" >&2; cat "$work/idp.err" >&2; exit 1; }
	idp_issuer="http://127.0.0.1:$idp_port/auth/realms/test"
}

# Proxy variant I, with client_credentials against the IdP. Its fifo fd is not inherited.
start_proxy() {
	local i=$1 flags
	read -r -a flags <<<"${variants[$i]}"
	local port admin
	pick_port port
	pick_port admin
	proxy_ports[i]=$port admin_ports[i]=$admin
	env SELDON_AUTH_PROXY_CLIENT_SECRET="$CLIENT_SECRET" "$proxy_bin" serve \
		--upstream "http://127.0.0.1:$upstream_port" \
		--listen "127.0.0.1:${proxy_ports[$i]}" --admin-listen "127.0.0.1:${admin_ports[$i]}" \
		--oidc-server "$idp_issuer" --client-id "$CLIENT_ID" \
		"${common_flags[@]}" "${flags[@]}" >"$work/proxy$i.log" 2>&1 {idp_fd}>&- &
	pids+=($!) proxy_pids[i]=$!
}

proxy_label() {
	local text="${common_flags[*]} ${variants[$1]}"
	text=${text# } text=${text% }
	if [[ -z $text && ${#variants[@]} -eq 1 ]]; then echo proxy; else echo "proxy(${text:-defaults})"; fi
}

wait_for_proxies() {
	local i auth
	for i in "${!variants[@]}"; do
		if ! wait_for_http "http://127.0.0.1:${admin_ports[$i]}/readyz" 200 "$(proxy_label "$i")"; then
			tail -20 "$work/proxy$i.log" >&2
			exit 1
		fi
		auth=$(curl -sf "http://127.0.0.1:${proxy_ports[$i]}$API/whoami")
		if [[ $auth != "Bearer "* || $auth == *"$STATIC_TOKEN"* ]]; then
			echo "run.sh: $(proxy_label "$i") did not inject an IdP token (upstream saw: ${auth:-nothing})" >&2
			exit 1
		fi
	done
}

# Starts what every mode needs and fills targets: parallel arrays of label, port, CPU PIDs.
target_names=() target_ports=() target_cpu_pids=()
start_all() {
	work=$(mktemp -d)
	chmod 755 "$work"
	pick_port upstream_port
	pick_port nginx_port
	pick_port haproxy_port
	pick_port sink_port
	((memory_mode)) && start_sink
	start_upstream
	start_nginx_proxy
	((use_haproxy)) && start_haproxy
	start_idp
	local i
	for i in "${!variants[@]}"; do start_proxy "$i"; done

	wait_for_http "http://127.0.0.1:$upstream_port$SMALL_PATH" 200 "the upstream nginx"
	wait_for_http "http://127.0.0.1:$nginx_port$SMALL_PATH" 200 "the nginx proxy"
	((use_haproxy)) && wait_for_http "http://127.0.0.1:$haproxy_port$SMALL_PATH" 200 "haproxy"
	wait_for_proxies

	target_names=(direct) target_ports=("$upstream_port") target_cpu_pids=("$(process_tree "$upstream_pid" | xargs)")
	target_names+=(nginx) target_ports+=("$nginx_port") target_cpu_pids+=("$(process_tree "$nginx_pid" | xargs)")
	if ((use_haproxy)); then
		target_names+=(haproxy) target_ports+=("$haproxy_port") target_cpu_pids+=("$haproxy_pid")
	fi
	for i in "${!variants[@]}"; do
		target_names+=("$(proxy_label "$i")") target_ports+=("${proxy_ports[$i]}") target_cpu_pids+=("${proxy_pids[$i]}")
	done
}

# ---------------------------------------------------------------- measuring

# Runs wrk; prints "req/s p50_us p99_us requests errors" (errors: non-2xx and socket errors).
run_wrk() {
	local port=$1 connections=$2 seconds=$3 out
	out=$(wrk -t1 -c"$connections" -d"${seconds}s" --latency "http://127.0.0.1:$port$SMALL_PATH")
	awk '
		function us(v) {
			if (v ~ /us$/) return v + 0
			if (v ~ /ms$/) return v * 1000
			if (v ~ /m$/) return v * 60e6
			if (v ~ /s$/) return v * 1e6
			return v
		}
		/Requests\/sec/ { rps = $2 }
		$1 == "50%" { p50 = us($2) }
		$1 == "99%" { p99 = us($2) }
		/requests in/ { requests = $1 }
		/Non-2xx/ { errors += $NF }
		/Socket errors/ { gsub(/,/, ""); errors += $4 + $6 + $8 + $10 }
		END { printf "%s %.0f %.0f %d %d\n", rps, p50, p99, requests, errors + 0 }' <<<"$out"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
best() { sort -g | tail -1; }
lowest() { sort -g | head -1; }

# One line per target per round in $work/results/<kind>.<target index>: rps p50 p99 cpu_us_per_req errors
run_rounds() {
	local kind=$1 connections=$2 seconds=$3 round n=${#target_names[@]} k t before after
	local cpu_pids rps p50 p99 requests errors cpu_per_request
	mkdir -p "$work/results"
	for ((round = 1; round <= rounds; round++)); do
		printf '  round %d/%d:' "$round" "$rounds" >&2
		for ((k = 0; k < n; k++)); do
			t=$(((k + round - 1) % n)) # rotate the order so no target always runs first
			read -r -a cpu_pids <<<"${target_cpu_pids[$t]}"
			before=$(cpu_ticks "${cpu_pids[@]}")
			read -r rps p50 p99 requests errors < <(run_wrk "${target_ports[$t]}" "$connections" "$seconds")
			after=$(cpu_ticks "${cpu_pids[@]}")
			cpu_per_request=$(awk -v d=$((after - before)) -v hz="$(getconf CLK_TCK)" -v r="$requests" \
				'BEGIN { printf "%.1f", r ? d * 1e6 / hz / r : 0 }')
			echo "$rps $p50 $p99 $cpu_per_request $errors" >>"$work/results/$kind.$t"
			printf ' %s %.0f' "${target_names[$t]}" "$rps" >&2
		done
		echo >&2
	done
}

column_of() { awk -v c="$2" '{ print $c }' "$1"; }

# Median over rounds of column COL (1 req/s, 4 cpu us/req) of target X divided by that of Y,
# taken round by round so a slow round (someone else's build) cancels out.
median_ratio() {
	local kind=$1 x=$2 y=$3 col=${4:-1}
	paste -d' ' "$work/results/$kind.$x" "$work/results/$kind.$y" | awk -v c="$col" '$(c + 5) > 0 { print $c / $(c + 5) }' | median
}
median_difference() {
	local kind=$1 x=$2 y=$3 col=$4
	paste -d' ' "$work/results/$kind.$x" "$work/results/$kind.$y" | awk -v c="$col" '{ print $c - $(c + 5) }' | median
}

# The width of the target column: the longest label.
name_width() {
	local t width=8
	for t in "${target_names[@]}"; do ((${#t} > width)) && width=${#t}; done
	echo "$width"
}

report_throughput() {
	local t f errors w
	w=$(name_width)
	printf '\n%-*s %12s %12s %10s %10s %11s %7s\n' "$w" target 'median req/s' 'best req/s' 'p50 (us)' 'p99 (us)' 'cpu us/req' errors
	for t in "${!target_names[@]}"; do
		f=$work/results/load.$t
		errors=$(column_of "$f" 5 | awk '{ s += $1 } END { print s + 0 }')
		printf '%-*s %12.0f %12.0f %10.0f %10.0f %11.1f %7d\n' "$w" "${target_names[$t]}" \
			"$(column_of "$f" 1 | median)" "$(column_of "$f" 1 | best)" \
			"$(column_of "$f" 2 | median)" "$(column_of "$f" 3 | median)" "$(column_of "$f" 4 | median)" "$errors"
	done
	echo "(req/s best and median over rounds; p50/p99 median over rounds; cpu us/req: CPU time of the"
	echo " target's own processes per request, for direct the upstream nginx; errors: non-2xx and socket"
	echo " errors summed over rounds)"
	echo
	echo "ratios, median of per-round ratios:"
	for t in "${!target_names[@]}"; do
		((t < 2)) && continue
		printf '  %-*s req/s /nginx %.3f  /direct %.3f   cpu us/req /nginx %.2f\n' "$w" "${target_names[$t]}" \
			"$(median_ratio load "$t" 1)" "$(median_ratio load "$t" 0)" "$(median_ratio load "$t" 1 4)"
	done
}

report_one_connection() {
	local t w
	w=$(name_width)
	echo
	echo "1 connection ($rounds rounds x ${one_conn_duration}s): p50 added over direct, as the median of per-round"
	echo "differences and as the difference of the best (lowest) p50s, the least disturbed by other work"
	printf '  %-*s p50 %6.0f us (best %4.0f)  p99 %6.0f us\n' "$w" direct "$(column_of "$work/results/one.0" 2 | median)" \
		"$(column_of "$work/results/one.0" 2 | lowest)" "$(column_of "$work/results/one.0" 3 | median)"
	for t in "${!target_names[@]}"; do
		((t == 0)) && continue
		printf '  %-*s p50 %6.0f us (best %4.0f)  p99 %6.0f us  added %+5.0f us (best %+4.0f)  %6.0f req/s %5.1f cpu us/req\n' \
			"$w" "${target_names[$t]}" \
			"$(column_of "$work/results/one.$t" 2 | median)" "$(column_of "$work/results/one.$t" 2 | lowest)" \
			"$(column_of "$work/results/one.$t" 3 | median)" "$(median_difference one "$t" 0 2)" \
			"$(($(column_of "$work/results/one.$t" 2 | lowest) - $(column_of "$work/results/one.0" 2 | lowest)))" \
			"$(column_of "$work/results/one.$t" 1 | median)" "$(column_of "$work/results/one.$t" 4 | median)"
	done
}

idp_total() { curl -sf "http://127.0.0.1:$idp_port/__control/stats" | sed -n 's/.*"total":\([0-9]*\).*/\1/p'; }

proxy_token_requests() {
	curl -sf "http://127.0.0.1:${admin_ports[$1]}/metrics" |
		awk '/^seldon_auth_proxy_token_requests_total/ { s += $NF } END { print s + 0 }'
}

# Each proxy fetches once at start and again at every refresh; the IdP's count must equal the
# sum of the proxies' own counters, and no request may have failed.
report_token_requests() {
	local started=$1 elapsed i n total=0 interval
	elapsed=$(($(date +%s) - started))
	echo
	echo "token requests seen by the IdP since the proxies started: $(idp_total) for ${#variants[@]} proxy process(es)," \
		"${elapsed}s with ${token_lifetime}s tokens"
	echo "  IdP: $(curl -sf "http://127.0.0.1:$idp_port/__control/stats")"
	for i in "${!variants[@]}"; do
		n=$(proxy_token_requests "$i")
		total=$((total + n))
		interval=$(awk -v n="$n" -v e="$elapsed" 'BEGIN { if (n > 1) printf "one refresh every %.0f s", e / (n - 1); else print "no refresh" }')
		echo "  $(proxy_label "$i"): $n by its own /metrics = 1 at start + $((n - 1)) refreshes ($interval)"
	done
	[[ $total == "$(idp_total)" ]] || echo "  MISMATCH: the proxies count $total, the IdP $(idp_total)"
}

run_throughput() {
	local started t
	started=$(date +%s)
	echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo); load average $(cut -d' ' -f1-3 /proc/loadavg)"
	echo "wrk -t1 -c$conns -d${duration}s --latency, $rounds interleaved rounds; proxy: $proxy_bin"
	echo "warming up ..." >&2
	for t in "${!target_names[@]}"; do run_wrk "${target_ports[$t]}" "$conns" 1 >/dev/null; done
	echo "throughput, $conns connections:" >&2
	run_rounds load "$conns" "$duration"
	if ((one_conn_duration > 0)); then
		echo "latency, 1 connection:" >&2
		run_rounds one 1 "$one_conn_duration"
	fi
	report_throughput
	((one_conn_duration > 0)) && report_one_connection
	report_token_requests "$started"
}

# ---------------------------------------------------------------- memory

status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

# Resets the process's peak RSS (VmHWM) so the next reading is the peak of what follows.
reset_peak() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null; }

# Samples VmRSS every 50 ms into FILE until stopped; the max is a fallback where clear_refs is refused.
start_rss_sampler() {
	local pid=$1 file=$2
	(while [[ -e /proc/$pid/status ]]; do status_kib "$pid" VmRSS; sleep 0.05; done >"$file") &
	sampler_pid=$!
}
stop_rss_sampler() {
	kill "$sampler_pid" 2>/dev/null || true
	wait "$sampler_pid" 2>/dev/null || true
}

# Peak RSS (KiB) of PID while COMMAND runs: VmHWM after a reset, or the sampled maximum.
peak_during() {
	local pid=$1 samples=$work/rss.samples hwm sampled
	shift
	local can_reset=0
	if reset_peak "$pid"; then can_reset=1; fi
	start_rss_sampler "$pid" "$samples"
	"$@"
	stop_rss_sampler
	hwm=$(status_kib "$pid" VmHWM)
	sampled=$(sort -g "$samples" | tail -1)
	if ((can_reset)); then echo "$hwm"; else echo "${sampled:-$hwm}"; fi
}

mib() { awk -v k="$1" 'BEGIN { printf "%.1f MiB", k / 1024 }'; }

download_through() { curl -sf -o /dev/null -w '%{size_download} bytes at %{speed_download} B/s\n' "http://127.0.0.1:$1$API/download" >"$work/transfer.out"; }
upload_through() { curl -sf -o "$work/upload.response" -H 'Expect:' -T "$work/big" -w '%{size_upload} bytes at %{speed_upload} B/s\n' "http://127.0.0.1:$1$API/upload" >"$work/transfer.out"; }
load_with() { wrk -t1 -c"$2" -d10s "http://127.0.0.1:$1$SMALL_PATH" >"$work/wrk.out"; }

transfer_rate() { awk '{ printf "%s bytes, %.0f MiB/s", $1, $4 / 1048576 }' "$work/transfer.out"; }

# The same 1000-connection load through the nginx peer, for scale: the sum of its processes' peaks.
report_nginx_memory() {
	local pid idle=0 peak=0 kib
	local -a tree
	read -r -a tree <<<"$(process_tree "$nginx_pid" | xargs)"
	for pid in "${tree[@]}"; do
		idle=$((idle + $(status_kib "$pid" VmRSS)))
		reset_peak "$pid" || true
	done
	load_with "$nginx_port" "$memory_conns"
	for pid in "${tree[@]}"; do
		kib=$(status_kib "$pid" VmHWM)
		peak=$((peak + kib))
	done
	echo
	echo "for scale, the nginx peer (master + 2 workers, RSS summed): $(mib "$idle") after the warm-up," \
		"peaks summing to $(mib "$peak") at $memory_conns connections ($(wrk_summary))"
}

wrk_summary() { awk '/Requests\/sec/ { r = $2 } /Non-2xx|Socket errors/ { e = e "; " $0 } END { print r " req/s" e }' "$work/wrk.out"; }

run_memory() {
	local i pid port before peak
	echo "machine: $(nproc) CPUs; memory of the proxy process (VmRSS/VmHWM from /proc/PID/status)"
	cat "$work/big" >/dev/null # the first read of the sparse file fills the page cache: keep it out of the rates
	download_through "$upstream_port"
	echo "direct from the upstream: download $(transfer_rate)"
	upload_through "$upstream_port"
	echo "direct to the upstream:   upload   $(transfer_rate)"
	run_wrk "$nginx_port" 64 2 >/dev/null
	for i in "${!variants[@]}"; do
		pid=${proxy_pids[$i]} port=${proxy_ports[$i]}
		echo
		echo "$(proxy_label "$i") (pid $pid):"
		sleep 1
		echo "  idle RSS, token held, no request yet:  $(mib "$(status_kib "$pid" VmRSS)")"
		run_wrk "$port" 64 2 >/dev/null
		sleep 1
		echo "  idle RSS after 2 s at 64 connections:  $(mib "$(status_kib "$pid" VmRSS)")"

		before=$(status_kib "$pid" VmRSS)
		peak=$(peak_during "$pid" download_through "$port")
		echo "  1 GiB download: peak $(mib "$peak"), growth +$(mib $((peak - before)))  ($(transfer_rate))"
		before=$(status_kib "$pid" VmRSS)
		peak=$(peak_during "$pid" upload_through "$port")
		echo "  1 GiB upload:   peak $(mib "$peak"), growth +$(mib $((peak - before)))  ($(transfer_rate);" \
			"the sink answered $(cat "$work/upload.response"))"

		before=$(status_kib "$pid" VmRSS)
		peak=$(peak_during "$pid" load_with "$port" "$memory_conns")
		echo "  peak RSS at $memory_conns connections (wrk -t1 -c$memory_conns -d10s): $(mib "$peak")" \
			"(+$(mib $((peak - before))); $(wrk_summary))"
		sleep 2
		echo "  RSS 2 s after that load:               $(mib "$(status_kib "$pid" VmRSS)")"
	done
	report_nginx_memory
}

hold_for_profiling() {
	local t
	for t in "${!target_names[@]}"; do
		printf '%-28s http://127.0.0.1:%s%s  (pids %s)\n' "${target_names[$t]}" "${target_ports[$t]}" "$SMALL_PATH" "${target_cpu_pids[$t]}"
	done
	echo "IdP: $idp_issuer (stats: http://127.0.0.1:$idp_port/__control/stats); logs in $work"
	echo "holding; Ctrl-C (or SIGTERM to pid $$) stops everything"
	while :; do
		sleep 3600 &
		pids+=($!)
		wait $! # a trapped signal interrupts wait, not a foreground sleep
	done
}

# ---------------------------------------------------------------- main

main() {
	parse_options "$@"
	check_tools
	raise_open_file_limit
	build_proxy
	install_idp_dependencies
	trap cleanup EXIT
	trap 'exit 130' INT TERM
	start_all
	if ((hold)); then
		hold_for_profiling
	elif ((memory_mode)); then
		run_memory
	else
		run_throughput
	fi
}

main "$@"; exit
