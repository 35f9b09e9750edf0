#!/usr/bin/env bash
# Runs every test of knet: the C suite (ctest) plainly, under ASan+UBSan,
# under TSan, built with clang and under MSan (clang); the Swift suite (swift test),
# also under TSan and under ASan+LSan; and each fuzzer for a short time.
# Usage: scripts/test-all.sh            (from anywhere; builds into build-test-*)
# Env:   KNET_TEST_SKIP="tsan fuzz ..."  skips parts: plain asan tsan clang msan swift swift-tsan swift-asan fuzz
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
skip=" ${KNET_TEST_SKIP:-} "
jobs=$(nproc 2>/dev/null || echo 2)
failed=()

step() { echo; echo "==== $*"; }
run_ctest() { # name, cmake args...
  local name=$1; shift
  local dir="$root/build-test-$name"
  step "C suite ($name)"
  cmake -S "$root" -B "$dir" -DKNET_BUILD_BENCHMARKS=ON "$@" >/dev/null &&
  cmake --build "$dir" -j"$jobs" >/dev/null &&
  ctest --test-dir "$dir" --output-on-failure -j2 || failed+=("ctest-$name")
}

[[ $skip == *" plain "* ]] || run_ctest plain -DCMAKE_BUILD_TYPE=RelWithDebInfo
[[ $skip == *" asan "* ]]  || run_ctest asan -DCMAKE_BUILD_TYPE=Debug "-DKNET_SANITIZE=address;undefined"
[[ $skip == *" tsan "* ]]  || run_ctest tsan -DCMAKE_BUILD_TYPE=Debug -DKNET_SANITIZE=thread
# The same -Werror build with clang (the Swift toolchain's when none is on PATH).
if [[ $skip != *" clang "* ]]; then
  cc=$(command -v clang || echo /opt/swift/usr/bin/clang)
  cxx=$(command -v clang++ || echo /opt/swift/usr/bin/clang++)
  if [[ -x $cc && -x $cxx ]]; then
    run_ctest clang -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER="$cc" -DCMAKE_CXX_COMPILER="$cxx"
  else
    echo "no clang found: the clang build is skipped"; failed+=("clang-missing")
  fi
fi
# MemorySanitizer (reads of uninitialised memory), which only clang has. Optimised, as
# MSan's docs advise: at -O0 the tests' per-byte pattern checks took 4 min, now 1.
if [[ $skip != *" msan "* ]]; then
  cc=$(command -v clang || echo /opt/swift/usr/bin/clang)
  cxx=$(command -v clang++ || echo /opt/swift/usr/bin/clang++)
  if [[ -x $cc && -x $cxx ]]; then
    run_ctest msan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKNET_SANITIZE=memory -DCMAKE_C_COMPILER="$cc" -DCMAKE_CXX_COMPILER="$cxx"
  else
    echo "no clang found: the MSan build is skipped"
  fi
fi

if [[ $skip != *" swift "* ]]; then
  step "Swift suite (swift test)"
  swift build -Xswiftc -warnings-as-errors --build-tests &&
  swift test -Xswiftc -warnings-as-errors --skip-build || failed+=("swift-test")
fi
if [[ $skip != *" swift-tsan "* ]] && [[ -x "$root/scripts/swift-sanitize.sh" ]]; then
  step "Swift suite under TSan"
  "$root/scripts/swift-sanitize.sh" thread || failed+=("swift-tsan")
fi
if [[ $skip != *" swift-asan "* ]] && [[ -x "$root/scripts/swift-sanitize.sh" ]]; then
  step "Swift suite under ASan+LSan"
  "$root/scripts/swift-sanitize.sh" address || failed+=("swift-asan")
fi
if [[ $skip != *" fuzz "* ]] && [[ -x "$root/fuzz/run.sh" ]]; then
  step "fuzzers (short run)"
  "$root/fuzz/run.sh" 20 || failed+=("fuzz")
fi

echo
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]}"
  exit 1
fi
echo "all test suites passed"
