#!/usr/bin/env bash
# The Swift suite under ThreadSanitizer (its own build folder, so the normal
# build stays warm).
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
run() { swift test --sanitize=thread --scratch-path .build-tsan 2>&1 | tee "$log"; }
# A reused .build-tsan can make SwiftPM fail before building anything ("unknown
# build description"): then, and only then, start the folder afresh and run again.
if ! run; then
  grep -q "unknown build description" "$log" || exit 1
  echo "swift-tsan: stale .build-tsan, rebuilding it from scratch" >&2
  rm -rf .build-tsan
  run
fi
