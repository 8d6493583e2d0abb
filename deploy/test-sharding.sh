#!/usr/bin/env bash
# Path-sharding test (npm run test:sharding): two proxy processes, each with its own config and port, behind
# nginx (Debian's package, installed here if missing) routing /memory/* to one and /everything/* to the other,
# with deploy/nginx/mcp-sharding.conf as the nginx config. SDK clients reach both servers through nginx, over
# Streamable HTTP and legacy SSE. Loopback only; every process and file it starts or writes is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "== installing nginx from Debian's packages"
  # Debian's postinst would start nginx on 0.0.0.0:80: forbid service starts during the install.
  made_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null
  [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
fi
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

tmp=$(mktemp -d /tmp/rmp-sharding-test.XXXXXX)
chmod 755 "$tmp" # nginx workers (nobody) create their temp files below it
pids=()
passed=0
failed=0
cleanup() {
  set +e
  [ -f "$tmp/nginx.pid" ] && kill -QUIT "$(cat "$tmp/nginx.pid")" 2>/dev/null
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  done
  rm -rf "$tmp"
}
trap cleanup EXIT

ok() { echo "  ok  $*"; passed=$((passed + 1)); }
fail() { echo "  FAIL  $*"; failed=$((failed + 1)); }
finish() {
  if [ "$failed" -gt 0 ]; then
    for f in "$tmp"/*.log; do echo "--- $f"; tail -20 "$f"; done
  fi
  echo "sharding: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit
}
free_port() {
  node -e 's=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}
wait_status() { # URL STATUS: bounded wait (30 s) for URL to answer STATUS
  for _ in $(seq 1 60); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "$1")" = "$2" ] && return 0
    sleep 0.5
  done
  return 1
}
code() { curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" "$@"; }

node build.mjs
token=$(node -e 'console.log(require("crypto").randomBytes(32).toString("hex"))')

# Two instances, two configs: the same claude_desktop_config.json shape, one server each. `npx -y PKG` runs the
# package installed in this repo (devDependencies) through --packages-dir: no network, no npx.
cat >"$tmp/memory.json" <<'JSON'
{ "mcpServers": { "memory": { "command": "npx", "args": ["-y", "@modelcontextprotocol/server-memory"],
                              "env": { "MEMORY_FILE_PATH": "${MEMORY_FILE_PATH}" } } } }
JSON
cat >"$tmp/everything.json" <<'JSON'
{ "mcpServers": { "everything": { "command": "npx", "args": ["-y", "@modelcontextprotocol/server-everything"] } } }
JSON
port_memory=$(free_port)
port_everything=$(free_port)
port_nginx=$(free_port)
start_proxy() { # NAME PORT
  MCP_PROXY_TOKEN=$token MEMORY_FILE_PATH=$tmp/memory.jsonl \
    node dist/proxy.js --config "$tmp/$1.json" --host 127.0.0.1 --port "$2" --packages-dir "$root" >"$tmp/proxy-$1.log" 2>&1 &
  pids+=($!)
}
echo "== two proxy instances"
start_proxy memory "$port_memory"
start_proxy everything "$port_everything"
wait_status "http://127.0.0.1:$port_memory/readyz" 200 && ok "instance A (memory) ready on 127.0.0.1:$port_memory" || fail "instance A not ready"
wait_status "http://127.0.0.1:$port_everything/readyz" 200 && ok "instance B (everything) ready on 127.0.0.1:$port_everything" || fail "instance B not ready"
[ "$(code "http://127.0.0.1:$port_memory/everything/mcp" -X POST)" = 404 ] && ok "instance A alone does not serve /everything (404)" || fail "A serves /everything"

echo "== nginx routing by path prefix (deploy/nginx/mcp-sharding.conf)"
sed -e "s/server memory-proxy:8080;/server 127.0.0.1:$port_memory;/" \
    -e "s/server everything-proxy:8080;/server 127.0.0.1:$port_everything;/" \
    -e "s/listen 8080;/listen 127.0.0.1:$port_nginx;/" deploy/nginx/mcp-sharding.conf >"$tmp/mcp-sharding.conf"
grep -q "listen 127.0.0.1:$port_nginx;" "$tmp/mcp-sharding.conf" || { fail "could not rewrite the nginx config"; finish; }
cat >"$tmp/nginx.conf" <<EOF
worker_processes 1;
pid $tmp/nginx.pid;
error_log $tmp/nginx-error.log info;
events { worker_connections 256; }
http {
  access_log $tmp/nginx-access.log;
  client_body_temp_path $tmp/client_body;
  proxy_temp_path $tmp/proxy_temp;
  fastcgi_temp_path $tmp/fastcgi_temp;
  uwsgi_temp_path $tmp/uwsgi_temp;
  scgi_temp_path $tmp/scgi_temp;
  include $tmp/mcp-sharding.conf;
}
EOF
"$nginx_bin" -t -q -e "$tmp/nginx-error.log" -p "$tmp" -c "$tmp/nginx.conf" && ok "nginx -t accepts the config" || { fail "nginx -t"; finish; }
"$nginx_bin" -e "$tmp/nginx-error.log" -p "$tmp" -c "$tmp/nginx.conf" -g 'daemon off;' &
pids+=($!)
wait_status "http://127.0.0.1:$port_nginx/nothing" 404 && ok "nginx up on 127.0.0.1:$port_nginx" || { fail "nginx did not start"; finish; }
base=http://127.0.0.1:$port_nginx

echo "== SDK clients through nginx"
for scenario in memory everything; do
  if MCP_TOKEN=$token node deploy/test/mcp-client.mjs "$scenario" "$base" >"$tmp/client-$scenario.log" 2>&1; then
    grep '^  ok' "$tmp/client-$scenario.log"; passed=$((passed + 1))
  else
    cat "$tmp/client-$scenario.log"; fail "$scenario through nginx"
  fi
done
[ -s "$tmp/memory.jsonl" ] && ok "instance A's memory server wrote its state" || fail "no memory state"
[ "$(code "$base/other/mcp" -X POST)" = 404 ] && ok "an unrouted prefix answers 404 at nginx" || fail "unrouted prefix"
[ "$(curl -s -o /dev/null -w '%{http_code}' -X POST "$base/memory/mcp")" = 401 ] && ok "the token is still required behind nginx (401)" || fail "no 401 behind nginx"

finish
