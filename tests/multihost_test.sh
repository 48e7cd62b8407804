#!/usr/bin/env bash
# The multihost phase of scripts/test.sh: jobs across several hosts made of network namespaces on this machine
# (scripts/netns_cluster.sh), Open MPI over TCP between them, shared memory inside each.
#   1. 2 hosts x 2 ranks, then 3 hosts x 1 rank: comm_topology_test, hierarchical_comm_test and engine_zeropp_test
#      with the nodes MPI detects (ZERO_TEST_NODES = the hosts, which the topology tests require).
#   2. The LoRA example's pretraining with ZeRO++ across 2 hosts x 2 ranks (a real trainer, a few seconds).
#   3. zero_bench_zeropp across 2 hosts x 2 ranks with every host link limited to 200 Mbit/s (unlimited, saying so,
#      where the kernel has no tc tbf): for every
#      configuration the bytes counted to other nodes equal the formula (inter_formula_ratio 1), and each host's link
#      carried at least what its ranks counted (it also carries TCP/IP headers and MPI's own messages): the traffic
#      zero calls inter-node went over the network.
# Skips (exit 0, printing why) only where the kernel or the user cannot make network namespaces.
# usage: tests/multihost_test.sh BUILD_DIR
set -euo pipefail
build=$(cd "$1" && pwd)
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cluster=$here/../scripts/netns_cluster.sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

if ! why=$("$cluster" check); then
  echo "multihost: SKIPPED: $why"
  exit 0
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/multihost.XXXXXX")
trap 'rm -rf "$work"' EXIT
failed=0
fail() { echo "multihost: FAIL: $*"; failed=1; }

# 1. The suites, with the detected nodes.
for layout in "2 2" "3 1"; do
  read -r hosts per_host <<<"$layout"
  for suite in comm_topology_test hierarchical_comm_test engine_zeropp_test; do
    log=$work/$suite.$hosts.log
    start=$SECONDS
    if ZERO_TEST_NODES=$hosts "$cluster" run --hosts "$hosts" --ranks-per-host "$per_host" -- \
        "$build/tests/$suite" --gtest_color=no >"$log" 2>&1; then
      echo "multihost: $suite on $hosts hosts x $per_host: $(grep -c '^\[       OK \]' "$log") tests passed" \
           "($((SECONDS - start)) s)"
    else
      tail -n 40 "$log"
      fail "$suite on $hosts hosts x $per_host"
    fi
  done
done

# 2. The example's pretraining with ZeRO++ across hosts.
lora=$build/examples/lora_finetune/lora_finetune
if [[ -x $lora ]]; then
  log=$work/lora.log
  if "$cluster" run --hosts 2 --ranks-per-host 2 -- "$lora" pretrain --out "$work/lora" --base-corpus synthetic \
      --tune-corpus synthetic --dim 32 --layers 2 --heads 4 --kv-heads 2 --ffn 86 --seq 32 --batch 2 --micro 1 \
      --pretrain-steps 40 --warmup 5 --eval-batches 2 --stage 3 --hpz 1 --qwz 1 --qgz-bits 8 >"$log" 2>&1 &&
      grep -q "ZeRO++: hpz 1, qwz 1, qgz 8 bits; 4 ranks on 2 nodes of 2" "$log" &&
      grep -q "^pretrain: validation loss [0-9.]*$" "$log"; then
    echo "multihost: lora_finetune pretrain with ZeRO++ on 2 hosts x 2: $(grep '^pretrain: validation loss' "$log")"
  else
    tail -n 20 "$log"
    fail "lora_finetune pretrain with ZeRO++ on 2 hosts x 2"
  fi
else
  echo "multihost: lora_finetune not built: its run skipped"
fi

# 3. Bytes counted against bytes on the links, with limited links.
bench=$build/bench/zero_bench_zeropp
if [[ -x $bench ]]; then
  log=$work/bench.log
  rate=(--rate 200mbit)
  if ! why=$("$cluster" check-rate); then
    echo "multihost: links not limited (the bytes check does not need it): $why"
    rate=()
  fi
  if "$cluster" run --hosts 2 --ranks-per-host 2 "${rate[@]}" --stats "$work/links" -- "$bench" --sizes=20 \
      --iterations=2 --ranks_per_node=0 --benchmark_format=csv >"$log" 2>&1; then
    ratios=$(grep '^"ZeroPP' "$log" | awk -F, '{print $12}' | sort -u | tr '\n' ' ')
    [[ $ratios == "1 " ]] || fail "counted inter-node bytes differ from the formula (inter_formula_ratio: $ratios)"
    for node in 0 1; do
      counted=$(sed -n "s/^zero_bench_zeropp: node $node counted \([0-9]*\) bytes.*/\1/p" "$log")
      carried=$(awk -v h="h$node" '$1 ~ h"$" { print $2 }' "$work/links")
      if [[ -z $counted || -z $carried ]] || ! awk -v c="$counted" -v t="$carried" 'BEGIN { exit !(c > 0 && t >= c) }'; then
        fail "host $node's link carried ${carried:-?} bytes, less than the ${counted:-?} its ranks counted"
      else
        echo "multihost: host $node's link carried $carried bytes; its ranks counted $counted to other nodes"
      fi
    done
    grep '^"ZeroPP' "$log" | awk -F, '{gsub(/"/, "", $8); printf "multihost:   %-8s step %6.1f ms  inter-node %9.0f bytes/step  time vs stage 3 %.2f  bytes vs stage 3 %.3f\n", $8, $3, $13, $22, $15}'
  else
    tail -n 30 "$log"
    fail "zero_bench_zeropp on 2 hosts x 2"
  fi
else
  echo "multihost: zero_bench_zeropp not built: the link check skipped"
fi
exit "$failed"
