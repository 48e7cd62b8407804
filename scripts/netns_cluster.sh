#!/usr/bin/env bash
# scripts/netns_cluster.sh: a cluster of "hosts" on this machine, for real multi-host MPI runs without a cluster.
#
# Each host is a network namespace (iproute2) with a hostname of its own (a UTS namespace, entered by unshare), joined
# to the others through a veth pair to a bridge in a switch namespace. One mpiexec, started in host 0, launches its
# daemons on the other hosts through an rsh agent that enters their namespaces (`ip netns exec`) instead of ssh, so
# Open MPI sees separate nodes: ranks on one host talk through shared memory (vader), ranks on different hosts over
# TCP across the veth links, and MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) finds one node per host. A tc limit on
# every host's link (--rate) makes the inter-host bandwidth scarce, as between real nodes.
#
# usage:
#   scripts/netns_cluster.sh check
#       exit 0 when network namespaces, veth links and a bridge can be made here; 77 printing why not (not root, or
#       a kernel or container that forbids them)
#   scripts/netns_cluster.sh check-rate
#       exit 0 when, on top of that, tc can limit a link here (the tbf queueing discipline that --rate uses); 77
#       printing why not (a kernel without sch_tbf)
#   scripts/netns_cluster.sh run [--hosts H] [--ranks-per-host R] [--rate RATE] [--stats FILE] [--mpi-arg ARG]...
#                                -- PROGRAM [ARGS...]
#       makes H hosts (default 2) of R ranks (default 2), runs PROGRAM on all H*R ranks under one mpiexec, removes the
#       hosts, and exits with mpiexec's status. --rate: a token-bucket limit (tc tbf) on every host's link in both
#       directions, in tc's units (200mbit, 1gbit). --stats FILE: after the run, one line per host,
#       "host tx_bytes rx_bytes", what its link carried. --mpi-arg: passed to mpiexec (repeatable). The environment
#       reaches every rank (the agent inherits mpiexec's).
#
# Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN), iproute2 (ip, tc), util-linux's unshare and Open MPI's mpiexec.
# Names carry this process's id, so several clusters can exist at once; an exit (or a signal) removes them.
set -euo pipefail

subnet_prefix=10.77.0      # hosts are .1, .2, ... on a /24 inside their namespaces (private to the cluster)
prefix="zc$$"              # namespace names: ${prefix}h0 ... and ${prefix}sw

die() { echo "netns_cluster: $*" >&2; exit 1; }

made=()
cleanup() {
  local ns
  for ns in "${made[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  made=()
  [[ -n ${work:-} ]] && rm -rf "$work"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

check() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "network namespaces need root (CAP_NET_ADMIN); running as uid $(id -u)"
    return 77
  fi
  local need
  for need in ip tc unshare mpiexec; do
    command -v "$need" >/dev/null || { echo "$need is not installed (scripts/deps.sh installs it)"; return 77; }
  done
  local probe="${prefix}probe" err="" rc=0
  if ! err=$(ip netns add "$probe" 2>&1); then
    echo "the kernel refuses network namespaces here: ip netns add: $err"
    return 77
  fi
  if ! err=$(ip netns exec "$probe" ip link add name zca type veth peer name zcb 2>&1); then
    echo "the kernel refuses veth links here: $err"
    rc=77
  elif ! err=$(ip netns exec "$probe" ip link add name zcbr type bridge 2>&1); then
    echo "the kernel refuses bridges here: $err"
    rc=77
  elif ! err=$(ip netns exec "$probe" unshare --uts -- hostname zcprobe 2>&1); then
    echo "the kernel refuses UTS namespaces here (unshare --uts): $err"
    rc=77
  fi
  ip netns del "$probe" 2>/dev/null || true
  return "$rc"
}

check_rate() {
  local probe="${prefix}rate" err="" rc=0
  err=$(check) || { echo "$err"; return 77; }
  ip netns add "$probe"
  if ! err=$(ip netns exec "$probe" ip link add name zca type veth peer name zcb 2>&1); then
    echo "veth: $err"
    rc=77
  elif ! err=$(ip netns exec "$probe" tc qdisc add dev zca root tbf rate 200mbit burst 64kb latency 200ms 2>&1); then
    echo "the kernel refuses tc's tbf queueing discipline here (no sch_tbf?): $err"
    rc=77
  fi
  ip netns del "$probe" 2>/dev/null || true
  return "$rc"
}

# Makes the switch and `hosts` hosts; host i is ${prefix}h$i at ${subnet_prefix}.(i+1), its link "eth0".
make_hosts() {
  local hosts=$1 rate=$2 i sw="${prefix}sw"
  ip netns add "$sw"
  made+=("$sw")
  ip -n "$sw" link set lo up
  ip -n "$sw" link add name br0 type bridge
  ip -n "$sw" link set br0 up
  for ((i = 0; i < hosts; i++)); do
    local h="${prefix}h$i"
    ip netns add "$h"
    made+=("$h")
    ip -n "$h" link set lo up
    ip link add name eth0 netns "$h" type veth peer name "p$i" netns "$sw"
    ip -n "$sw" link set "p$i" master br0
    ip -n "$sw" link set "p$i" up
    ip -n "$h" addr add "${subnet_prefix}.$((i + 1))/24" dev eth0
    ip -n "$h" link set eth0 up
    if [[ -n $rate ]]; then
      # Egress of the host's end limits what it sends, egress of the switch's end what it receives. The bucket
      # (64 KB) lets a short message through at once; the queue holds 200 ms of traffic before dropping.
      local qdisc=(tbf rate "$rate" burst 64kb latency 200ms)
      ip netns exec "$h" tc qdisc add dev eth0 root "${qdisc[@]}"
      ip netns exec "$sw" tc qdisc add dev "p$i" root "${qdisc[@]}"
    fi
  done
}

link_stats() {
  local hosts=$1 i
  for ((i = 0; i < hosts; i++)); do
    local h="${prefix}h$i"
    echo "$h $(ip netns exec "$h" cat /sys/class/net/eth0/statistics/tx_bytes) \
$(ip netns exec "$h" cat /sys/class/net/eth0/statistics/rx_bytes)"
  done
}

run() {
  local hosts=2 per_host=2 rate="" stats="" mpi_args=()
  while (($#)); do
    case $1 in
      --hosts) hosts=$2; shift ;;
      --ranks-per-host) per_host=$2; shift ;;
      --rate) rate=$2; shift ;;
      --stats) stats=$2; shift ;;
      --mpi-arg) mpi_args+=("$2"); shift ;;
      --) shift; break ;;
      *) die "unknown argument $1 (see the comment at the top of scripts/netns_cluster.sh)" ;;
    esac
    shift
  done
  (($#)) || die "run: no program after --"
  local why
  why=$(check) || { echo "netns_cluster: $why" >&2; return 77; }
  work=$(mktemp -d "${TMPDIR:-/tmp}/netns_cluster.XXXXXX")
  make_hosts "$hosts" "$rate"
  local i
  for ((i = 0; i < hosts; i++)); do echo "${prefix}h$i slots=$per_host"; done >"$work/hostfile"
  # Open MPI's rsh agent: "agent [options] HOST COMMAND..." runs COMMAND (one shell line, as ssh would) in HOST.
  cat >"$work/agent" <<'EOF'
#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
host=$1
shift
exec ip netns exec "$host" unshare --uts -- sh -c "hostname $host; $*"
EOF
  chmod +x "$work/agent"
  local net="${subnet_prefix}.0/24" rc=0
  ip netns exec "${prefix}h0" unshare --uts -- sh -c 'hostname "$0"; exec "$@"' "${prefix}h0" \
    mpiexec -n $((hosts * per_host)) --hostfile "$work/hostfile" --mca plm_rsh_agent "$work/agent" \
    --mca plm_rsh_no_tree_spawn 1 --mca btl self,vader,tcp --mca btl_tcp_if_include "$net" \
    --mca oob_tcp_if_include "$net" --bind-to none --oversubscribe "${mpi_args[@]}" "$@" || rc=$?
  if [[ -n $stats ]]; then link_stats "$hosts" >"$stats"; fi
  cleanup
  return "$rc"
}

case ${1:-} in
  check) shift; check ;;
  check-rate) shift; check_rate ;;
  run) shift; run "$@" ;;
  *) die "usage: $0 check | check-rate | run [options] -- PROGRAM [ARGS...] (see the comment at the top)" ;;
esac
