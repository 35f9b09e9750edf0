#!/usr/bin/env bash
# The Swift suite under AddressSanitizer with LeakSanitizer (its own build folder, so the
# normal build stays warm). The C core (target CKNet) is instrumented too, and so is the
# knet-pingpong executable some tests run.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Leaks are checked when the test process exits; what the toolchain's own libraries
# leave behind (not knet's) is listed in swift-asan.supp. Stack use after return catches
# a pointer kept past its withUnsafe* closure (about 5% slower here).
export ASAN_OPTIONS="detect_leaks=1:detect_stack_use_after_return=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export LSAN_OPTIONS="suppressions=$PWD/scripts/swift-asan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
run() { swift test --sanitize=address --scratch-path .build-asan -Xswiftc -warnings-as-errors 2>&1 | tee "$log"; }
# A reused .build-asan can make SwiftPM fail before building anything ("unknown build
# description"; with --sanitize it does every time on Swift 6.3): then, and only then,
# start the folder afresh and run again.
if ! run; then
  grep -q "unknown build description" "$log" || exit 1
  echo "swift-asan: stale .build-asan, rebuilding it from scratch" >&2
  rm -rf .build-asan
  run
fi
