#!/usr/bin/env bash
# Builds knet's libFuzzer harnesses (with ASan + UBSan) into fuzz/out/ and runs
# each for SECONDS (default 20). Exit 1 if any fuzzer finds a crash or fails to
# build. One summary line per fuzzer.
#
# Usage: fuzz/run.sh [SECONDS] [NAME...]     NAME: fuzz_codecs, fuzz_addr (default: all)
# Env:   FUZZ_CC     a clang with -fsanitize=fuzzer (default: clang on PATH that
#                    supports it, else /opt/swift/usr/bin/clang)
#        FUZZ_ARGS   extra libFuzzer flags, e.g. "-jobs=2 -workers=2"
# Crash inputs land in fuzz/out/crash-<name>-*; the growing corpus in
# fuzz/out/corpus/<name> (the committed seeds in fuzz/corpus/<name> are only read).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
secs="${1:-20}"
shift || true
names=("$@")
((${#names[@]})) || names=(fuzz_codecs fuzz_addr)
out="$root/fuzz/out"
mkdir -p "$out"

supports_fuzzer() { # compiler: builds and links a trivial fuzz target?
  local t="$out/.probe"
  printf '#include <stdint.h>\n#include <stddef.h>\nint LLVMFuzzerTestOneInput(const uint8_t *d, size_t n){(void)d;(void)n;return 0;}\n' >"$t.c"
  "$1" -fsanitize=fuzzer "$t.c" -o "$t" >/dev/null 2>&1
}
cc="${FUZZ_CC:-}"
if [[ -z $cc ]]; then
  for c in clang /opt/swift/usr/bin/clang; do
    if command -v "$c" >/dev/null 2>&1 && supports_fuzzer "$c"; then cc="$c"; break; fi
  done
fi
if [[ -z $cc ]]; then
  echo "fuzz: no clang with -fsanitize=fuzzer found (set FUZZ_CC)" >&2
  exit 1
fi
# lld avoids ld.gold's harmless "Cannot export local symbol" noise.
ldflag=""
if "$cc" -fuse-ld=lld -fsanitize=fuzzer "$out/.probe.c" -o "$out/.probe" >/dev/null 2>&1; then
  ldflag="-fuse-ld=lld"
fi

cflags=(-std=c11 -g -O1 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined
        -fno-sanitize-recover=all -fno-omit-frame-pointer
        -Wall -Wextra -Werror -I"$root/csrc" -I"$root/include")
failed=0
for name in "${names[@]}"; do
  src="$root/fuzz/$name.c"
  if [[ ! -f $src ]]; then echo "$name: no such harness ($src)"; failed=1; continue; fi
  if ! "$cc" "${cflags[@]}" $ldflag "$src" "$root"/csrc/*.c -lpthread -o "$out/$name" 2>"$out/$name.build.log"; then
    echo "$name: BUILD FAILED (see $out/$name.build.log)"; cat "$out/$name.build.log" >&2; failed=1; continue
  fi
  mkdir -p "$out/corpus/$name"
  log="$out/$name.log"
  set +e
  # shellcheck disable=SC2086
  "$out/$name" "$out/corpus/$name" "$root/fuzz/corpus/$name" -max_total_time="$secs" \
      -timeout=10 -print_final_stats=1 -artifact_prefix="$out/crash-$name-" ${FUZZ_ARGS:-} >"$log" 2>&1
  rc=$?
  set -e
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
  corpus=$(find "$out/corpus/$name" -type f | wc -l)
  if ((rc != 0)); then
    echo "$name: FAILED (exit $rc) after ${runs:-?} runs; log $log; crash input:"
    ls "$out"/crash-"$name"-* 2>/dev/null || true
    grep -E 'ERROR|check failed|SUMMARY' "$log" | head -5
    failed=1
  else
    echo "$name: ok, ${runs:-?} runs in ${secs} s, coverage ${cov:-?}, corpus $corpus, 0 crashes"
  fi
done
rm -f "$out/.probe" "$out/.probe.c"
exit $failed
