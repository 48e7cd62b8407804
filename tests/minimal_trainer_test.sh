#!/usr/bin/env bash
# examples/minimal_trainer, the loop the README tells users to copy, run as a user runs it: under mpiexec at
# stages 0-3 with RANKS ranks. It all-reduces its loss on its own Comm right after every Step (while stages 1-2
# still gather on the engine's side) and evaluates in an eval pass. Each run must exit 0, print 12 step lines and
# an eval line, lower the loss by at least 0.1 in 12 steps, and reach the same evaluation loss at every stage and
# world size (within 1e-3: the data, the initial values and the global batch are independent of both; only fp32
# summation orders differ).
# usage: minimal_trainer_test.sh BINARY MPIEXEC RANKS [mpiexec flags...]
set -euo pipefail
binary=$1 mpiexec=$2 ranks=$3
shift 3
reference=""
for stage in 0 1 2 3; do
  out=$("$mpiexec" -n "$ranks" "$@" "$binary" --stage "$stage" --steps 12 --batch 48) ||
    { echo "FAIL: stage $stage at $ranks ranks exited with $?"; echo "$out"; exit 1; }
  echo "$out" | sed "s/^/[stage $stage] /"
  first=$(sed -n 's/^step   1  loss \([0-9.]*\) .*/\1/p' <<<"$out")
  last=$(sed -n 's/^step  12  loss \([0-9.]*\) .*/\1/p' <<<"$out")
  eval_loss=$(sed -n 's/^eval loss \([0-9.]*\) .*/\1/p' <<<"$out")
  [[ -n $first && -n $last && -n $eval_loss ]] || { echo "FAIL: stage $stage: missing step or eval lines"; exit 1; }
  awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a - 0.1) }' ||
    { echo "FAIL: stage $stage: loss went from $first to $last"; exit 1; }
  if [[ -z $reference ]]; then
    reference=$eval_loss
  else
    awk -v a="$reference" -v b="$eval_loss" 'BEGIN { d = a - b; exit !(d < 1e-3 && d > -1e-3) }' ||
      { echo "FAIL: stage $stage: eval loss $eval_loss, stage 0 had $reference"; exit 1; }
  fi
done
echo "PASS: stages 0-3 at $ranks ranks, eval loss $reference"
