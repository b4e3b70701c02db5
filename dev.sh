#!/usr/bin/env bash
# One entry point for working on maxwellhub:
#
#   ./dev.sh run [ARGS...]    set up what the main job needs (steps 1-3 below, and the
#                             extras the config's models need, such as pyscf for rttddft),
#                             then run it (maxwellhub run ARGS...)
#   ./dev.sh test [ARGS...]   set up everything (steps 1-4, test extras and test peers),
#                             then run pytest (default: -q)
#   ./dev.sh setup            set up everything the tests need, run nothing
#
# Set-up is idempotent and takes about a second when everything is in place:
#   1. Debian packages (Meep with MPI, mpi4py, OpenMPI, venv, h5py, matplotlib, and gcc with
#      Python's headers for the C speedups), via apt
#      when we are root or have passwordless sudo; otherwise prints the command and stops.
#   2. .venv made by Debian's /usr/bin/python3 with --system-site-packages, so it sees
#      Debian's Meep and numpy (Meep is built against that numpy; it must never be upgraded).
#   3. `pip install -e .` into .venv for run, `pip install -e ".[test]"` for test and setup
#      (this compiles the C speedups in place); redone only when pyproject.toml, setup.py
#      or a C source changes (or test needs what run did not install).
#   4. Test and setup only, best effort: MaxwellLink in its own throwaway venv .peers/maxwelllink
#      (no system site packages: it brings its own numpy 2 and scipy), and the stock i-PI
#      clients ASE (SocketClient) and i-PI (i-pi-py_driver) in another, .peers/stock-ipi;
#      and MaxwellLink's Meep solvers in .peers/maxwelllink-meep (--system-site-packages:
#      Debian's Meep, numpy and scipy; maxwelllink installed --no-deps so nothing replaces
#      Debian's numpy, plus pytest for benchmarks/maxwelllink_suite.py).
set -euo pipefail

ROOT="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
cd "$ROOT"

# Drivers run one per molecule; a BLAS thread pool in each would oversubscribe the cores.
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

SYS_PYTHON=/usr/bin/python3
VENV="$ROOT/.venv"
STAMP="$VENV/.maxwellhub-stamp"
PEER_SPEC="maxwelllink==0.5.0"
MEEP_PEER_SPEC="$PEER_SPEC --no-deps + pytest>=8, --system-site-packages"
# ASE 3.28 is the last release whose SocketClient goes back to NEEDINIT after every force
# call (3.29 stays READY): the harder case for the hub, and the one the issue describes.
STOCK_SPEC="ase==3.28.0 ipi==3.3.1"
DEB_PACKAGES=(
    python3-meep-mpi-default
    python3-mpi4py
    openmpi-bin
    python3-venv
    python3-h5py
    python3-matplotlib
    gcc
    python3-dev
)

say() { printf 'dev.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

usage() {
    cat >&2 <<'EOF'
usage: ./dev.sh run [ARGS...] | test [PYTEST ARGS...] | setup
  run     install what the main job needs (Debian packages, .venv, editable install),
          then run it: .venv/bin/maxwellhub run ARGS...
  test    install that, the test extras and the test peers (.peers/), then run the tests:
          .venv/bin/python -m pytest ARGS... (default: -q)
  setup   install what test needs, run nothing
EOF
}

ensure_debian_packages() {
    if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
        say "this is not a Debian/Ubuntu (apt) system; maxwellhub's setup needs one."
        say "Install by hand: Meep's Python bindings with MPI, mpi4py, OpenMPI, h5py and"
        say "matplotlib for one Python >= 3.11 at /usr/bin/python3, then rerun. On Debian:"
        say "  apt-get install -y ${DEB_PACKAGES[*]}"
        exit 1
    fi
    local pkg status missing=()
    for pkg in "${DEB_PACKAGES[@]}"; do
        status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
        [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
    done
    ((${#missing[@]} == 0)) && return 0

    local sudo=()
    if ((EUID != 0)); then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo)
        else
            say "missing Debian packages, and installing them needs root (no passwordless sudo):"
            echo "sudo apt-get install -y ${missing[*]}"
            exit 1
        fi
    fi
    say "installing Debian packages: ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

# Exit status of one quick probe of .venv (one interpreter start, ~0.8 s for Meep):
#   0 all good, 2 Meep does not import, 3 project (or, for test, test deps) not installed
#   here, 4 numpy is not Debian's. Uses find_spec, not import, so a half-written module in
#   the tree does not make set-up reinstall. Usage: venv_probe run|test
venv_probe() {
    "$VENV/bin/python" -I - "$ROOT" "$1" >/dev/null 2>&1 <<'EOF'
import os
import sys
from importlib.util import find_spec
root = os.path.realpath(sys.argv[1])
purpose = sys.argv[2]
try:
    import meep  # noqa: F401  (prints MPI chatter; the caller discards it)
except Exception:
    sys.exit(2)
import numpy
if not numpy.__file__.startswith("/usr/lib/python3/dist-packages/"):
    sys.exit(4)
want = {"maxwellhub": root + "/src/maxwellhub/",
        "maxwellhub_drivers": root + "/src/maxwellhub_drivers/"}
for name, where in want.items():
    spec = find_spec(name)
    if spec is None or not os.path.realpath(spec.origin or "").startswith(where):
        sys.exit(3)
if purpose != "test":
    sys.exit(0)
for name in ("uvloop", "pytest", "pytest_asyncio", "pytest_timeout", "pytest_cov",
             "hypothesis", "pyscf", "qutip", "ase", "ruff", "mypy"):
    if find_spec(name) is None:
        sys.exit(3)
EOF
}

make_venv() {
    [[ -x "$SYS_PYTHON" ]] || die "$SYS_PYTHON not found (Debian's python3 is needed for Meep)"
    if ! "$SYS_PYTHON" -c 'import meep' >/dev/null 2>&1; then
        die "$SYS_PYTHON cannot import meep although python3-meep-mpi-default is installed; try: $SYS_PYTHON -c 'import meep'"
    fi
    say "creating .venv with $SYS_PYTHON --system-site-packages"
    rm -rf "$VENV"
    "$SYS_PYTHON" -m venv --system-site-packages "$VENV"
}

# What the editable install depends on: the project's metadata and the C speedups it
# compiles (an edited .c file must be rebuilt, as pip install -e does).
project_hash() {
    cat pyproject.toml setup.py src/maxwellhub/net/_steadyc.c \
        $(ls src/maxwellhub_drivers/*.c 2>/dev/null) | sha256sum | cut -d' ' -f1
}

check_debian_numpy() {
    local ours theirs
    ours="$("$VENV/bin/python" -I -c 'import numpy; print(numpy.__version__)')"
    theirs="$("$SYS_PYTHON" -I -c 'import numpy; print(numpy.__version__)')"
    if [[ "$ours" != "$theirs" ]]; then
        say "FATAL: .venv now has numpy $ours but Debian's is $theirs; Meep is built against"
        say "Debian's. Something in pyproject.toml's dependencies upgraded it. Fix that, then:"
        say "  rm -rf .venv && ./dev.sh setup"
        exit 1
    fi
}

# Usage: ensure_venv_and_project run|test. The stamp records pyproject.toml's hash and what
# was installed: "HASH test" satisfies both, "HASH run" only run.
ensure_venv_and_project() {
    local purpose="$1" rc=0
    if [[ -x "$VENV/bin/python" ]]; then
        venv_probe "$purpose" || rc=$?
    else
        rc=2
    fi
    if ((rc == 2)); then
        make_venv
        rc=3
    elif ((rc == 4)); then
        check_debian_numpy
        die ".venv's numpy does not come from Debian; rm -rf .venv && ./dev.sh setup"
    fi

    local hash have=""
    hash="$(project_hash)"
    [[ -f "$STAMP" ]] && have="$(<"$STAMP")"
    if ((rc == 0)) && [[ "$have" == "$hash test" || "$have" == "$hash $purpose" ]] \
        && [[ -x "$VENV/bin/maxwellhub" && -x "$VENV/bin/maxwellhub-driver" ]]; then
        return 0
    fi
    if [[ "$purpose" == test ]]; then
        say "installing maxwellhub editable with test extras into .venv"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
    else
        say "installing maxwellhub editable into .venv (what the main job needs)"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e .
    fi
    check_debian_numpy
    printf '%s %s\n' "$hash" "$purpose" >"$STAMP"
}

# A test peer in its own throwaway venv .peers/NAME, best effort: a failure is recorded in
# .peers/NAME.failed (not retried on every run), and the tests that need it skip with a
# reason. Usage: ensure_peer_venv NAME EXECUTABLE_IT_MUST_HAVE "SPEC [SPEC...]"
ensure_peer_venv() {
    local name="$1" exe="$2" spec="$3"
    local venv="$ROOT/.peers/$name"
    local stamp="$venv/.maxwellhub-stamp" failed="$ROOT/.peers/$name.failed"
    if [[ -x "$venv/bin/$exe" && -f "$stamp" && "$(<"$stamp")" == "$spec" ]]; then
        return 0
    fi
    if [[ -f "$failed" ]]; then
        return 0  # a failed attempt is not retried on every run; see the warning it printed
    fi
    say "installing test peer $spec into .peers/$name (its own venv)"
    mkdir -p "$ROOT/.peers"
    rm -rf "$venv"
    local log="$ROOT/.peers/$name-install.log"
    local -a specs
    read -r -a specs <<<"$spec"
    if "$SYS_PYTHON" -m venv "$venv" >"$log" 2>&1 \
        && "$venv/bin/python" -m pip install -q --disable-pip-version-check \
            "${specs[@]}" >>"$log" 2>&1 \
        && [[ -x "$venv/bin/$exe" ]]; then
        printf '%s\n' "$spec" >"$stamp"
        rm -f "$log"
    else
        date >"$failed"
        say "warning: could not install $spec (see .peers/$name-install.log); the tests that need it will skip; rm -rf .peers/$name* to retry"
    fi
}

# MaxwellLink's own Meep solvers (MeepSimulation, SocketMolecule) run against our SocketHub
# in tests/integration/test_mxl_dropin.py. Same best-effort rules as ensure_peer_venv (stamp, .failed),
# but the venv sees Debian's Meep, and maxwelllink comes --no-deps: its declared deps
# (numpy>=1.24, scipy>=1.10) are Debian's, the others (cmake, requests) are unused here.
# Our package is not installed there: the tests put the repo's src/ on PYTHONPATH, so the peer
# always runs the worktree's maxwellhub and never gets a second numpy.
ensure_meep_peer_venv() {
    local name=maxwelllink-meep
    local venv="$ROOT/.peers/$name" spec="$MEEP_PEER_SPEC"
    local stamp="$venv/.maxwellhub-stamp" failed="$ROOT/.peers/$name.failed"
    if [[ -x "$venv/bin/mxl_driver" && -f "$stamp" && "$(<"$stamp")" == "$spec" ]]; then
        return 0
    fi
    if [[ -f "$failed" ]]; then
        return 0  # not retried on every run; rm -f it to retry
    fi
    say "installing test peer $spec into .peers/$name (--system-site-packages: Debian's Meep)"
    mkdir -p "$ROOT/.peers"
    rm -rf "$venv"
    local log="$ROOT/.peers/$name-install.log"
    if "$SYS_PYTHON" -m venv --system-site-packages "$venv" >"$log" 2>&1 \
        && "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
            "$PEER_SPEC" >>"$log" 2>&1 \
        && "$venv/bin/python" -m pip install -q --disable-pip-version-check \
            "pytest>=8" >>"$log" 2>&1 \
        && "$venv/bin/python" -I -c 'import meep, maxwelllink, numpy, sys
sys.exit(not numpy.__file__.startswith("/usr/lib/python3/dist-packages/"))' >>"$log" 2>&1 \
        && [[ -x "$venv/bin/mxl_driver" ]]; then
        printf '%s\n' "$spec" >"$stamp"
        rm -f "$log"
    else
        date >"$failed"
        say "warning: could not install $spec with Debian's Meep (see .peers/$name-install.log); the tests that need it will skip; rm -rf .peers/$name* to retry"
    fi
}

ensure_peer() {
    ensure_peer_venv maxwelllink mxl_driver "$PEER_SPEC"
    ensure_peer_venv stock-ipi i-pi-py_driver "$STOCK_SPEC"
    ensure_meep_peer_venv
}

# The pip extras the run's models need (rttddft: pyscf), asked of the config itself, so a
# model added to a config brings its package with it. A bad config prints nothing here;
# the run that follows reports it.
ensure_run_extras() {
    local extras joined
    extras="$("$VENV/bin/maxwellhub" run --missing-extras "$@" 2>/dev/null)" || return 0
    [[ -n "$extras" ]] || return 0
    joined="$(paste -sd, <<<"$extras")"
    say "installing maxwellhub[$joined] for this config's models"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[$joined]"
    check_debian_numpy
}

# The main job's set-up: Debian packages and the editable install, no test extras or peers.
setup_run() {
    ensure_debian_packages
    ensure_venv_and_project run
}

# The tests' set-up: everything, test peers included.
setup_test() {
    ensure_debian_packages
    ensure_venv_and_project test
    ensure_peer
}

cmd="${1:-}"
(($#)) && shift
case "$cmd" in
    setup)
        setup_test
        ;;
    run)
        setup_run
        ensure_run_extras "$@"
        exec "$VENV/bin/maxwellhub" run "$@"
        ;;
    test)
        setup_test
        (($#)) || set -- -q
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    -h | --help | help)
        usage
        ;;
    *)
        usage
        exit 2
        ;;
esac
