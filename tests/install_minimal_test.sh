#!/usr/bin/env bash
# examples/minimal_trainer from the installed package: installs this build of zero into a temporary prefix, builds
# the example against it the way the README says (tests/install_minimal: find_package(zero), zero::zero), and runs
# tests/minimal_trainer_test.sh with that binary at 1, 2 and 3 ranks.
# usage: install_minimal_test.sh BUILD_DIR SOURCE_DIR MPIEXEC [mpiexec flags...]
set -euo pipefail
build=$1 source=$2 mpiexec=$3
shift 3
tmp=$(mktemp -d "${TMPDIR:-/tmp}/zero-install-minimal.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >"$tmp/install.log" 2>&1 || { cat "$tmp/install.log"; exit 1; }
cmake -S "$source/tests/install_minimal" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$tmp/prefix" >"$tmp/configure.log" 2>&1 || { cat "$tmp/configure.log"; exit 1; }
cmake --build "$tmp/build" >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }
for ranks in 1 2 3; do
  "$source/tests/minimal_trainer_test.sh" "$tmp/build/minimal_trainer" "$mpiexec" "$ranks" "$@"
done
