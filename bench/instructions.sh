#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's callgrind: the one-hop
# sidecar and HAProxy (each with one thread per core), over HTTP/1.1 and h2c, on loopback.
#
# Unlike requests per second on a shared 2-core machine, an instruction count does not depend on
# what else the machine is doing: the same binary and inputs give the same figure within a few
# tenths of a percent. It counts user space only (the proxy, its libraries and libc), not the
# kernel's socket work, which every proxy pays alike. Each figure is the difference between a run
# of N2 and one of N1 requests, over N2 - N1, so start-up does not count.
#
# Usage: bench/instructions.sh [SIDECAR_BINARY]
# Needs the release binaries (cargo build --release -p ferry-sidecar -p ferry-control-plane -p
# ferry-bench), valgrind, h2load (nghttp2-client) and haproxy.
set -euo pipefail
cd "$(dirname "$0")/.."

release=target/release
sidecar="${1:-$release/ferry-sidecar}"
n1=2000
n2=12000
for tool in valgrind h2load haproxy curl; do
    command -v "$tool" >/dev/null || { echo "instructions.sh: $tool is needed" >&2; exit 1; }
done

dir="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT

# The log line "NAME ... KEY=VALUE" a process prints when it listens.
wait_for() {
    local file="$1" key="$2"
    for _ in $(seq 1 200); do
        if grep -q "$key=" "$file" 2>/dev/null; then
            grep -o "$key=[^ ]*" "$file" | head -1 | cut -d= -f2
            return
        fi
        sleep 0.1
    done
    echo "instructions.sh: no $key in $file:" >&2
    cat "$file" >&2
    exit 1
}

# The API in plaintext without tokens: what is counted is the one-hop data path to an
# API-registered upstream (plaintext), which the control plane's API security does not touch.
"$release/ferry-control-plane" --grpc 127.0.0.1:0 --http 127.0.0.1:0 --dns 127.0.0.1:0 --store memory \
    --api-tls off --auth none --data-dir "$dir/cp" >"$dir/cp.log" 2>&1 &
pids+=($!)
"$release/ferry-bench" upstream >"$dir/upstream.log" 2>&1 &
pids+=($!)
grpc="$(wait_for "$dir/cp.log" grpc)"
http="$(wait_for "$dir/cp.log" http)"
upstream="$(wait_for "$dir/upstream.log" addr)"
curl -sf -X PUT "http://$http/v1/instances" -H "content-type: application/json" \
    -d "{\"id\": \"bench-upstream\", \"service\": \"bench\", \"address\": \"127.0.0.1\", \"port\": ${upstream##*:}}" >/dev/null

# HAProxy cannot print a port it picked: free ones are found first, for its two frontends.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
haproxy_http1="127.0.0.1:$(free_port)"
haproxy_h2c="127.0.0.1:$(free_port)"
"$release/ferry-bench" haproxy-config "$haproxy_http1" "$haproxy_h2c" "$upstream" >"$dir/haproxy.cfg"

# Total instructions of one proxy run under callgrind that serves N requests.
# proxy_run NAME PROTOCOL N
proxy_run() {
    local name="$1" protocol="$2" n="$3" out="$dir/callgrind.out" log="$dir/run.log" url
    rm -f "$out"
    case "$name" in
        ferry-1hop)
            valgrind --tool=callgrind --callgrind-out-file="$out" "$sidecar" --service bench-client \
                --control-plane "http://$grpc" --outbound 127.0.0.1:0 --admin 127.0.0.1:0 --upstream bench=127.0.0.1:0 \
                >"$log" 2>&1 &
            local pid=$!
            url="http://$(wait_for "$log" upstreams | sed 's/^bench@//')/"
            ;;
        haproxy)
            valgrind --tool=callgrind --callgrind-out-file="$out" haproxy -db -f "$dir/haproxy.cfg" >"$log" 2>&1 &
            local pid=$!
            if [ "$protocol" = h1 ]; then url="http://$haproxy_http1/"; else url="http://$haproxy_h2c/"; fi
            ;;
    esac
    local flags=(-c 16 -t 1)
    if [ "$protocol" = h1 ]; then flags+=(--h1 -m 1); else flags+=(-m 4); fi
    # Readiness: a request through the proxy (h2load's own first requests would count a failure).
    for _ in $(seq 1 300); do
        h2load "${flags[@]}" -n 16 "$url" 2>/dev/null | grep -q "16 succeeded" && break
        sleep 0.2
    done
    h2load "${flags[@]}" -n "$n" "$url" >"$dir/h2load.out" 2>&1
    grep -q "$n succeeded" "$dir/h2load.out" || { echo "instructions.sh: $name $protocol: not every request succeeded" >&2; cat "$dir/h2load.out" >&2; exit 1; }
    kill -TERM "$pid"
    wait "$pid" || true
    grep '^summary:' "$out" | awk '{print $2}'
}

echo "| path | protocol | instructions per request |"
echo "|---|---|---:|"
for name in ferry-1hop haproxy; do
    for protocol in h1 h2c; do
        a="$(proxy_run "$name" "$protocol" "$n1")"
        b="$(proxy_run "$name" "$protocol" "$n2")"
        label=$([ "$protocol" = h1 ] && echo "HTTP/1.1" || echo h2c)
        echo "| $name | $label | $(((b - a) / (n2 - n1))) |"
    done
done
