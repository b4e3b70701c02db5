#!/usr/bin/env bash
# The 2D relaxation under mpirun, with drivers that find the hub through a rendezvous file.
#   examples/hpc/mpirun_job.sh separate   # drivers as their own process group (default)
#   examples/hpc/mpirun_job.sh mpmd       # drivers in the same mpirun (MPMD)
# Settings come from the environment; see examples/hpc/README.md, line by line.
set -euo pipefail

MODE=${1:-separate}
NP=${NP:-2}
NDRIVERS=${NDRIVERS:-8}
UNTIL=${UNTIL:-90}
PYTHON=${PYTHON:-python3}
DRIVER=${DRIVER:-maxwellhub-driver}
MPIRUN=${MPIRUN:-mpirun}
MPIRUN_FLAGS=${MPIRUN_FLAGS:-}
RUN_DIR=${RUN_DIR:-$PWD/run_mpirun_$$}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

mkdir -p "$RUN_DIR"
ADDR=$RUN_DIR/hub.addr
rm -f "$ADDR"
TLS=(--model tls --param omega=0.242 --param mu12=187 --param orientation=2
     --param pe_initial=1e-4)
EM=("$PYTHON" "$HERE/em_relax_2d.py" --address-file "$ADDR" --molecules "$NDRIVERS"
    --until "$UNTIL" --wait 300 --out "$RUN_DIR/populations.npz")

case $MODE in
  separate)
    pids=()
    for ((i = 0; i < NDRIVERS; i++)); do
      setsid -w "$DRIVER" --address-file "$ADDR" --timeout 300 "${TLS[@]}" \
        >"$RUN_DIR/driver_$i.log" 2>&1 &
      pids+=($!)
    done
    trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
    # shellcheck disable=SC2086  # MPIRUN_FLAGS is a list of words
    $MPIRUN $MPIRUN_FLAGS -np "$NP" "${EM[@]}"
    for pid in "${pids[@]}"; do
      wait "$pid"
    done
    trap - EXIT
    ;;
  mpmd)
    # shellcheck disable=SC2086
    $MPIRUN $MPIRUN_FLAGS -np "$NP" "${EM[@]}" : \
      -np "$NDRIVERS" "$PYTHON" -m maxwellhub.mpmd \
      "$DRIVER" --address-file "$ADDR" --timeout 300 "${TLS[@]}"
    ;;
  *)
    echo "usage: $0 [separate|mpmd]  (got '$MODE')" >&2
    exit 2
    ;;
esac
