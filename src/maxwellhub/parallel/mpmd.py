"""Drivers in the same ``mpirun`` as Meep (MPMD), without joining Meep's MPI world.

    mpirun -np K python em.py : -np M python -m maxwellhub.mpmd maxwellhub-driver \\
        --address-file run.addr --model tls ...

What MPI does here, and why this module exists (measured with Open MPI 4.1):

- In an MPMD launch every program shares one ``MPI_COMM_WORLD`` of K + M ranks.
- A program that never calls ``MPI_Init`` (``maxwellhub-driver`` never imports mpi4py)
  makes the others hang inside ``MPI_Init`` (its start-up exchange waits for all K + M);
  when it exits, ``mpirun`` says "this process did not call init before exiting" and
  aborts the job, or, as its own message warns, leaves the others hanging in ``MPI_Init``
  (seen about half the time on a loaded 2-core machine).
  So ``mpirun -np K python em.py : -np M maxwellhub-driver ...`` cannot work as such.
- Meep computes on ``MPI_COMM_WORLD``; the only way to confine it to fewer ranks is
  ``meep.divide_parallel_processes(g)``, which splits the world into g contiguous groups
  of (nearly) equal size: rank r goes to group ``r * g // N``.

So both sides take part in three collective calls on the world, in this order, and then
never touch it again:

1. ``Allgather`` (a buffer, no pickle) of every rank's program number (``MPI.APPNUM``):
   all learn K and N;
2. the split Meep makes (``divide_parallel_processes(g)``, g chosen so that the EM ranks
   0..K-1 are exactly group 0); the driver side makes the matching ``Comm.Split``;
3. ``Comm.Split`` by program number: the EM side's communicator, of size K.

On the EM side :func:`split_world` does this and makes :func:`maxwellhub.mpi.comm_world`
return the K-rank communicator (the hub on its rank 0, the broadcasts over K ranks). On
the driver side :func:`main` (``python -m maxwellhub.mpmd COMMAND...``) is a small MPI
placeholder: it does its part of the three calls, starts COMMAND as a child process with
every MPI variable removed (:func:`maxwellhub.launch.driver_env`, so the driver cannot join
any MPI world), waits for it, finalises MPI with the others and exits with its status.

The EM program must come first on the ``mpirun`` line, and a g must exist with
``N/K <= g < N/(K-1)`` (always for K <= 2; for larger K it needs enough drivers, for
example K = 4 needs M >= 6 or M = 4). Otherwise start the drivers as their own job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

from ..errors import UsageError

__all__ = ["main", "meep_groups", "split_world"]


def meep_groups(k: int, n: int) -> int:
    """The number of Meep process groups g that makes ranks 0..k-1 of n exactly group 0."""
    if not 0 < k < n:
        raise UsageError(f"MPMD with {k} EM ranks among {n}: expected 0 < K < N")
    g = -(-n // k)  # ceil(n / k): rank k is in group >= 1
    if (k - 1) * g >= n:  # rank k-1 would leave group 0
        raise UsageError(
            f"MPMD with K = {k} EM ranks and {n - k} other ranks: Meep splits processes "
            f"into equal groups only, and no group count confines it to ranks 0..{k - 1} "
            f"(needs N/K <= g < N/(K-1)); use more or fewer driver ranks, or start the "
            "drivers as their own job with --address-file"
        )
    return g


def _appnum(MPI) -> int:
    value = MPI.COMM_WORLD.Get_attr(MPI.APPNUM)
    return 0 if value is None else int(value)


def _world_layout(MPI) -> tuple[Any, int, int, int, int]:
    import numpy as np

    world = MPI.COMM_WORLD
    # Allgather of a buffer, not allgather of objects: nothing on any wire is pickled.
    apps_buf = np.zeros(world.Get_size(), dtype=np.int64)
    world.Allgather(np.array([_appnum(MPI)], dtype=np.int64), apps_buf)  # collective 1
    apps = apps_buf.tolist()
    mine = apps[world.Get_rank()]
    return world, world.Get_rank(), world.Get_size(), apps.count(apps[0]), mine


def split_world():
    """Call at the top of an EM script started in an MPMD ``mpirun``, before creating
    the Meep simulation. Returns the EM program's communicator (size K); outside MPMD it
    returns ``MPI.COMM_WORLD`` and changes nothing (one ``Allgather``). Without MPI: None.
    """
    from . import mpi

    if "mpi4py.MPI" not in sys.modules and not any(v in os.environ for v in mpi._LAUNCHER_VARS):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        return None

    world, rank, n, k, mine = _world_layout(MPI)
    if k == n:
        return world
    if mine != 0 or rank >= k:
        raise UsageError(
            "split_world() is for the EM program, which must come first on "
            "the mpirun line (mpirun -np K python em.py : -np M ...)"
        )
    g = meep_groups(k, n)
    try:
        import meep
    except ImportError:  # a hub without Meep: the same split, made directly
        world.Split(rank * g // n, rank).Free()  # collective 2
    else:
        meep.divide_parallel_processes(g)  # collective 2
    app = world.Split(0, rank)  # collective 3
    mpi._APP_COMM["comm"] = app
    return app


def _driver_side(MPI) -> None:
    world, rank, n, k, mine = _world_layout(MPI)  # collective 1
    if mine == 0:
        raise UsageError(
            "python -m maxwellhub.mpmd is for the driver program, which must "
            "come after the EM program on the mpirun line"
        )
    world.Split(rank * meep_groups(k, n) // n, rank).Free()  # collective 2
    world.Split(mine, rank).Free()  # collective 3


def main(argv: list[str] | None = None) -> int:
    """``python -m maxwellhub.mpmd COMMAND [ARGS...]``: the driver side of an MPMD job."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(
            __doc__.split("\n\n")[0] + "\n\nusage: python -m maxwellhub.mpmd COMMAND [ARGS...]",
            file=sys.stderr,
        )
        return 2
    from mpi4py import MPI  # MPI_Init: required of every program of an MPMD job

    from ..run.launch import driver_env

    try:
        _driver_side(MPI)
    except UsageError as exc:
        print(f"maxwellhub.mpmd: {exc}", file=sys.stderr)
        MPI.COMM_WORLD.Abort(2)
    try:
        child = subprocess.Popen(argv, env=driver_env(), stdin=subprocess.DEVNULL)
    except OSError as exc:
        print(f"maxwellhub.mpmd: cannot start {argv[0]}: {exc}", file=sys.stderr)
        return 127  # MPI_Finalize still runs (mpi4py at exit), so the EM side can end

    def forward(signum, _frame):
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    # Unbounded on purpose: the driver ends at STOP, or when its hub's connection dies
    # (maxwellhub.liveness); a --timeout of its own bounds its connecting.
    code = child.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
