#!/usr/bin/env bash
# knet as a dependency, the ways C and C++ projects take it. Every consumer runs an
# echo round trip (examples/consumer):
#  1. installed with a prefix chosen at install time: find_package(knet) with the static
#     and the shared target, version requests; pkg-config, shared and static; C++11/17;
#     no global symbol outside knet_ in libknet.a or libknet.so; libknet.so exports exactly
#     what knet.h declares, has no RUNPATH, and a SONAME that changes as find_package's
#     compatibility does; the installed tree holds only what it should.
#  2. installed with DESTDIR and then moved elsewhere: both ways still work (relocatable).
#  3. installed with absolute CMAKE_INSTALL_LIBDIR/INCLUDEDIR (as distributions pass them):
#     pkg-config finds the header and the library.
#  4. added to a parent project with add_subdirectory (as FetchContent does): only the
#     library comes along — no tests, examples, benchmarks, target names, -Werror or build
#     type of knet's own in the parent's build.
# Prints every failed check and exits non-zero if there was one.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
failed=0
fail() { echo "FAILED: $*" >&2; failed=$((failed + 1)); }
quiet() { # runs "$@" with its output in $tmp/log, shown when it fails
  "$@" >"$tmp/log" 2>&1 || { tail -n 15 "$tmp/log" >&2; return 1; }
}

lib_only=(-DBUILD_TESTING=OFF -DKNET_BUILD_BENCHMARKS=OFF -DKNET_BUILD_EXAMPLES=OFF)
quiet cmake -S "$root" -B "$tmp/build" "${lib_only[@]}" -DCMAKE_INSTALL_PREFIX="$tmp/configured-prefix"
quiet cmake --build "$tmp/build" -j2

# consumers PREFIX NAME: builds examples/consumer against the knet installed in PREFIX with
# CMake (static and shared target) and pkg-config (shared, static), runs each.
consumers() {
  local prefix=$1 name=$2 out="$tmp/$2" libdir
  libdir="$(dirname "$(find "$prefix" -name libknet.so | head -1)")"
  if quiet cmake -S "$root/examples/consumer" -B "$out/cmake" -DCMAKE_PREFIX_PATH="$prefix" &&
     quiet cmake --build "$out/cmake"; then
    "$out/cmake/consumer" || fail "$name: find_package, knet::knet"
    "$out/cmake/consumer_shared" || fail "$name: find_package, knet::knet_shared"
    readelf -d "$out/cmake/consumer_shared" | grep -q 'NEEDED.*libknet\.so' ||
      fail "$name: knet::knet_shared did not link libknet.so"
  else
    fail "$name: find_package consumer does not build"
  fi
  local pc=(env PKG_CONFIG_PATH="$libdir/pkgconfig" pkg-config)
  if quiet cc -std=c11 -Wall -Wextra -Werror "$root/examples/consumer/consumer.c" \
       $("${pc[@]}" --cflags --libs knet) -pthread -o "$out/pc-shared"; then
    LD_LIBRARY_PATH="$libdir" "$out/pc-shared" || fail "$name: pkg-config consumer (shared)"
  else
    fail "$name: pkg-config consumer (shared) does not build"
  fi
  # --static adds Libs.private; the archive itself is named so that no .so is taken.
  if quiet cc -std=c11 "$root/examples/consumer/consumer.c" $("${pc[@]}" --static --cflags knet) \
       "$("${pc[@]}" --variable=libdir knet)/libknet.a" \
       $("${pc[@]}" --static --libs-only-other knet) -o "$out/pc-static"; then
    "$out/pc-static" || fail "$name: pkg-config consumer (static)"
  else
    fail "$name: pkg-config consumer (static) does not build"
  fi
}

# 1. --prefix at install time, as README shows.
quiet cmake --install "$tmp/build" --prefix "$tmp/prefix"
consumers "$tmp/prefix" prefix
v="$(sed -n 's/^project(knet VERSION \([0-9.]*\).*/\1/p' "$root/CMakeLists.txt")"
hv="$(awk '/#define KNET_VERSION_(MAJOR|MINOR|PATCH)/ {printf "%s%s", sep, $3; sep = "."}' "$tmp/prefix/include/knet/knet.h")"
pv="$(PKG_CONFIG_PATH="$(dirname "$(find "$tmp/prefix" -name knet.pc)")" pkg-config --modversion knet)"
[[ $hv == "$v" && $pv == "$v" ]] || fail "versions differ: CMake $v, knet.h $hv, knet.pc $pv"
for req in "$v" "${v%.*}"; do
  quiet cmake -S "$root/examples/consumer" -B "$tmp/req-ok-$req" -DCMAKE_PREFIX_PATH="$tmp/prefix" \
    -DKNET_REQUIRE="$req" || fail "find_package(knet $req) refused version $v"
done
if cmake -S "$root/examples/consumer" -B "$tmp/req-high" -DCMAKE_PREFIX_PATH="$tmp/prefix" \
     -DKNET_REQUIRE=$((${v%%.*} + 1)).0 >/dev/null 2>&1; then
  fail "find_package(knet $((${v%%.*} + 1)).0) accepted version $v"
fi
# The loader refuses what find_package refuses: the next minor version (this tree configured
# as one) must not satisfy find_package(knet $v) while a program linked to this libknet.so
# would load it (the same SONAME) -- it would run against an ABI its build never saw.
v_next="${v%%.*}.$(($(cut -d. -f2 <<<"$v") + 1)).0"
echo "set(PROJECT_VERSION $v_next)
set(PROJECT_VERSION_MINOR $(cut -d. -f2 <<<"$v_next"))
set(PROJECT_VERSION_PATCH 0)" >"$tmp/next-version.cmake"
quiet cmake -S "$root" -B "$tmp/build-next" "${lib_only[@]}" -DCMAKE_PROJECT_knet_INCLUDE="$tmp/next-version.cmake"
quiet cmake --build "$tmp/build-next" -j2
quiet cmake --install "$tmp/build-next" --prefix "$tmp/next-prefix"
soname() { readelf -d "$1" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p'; }
so_now="$(soname "$(find "$tmp/prefix" -name libknet.so)")"
so_next="$(soname "$(find "$tmp/next-prefix" -name libknet.so)")"
if ! cmake -S "$root/examples/consumer" -B "$tmp/req-next" -DCMAKE_PREFIX_PATH="$tmp/next-prefix" \
     -DKNET_REQUIRE="$v" >/dev/null 2>&1 && [[ $so_now == "$so_next" ]]; then
  fail "find_package(knet $v) refuses $v_next, but both are SONAME $so_now: a program built on $v loads $v_next"
fi
# Symbol hygiene: both libraries define no global name outside knet_ (libknet.a's are
# linked into the program, where hidden visibility does not keep them apart), so a program
# with helpers of its own named kn_* links statically.
for lib in "$(find "$tmp/prefix" -name libknet.a)" "$(find "$tmp/prefix" -name libknet.so)"; do
  other="$(nm -g --defined-only "$lib" | awk 'NF == 3 && $3 !~ /^knet_/ {print $3}' | sort -u)"
  [[ -z $other ]] || fail "$(basename "$lib") defines $(wc -w <<<"$other") names outside knet_: $(echo $other | cut -c1-120)..."
done
# libknet.so exports exactly what knet.h declares: no knet__ internals a program could bind
# to (or collide with), and no public call left hidden.
so="$(find "$tmp/prefix" -name libknet.so)"
declared="$(cc -E -P "$tmp/prefix/include/knet/knet.h" |
  grep -oE '\bknet_[a-z0-9_]+ *\(|extern const [a-z_]+ knet_[a-z_]+' | sed -E 's/ *\($//; s/.* //' | sort -u)"
exported="$(nm -D --defined-only "$so" | awk '{print $3}' | sort -u)"
[[ $declared == "$exported" ]] ||
  fail "libknet.so's exports differ from knet.h's declarations: $(diff <(echo "$declared") <(echo "$exported") | grep '^[<>]' | tr '\n' ' ')"
! readelf -d "$so" | grep -qE 'RPATH|RUNPATH' || fail "the installed libknet.so has an RPATH/RUNPATH"
# The installed tree: the public header, the libraries, the CMake package and knet.pc only
# (no internal header, nothing of the tests).
# (Only include/ and the libdir, lib or lib64: the consumers above were built in $tmp/prefix too.)
l="${so#"$tmp/prefix/"}"; l="${l%/libknet.so}"
files="$(cd "$tmp/prefix" && find include "$l" -type f -o -type l | sort | tr '\n' ' ')"
want="include/knet/knet.h $l/cmake/knet/knetConfig.cmake $l/cmake/knet/knetConfigVersion.cmake $l/cmake/knet/knetTargets-relwithdebinfo.cmake $l/cmake/knet/knetTargets.cmake $l/libknet.a $l/libknet.so $l/libknet.so.$v $l/libknet.so.${v%.*} $l/pkgconfig/knet.pc"
[[ $(echo $files | tr ' ' '\n' | sort | tr '\n' ' ') == "$(echo $want | tr ' ' '\n' | sort | tr '\n' ' ')" ]] ||
  fail "installed files: $files (expected $want)"
cat >"$tmp/own_kn.c" <<'EOF2'
#include <knet/knet.h>
#include <stdio.h>
void kn_log(const char *msg);
long kn_now_ms(void);
void kn_log(const char *msg) { puts(msg); }
long kn_now_ms(void) { return 0; }
int main(void) {
    kn_log(knet_strerror(KNET_ECLOSED));
    knet_server *s = knet_server_new("127.0.0.1:0");
    knet_server_close(s);
    int rc = knet_server_listen_and_serve(s, NULL, NULL);
    knet_server_free(s);
    return rc == KNET_ESERVERCLOSED && kn_now_ms() == 0 ? 0 : 1;
}
EOF2
if quiet cc -std=c11 -Wall -Wextra -Werror -I"$tmp/prefix/include" "$tmp/own_kn.c" \
     "$(find "$tmp/prefix" -name libknet.a)" -pthread -o "$tmp/own_kn"; then
  quiet "$tmp/own_kn" || fail "a program with its own kn_log (static knet)"
else
  fail "a program with its own kn_log, kn_now_ms does not link with libknet.a"
fi
for std in c++11 c++17; do
  if quiet c++ -std=$std -Wall -Wextra -Werror -pedantic -I"$tmp/prefix/include" \
       "$root/examples/consumer/consumer.cpp" -L"$(dirname "$(find "$tmp/prefix" -name libknet.a)")" \
       -Wl,-Bstatic -lknet -Wl,-Bdynamic -pthread -o "$tmp/cxx-$std"; then
    "$tmp/cxx-$std" || fail "C++ consumer ($std)"
  else
    fail "C++ consumer ($std) does not build"
  fi
done

# 2. DESTDIR, then the tree moved: nothing may point back to where it was installed.
quiet env DESTDIR="$tmp/stage" cmake --install "$tmp/build"
mv "$tmp/stage$tmp/configured-prefix" "$tmp/moved"
consumers "$tmp/moved" moved

# 3. Absolute install dirs.
quiet cmake -S "$root" -B "$tmp/build-abs" "${lib_only[@]}" -DCMAKE_INSTALL_PREFIX="$tmp/abs" \
  -DCMAKE_INSTALL_LIBDIR="$tmp/abs/lib" -DCMAKE_INSTALL_INCLUDEDIR="$tmp/abs/inc"
quiet cmake --build "$tmp/build-abs" -j2
quiet cmake --install "$tmp/build-abs"
consumers "$tmp/abs" absolute-dirs

# 4. A parent project that adds knet's source tree. Its build has a warning knet's code
# has (-Wcast-qual): knet's own -Werror must not turn the parent's choice of warnings into a
# failed build. A second parent has targets of names a project may well use itself.
mkdir -p "$tmp/parent" "$tmp/parent-names"
for p in parent parent-names; do
  ln -s "$root" "$tmp/$p/knet"
  cp "$root/examples/consumer/consumer.c" "$tmp/$p/"
done
cat >"$tmp/parent/CMakeLists.txt" <<'EOF2'
cmake_minimum_required(VERSION 3.16)
project(parent C)
enable_testing()
add_subdirectory(knet)
add_executable(app consumer.c)
target_link_libraries(app PRIVATE knet::knet)
add_test(NAME app COMMAND app)
EOF2
if quiet cmake -S "$tmp/parent" -B "$tmp/parent-build" -DCMAKE_C_FLAGS=-Wcast-qual; then
  grep -q '^CMAKE_BUILD_TYPE:STRING=$' "$tmp/parent-build/CMakeCache.txt" ||
    fail "subproject: knet set the parent's $(grep '^CMAKE_BUILD_TYPE:' "$tmp/parent-build/CMakeCache.txt")"
  tests="$(ctest --test-dir "$tmp/parent-build" -N | sed -n 's/^Total Tests: //p')"
  [[ $tests == 1 ]] || fail "subproject: the parent's ctest has $tests tests, not its 1"
  extra="$(cmake --build "$tmp/parent-build" --target help | grep -cE '^\.\.\. (echo_server|.*pingpong|latency|scale|connrate|idle_conns|soak|knet_test_.*|knet_fault_.*)$' || true)"
  [[ $extra == 0 ]] || fail "subproject: the parent's build has $extra targets of knet's tests, examples and benchmarks"
  if quiet cmake --build "$tmp/parent-build" -j2 --target app; then
    "$tmp/parent-build/app" || fail "subproject: app"
  else
    fail "subproject: the parent does not build (CMAKE_C_FLAGS=-Wcast-qual)"
  fi
else
  fail "subproject: the parent does not configure"
fi
sed -e 's/^add_subdirectory(knet)$/foreach(t echo_server latency scale connrate soak)\
  add_executable(${t} consumer.c)\
  target_link_libraries(${t} PRIVATE knet::knet)\
endforeach()\
add_subdirectory(knet)/' "$tmp/parent/CMakeLists.txt" >"$tmp/parent-names/CMakeLists.txt"
quiet cmake -S "$tmp/parent-names" -B "$tmp/parent-names-build" ||
  fail "subproject: a parent with targets echo_server, latency, scale, connrate, soak does not configure"

if ((failed)); then
  echo "install check: $failed failed" >&2
  exit 1
fi
echo "install check passed (find_package, pkg-config, C++, DESTDIR + moved, absolute dirs, subproject)"
