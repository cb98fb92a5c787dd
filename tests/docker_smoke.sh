#!/usr/bin/env bash
# The Docker image as a sidecar meets it: build it, start the image's own mock upstream and
# the proxy on a private network, and check a routed answer, a stream, an OpenAI-shaped
# error, health (and the image's health check), the non-root user and a clean stop. Needs
# a Docker engine, so it is not part of `cargo test` (CI machines here have none); run it
# by hand after changing the Dockerfile:
#
#   bash tests/docker_smoke.sh            # builds routellm:smoke from this checkout
#   IMAGE=routellm:local bash tests/docker_smoke.sh   # or checks an image already built
set -euo pipefail
cd "$(dirname "$0")/.."
# curl talks to the container on 127.0.0.1: an egress proxy must not catch it.
export NO_PROXY="${NO_PROXY:+$NO_PROXY,}127.0.0.1,localhost" no_proxy="${no_proxy:+$no_proxy,}127.0.0.1,localhost"

image="${IMAGE:-}"
if [ -z "$image" ]; then
  image=routellm:smoke
  docker build -t "$image" .
fi
suffix="smoke-$$"
network="routellm-$suffix"
cleanup() {
  docker rm -f "mock-$suffix" "proxy-$suffix" >/dev/null 2>&1 || true
  docker network rm "$network" >/dev/null 2>&1 || true
}
trap cleanup EXIT
fail() { echo "FAIL: $*" >&2; docker logs "proxy-$suffix" >&2 || true; exit 1; }

docker network create "$network" >/dev/null
docker run -d --name "mock-$suffix" --network "$network" "$image" \
  mock-upstream --host 0.0.0.0 --port 9000 >/dev/null
docker run -d --name "proxy-$suffix" --network "$network" -p 127.0.0.1::6060 -e OPENAI_API_KEY=sk-smoke \
  "$image" serve --routers mf sw_ranking random \
  --strong-model openai/strong --weak-model openai/weak --base-url "http://mock-$suffix:9000/v1" >/dev/null
address=$(docker port "proxy-$suffix" 6060 | head -1)
for _ in $(seq 1 100); do
  curl -sf "http://$address/health" >/dev/null && break
  sleep 0.1
done
[ "$(curl -s "http://$address/health")" = '{"status":"online"}' ] || fail "health"

chat() { # model, extra JSON fields -> the response with its headers
  curl -s -i "http://$address/v1/chat/completions" -H 'content-type: application/json' \
    -d "{\"model\":\"$1\",\"messages\":[{\"role\":\"user\",\"content\":\"Prove that there are infinitely many primes.\"}]$2}"
}
routed=$(chat router-mf-0.116 "")
grep -q '^HTTP/1.1 200' <<<"$routed" || fail "routed status: $routed"
grep -qi '^x-routellm-router: mf' <<<"$routed" || fail "router header: $routed"
grep -qiE '^x-routellm-tier: (strong|weak)' <<<"$routed" || fail "tier header: $routed"
grep -q '"chat.completion"' <<<"$routed" || fail "answer: $routed"

streamed=$(chat router-sw_ranking-0.5 ',"stream":true')
grep -q '^data: \[DONE\]' <<<"$streamed" || fail "stream did not end with [DONE]: $streamed"

refused=$(chat router-nosuch-0.5 "")
grep -q '^HTTP/1.1 400' <<<"$refused" || fail "unknown router status: $refused"
grep -q '"error":{"message"' <<<"$refused" || fail "error shape: $refused"
grep -q '"param":"model","code":"invalid_model"' <<<"$refused" || fail "error fields: $refused"

[ "$(docker exec "proxy-$suffix" id -u)" = 10001 ] || fail "the server does not run as uid 10001"

# The image's HEALTHCHECK (`routellm health`) reports the server healthy.
docker exec "proxy-$suffix" routellm health >/dev/null || fail "routellm health in the container"
for _ in $(seq 1 150); do
  status=$(docker inspect "proxy-$suffix" --format '{{.State.Health.Status}}')
  [ "$status" = healthy ] && break
  sleep 0.1
done
[ "$status" = healthy ] || fail "health status: $status"

docker stop --time 30 "proxy-$suffix" >/dev/null
[ "$(docker inspect "proxy-$suffix" --format '{{.State.ExitCode}}')" = 0 ] || fail "SIGTERM did not stop it cleanly"
echo "docker smoke test passed: $image"
