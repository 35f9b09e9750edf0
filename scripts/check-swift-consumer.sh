#!/usr/bin/env bash
# Builds examples/swift-consumer, an outside package that depends on this
# checkout by path, in debug and release, and runs its echo round trip.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
ln -s "$root" "$tmp/knet"   # the dependency's identity is its folder name: knet
cp -r "$root/examples/swift-consumer" "$tmp/consumer"
for config in debug release; do
  swift build --package-path "$tmp/consumer" -c $config -Xswiftc -warnings-as-errors >/dev/null
  "$tmp/consumer/.build/$config/app"
done
echo "swift consumer check passed"
