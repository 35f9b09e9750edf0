#!/usr/bin/env bash
# Runs a program with bad arguments and checks each ends at once (bounded) with a
# message on stderr and exit status 2 (or 1, "status"), never a signal or a hang.
#   bad_args.sh STATUS PROGRAM -- ARGS... [-- ARGS...]...
set -u
want=$1 prog=$2
shift 2
failed=0
run() {
  local err rc
  err=$(timeout -s KILL 20 "$prog" "$@" 2>&1 >/dev/null)
  rc=$?
  if [[ $rc -ne $want || -z $err ]]; then
    echo "FAILED: $prog $* -> status $rc (want $want), stderr: ${err:-<empty>}"
    failed=1
  else
    echo "ok: $prog $* -> $rc: ${err%%$'\n'*}"
  fi
}
args=()
for a in "$@" --; do
  if [[ $a == -- ]]; then
    ((${#args[@]})) && run "${args[@]}"
    args=()
  else
    args+=("$a")
  fi
done
exit $failed
