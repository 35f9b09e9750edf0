#!/usr/bin/env bash
# Cross-compatibility check of the suite's shared protocol: every built
# contender's client against every built contender's server (1 s, 10 x 16 KiB
# and 100 x 64 B), plus a byte-exact 64-byte echo check of each server with
# the latency tool. Run Benchmarks/run.sh once first (it builds everything);
# this script only uses what is built. Exits non-zero on any failure.
#
#   Benchmarks/crosscheck.sh            CONTENDERS="epoll go" Benchmarks/crosscheck.sh
set -u -o pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
CB=$HERE/.build-cmake
declare -A BIN=(
    [epoll]=$CB/standalone/epoll_pingpong
    [uv]=$CB/standalone/uv_pingpong
    [knet_c]=$CB/full/Benchmarks/knet_pingpong
    [go]=$HERE/bin/go_pingpong
    [nio]=$HERE/nio/.build/release/nio-pingpong
    [knet_swift]=$ROOT/.build/release/knet-pingpong
)
LATENCY=$CB/standalone/latency
ACTIVE=()
for c in ${CONTENDERS:-epoll uv go nio knet_c knet_swift}; do
    if [ -x "${BIN[$c]:-/nonexistent}" ]; then ACTIVE+=("$c"); else echo "skip $c: not built"; fi
done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

SERVER_PID=""
cleanup() { [ -n "$SERVER_PID" ] && { kill -KILL "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; }; SERVER_PID=""; }
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Below the ephemeral range: client sockets cannot hold these ports.
PORT=$((12000 + RANDOM % 8000))
pass=0 fail=0
check() { # description, then the command; passes when it exits 0 with the four lines and bytes > 0
    local what=$1 out
    shift
    out=$(timeout -k 2 30 "$@" 2>&1)
    local rc=$?
    if [ "$rc" -eq 0 ] && [ "$(grep -cE '^[0-9.]+ (total bytes read|total messages read|average message size|MiB/s throughput)$' <<<"$out")" = 4 ] &&
        [ "$(awk '/ total bytes read$/ {print $1}' <<<"$out")" -gt 0 ]; then
        pass=$((pass + 1))
        echo "ok   $what: $(awk '/ MiB\/s throughput$/ {print $1}' <<<"$out") MiB/s"
    else
        fail=$((fail + 1))
        echo "FAIL $what (status $rc): $(tr '\n' ' ' <<<"$out")"
    fi
}

for s in "${ACTIVE[@]}"; do
    while port_open "$PORT"; do PORT=$((PORT + 1)); done
    "${BIN[$s]}" server "$PORT" 1 >/dev/null 2>&1 &
    SERVER_PID=$!
    for ((i = 0; i < 200; i++)); do port_open "$PORT" && break; sleep 0.05; done
    if [ -x "$LATENCY" ]; then
        if out=$(timeout 20 "$LATENCY" "$PORT" 10 1 2>&1); then
            pass=$((pass + 1)); echo "ok   $s server echoes 64-byte messages exactly ($(head -1 <<<"$out"))"
        else
            fail=$((fail + 1)); echo "FAIL $s server echo check: $out"
        fi
    fi
    for c in "${ACTIVE[@]}"; do
        check "$c client -> $s server, 10 x 16384" "${BIN[$c]}" client "$PORT" 10 16384 1 1
        check "$c client -> $s server, 100 x 64" "${BIN[$c]}" client "$PORT" 100 64 1 1
    done
    kill -TERM "$SERVER_PID"
    for ((i = 0; i < 100; i++)); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.05; done
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        fail=$((fail + 1)); echo "FAIL $s server ignored SIGTERM for 5 s"
        cleanup
    else
        wait "$SERVER_PID"; rc=$?
        if [ "$rc" -eq 0 ]; then pass=$((pass + 1)); echo "ok   $s server exits 0 on SIGTERM"
        else fail=$((fail + 1)); echo "FAIL $s server exited $rc on SIGTERM"; fi
    fi
    SERVER_PID=""
    PORT=$((PORT + 1))
done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
