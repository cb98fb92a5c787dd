#!/usr/bin/env bash
# Load benchmark: the same wrk load straight at a mock upstream and through the proxy, in
# one run, on loopback. Reports requests/s, p50/p99 latency, the latency the proxy adds,
# streaming time to first byte, and the proxy's peak RSS. See benches/README.md.
#
# Usage: benches/load.sh [seconds per run, default 10] [connections, default 64]
# Needs: wrk (apt-get install wrk), curl, a release build (built here).
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10}"
connections="${2:-64}"
threads=2
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build --release --quiet
bin="$CARGO_TARGET_DIR/release/routellm"
work="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { # a loopback port nothing listens on
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_address() { # log file -> host:port once the process reports it
  for _ in $(seq 1 200); do
    if address=$(grep -o 'address=[0-9.:]*' "$1" 2>/dev/null | head -1 | cut -d= -f2) && [ -n "$address" ]; then
      echo "$address"; return 0
    fi
    sleep 0.05
  done
  echo "no address in $1" >&2; cat "$1" >&2; return 1
}

"$bin" mock-upstream --port 0 2>"$work/mock.log" & pids+=($!)
upstream=$(wait_for_address "$work/mock.log")
"$bin" serve --host 127.0.0.1 --port 0 --routers random mf sw_ranking \
  --strong-model openai/strong --weak-model openai/weak --base-url "http://$upstream/v1" --api-key sk-bench \
  2>"$work/proxy.log" & proxy_pid=$!; pids+=($proxy_pid)
proxy=$(wait_for_address "$work/proxy.log")

prompt=$(python3 -c 'print(" ".join(["explain the difference between threads and processes"] * 40))')
lua() { # model, stream -> wrk script
  cat > "$work/$1-$2.lua" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"$1","stream":$2,"messages":[{"role":"user","content":"$prompt"}]}'
LUA
  echo "$work/$1-$2.lua"
}

distinct_lua() { # model -> wrk script whose every request has a prompt of its own
  cat > "$work/$1-distinct.lua" <<LUA
local started = 0
function setup(thread) started = started + 1; thread:set("tid", started) end
local count = 0
function request()
  count = count + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"},
    '{"model":"$1","messages":[{"role":"user","content":"$prompt ' .. tid .. '-' .. count .. '"}]}')
end
LUA
  echo "$work/$1-distinct.lua"
}

run() { # label, url, model, stream [connections]
  run_script "$1" "$2" "$(lua "$3" "$4")" "${5:-$connections}"
}

run_script() { # label, url, wrk script, connections
  local out c="$4"
  out=$(wrk -t"$(( c < threads ? c : threads ))" -c"$c" -d"${duration}s" --latency -s "$3" "$2/v1/chat/completions")
  local rps p50 p99 errors
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1 == "50%" {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  errors=$(echo "$out" | awk '/Non-2xx/ {print $5}')
  printf '| %-28s | %10s | %8s | %8s | %6s |\n' "$1" "$rps" "$p50" "$p99" "${errors:-0}"
}

ttfb() { # url, model -> median time to first byte in ms over 50 streamed requests
  for _ in $(seq 1 50); do
    curl -s -o /dev/null -w '%{time_starttransfer}\n' -H 'content-type: application/json' \
      -d "{\"model\":\"$2\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}" "$1/v1/chat/completions"
  done | sort -n | awk '{a[NR]=$1} END {printf "%.3f", a[int(NR/2)+1]*1000}'
}

echo "routellm load benchmark: $(nproc) cores, $connections connections, ${duration}s per run, wrk $threads threads"
echo
echo "| run                          |  req/s     |  p50     |  p99     | non-2xx |"
echo "|------------------------------|------------|----------|----------|--------|"
run "direct to upstream" "http://$upstream" "mock" false
run "proxy, router-random-0.5" "http://$proxy" "router-random-0.5" false
run "proxy, router-mf-0.5 (static)" "http://$proxy" "router-mf-0.5" false
run "proxy, router-sw_ranking-0.5" "http://$proxy" "router-sw_ranking-0.5" false
run "direct, streaming" "http://$upstream" "mock" true
run "proxy, streaming, random" "http://$proxy" "router-random-0.5" true
# One connection: latency without queueing, so proxy minus direct is the added latency.
run "direct, 1 connection" "http://$upstream" "mock" false 1
run "proxy random, 1 connection" "http://$proxy" "router-random-0.5" false 1
run "proxy mf, 1 connection" "http://$proxy" "router-mf-0.5" false 1
run "proxy sw_ranking, 1 connection" "http://$proxy" "router-sw_ranking-0.5" false 1

# A strong tier whose first deployment is down (nothing listens on its port): failover
# passes it over for its cooldown, so requests do not each pay a refused connection first.
dead=$(free_port)
cat > "$work/failover.yaml" <<YAML
strong_model:
  - {name: openai/primary, base_url: "http://127.0.0.1:$dead/v1", api_key: sk-bench}
  - {name: openai/backup, base_url: "http://$upstream/v1", api_key: sk-bench}
weak_model: {name: openai/weak, base_url: "http://$upstream/v1", api_key: sk-bench}
YAML
"$bin" serve --host 127.0.0.1 --port 0 --routers random --config "$work/failover.yaml" 2>"$work/failover.log" & pids+=($!)
failover=$(wait_for_address "$work/failover.log")
run "proxy, first deployment down" "http://$failover" "router-random-0" false

# The response cache in front of the costliest router here: the same request again and
# again (every one after the first a hit: no scoring, no model call), and every request
# new (each a miss that is scored, forwarded and kept: what the cache costs when it never helps).
cat > "$work/cache.yaml" <<YAML
strong_model: {name: openai/strong, base_url: "http://$upstream/v1", api_key: sk-bench}
weak_model: {name: openai/weak, base_url: "http://$upstream/v1", api_key: sk-bench}
response_cache: {ttl_secs: 3600, max_mb: 256}
YAML
"$bin" serve --host 127.0.0.1 --port 0 --routers sw_ranking --config "$work/cache.yaml" 2>"$work/cache.log" & pids+=($!)
cached=$(wait_for_address "$work/cache.log")
run "cache on, sw_ranking, all hits" "http://$cached" "router-sw_ranking-0.5" false
run_script "cache on, sw_ranking, all new" "http://$cached" "$(distinct_lua router-sw_ranking-0.5)" "$connections"
run_script "cache off, sw_ranking, all new" "http://$proxy" "$(distinct_lua router-sw_ranking-0.5)" "$connections"

# A client key with request and token limits and a budget: counted in this process, or
# shared with other replicas in Redis (`shared_state`: one Lua script per admission and
# one per answer's charge), one server or a three-node Redis Cluster (`cluster: true`).
# Needs redis-server and redis-cli (apt-get install redis-server).
if command -v redis-server >/dev/null; then
  redis_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
  for _ in $(seq 1 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.05; done
  cluster_ports=()
  for range in "0 5460" "5461 10922" "10923 16383"; do
    node=$(free_port)
    redis-server --port "$node" --cluster-port "$(free_port)" --cluster-enabled yes --cluster-config-file "$work/nodes-$node.conf" \
      --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
    for _ in $(seq 1 100); do redis-cli -p "$node" ping >/dev/null 2>&1 && break; sleep 0.05; done
    redis-cli -p "$node" cluster addslotsrange $range >/dev/null
    cluster_ports+=("$node")
  done
  for node in "${cluster_ports[@]:1}"; do
    bus=$(redis-cli -p "$node" config get cluster-port | tail -1)
    redis-cli -p "${cluster_ports[0]}" cluster meet 127.0.0.1 "$node" "$bus" >/dev/null
  done
  for node in "${cluster_ports[@]}"; do
    for _ in $(seq 1 200); do redis-cli -p "$node" cluster info | grep -q cluster_state:ok && break; sleep 0.05; done
  done
  for mode in local shared cluster; do
    cat > "$work/limits-$mode.yaml" <<YAML
strong_model: {name: openai/strong, base_url: "http://$upstream/v1", api_key: sk-bench, price_per_million_tokens: {input: 1, output: 1}}
weak_model: {name: openai/weak, base_url: "http://$upstream/v1", api_key: sk-bench, price_per_million_tokens: {input: 1, output: 1}}
api_keys: [{key: sk-team, name: team, requests_per_minute: 100000000, tokens_per_minute: 1000000000, budget: {limit: 1000000, per: day}}]
YAML
    [ "$mode" = shared ] && echo "shared_state: {redis_url: 'redis://127.0.0.1:$redis_port'}" >> "$work/limits-$mode.yaml"
    [ "$mode" = cluster ] && echo "shared_state: {redis_url: 'redis://127.0.0.1:${cluster_ports[0]}', cluster: true}" >> "$work/limits-$mode.yaml"
    "$bin" serve --host 127.0.0.1 --port 0 --routers random --config "$work/limits-$mode.yaml" 2>"$work/limits-$mode.log" & pids+=($!)
  done
  limits_local=$(wait_for_address "$work/limits-local.log")
  limits_shared=$(wait_for_address "$work/limits-shared.log")
  limits_cluster=$(wait_for_address "$work/limits-cluster.log")
  keyed="$work/keyed.lua"
  cat > "$keyed" <<LUA
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-team"
wrk.body = '{"model":"router-random-0.5","messages":[{"role":"user","content":"$prompt"}]}'
LUA
  run_script "key limits, per process" "http://$limits_local" "$keyed" "$connections"
  run_script "key limits, in Redis" "http://$limits_shared" "$keyed" "$connections"
  run_script "key limits, in a Redis Cluster" "http://$limits_cluster" "$keyed" "$connections"
  run_script "key limits, per process, 1 conn" "http://$limits_local" "$keyed" 1
  run_script "key limits, in Redis, 1 conn" "http://$limits_shared" "$keyed" 1
  run_script "key limits, in a Redis Cluster, 1 conn" "http://$limits_cluster" "$keyed" 1
else
  echo "(redis-server not found: key limits shared in Redis not measured)"
fi
echo
echo "streaming time to first byte (median of 50, ms): direct $(ttfb "http://$upstream" mock), proxy $(ttfb "http://$proxy" router-random-0.5)"
echo "proxy peak RSS (random + mf + sw_ranking loaded): $(awk '/VmHWM/ {printf "%.1f MiB", $2/1024}' /proc/$proxy_pid/status)"
