#!/usr/bin/env bash
# A rank killed (SIGKILL) in the middle of a step (ctest dead_rank, 3 ranks): every survivor must return a status
# naming the collective, bucket and step within about the communication timeout (3 s; asserted < 12 s, room for
# 3 ranks on 2 shared cores), and the last complete checkpoint must load in a fresh 2-rank job. Asserts on the
# files each rank writes (dead_rank_main.cc), not on mpiexec's exit code, which a killed rank makes non-zero.
# usage: dead_rank_test.sh BINARY MPIEXEC WORKDIR [mpiexec flags...]
set -uo pipefail
binary=$1 mpiexec=$2 work=$3
shift 3
rm -rf "$work"
mkdir -p "$work"
fail() { echo "dead_rank_test: FAIL: $*"; for f in "$work"/*.txt; do [[ -f $f ]] && { echo "--- $f"; cat "$f"; }; done; exit 1; }

victim=1
start=$SECONDS
# --enable-recovery: mpiexec keeps the other ranks running when one dies (they must find out by themselves).
timeout 120 "$mpiexec" --enable-recovery -n 3 "$@" "$binary" train "$work" "$victim" >"$work/train.log" 2>&1
echo "train job ended after $((SECONDS - start)) s (mpiexec exit code $?, expected non-zero: a rank was killed)"

[[ ! -f $work/rank-$victim.txt ]] || fail "the killed rank $victim wrote an outcome"
for r in 0 2; do
  f=$work/rank-$r.txt
  [[ -f $f ]] || { cat "$work/train.log"; fail "survivor rank $r wrote no outcome (hung or crashed)"; }
  code=$(sed -n 's/^code=//p' "$f")
  msg=$(sed -n 's/^message=//p' "$f")
  secs=$(sed -n 's/^seconds=//p' "$f")
  # Timeout: the rank waited out its own timeout; Aborted: a peer's notice arrived first, carrying its reason.
  [[ $code == Timeout || $code == Aborted ]] || fail "rank $r: code $code, expected Timeout or Aborted"
  grep -q "step 4" <<<"$msg" || fail "rank $r: the message does not name step 4: $msg"
  grep -qE "buckets? [0-9]+" <<<"$msg" || fail "rank $r: the message does not name a bucket: $msg"
  grep -qiE "reduce-scatter|all-gather|gather|reduc" <<<"$msg" || fail "rank $r: the message names no collective: $msg"
  awk -v s="$secs" 'BEGIN { exit !(s > 0 && s < 12) }' || fail "rank $r: failed after $secs s (timeout 3 s)"
  echo "rank $r: $code after $secs s: $msg"
done

[[ $(cat "$work/ckpt/latest" 2>/dev/null) == step3 ]] || fail "ckpt/latest does not name step3"
timeout 120 "$mpiexec" -n 2 "$@" "$binary" load "$work" >"$work/load.log" 2>&1 || { cat "$work/load.log"; fail "the load job failed"; }
for r in 0 1; do
  f=$work/load-$r.txt
  [[ -f $f ]] || fail "load rank $r wrote no outcome"
  [[ $(sed -n 's/^code=//p' "$f") == OK ]] || fail "load rank $r: $(cat "$f")"
  [[ $(sed -n 's/^step=//p' "$f") == 3 ]] || fail "load rank $r: loaded step $(sed -n 's/^step=//p' "$f"), expected 3"
done
echo "dead_rank_test: OK"
