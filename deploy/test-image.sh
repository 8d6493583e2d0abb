#!/usr/bin/env bash
# Image test (npm run test:image): builds the distroless image with podman, bakes in
# @modelcontextprotocol/server-memory, runs it read-only as non-root with a mounted config directory, and checks
#   - it refuses to start on 0.0.0.0 without a token, with a message naming what to set; `check` works;
#   - /readyz answers 200; the HEALTHCHECK (node dist/proxy.js healthcheck, no shell) passes;
#   - real MCP calls with the SDK client (Streamable HTTP and legacy SSE), bearer token from the container env,
#     `npx -y @modelcontextprotocol/server-memory` served from the baked package, state written under /data;
#   - a child that orphans grandchildren is stopped: no zombie remains (tini as PID 1); and, as a control that
#     the check can fail, the same image with node as PID 1 (no tini) does keep zombies;
#   - `podman stop` exits 0 within 5 s and the container exits 0.
# On these machines podman has no registry: the base images are the local stand-ins of
# ../shared/container/standins.sh (run here if missing). Containers use host networking, so the proxy is told
# to listen on a free loopback port. Everything the test creates (containers, images, temp files) is removed.
# Env: KEEP_IMAGE=1 keeps the built image (tagged remote-mcp-proxy:test); SHARED_DIR overrides ../shared.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
shared=${SHARED_DIR:-$root/../shared}

command -v podman >/dev/null 2>&1 || [ -x "$shared/container/standins.sh" ] || { echo "test-image: podman not available, skipped"; exit 0; }
if ! command -v podman >/dev/null 2>&1 || ! podman image exists gcr.io/distroless/nodejs24-debian12:nonroot 2>/dev/null \
   || ! podman image exists docker.io/library/node:24-bookworm-slim 2>/dev/null; then
  [ -x "$shared/container/standins.sh" ] || { echo "test-image: base images missing and no standins.sh"; exit 1; }
  echo "== building the base image stand-ins (once per machine)"
  "$shared/container/standins.sh" >/dev/null
fi
# shellcheck source=/dev/null
source "$shared/container/podman-env.sh"

tag=localhost/remote-mcp-proxy:test-$$
ctr=rmp-test-$$
ctr_noinit=rmp-test-noinit-$$
tmp=$(mktemp -d /tmp/rmp-image-test.XXXXXX)
token=$(node -e 'console.log(require("crypto").randomBytes(32).toString("hex"))')
images_before=$(podman images -a -q --no-trunc | sort -u)
passed=0
failed=0

cleanup() {
  set +e
  for c in "$ctr" "$ctr_noinit" "$ctr-refuse" "$ctr-check"; do podman rm -f -t 0 "$c" >/dev/null 2>&1; done
  if [ "${KEEP_IMAGE:-}" = 1 ]; then
    podman tag "$tag" localhost/remote-mcp-proxy:test >/dev/null 2>&1
    podman untag "$tag" >/dev/null 2>&1
  else
    podman rmi -f "$tag" >/dev/null 2>&1
    # intermediate images of this build (builder/packages stages), nothing that was there before
    for id in $(comm -13 <(echo "$images_before") <(podman images -a -q --no-trunc | sort -u)); do
      podman rmi -f "$id" >/dev/null 2>&1
    done
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

ok() { echo "  ok  $*"; passed=$((passed + 1)); }
fail() { echo "  FAIL  $*"; failed=$((failed + 1)); }
die() { echo "  FAIL  $*"; failed=$((failed + 1)); finish; }
finish() {
  if [ "$failed" -gt 0 ]; then
    for c in "$ctr" "$ctr_noinit"; do
      podman container exists "$c" 2>/dev/null && { echo "--- podman logs $c"; podman logs "$c" 2>&1 | tail -40; }
    done
  fi
  echo "image: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit
}
free_port() {
  node -e 's=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}
ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

echo "== podman build (stand-in bases), MCP_NPM_PACKAGES=@modelcontextprotocol/server-memory"
t0=$(date +%s%N)
if ! podman build --pull=never --format docker --build-arg MCP_NPM_PACKAGES=@modelcontextprotocol/server-memory \
     -t "$tag" . >"$tmp/build.log" 2>&1; then
  tail -40 "$tmp/build.log"; die "podman build"
fi
ok "built $tag in $(ms_since "$t0") ms"
size=$(podman image inspect -f '{{.Size}}' "$tag")
base=$(podman image inspect -f '{{.Size}}' gcr.io/distroless/nodejs24-debian12:nonroot)
echo "     image size $((size / 1000000)) MB (stand-in distroless base $((base / 1000000)) MB + $(((size - base) / 1000)) kB of ours)"
[ "$(podman image inspect -f '{{.Config.User}}' "$tag")" = 65532:65532 ] && ok "image USER is 65532:65532" || fail "image USER"
healthcmd=$(podman image inspect -f '{{json .Config.Healthcheck.Test}}' "$tag")
[ "$healthcmd" = '["CMD","/nodejs/bin/node","/app/dist/proxy.js","healthcheck"]' ] && ok "HEALTHCHECK in exec form: $healthcmd" || fail "HEALTHCHECK is $healthcmd"
if podman run --rm --entrypoint /bin/sh "$tag" -c true >/dev/null 2>&1; then fail "the image has a shell"; else ok "no /bin/sh in the image"; fi

# The mounted config directory: a real claude_desktop_config.json shape, secrets by ${VAR} from the container env.
mkdir -p "$tmp/config" "$tmp/data"
chown 65532:65532 "$tmp/data"
cp deploy/test/orphaner.mjs "$tmp/config/"
cat >"$tmp/config/config.json" <<'JSON'
{
  "mcpServers": {
    "memory": {
      "command": "npx",
      "args": ["-y", "@modelcontextprotocol/server-memory"],
      "env": { "MEMORY_FILE_PATH": "${MEMORY_FILE_PATH}" }
    },
    "orphaner": { "command": "node", "args": ["/config/orphaner.mjs"], "sessions": "per-session" }
  }
}
JSON
run_args=(--read-only -v "$tmp/config:/config:ro" -v "$tmp/data:/data" -e MEMORY_FILE_PATH=/data/memory.jsonl)

echo "== refuses a public bind without auth; check"
timeout 60 podman run --name "$ctr-refuse" --no-healthcheck "${run_args[@]}" "$tag" >"$tmp/refuse.log" 2>&1 && code=0 || code=$?
if [ "$code" -ne 0 ] && grep -q 'MCP_PROXY_TOKEN' "$tmp/refuse.log" && grep -q 'allow-unauthenticated' "$tmp/refuse.log"; then
  ok "no token on 0.0.0.0: exit $code, \"$(grep -o 'refusing[^:]*' "$tmp/refuse.log" | head -1)\""
else
  cat "$tmp/refuse.log"; fail "expected a refusal naming MCP_PROXY_TOKEN (exit $code)"
fi
podman run --name "$ctr-check" --no-healthcheck "${run_args[@]}" "$tag" check >"$tmp/check.log" 2>"$tmp/check.err" \
  && ok "podman run IMAGE check: $(cat "$tmp/check.log")" || { cat "$tmp/check.log" "$tmp/check.err"; fail "check"; }

# start_container NAME [podman run options...]: runs the image on a free loopback port; sets $port, $base.
start_container() {
  local name=$1; shift
  port=$(free_port)
  base=http://127.0.0.1:$port
  podman run -d --name "$name" "${run_args[@]}" -e MCP_PROXY_HOST=127.0.0.1 -e MCP_PROXY_PORT="$port" \
    -e MCP_PROXY_TOKEN="$token" "$@" "$tag" >"$tmp/$name.run.log" 2>&1 || { cat "$tmp/$name.run.log"; die "podman run $name"; }
  local t0; t0=$(date +%s%N)
  for _ in $(seq 1 120); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$base/readyz")" = 200 ] && { ok "$name: /readyz 200 after $(ms_since "$t0") ms on $base"; return; }
    sleep 0.5
  done
  die "$name: /readyz not 200 within 60 s"
}
# zombies NAME: how many processes in the container's PID namespace are zombies.
zombies() {
  node deploy/test/procs.mjs "$(podman inspect -f '{{.State.Pid}}' "$1")" | node -e \
    'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{const p=JSON.parse(s);console.log(p.filter(x=>x.state==="Z").length)})'
}
# orphan_then_count NAME: a child orphans 3 grandchildren and is stopped; prints the zombies left 3 s later.
orphan_then_count() {
  MCP_TOKEN=$token node deploy/test/mcp-client.mjs orphan "$base" >"$tmp/orphan.log" 2>&1 || { cat "$tmp/orphan.log" >&2; echo error; return; }
  sleep 3 # the setsid grandchild lives 1.5 s
  zombies "$1"
}
# stop_container NAME: podman stop must exit 0 within 5 s, and the container must exit 0.
stop_container() {
  local t0 rc elapsed code
  t0=$(date +%s%N)
  podman stop -t 10 "$1" >/dev/null 2>>"$tmp/podman.err" && rc=0 || rc=$?
  elapsed=$(ms_since "$t0")
  code=$(podman inspect -f '{{.State.ExitCode}}' "$1")
  if [ "$rc" -eq 0 ] && [ "$elapsed" -lt 5000 ] && [ "$code" = 0 ]; then
    ok "$1: podman stop exit 0 in $elapsed ms, container exit code $code"
  else
    fail "$1: podman stop exit $rc in $elapsed ms, container exit code $code"
  fi
}

echo "== run: read-only, non-root, tini as PID 1"
start_container "$ctr"
[ "$(podman inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$ctr")" = true ] && ok "root filesystem is read-only" || fail "not read-only"
pid1=$(podman inspect -f '{{.State.Pid}}' "$ctr")
procs=$(node deploy/test/procs.mjs "$pid1")
[ "$(node -p "JSON.parse(process.argv[1])[0].comm" "$procs")" = tini ] && ok "PID 1 is tini" || fail "PID 1: $procs"
proxy_host_pid=$(node -p "JSON.parse(process.argv[1]).find((p) => p.ppid === $pid1 && p.comm !== 'tini').hostPid" "$procs")
proxy_uid=$(awk '/^Uid:/{print $2}' "/proc/$proxy_host_pid/status")
[ "$proxy_uid" = 65532 ] && ok "the proxy runs as uid $proxy_uid" || fail "the proxy runs as uid $proxy_uid"
podman healthcheck run "$ctr" >/dev/null 2>>"$tmp/podman.err" && ok "podman healthcheck run: healthy" || fail "healthcheck"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$base/healthz")" = 200 ] && ok "/healthz 200" || fail "/healthz"

echo "== MCP through the container (SDK client, token from the container env)"
MCP_TOKEN=$token node deploy/test/mcp-client.mjs unauthorized "$base" && passed=$((passed + 1)) || fail "unauthorized"
if MCP_TOKEN=$token node deploy/test/mcp-client.mjs memory "$base" >"$tmp/memory.log" 2>&1; then
  grep '^  ok' "$tmp/memory.log"; passed=$((passed + 1))
else
  cat "$tmp/memory.log"; fail "memory scenario"
fi
podman logs "$ctr" 2>&1 | grep -q 'npx package baked into /app/packages' && ok "npx -y @modelcontextprotocol/server-memory ran the baked package" || fail "baked package not used"
entity=$(tail -1 "$tmp/memory.log" | node -p 'JSON.parse(require("fs").readFileSync(0,"utf8")).entity' 2>/dev/null || true)
[ -n "$entity" ] && grep -q "$entity" "$tmp/data/memory.jsonl" 2>/dev/null && ok "state written to /data/memory.jsonl (volume), owned by $(stat -c %u "$tmp/data/memory.jsonl")" || fail "no state in /data"

echo "== PID 1 duties"
z=$(orphan_then_count "$ctr")
grep '^  ok' "$tmp/orphan.log"
[ "$z" = 0 ] && ok "with tini: $z zombies after the orphaning child was stopped" || fail "with tini: $z zombies"
stop_container "$ctr"

echo "== control: the same image with node as PID 1 (no tini)"
start_container "$ctr_noinit" --entrypoint '["/nodejs/bin/node","/app/dist/proxy.js"]'
z=$(orphan_then_count "$ctr_noinit")
[[ "$z" =~ ^[1-9][0-9]*$ ]] && ok "without tini: $z zombies remain (node does not reap orphans), so the check above can fail" \
  || fail "without tini: $z zombies (expected some: is the check blind?)"
stop_container "$ctr_noinit"

finish
