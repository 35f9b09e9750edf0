#!/usr/bin/env bash
# The Swift suite under a sanitizer, in its own build folder (so the normal build stays
# warm): `thread` (TSan) or `address` (ASan with LeakSanitizer). The C core (target
# CKNet) is instrumented too, and so is the knet-pingpong executable some tests run.
# Usage: scripts/swift-sanitize.sh thread|address
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:?usage: $0 thread|address}
case $kind in
  thread) dir=.build-tsan ;;
  address)
    dir=.build-asan
    # Leaks are checked when the test process exits; what the toolchain's own libraries
    # leave behind (not knet's) is listed in swift-asan.supp. Stack use after return
    # catches a pointer kept past its withUnsafe* closure (about 5% slower here).
    export ASAN_OPTIONS="detect_leaks=1:detect_stack_use_after_return=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
    export LSAN_OPTIONS="suppressions=$PWD/scripts/swift-asan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
    ;;
  *) echo "usage: $0 thread|address" >&2; exit 2 ;;
esac
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# lld: gold warns of every ASan report symbol it cannot export (the toolchain's, not knet's).
run() { swift test --sanitize="$kind" --scratch-path "$dir" -Xswiftc -warnings-as-errors -Xswiftc -use-ld=lld 2>&1 | tee "$log"; }
# A reused build folder can make SwiftPM fail before building anything ("unknown build
# description"; with --sanitize it does every time on Swift 6.3): then, and only then,
# start the folder afresh and run again.
if ! run; then
  grep -q "unknown build description" "$log" || exit 1
  echo "swift-sanitize: stale $dir, rebuilding it from scratch" >&2
  rm -rf "$dir"
  run
fi
