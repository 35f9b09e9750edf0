#!/usr/bin/env bash
# The Swift suite under ThreadSanitizer (its own build folder, so the normal
# build stays warm).
set -euo pipefail
cd "$(dirname "$0")/.."
swift test --sanitize=thread --scratch-path .build-tsan
