#!/usr/bin/env bash
# expect_line.sh: runs a command that is expected to end badly (a rank killed on purpose makes mpiexec fail) and
# judges it by its output instead: exit 0 iff a line matches PATTERN (grep -E) and none matches NOT (if given).
# usage: expect_line.sh PATTERN NOT -- COMMAND...     (NOT may be "" for none)
set -uo pipefail
pattern=$1 not=$2
shift 2
[[ ${1:-} == -- ]] && shift
out=$(mktemp)
"$@" >"$out" 2>&1
rc=$?
cat "$out"
echo "expect_line: the command exited with $rc"
if ! grep -qE "$pattern" "$out"; then
  echo "expect_line: FAIL: no line matches /$pattern/"
  exit 1
fi
if [[ -n $not ]] && grep -qE "$not" "$out"; then
  echo "expect_line: FAIL: a line matches /$not/"
  exit 1
fi
echo "expect_line: PASS: $(grep -E "$pattern" "$out" | head -n 3 | tr '\n' ' ')"
