#!/usr/bin/env bash
# The library never ends the process on its own: libzero must not reference MPI_Abort, exit, _exit, quick_exit or
# abort (errors become statuses; MPI errors return on its communicators through MPI_ERRORS_RETURN). ctest
# no_exit_check; reads the shared library's undefined dynamic symbols with nm.
# usage: no_exit_check.sh LIBZERO
set -euo pipefail
lib=$1
syms=$(nm -D --undefined-only "$lib" | awk '{ print $NF }' | sed 's/@.*//')
[[ -n $syms ]] || { echo "no_exit_check: FAIL: nm found no undefined symbols in $lib (not a shared library?)"; exit 1; }
bad=$(grep -xE 'MPI_Abort|PMPI_Abort|exit|_exit|_Exit|quick_exit|abort' <<<"$syms" || true)
if [[ -n $bad ]]; then
  echo "no_exit_check: FAIL: $lib references: $(tr '\n' ' ' <<<"$bad")"
  exit 1
fi
grep -qx 'MPI_Comm_set_errhandler' <<<"$syms" || { echo "no_exit_check: FAIL: $lib never sets an MPI error handler"; exit 1; }
echo "no_exit_check: OK: $(wc -l <<<"$syms") undefined symbols, none ends the process"
