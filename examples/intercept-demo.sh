#!/usr/bin/env bash
# Transparent interception, end to end: the demo's apps, unmodified (no proxy settings, services
# called by plain name: catalog dials inventory:50051, frontend GETs http://catalog/), join the
# mesh through `ferry-sidecar iptables install` and an intercepting sidecar each, one network
# namespace per instance. A client namespace runs a plain `curl http://frontend/`.
#
#   sudo examples/intercept-demo.sh           run, show what happened, clean up
#   sudo examples/intercept-demo.sh --keep    ...and leave it running until Enter is pressed
#   sudo examples/intercept-demo.sh --clean   remove what a killed run left behind
#
# It needs root (namespaces, veth pairs, iptables rules) and ip, iptables, setpriv and curl.
# Everything it makes lives in network namespaces of its own and in /etc/netns/<namespace>/,
# and is removed on exit, on failure and on Ctrl-C. Nothing changes in the host's namespace.
# It builds the binaries with cargo (as $SUDO_USER under sudo), unless FERRY_BIN_DIR names a
# directory holding ferry-control-plane, ferry-sidecar, ferryctl and ferry-demo.
#
#   ferry-hub           bridge 10.77.0.1/24; the control plane (gRPC :7070, HTTP :7071, DNS :53)
#   ferry-inventory-N   10.77.0.1N   inventory (gRPC) on 127.0.0.1:50051
#   ferry-catalog-N     10.77.0.2N   catalog (HTTP) on 127.0.0.1:8080; catalog-2 is v2
#   ferry-frontend-1    10.77.0.31   frontend (HTTP) on 127.0.0.1:8080
#   ferry-client        10.77.0.100  a sidecar with no app, and curl
#
# Each namespace but the hub: iptables rules first, then the sidecar (`--intercept`, run with
# the exempt group so its own connections are not redirected), then the app. Each resolves
# names through 10.77.0.1, and `--capture-dns` hands those lookups to its sidecar.

set -euo pipefail

readonly HUB=ferry-hub CLIENT=ferry-client BRIDGE=ferry-br
readonly NET=10.77.0 PROXY_GID=1337
readonly CONTROL_PLANE="https://$NET.1:7070"
# namespace  service  instance  address  app port  version  health check
readonly INSTANCES=(
	"ferry-inventory-1 inventory inventory-1 $NET.11 50051 v1 grpc:ferry.demo.v1.Inventory,interval=2s"
	"ferry-inventory-2 inventory inventory-2 $NET.12 50051 v1 grpc:ferry.demo.v1.Inventory,interval=2s"
	"ferry-catalog-1 catalog catalog-1 $NET.21 8080 v1 http:/healthz,interval=2s"
	"ferry-catalog-2 catalog catalog-2 $NET.22 8080 v2 http:/healthz,interval=2s"
	"ferry-frontend-1 frontend frontend-1 $NET.31 8080 v1 http:/healthz,interval=2s"
)
readonly CLIENT_ADDR=$NET.100 CLIENT_SERVICE=demo-client REQUESTS=8

say() { printf '%s\n' "$*"; }
warn() { printf 'intercept-demo.sh: %s\n' "$*" >&2; }
die() {
	warn "$*"
	exit 1
}

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; }

keep=0 clean_only=0
for arg in "$@"; do
	case $arg in
	--keep) keep=1 ;;
	--clean) clean_only=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		warn "unknown argument $arg (try --help)"
		exit 64
		;;
	esac
done

if [[ $EUID -ne 0 ]]; then
	die "needs root: it creates network namespaces, veth pairs and iptables rules (all removed at exit). Run: sudo $0${*:+ $*}"
fi
for tool in ip iptables setpriv curl; do
	command -v "$tool" >/dev/null || die "needs $tool, which is not on PATH (Debian: iproute2, iptables, util-linux, curl)"
done

# Proxy settings or Ferry settings from the caller's environment would change what the apps,
# curl and the sidecars do; the point is that they have none.
bin_dir=${FERRY_BIN_DIR:-}
unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY
for name in "${!FERRY_@}"; do unset "$name"; done

namespaces=("$HUB" "$CLIENT")
for instance in "${INSTANCES[@]}"; do namespaces+=("${instance%% *}"); done

# --- cleanup ------------------------------------------------------------------------------

created_ns=() created_etc=() pids=() work="" etc_netns_made=0

# Stops every process in `namespaces`: TERM, then KILL after 5 seconds.
stop_processes() {
	local ns pid left=()
	for ns in "$@"; do
		for pid in $(ip netns pids "$ns" 2>/dev/null); do left+=("$pid"); done
	done
	for pid in "${pids[@]}"; do left+=("$pid"); done
	((${#left[@]})) || return 0
	kill -TERM "${left[@]}" 2>/dev/null || true
	for _ in {1..50}; do
		kill -0 "${left[@]}" 2>/dev/null || return 0
		sleep 0.1
	done
	kill -KILL "${left[@]}" 2>/dev/null || true
}

cleanup() {
	local status=$?
	set +e
	trap - HUP INT TERM
	# Output may have nowhere to go (a closed pipe, a closed terminal): clean up regardless.
	trap '' PIPE
	stop_processes "${created_ns[@]}"
	wait 2>/dev/null
	for ns in "${created_ns[@]}"; do ip netns del "$ns"; done
	for dir in "${created_etc[@]}"; do rm -rf "$dir"; done
	((etc_netns_made)) && rmdir /etc/netns 2>/dev/null
	if [[ -n $work ]]; then
		rm -rf "$work/data" "$work/tokens"
		if ((status == 0)); then
			rm -rf "$work"
		else
			say "logs kept in $work/logs"
		fi
	fi
	((${#created_ns[@]})) && say "cleaned up: ${#created_ns[@]} namespaces and everything in them"
	exit "$status"
}

if ((clean_only)); then
	# What a run killed before its cleanup left: only the names this script uses.
	found=()
	for ns in "${namespaces[@]}"; do [[ -e /run/netns/$ns ]] && found+=("$ns"); done
	stop_processes "${found[@]}"
	for ns in "${found[@]}"; do ip netns del "$ns"; done
	for ns in "${namespaces[@]}"; do rm -rf "/etc/netns/$ns"; done
	rmdir /etc/netns 2>/dev/null || true
	say "removed ${#found[@]} namespaces${found:+: ${found[*]}}"
	exit 0
fi

for ns in "${namespaces[@]}"; do
	if [[ -e /run/netns/$ns || -e /etc/netns/$ns ]]; then
		die "namespace $ns exists already, left by an earlier run or made by someone else; if it is this script's: sudo $0 --clean"
	fi
done

trap cleanup EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 141' PIPE
trap 'exit 143' TERM
trap 'warn "line $LINENO: \"$BASH_COMMAND\" failed"' ERR

work=$(mktemp -d /tmp/ferry-intercept.XXXXXX)
logs=$work/logs data=$work/data tokens=$work/tokens
mkdir -p "$logs" "$data" "$tokens"
chmod 700 "$tokens"

# --- binaries -----------------------------------------------------------------------------

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n $bin_dir ]]; then
	bin=$(cd "$bin_dir" && pwd)
else
	build=(build --quiet --manifest-path "$repo/Cargo.toml" -p ferry-control-plane -p ferry-sidecar -p ferryctl -p ferry-examples)
	say "building the binaries: cargo build -p ferry-control-plane -p ferry-sidecar -p ferryctl -p ferry-examples"
	if [[ -n ${SUDO_USER:-} && $SUDO_USER != root ]]; then
		# As the user who ran sudo, with their toolchain, so target/ stays theirs.
		home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
		cargo=$(command -v cargo || true)
		[[ -z $cargo && -x $home/.cargo/bin/cargo ]] && cargo=$home/.cargo/bin/cargo
		[[ -n $cargo ]] || die "cargo not found; build first and pass the binaries: FERRY_BIN_DIR=$repo/target/debug"
		setpriv --reuid "$SUDO_USER" --regid "$(id -g "$SUDO_USER")" --init-groups \
			env HOME="$home" PATH="$(dirname "$cargo"):$PATH" "$cargo" "${build[@]}"
	else
		command -v cargo >/dev/null || die "cargo not found; build first and pass the binaries: FERRY_BIN_DIR=$repo/target/debug"
		cargo "${build[@]}"
	fi
	bin=${CARGO_TARGET_DIR:-$repo/target}/debug
fi
for binary in ferry-control-plane ferry-sidecar ferryctl ferry-demo; do
	[[ -x $bin/$binary ]] || die "$bin/$binary: not found or not executable"
done
"$bin/ferry-sidecar" iptables install --help >/dev/null 2>&1 ||
	die "$bin/ferry-sidecar has no \`iptables\` subcommand: it is older than interception"

# --- helpers ------------------------------------------------------------------------------

in_ns() {
	local ns=$1
	shift
	ip netns exec "$ns" "$@"
}

# start NAME NAMESPACE COMMAND...: runs COMMAND in the background, logging to logs/NAME.log.
start() {
	local name=$1 ns=$2
	shift 2
	ip netns exec "$ns" "$@" </dev/null >"$logs/$name.log" 2>&1 &
	pids+=($!)
}

# The last lines of a log that say something went wrong, or its last lines.
log_tail() {
	local log=$logs/$1.log problems=' (ERROR|WARN) |^error|^curl: '
	if grep -qE "$problems" "$log" 2>/dev/null; then
		grep -E "$problems" "$log" | tail -n 5
	else
		tail -n 5 "$log" 2>/dev/null || true
	fi | sed 's/^/    /'
}

# wait_until WHAT LOG SECONDS COMMAND...: polls COMMAND until it succeeds, or exits showing LOG.
wait_until() {
	local what=$1 log=$2 patience=$3 deadline=$((SECONDS + $3))
	shift 3
	until "$@" >/dev/null 2>&1; do
		if ((SECONDS >= deadline)); then
			warn "gave up waiting ${patience}s for $what; $logs/$log.log says:"
			log_tail "$log" >&2
			warn "every process's log is in $logs"
			exit 1
		fi
		sleep 0.2
	done
}

ctl() { FERRY_TOKEN=$admin in_ns "$HUB" "$bin/ferryctl" --control-plane "$CONTROL_PLANE" --ca-file "$data/ca.pem" "$@"; }

# add_ns NAMESPACE ADDRESS: a namespace on the hub's bridge, resolving names through the hub.
add_ns() {
	local ns=$1 addr=$2 veth=fv-${2##*.}
	ip netns add "$ns"
	created_ns+=("$ns")
	ip -n "$ns" link set lo up
	ip -n "$HUB" link add "$veth" type veth peer name eth0 netns "$ns"
	ip -n "$HUB" link set "$veth" master "$BRIDGE" up
	ip -n "$ns" addr add "$addr/24" dev eth0
	ip -n "$ns" link set eth0 up
	# A route for every destination, virtual IPs (240.240.0.0/16) included: connect() needs
	# one before the nat rules can redirect the connection to the sidecar.
	ip -n "$ns" route add default via "$NET.1"
	# `ip netns exec` mounts these over /etc. The hub (the control plane's DNS) answers what
	# the sidecar forwards; nsswitch keeps lookups on DNS, which --capture-dns can see (a host
	# whose nsswitch asks systemd-resolved over its socket would bypass it).
	[[ -d /etc/netns ]] || { mkdir /etc/netns && etc_netns_made=1; }
	mkdir "/etc/netns/$ns"
	created_etc+=("/etc/netns/$ns")
	printf 'nameserver %s\n' "$NET.1" >"/etc/netns/$ns/resolv.conf"
	if [[ -f /etc/nsswitch.conf ]]; then
		sed 's/^hosts:.*/hosts: files dns/' /etc/nsswitch.conf >"/etc/netns/$ns/nsswitch.conf"
	fi
}

# intercept NAMESPACE NAME SERVICE SIDECAR_FLAGS...: the rules, then an intercepting sidecar
# run with the exempt group.
intercept() {
	local ns=$1 name=$2 service=$3
	shift 3
	in_ns "$ns" "$bin/ferry-sidecar" iptables install --proxy-gid "$PROXY_GID" --capture-dns \
		--control-plane "$CONTROL_PLANE" >"$logs/$name-iptables.log" 2>&1 ||
		die "iptables install in $ns failed: $(cat "$logs/$name-iptables.log")"
	start "$name-sidecar" "$ns" setpriv --regid "$PROXY_GID" --clear-groups -- \
		"$bin/ferry-sidecar" --service "$service" --intercept --control-plane "$CONTROL_PLANE" \
		--ca-file "$data/ca.pem" --token-file "$tokens/$service.token" --drain 1s "$@"
}

sidecar_ready() { in_ns "$1" curl -sf --max-time 1 http://127.0.0.1:15000/ready; }

# Whether `ferryctl services` counts every instance passing.
all_passing() {
	ctl services | awk -v want="${#INSTANCES[@]}" '
		NR == 1 { for (i = 1; i <= NF; i++) if ($i == "PASSING") column = i; next }
		{ passing += $column }
		END { exit !(column && passing >= want) }'
}

# Whether curl in the client namespace gets a 200 from http://frontend/; curl's error in
# logs/client-curl.log otherwise.
frontend_answers() { in_ns "$CLIENT" curl -sSf --max-time 3 -o /dev/null http://frontend/ 2>"$logs/client-curl.log"; }

# --- the network and the control plane ----------------------------------------------------

say "ferry intercept demo: logs in $logs"
ip netns add "$HUB"
created_ns+=("$HUB")
ip -n "$HUB" link set lo up
ip -n "$HUB" link add "$BRIDGE" type bridge
ip -n "$HUB" addr add "$NET.1/24" dev "$BRIDGE"
ip -n "$HUB" link set "$BRIDGE" up
for instance in "${INSTANCES[@]}"; do
	read -r ns _ _ addr _ <<<"$instance"
	add_ns "$ns" "$addr"
done
add_ns "$CLIENT" "$CLIENT_ADDR"

start control-plane "$HUB" "$bin/ferry-control-plane" --grpc "$NET.1:7070" --http "$NET.1:7071" \
	--dns "$NET.1:53" --data-dir "$data"
wait_until "the control plane to be ready" control-plane 30 \
	in_ns "$HUB" curl -sf --max-time 1 --cacert "$data/ca.pem" "https://$NET.1:7071/ready"
admin=$(<"$data/admin.token")
for service in inventory catalog frontend "$CLIENT_SERVICE"; do
	ctl token create --kind sidecar --service "$service" --description intercept-demo >"$tokens/$service.token"
done

# --- the services and the client ----------------------------------------------------------

for instance in "${INSTANCES[@]}"; do
	read -r ns service id addr port version check <<<"$instance"
	intercept "$ns" "$id" "$service" --id "$id" --app "127.0.0.1:$port" --advertise "$addr" \
		--meta "version=$version" --check "$check"
	start "$id" "$ns" "$bin/ferry-demo" app "$service" --listen "127.0.0.1:$port" --instance "$id" --version "$version"
done
intercept "$CLIENT" client "$CLIENT_SERVICE"
say "started: the control plane in $HUB; ${#INSTANCES[@]} app instances, each behind an intercepting sidecar; a client sidecar"

for instance in "${INSTANCES[@]}"; do
	read -r ns _ id _ <<<"$instance"
	wait_until "$id's sidecar to be ready (its app passing its check)" "$id-sidecar" 30 sidecar_ready "$ns"
done
wait_until "the client sidecar to be ready" client-sidecar 30 sidecar_ready "$CLIENT"
wait_until "every instance to pass its check at the control plane" control-plane 30 all_passing
wait_until "curl http://frontend/ in $CLIENT to answer 200" client-curl 60 frontend_answers
say "ready: every instance passes its check, and curl http://frontend/ in $CLIENT answers"

# --- what it shows ------------------------------------------------------------------------

say ""
say "curl http://frontend/ in $CLIENT, $REQUESTS requests at once (no proxy settings: a plain name, port 80)"
say "  answered by: frontend -> catalog (its version) -> the inventory of each of catalog's 3 items"
# At once, so the balancers spread them: one at a time, each would go to the fastest instance.
curls=()
for n in $(seq "$REQUESTS"); do
	in_ns "$CLIENT" curl -s --max-time 10 -w '\n%{http_code}' -o "$work/reply-$n" http://frontend/ >"$work/code-$n" 2>&1 &
	curls+=($!)
done
wait "${curls[@]}" || true
failed=0
for n in $(seq "$REQUESTS"); do
	body=$(<"$work/reply-$n") code=$(tr -d '\n' <"$work/code-$n")
	if [[ $code == 200 && $body =~ \"frontend\":\"([^\"]+)\",\"catalog_version\":\"([^\"]+)\",\"catalog\":\{\"catalog\":\"([^\"]+)\" ]]; then
		inventories=$(grep -o '"inventory":"[^"]*"' <<<"$body" | cut -d'"' -f4 | paste -sd' ' -)
		printf '  %2d  %s -> %s (%s) -> %s\n' "$n" "${BASH_REMATCH[1]}" "${BASH_REMATCH[3]}" "${BASH_REMATCH[2]}" "$inventories"
	else
		printf '  %2d  HTTP %s: %s\n' "$n" "${code:-none}" "${body:0:200}"
		failed=$((failed + 1))
	fi
done
say ""
say "ferryctl services:"
ctl services | sed 's/^/  /'

say ""
say "names in $CLIENT, answered by its sidecar:"
say "  getent hosts catalog:  $(in_ns "$CLIENT" getent hosts catalog | tr -s ' ' || echo 'no answer')"
if command -v dig >/dev/null; then
	say "  dig @127.0.0.1 -p 15053 +short inventory.vip.ferry:  $(in_ns "$CLIENT" dig @127.0.0.1 -p 15053 +short +time=2 inventory.vip.ferry | paste -sd' ' -)"
fi

say ""
say "connections the client sidecar intercepted (its /metrics):"
in_ns "$CLIENT" curl -s --max-time 2 http://127.0.0.1:15000/metrics | grep '^ferry_intercepted_connections' | sed 's/^/  /' || say "  none"

say ""
say "the nat rules of ferry-catalog-1 (iptables-save -t nat), as ferry-sidecar iptables install wrote them:"
in_ns ferry-catalog-1 iptables-save -t nat | grep -E '^-A (FERRY_|OUTPUT -j FERRY|PREROUTING -j FERRY)' | sed 's/^/  /' || true

if ((keep)); then
	say ""
	say "running; in another shell, as root:"
	say "  ip netns exec $CLIENT curl -s http://catalog/items"
	say "  ip netns exec $CLIENT curl -s http://127.0.0.1:15000/metrics | grep intercepted"
	say "  ip netns exec ferry-catalog-1 iptables-save -t nat"
	say "  FERRY_TOKEN=\$(cat $data/admin.token) ip netns exec $HUB $bin/ferryctl --control-plane $CONTROL_PLANE --ca-file $data/ca.pem instances catalog"
	say "press Enter (or Ctrl-C) to stop and clean up"
	trap 'exit $((failed > 0))' INT
	read -r _ || true
fi

if ((failed)); then
	warn "$failed of $REQUESTS requests failed"
	exit 1
fi
say ""
say "every request crossed the mesh three times, sidecar to sidecar over mTLS, with no proxy settings anywhere"
