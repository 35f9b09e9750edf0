#!/usr/bin/env bash
# Installs knet into a scratch prefix and builds an outside project against it
# twice: with CMake's find_package(knet) and with pkg-config; both run an echo
# round trip (examples/consumer).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cmake -S "$root" -B "$tmp/build" -DBUILD_TESTING=OFF -DKNET_BUILD_BENCHMARKS=OFF -DKNET_BUILD_EXAMPLES=OFF \
      -DCMAKE_INSTALL_PREFIX="$tmp/configured-prefix" >/dev/null
cmake --build "$tmp/build" -j2 >/dev/null
cmake --install "$tmp/build" --prefix "$tmp/prefix" >/dev/null # chosen at install, as README shows
cmake -S "$root/examples/consumer" -B "$tmp/consumer" -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/consumer" >/dev/null
"$tmp/consumer/consumer"
libdir="$(dirname "$(find "$tmp/prefix" -name 'libknet.so' | head -1)")"
cc -std=c11 "$root/examples/consumer/consumer.c" \
   $(PKG_CONFIG_PATH="$libdir/pkgconfig" pkg-config --cflags --libs knet) -pthread -o "$tmp/consumer-pc"
LD_LIBRARY_PATH="$libdir" "$tmp/consumer-pc"
echo "install check passed (find_package and pkg-config)"
