#!/usr/bin/env bash
# knet's side-by-side ping-pong benchmark suite: installs what it needs, builds
# every contender, runs the configurations and prints one markdown table
# (also written to Benchmarks/results/latest.md). See Benchmarks/README.md.
#
#   Benchmarks/run.sh                                   # everything (RUNS=3), ~18 min on 2 cores
#   CONFIGS="A B" CONTENDERS="epoll knet_c" RUNS=3 SECONDS=10 Benchmarks/run.sh
#
# Environment:
#   CONFIGS      configurations to run (default: A B C D E B2 S H R L)
#   CONTENDERS   contenders to run (default: epoll uv go nio knet_c knet_swift)
#   RUNS         runs of each configuration and contender, median quoted (default 3)
#   SECONDS      seconds per throughput / latency run (default 5)
#   R_SECONDS    seconds per connection-rate run (default 10)
#   IDLE_CONNS   idle connections held for H (default 10000)
#   SCALE_CONNS  connections of the S run (default 10000)
#   BENCH_HOST   address the servers listen on and clients dial (default 127.0.0.1)
#   SKIP_BUILD=1 use the binaries already built;  BUILD_ONLY=1 build, then stop
#   NO_APT=1     never call apt-get
# Contenders are built into Benchmarks/.build-cmake (CMake), Benchmarks/bin (Go),
# Benchmarks/nio/.build (SwiftNIO) and .build (knet's Swift package).

# SECONDS as given in the environment: bash's own $SECONDS counts up from it (and
# reads 1, not empty, when none was given and the start crossed a second boundary).
S_ENV=$(tr '\0' '\n' < /proc/$$/environ 2>/dev/null | sed -n 's/^SECONDS=//p')
set -u -o pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
CB=$HERE/.build-cmake
LOGS=$CB/logs
RESULTS=$HERE/results
mkdir -p "$LOGS" "$RESULTS" "$HERE/bin"

ALL_CONFIGS="A B C D E B2 S H R L"
ALL_CONTENDERS="epoll uv go nio knet_c knet_swift"
CONFIGS=${CONFIGS:-$ALL_CONFIGS}
CONTENDERS=${CONTENDERS:-$ALL_CONTENDERS}
RUNS=${RUNS:-3}
SECS=${BENCH_SECONDS:-$S_ENV}
[ "$SECS" -gt 0 ] 2>/dev/null || SECS=5
R_SECONDS=${R_SECONDS:-10}
IDLE_CONNS=${IDLE_CONNS:-10000}
SCALE_CONNS=${SCALE_CONNS:-10000}
HOST=${BENCH_HOST:-127.0.0.1}
HOSTARG=()
[ -n "${BENCH_HOST:-}" ] && HOSTARG=(--host "$BENCH_HOST")

# The exact command, with the settings that were given.
CMDLINE=""
for v in CONFIGS CONTENDERS RUNS SECONDS BENCH_SECONDS R_SECONDS IDLE_CONNS SCALE_CONNS BENCH_HOST SKIP_BUILD; do
    if [ "$v" = SECONDS ]; then
        [ "$S_ENV" -gt 0 ] 2>/dev/null && CMDLINE+="SECONDS=$S_ENV "
    elif [ -n "${!v:-}" ] && printenv "$v" >/dev/null; then
        CMDLINE+="$v=\"${!v}\" "
    fi
done
CMDLINE+="Benchmarks/run.sh${*:+ $*}"

NOTES=()
note() { NOTES+=("$*"); echo "note: $*" >&2; }
say() { echo "$*" >&2; }

# ---------------------------------------------------------------- setup

install_packages() {
    local missing=()
    command -v cmake >/dev/null || missing+=(cmake)
    command -v go >/dev/null || missing+=(golang-go)
    command -v pkg-config >/dev/null || missing+=(pkg-config)
    { command -v pkg-config >/dev/null && pkg-config --exists libuv; } || missing+=(libuv1-dev)
    command -v taskset >/dev/null || missing+=(util-linux)
    command -v cc >/dev/null || missing+=(gcc)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ -n "${NO_APT:-}" ]; then
        note "missing packages (${missing[*]}), NO_APT set: not installing"
        return 0
    fi
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo=sudo
    say "installing: ${missing[*]}"
    $sudo apt-get update -qq >"$LOGS/apt.log" 2>&1
    # The full list, so one apt line documents everything the suite needs.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
        cmake libuv1-dev golang-go pkg-config gcc util-linux >>"$LOGS/apt.log" 2>&1 ||
        note "apt-get install failed (see $LOGS/apt.log)"
}

# 10,000 idle connections need more descriptors than the usual soft limit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

BIN_epoll=$CB/standalone/epoll_pingpong
BIN_uv=$CB/standalone/uv_pingpong
BIN_knet_c=$CB/full/Benchmarks/knet_pingpong
BIN_go=$HERE/bin/go_pingpong
BIN_nio=$HERE/nio/.build/release/nio-pingpong
BIN_knet_swift=$ROOT/.build/release/knet-pingpong
TOOL_idle=$CB/standalone/idle_conns
TOOL_connrate=$CB/standalone/connrate
TOOL_latency=$CB/standalone/latency
TOOL_scale=$CB/standalone/scale

build_all() {
    # The C contenders and tools that do not need knet: this folder on its own.
    say "building C contenders and tools (CMake, $CB/standalone)"
    if cmake -S "$HERE" -B "$CB/standalone" -DCMAKE_BUILD_TYPE=Release -DKNET_BENCH_LIBUV=ON \
        >"$LOGS/cmake-standalone.log" 2>&1; then
        for t in epoll_pingpong uv_pingpong idle_conns connrate latency scale; do
            if [ "$t" = uv_pingpong ] && ! { command -v pkg-config >/dev/null && pkg-config --exists libuv; }; then
                note "uv_pingpong not built: libuv not found (apt-get install libuv1-dev)"
                continue
            fi
            cmake --build "$CB/standalone" -j2 --target "$t" >>"$LOGS/cmake-standalone.log" 2>&1 ||
                note "build of $t failed (see $LOGS/cmake-standalone.log)"
        done
    else
        note "CMake configure of Benchmarks/ failed (see $LOGS/cmake-standalone.log)"
    fi
    # knet_pingpong: through the top-level project, which builds knet itself.
    if [[ " $CONTENDERS " == *" knet_c "* ]]; then
        say "building knet_pingpong (CMake, $CB/full)"
        if [ -f "$ROOT/CMakeLists.txt" ] &&
            cmake -S "$ROOT" -B "$CB/full" -DCMAKE_BUILD_TYPE=Release -DKNET_BUILD_BENCHMARKS=ON \
                >"$LOGS/cmake-full.log" 2>&1 &&
            cmake --build "$CB/full" -j2 --target knet_pingpong >>"$LOGS/cmake-full.log" 2>&1; then
            :
        else
            note "knet_pingpong did not build (see $LOGS/cmake-full.log)"
            rm -f "$BIN_knet_c"
        fi
    fi
    if [[ " $CONTENDERS " == *" go "* ]]; then
        say "building go_pingpong"
        (cd "$HERE/go" && GOFLAGS=-mod=mod GOPROXY=off go build -o "$BIN_go" .) >"$LOGS/go.log" 2>&1 ||
            { note "go_pingpong did not build (see $LOGS/go.log)"; rm -f "$BIN_go"; }
    fi
    if [[ " $CONTENDERS " == *" nio "* ]]; then
        say "building nio-pingpong (swift build -c release, first build takes minutes)"
        if command -v swift >/dev/null; then
            swift build -c release --package-path "$HERE/nio" >"$LOGS/nio.log" 2>&1 ||
                { note "nio-pingpong did not build (see $LOGS/nio.log)"; rm -f "$BIN_nio"; }
        else
            note "no swift toolchain: nio-pingpong skipped"
        fi
    fi
    if [[ " $CONTENDERS " == *" knet_swift "* ]]; then
        say "building knet-pingpong (knet's Swift API)"
        if command -v swift >/dev/null && [ -f "$ROOT/Package.swift" ] &&
            (cd "$ROOT" && swift build -c release --product knet-pingpong) >"$LOGS/knet-swift.log" 2>&1; then
            :
        else
            note "knet-pingpong (Swift) did not build, skipped (see $LOGS/knet-swift.log)"
            rm -f "$BIN_knet_swift"
        fi
    fi
}

if [ -z "${SKIP_BUILD:-}" ]; then
    install_packages
    build_all
fi
if [ -n "${BUILD_ONLY:-}" ]; then
    say "built; notes: ${NOTES[*]:-none}"
    exit 0
fi

label() {
    case $1 in
    epoll) echo "raw epoll (ceiling)" ;;
    uv) echo "libuv" ;;
    go) echo "Go net (knet shape)" ;;
    nio) echo "SwiftNIO" ;;
    knet_c) echo "knet C API" ;;
    knet_swift) echo "knet Swift API" ;;
    *) echo "$1" ;;
    esac
}

ACTIVE=()
for c in $CONTENDERS; do
    bin_var=BIN_$c
    if [ -z "${!bin_var+x}" ]; then
        note "unknown contender '$c' (known: $ALL_CONTENDERS)"
    elif [ -x "${!bin_var}" ]; then
        ACTIVE+=("$c")
    else
        note "$(label "$c") skipped: ${!bin_var} not built"
    fi
done
[ ${#ACTIVE[@]} -gt 0 ] || { say "no contender built"; exit 1; }

NPROC=$(nproc)
PIN_S=() PIN_C=()
if [ "$NPROC" -ge 2 ] && command -v taskset >/dev/null; then
    PIN_S=(taskset -c 0) PIN_C=(taskset -c 1)
else
    note "fewer than 2 CPUs or no taskset: nothing is pinned"
fi

# ---------------------------------------------------------------- servers

SERVER_PID=""
SERVER_CONT=""
# Server ports come from below the kernel's ephemeral range: a port that some
# client socket holds as its local port cannot be bound by a server.
EPHEMERAL_LOW=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
PORT_LOW=10000
[ "$EPHEMERAL_LOW" -gt $((PORT_LOW + 2000)) ] 2>/dev/null || PORT_LOW=1100
NEXT_PORT=$((PORT_LOW + RANDOM % ((EPHEMERAL_LOW - PORT_LOW) / 2)))

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Sets PORT to a port nothing listens on and advances NEXT_PORT.
pick_port() {
    PORT=$NEXT_PORT
    while port_open "$PORT"; do PORT=$((PORT + 1)); done
    NEXT_PORT=$((PORT + 1))
    [ "$NEXT_PORT" -lt "$EPHEMERAL_LOW" ] || NEXT_PORT=$PORT_LOW
}

cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill -KILL "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
        SERVER_PID=""
    fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

# start_server CONTENDER THREADS PIN(1/0): starts it on a fresh port (PORT),
# trying the next port when the bind fails.
start_server() {
    local c=$1 threads=$2 pin=$3 bin_var=BIN_$1 i try
    local -a pre=()
    [ "$pin" = 1 ] && pre=("${PIN_S[@]}")
    for try in 1 2 3 4 5; do
        pick_port
        "${pre[@]}" "${!bin_var}" "${HOSTARG[@]}" server "$PORT" "$threads" >>"$LOGS/server-$c.log" 2>&1 &
        SERVER_PID=$!
        SERVER_CONT=$c
        for ((i = 0; i < 300; i++)); do
            port_open "$PORT" && return 0
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.05
        done
        kill -0 "$SERVER_PID" 2>/dev/null && break # running but not listening: give up
        wait "$SERVER_PID" 2>/dev/null
        SERVER_PID=""
    done
    note "$(label "$c") server did not start listening (see $LOGS/server-$c.log)"
    cleanup
    return 1
}

# Stops the server with SIGTERM (the protocol's way), SIGKILL after 5 s. Returns 1
# when the server was no longer running when the client finished (it crashed, was
# OOM-killed, or exited during the measurement: the client's figure then covers a
# dead server and must not count), else 0.
stop_server() {
    local i rc
    [ -n "$SERVER_PID" ] || return 0
    # Gone, or a zombie bash has not reaped yet (kill -0 succeeds on one).
    if ! kill -0 "$SERVER_PID" 2>/dev/null ||
        [ "$(awk '{print $3}' "/proc/$SERVER_PID/stat" 2>/dev/null)" = Z ]; then
        wait "$SERVER_PID" 2>/dev/null
        rc=$?
        note "$(label "$SERVER_CONT") server died during the run (status $rc; see $LOGS/server-$SERVER_CONT.log)"
        SERVER_PID=""
        return 1
    fi
    kill -TERM "$SERVER_PID" 2>/dev/null
    for ((i = 0; i < 100; i++)); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.05
    done
    local killed=0
    if kill -0 "$SERVER_PID" 2>/dev/null; then
        note "$(label "$SERVER_CONT") server still running 5 s after SIGTERM: killed"
        kill -KILL "$SERVER_PID" 2>/dev/null
        killed=1
    fi
    wait "$SERVER_PID" 2>/dev/null
    rc=$?
    # 137 is expected only when this function sent the SIGKILL.
    [ "$rc" -ne 0 ] && { [ "$rc" -ne 137 ] || [ "$killed" = 0 ]; } &&
        note "$(label "$SERVER_CONT") server exited with status $rc after SIGTERM"
    SERVER_PID=""
    return 0
}

# ---------------------------------------------------------------- results

declare -A VAL   # "CONFIG|contender" -> values of every run (space separated)
declare -A RAW   # "CONFIG|contender" -> raw per-run text
declare -A UNSERVED # contender -> 1 when an S run left a connection unserved (or failed)
declare -A RUNV  # "CONFIG|contender|round" -> that round's value, for paired ratios
ROUND=0          # the round (run number) being measured
add() { VAL["$1|$2"]+="$3 "; RUNV["$1|$2|$ROUND"]=$3; }
addraw() { RAW["$1|$2"]+="$3; "; }

median() {
    printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g |
        awk '{a[NR]=$1} END { if (NR == 0) print ""; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'
}

# A shuffled contender order per run (the same for a given run number): no one always
# goes first, and no one always runs next to the ceiling, whose run of the same round
# is what its ratio is paired with.
order() {
    local a=("${ACTIVE[@]}") i j t
    RANDOM=$((1000 + $1)) # seeded: the same order for a given run number
    for ((i = ${#a[@]} - 1; i > 0; i--)); do
        j=$((RANDOM % (i + 1)))
        t=${a[i]} a[i]=${a[j]} a[j]=$t
    done
    printf '%s\n' "${a[@]}"
}

# ---------------------------------------------------------------- configurations

# Throughput configurations: name conns block threads pinned.
pp_params() {
    case $1 in
    A) echo "1 16384 1 1" ;;
    B) echo "10 16384 1 1" ;;
    C) echo "100 4096 1 1" ;;
    D) echo "1000 64 1 1" ;;
    E) echo "1 64 1 1" ;;
    B2) echo "10 16384 2 0" ;;
    esac
}

run_pp() {
    local cfg=$1 c=$2 r=$3 conns block threads pin out bin_var=BIN_$2
    read -r conns block threads pin <<<"$(pp_params "$cfg")"
    local -a pre=()
    [ "$pin" = 1 ] && pre=("${PIN_C[@]}")
    start_server "$c" "$threads" "$pin" || { addraw "$cfg" "$c" "run $r: server failed"; return; }
    out=$(timeout -k 5 $((SECS + 60)) "${pre[@]}" "${!bin_var}" "${HOSTARG[@]}" client "$PORT" \
        "$conns" "$block" "$SECS" "$threads" 2>>"$LOGS/client-$c.log")
    local rc=$?
    stop_server || rc=255
    local bytes msgs avg mib
    bytes=$(awk '/ total bytes read$/ {print $1}' <<<"$out")
    msgs=$(awk '/ total messages read$/ {print $1}' <<<"$out")
    avg=$(awk '/ average message size$/ {print $1}' <<<"$out")
    mib=$(awk '/ MiB\/s throughput$/ {print $1}' <<<"$out")
    if [ "$rc" -ne 0 ] || [ -z "$bytes" ] || [ -z "$mib" ] || [ "$bytes" = 0 ]; then
        note "$cfg $(label "$c") run $r: failed (client status $rc, 255 = server died; see $LOGS/client-$c.log)"
        addraw "$cfg" "$c" "run $r: failed"
        return
    fi
    case $cfg in
    D | E)
        # Message rate: 64-byte blocks echoed per second (bytes / 64), which
        # does not depend on how a contender's reads split or merge.
        local rate
        rate=$(awk -v b="$bytes" -v bl="$block" -v s="$SECS" 'BEGIN { printf "%.0f", b / bl / s }')
        add "$cfg" "$c" "$rate"
        addraw "$cfg" "$c" "run $r: $rate msg/s, $msgs reads of avg $avg B"
        say "[$cfg run $r/$RUNS] $(label "$c"): $rate msg/s"
        ;;
    *)
        add "$cfg" "$c" "$mib"
        addraw "$cfg" "$c" "run $r: $mib MiB/s, $msgs reads of avg $avg B"
        say "[$cfg run $r/$RUNS] $(label "$c"): $mib MiB/s"
        ;;
    esac
}

run_h() {
    local c=$1 r=$2 out
    start_server "$c" 1 1 || { addraw H "$c" "run $r: server failed"; return; }
    out=$(timeout -k 5 120 "${PIN_C[@]}" "$TOOL_idle" "${HOSTARG[@]}" "$PORT" "$IDLE_CONNS" "$SERVER_PID" \
        2>>"$LOGS/idle-$c.log")
    local rc=$?
    stop_server || rc=255
    local fresh used
    fresh=$(awk '/ kib_per_idle_conn$/ {print $1}' <<<"$out")
    used=$(awk '/ kib_per_used_idle_conn$/ {print $1}' <<<"$out")
    if [ "$rc" -ne 0 ] || [ -z "$fresh" ]; then
        note "H $(label "$c") run $r: idle_conns failed (see $LOGS/idle-$c.log)"
        addraw H "$c" "run $r: failed"
        return
    fi
    add H "$c" "$fresh"
    add H1 "$c" "$used"
    addraw H "$c" "run $r: $fresh KiB/conn connected, $used KiB/conn after one round trip ($(tr '\n' ' ' <<<"$out" | sed 's/ *$//'))"
    say "[H run $r/$RUNS] $(label "$c"): $fresh KiB/idle conn, $used after a round trip"
}

# S: the D protocol on SCALE_CONNS connections against the contender's server,
# driven by one client for everyone (tools/scale.c): a contender's own client
# would need a thread per connection in some shapes. Counts how many
# connections were served in the timed phase.
run_s() {
    local c=$1 r=$2 out
    start_server "$c" 1 1 || { addraw S "$c" "run $r: server failed"; return; }
    out=$(timeout -k 5 $((SECS + 120)) "${PIN_C[@]}" "$TOOL_scale" "${HOSTARG[@]}" "$PORT" "$SCALE_CONNS" "$SECS" \
        2>>"$LOGS/scale-$c.log")
    local rc=$?
    stop_server || rc=255
    local rate served conns fewest
    rate=$(awk '/ msg\/s$/ {print $1}' <<<"$out")
    served=$(awk '/ served$/ {print $1}' <<<"$out")
    conns=$(awk '/ connections$/ {print $1}' <<<"$out")
    fewest=$(awk '/ fewest blocks$/ {print $1}' <<<"$out")
    if [ "$rc" -ne 0 ] || [ -z "$rate" ] || [ -z "$served" ]; then
        note "S $(label "$c") run $r: scale failed (see $LOGS/scale-$c.log)"
        addraw S "$c" "run $r: failed"
        UNSERVED["$c"]=1
        return
    fi
    add S "$c" "$rate"
    [ "$served" = "$conns" ] || UNSERVED["$c"]=1
    addraw S "$c" "run $r: $rate msg/s, $served of $conns connections served (fewest echoes on one: $fewest)"
    say "[S run $r/$RUNS] $(label "$c"): $rate msg/s, $served of $conns served"
}

run_r() {
    local c=$1 r=$2 out
    start_server "$c" 1 1 || { addraw R "$c" "run $r: server failed"; return; }
    out=$(timeout -k 5 $((R_SECONDS + 60)) "${PIN_C[@]}" "$TOOL_connrate" "${HOSTARG[@]}" "$PORT" "$R_SECONDS" \
        2>>"$LOGS/connrate-$c.log")
    local rc=$?
    stop_server || rc=255
    local rate errs
    rate=$(awk '/ connections\/s$/ {print $1}' <<<"$out")
    errs=$(awk '/ errors$/ {print $1}' <<<"$out")
    if [ "$rc" -ne 0 ] || [ -z "$rate" ]; then
        note "R $(label "$c") run $r: connrate failed (see $LOGS/connrate-$c.log)"
        addraw R "$c" "run $r: failed"
        return
    fi
    add R "$c" "$rate"
    addraw R "$c" "run $r: $rate conn/s, $errs errors"
    say "[R run $r/$RUNS] $(label "$c"): $rate conn/s ($errs errors)"
}

run_l() {
    local c=$1 r=$2 n out
    for n in 1 100; do
        start_server "$c" 1 1 || { addraw "L$n" "$c" "run $r: server failed"; continue; }
        out=$(timeout -k 5 $((SECS + 60)) "${PIN_C[@]}" "$TOOL_latency" "${HOSTARG[@]}" "$PORT" "$n" "$SECS" \
            2>>"$LOGS/latency-$c.log")
        local rc=$?
        stop_server || rc=255
        local p50 p99 p999 mean
        p50=$(awk '/ p50_us$/ {print $1}' <<<"$out")
        p99=$(awk '/ p99_us$/ {print $1}' <<<"$out")
        p999=$(awk '/ p999_us$/ {print $1}' <<<"$out")
        mean=$(awk '/ mean_us$/ {print $1}' <<<"$out")
        local max co
        max=$(awk '/ max_us$/ {print $1}' <<<"$out")
        co=$(awk '/ p99_co_us$/ {p99=$1} / p999_co_us$/ {p999=$1} END {if (p99 != "") print p99 " / p99.9 " p999}' <<<"$out")
        if [ "$rc" -ne 0 ] || [ -z "$p99" ]; then
            note "L$n $(label "$c") run $r: latency failed (see $LOGS/latency-$c.log)"
            addraw "L$n" "$c" "run $r: failed"
            continue
        fi
        add "L${n}p50" "$c" "$p50"
        add "L${n}p99" "$c" "$p99"
        add "L${n}p999" "$c" "$p999"
        addraw "L$n" "$c" "run $r: p50 $p50 / p99 $p99 / p99.9 $p999 / mean $mean / max $max us; corrected for coordinated omission: p99 ${co:-?} us"
        say "[L$n run $r/$RUNS] $(label "$c"): p50 $p50 p99 $p99 p99.9 $p999 us"
    done
}

tool_ok() { [ -x "$1" ] || { note "$2 skipped: $1 not built"; return 1; }; }

LOADAVG=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date +%s)
for cfg in $CONFIGS; do
    case $cfg in
    A | B | C | D | E | B2) runner=run_pp ;;
    H) tool_ok "$TOOL_idle" H || continue; runner=run_h ;;
    R) tool_ok "$TOOL_connrate" R || continue; runner=run_r ;;
    L) tool_ok "$TOOL_latency" L || continue; runner=run_l ;;
    S) tool_ok "$TOOL_scale" S || continue; runner=run_s ;;
    *) note "unknown configuration '$cfg' (known: $ALL_CONFIGS)"; continue ;;
    esac
    for ((r = 1; r <= RUNS; r++)); do
        ROUND=$r
        for c in $(order "$r"); do
            if [ "$runner" = run_pp ]; then run_pp "$cfg" "$c" "$r"; else $runner "$c" "$r"; fi
        done
    done
done
ELAPSED=$(($(date +%s) - START))

# ---------------------------------------------------------------- table

# fmt KIND VALUE: numbers as quoted in the table.
fmt() {
    [ -n "$2" ] || { echo "—"; return; }
    case $1 in
    mib) awk -v v="$2" 'BEGIN { printf "%.0f", v }' ;;
    rate) awk -v v="$2" 'BEGIN { if (v >= 1000) printf "%.1fk", v / 1000; else printf "%.0f", v }' ;;
    kib) awk -v v="$2" 'BEGIN { printf "%.2f", v }' ;;
    us) awk -v v="$2" 'BEGIN { if (v >= 100) printf "%.0f", v; else printf "%.1f", v }' ;;
    esac
}
# ratio KEY CONTENDER: the median over rounds of the contender's value divided by the
# ceiling's value of the same round. The rounds interleave the contenders, so each pair
# was measured minutes apart at most, and the host's slow swings (the ceiling's own runs
# of one configuration can differ by 1.5x) cancel instead of adding up.
ratio() {
    [[ " ${ACTIVE[*]} " == *" epoll "* ]] || return 0
    local r v c ratios=()
    for ((r = 1; r <= RUNS; r++)); do
        v=${RUNV["$1|$2|$r"]:-} c=${RUNV["$1|epoll|$r"]:-}
        [ -n "$v" ] && [ -n "$c" ] || continue
        ratios+=("$(awk -v v="$v" -v c="$c" 'BEGIN { if (c > 0) printf "%.6f", v / c }')")
    done
    [ ${#ratios[@]} -gt 0 ] || return 0
    awk -v m="$(median "${ratios[@]}")" 'BEGIN { if (m != "") printf " (%.2f)", m }'
}
med() { local v=${VAL["$1|$2"]:-}; median $v; }
# short KEY CONTENDER: " [k/RUNS runs]" when only k < RUNS runs gave a figure (the
# others failed: see the run list and the notes), so a median over fewer runs
# does not pass for a full one.
short() {
    local v=${VAL["$1|$2"]:-} k
    k=$(wc -w <<<"$v")
    [ "$k" -lt "$RUNS" ] && echo " [$k/$RUNS runs]"
    return 0
}

has_cfg() { [[ " $CONFIGS " == *" $1 "* ]]; }

COLS=()
HEAD="| contender |"
SEP="|---|"
for cfg in A B C D E B2 S R; do
    has_cfg "$cfg" || continue
    COLS+=("$cfg")
    case $cfg in
    A) HEAD+=" A 1×16K MiB/s |" ;;
    B) HEAD+=" B 10×16K MiB/s |" ;;
    C) HEAD+=" C 100×4K MiB/s |" ;;
    D) HEAD+=" D 1000×64 msg/s |" ;;
    E) HEAD+=" E 1×64 msg/s |" ;;
    B2) HEAD+=" B2 10×16K, 2 thr MiB/s |" ;;
    S) HEAD+=" S ${SCALE_CONNS}×64 msg/s |" ;;
    R) HEAD+=" R conn/s |" ;;
    esac
    SEP+="---:|"
done
if has_cfg L; then
    HEAD+=" L 1 conn p50/p99/p99.9 µs |"
    HEAD+=" L 100 conns p50/p99/p99.9 µs |"
    SEP+="---:|---:|"
fi
if has_cfg H; then
    HEAD+=" H KiB/idle conn (fresh / used) |"
    SEP+="---:|"
fi

TABLE="$HEAD"$'\n'"$SEP"$'\n'
for c in "${ACTIVE[@]}"; do
    row="| $(label "$c") |"
    for cfg in "${COLS[@]}"; do
        v=$(med "$cfg" "$c")
        case $cfg in D | E | R | S) kind=rate ;; *) kind=mib ;; esac
        mark=""
        [ "$cfg" = S ] && [ -n "${UNSERVED[$c]:-}" ] && mark=" **not all served**"
        row+=" $(fmt "$kind" "$v")$([ -n "$v" ] && ratio "$cfg" "$c")$([ -n "$v" ] && short "$cfg" "$c")$mark |"
    done
    if has_cfg L; then
        for n in 1 100; do
            p50=$(med "L${n}p50" "$c") p99=$(med "L${n}p99" "$c") p999=$(med "L${n}p999" "$c")
            if [ -n "$p99" ]; then
                row+=" $(fmt us "$p50") / $(fmt us "$p99") / $(fmt us "$p999")$(ratio "L${n}p99" "$c")$(short "L${n}p99" "$c") |"
            else
                row+=" — |"
            fi
        done
    fi
    if has_cfg H; then
        f=$(med H "$c") u=$(med H1 "$c")
        if [ -n "$f" ]; then row+=" $(fmt kib "$f") / $(fmt kib "$u")$(ratio H "$c")$(short H "$c") |"; else row+=" — |"; fi
    fi
    TABLE+="$row"$'\n'
done

CPU=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
NIO_VER=$(awk '/"identity" *: *"swift-nio"/ {f=1} f && /"version"/ {gsub(/[",]/, "", $3); print $3; exit}' \
    "$HERE/nio/Package.resolved" 2>/dev/null)
LIBUV_VER=$(pkg-config --modversion libuv 2>/dev/null)

{
    echo "# knet benchmark suite — latest results"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "- machine: $NPROC CPUs ($CPU), kernel $(uname -r); load average before the runs: $LOADAVG, after: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- command: \`$CMDLINE\`"
    echo "- settings: RUNS=$RUNS (median quoted), SECONDS=$SECS per throughput/latency run, R_SECONDS=$R_SECONDS, IDLE_CONNS=$IDLE_CONNS, SCALE_CONNS=$SCALE_CONNS; suite time ${ELAPSED}s"
    echo "- toolchains: $(gcc --version 2>/dev/null | head -1); $(go version 2>/dev/null); $(swift --version 2>/dev/null | head -1); libuv ${LIBUV_VER:-?}; SwiftNIO ${NIO_VER:-?}"
    echo
    echo "Each figure is the median over runs. In parentheses: its ratio to the raw-epoll ceiling, paired"
    echo "by round (each run divided by the ceiling's run of the same round, which the interleaving puts"
    echo "minutes apart at most; the median of those ratios), so the host's slow swings cancel. For"
    echo "latency: p99 / the ceiling's p99, for H: fresh KiB / the ceiling's; lower is better. [k/N runs]: only k of"
    echo "the N runs gave a figure (see the notes). Server pinned to CPU 0,"
    echo "client to CPU 1, one loop thread each (B2: two threads each, unpinned). D and E count 64-byte"
    echo "messages echoed per second (bytes / 64). S: D's protocol on $SCALE_CONNS connections, one common"
    echo "epoll client (tools/scale.c) against each server; every connection was served unless marked."
    echo "H: server RSS growth per connection with"
    echo "$IDLE_CONNS connections held, never used (fresh) and after one 64-byte round trip each (used)."
    echo
    printf '%s' "$TABLE"
    echo
    echo "## Every run"
    echo
    for key in A B C D E B2 S H R L1 L100; do
        for c in "${ACTIVE[@]}"; do
            [ -n "${RAW["$key|$c"]:-}" ] && echo "- $key $(label "$c"): ${RAW["$key|$c"]%; }"
        done
    done
    if [ ${#NOTES[@]} -gt 0 ]; then
        echo
        echo "## Notes"
        echo
        for n in "${NOTES[@]}"; do echo "- $n"; done
    fi
} >"$RESULTS/latest.md.tmp"
mv "$RESULTS/latest.md.tmp" "$RESULTS/latest.md"
cat "$RESULTS/latest.md"
