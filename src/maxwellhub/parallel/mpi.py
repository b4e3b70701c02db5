"""Rank-0 helpers for running under MPI; every function also works without mpi4py.

Nothing here pickles: :func:`mpi_bcast_from_master` moves numpy arrays with ``Bcast`` and
other values as UTF-8 JSON bytes, so data that came from a peer can never be unpickled.
"""

from __future__ import annotations

import json
import os
import sys
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["am_master", "any_rank", "comm_world", "mpi_bcast_from_master", "rank_and_size"]


_LAUNCHER_VARS = (
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "PMIX_RANK",
    "MPI_LOCALNRANKS",
    "SLURM_STEP_NUM_TASKS",
)


# The communicator of this program's own ranks once maxwellhub.mpmd.split_world() ran in
# an MPMD job. Process-wide by nature, like MPI_COMM_WORLD itself.
_APP_COMM: dict[str, Any] = {}


def comm_world():
    """The EM side's world: MPI.COMM_WORLD, or this program's share of it in an MPMD job
    (after :func:`maxwellhub.mpmd.split_world`), or None when there is no MPI world.

    mpi4py is imported (which initialises MPI) only when an MPI launcher started this
    process or something else (Meep's MPI build) already imported it: a serial hub or
    driver never pays for, or gets tangled in, MPI initialisation.
    """
    comm = _APP_COMM.get("comm")
    return comm if comm is not None else _world()


@lru_cache(maxsize=1)
def _world():
    if "mpi4py.MPI" not in sys.modules and not any(v in os.environ for v in _LAUNCHER_VARS):
        return None
    try:
        from mpi4py import MPI
    except Exception:  # mpi4py absent or broken: behave as one process
        return None
    apps = os.environ.get("OMPI_NUM_APP_CTX", "1")
    if apps.isdigit() and int(apps) > 1:
        from ..errors import UsageError

        raise UsageError(
            f"this process is one of {MPI.COMM_WORLD.Get_size()} in an MPMD job of {apps} "
            "programs: MPI.COMM_WORLD includes the other programs' ranks (the drivers'), "
            "so call maxwellhub.mpmd.split_world() at the top of the EM script, before "
            "creating the Meep simulation (see examples/hpc/README.md)"
        )
    return MPI.COMM_WORLD


def rank_and_size() -> tuple[int, int]:
    """(rank, size) of this process; (0, 1) without MPI."""
    comm = comm_world()
    if comm is None:
        return 0, 1
    return comm.Get_rank(), comm.Get_size()


def am_master() -> bool:
    """True on MPI rank 0 and in a process without MPI."""
    return rank_and_size()[0] == 0


# Kinds of broadcast payload: a header of three int64 says kind, dtype code and length.
_KIND_JSON, _KIND_ARRAY, _KIND_BYTES = 0, 1, 2
_DTYPES: list[np.dtype] = [
    np.dtype("<f8"),
    np.dtype("<i8"),
    np.dtype("<c16"),
    np.dtype("<f4"),
    np.dtype("<i4"),
    np.dtype("u1"),
    np.dtype("?"),
]


def _bcast_buffer(comm, buf: np.ndarray) -> np.ndarray:
    comm.Bcast(buf, root=0)
    return buf


def mpi_bcast_from_master(value: Any) -> Any:
    """Broadcast ``value`` from rank 0 to every rank and return it (unchanged without MPI).

    Supported values: numpy arrays (of float64, int64, complex128, float32, int32, uint8,
    bool; shape kept), bytes, and anything JSON can carry (None, numbers, strings, lists,
    dicts with string keys). Other ranks' ``value`` is ignored.
    """
    comm = comm_world()
    if comm is None or comm.Get_size() == 1:
        return value
    root = comm.Get_rank() == 0
    header = np.zeros(4, dtype=np.int64)
    payload: np.ndarray = np.empty(0, dtype=np.uint8)  # filled on the root only
    if root:
        if isinstance(value, np.ndarray):
            arr = np.ascontiguousarray(value)
            code = next(
                (
                    i
                    for i, d in enumerate(_DTYPES)
                    if d == arr.dtype.newbyteorder("<") or d == arr.dtype
                ),
                None,
            )
            if code is None:
                raise TypeError(f"cannot broadcast arrays of dtype {arr.dtype}")
            arr = arr.astype(_DTYPES[code], copy=False)
            header[:] = (_KIND_ARRAY, code, arr.ndim, arr.size)
            payload = arr
        elif isinstance(value, (bytes, bytearray, memoryview)):
            payload = np.frombuffer(bytes(value), dtype=np.uint8)
            header[:] = (_KIND_BYTES, 0, 1, payload.size)
        else:
            payload = np.frombuffer(json.dumps(value).encode(), dtype=np.uint8)
            header[:] = (_KIND_JSON, 0, 1, payload.size)
    _bcast_buffer(comm, header)
    kind, code, ndim, size = (int(x) for x in header)
    if kind == _KIND_ARRAY:
        shape = np.zeros(ndim, dtype=np.int64)
        if root:
            shape[:] = payload.shape
        _bcast_buffer(comm, shape)
        buf = payload if root else np.empty(size, dtype=_DTYPES[code])
        _bcast_buffer(comm, buf.reshape(-1))
        return value if root else buf.reshape(tuple(int(s) for s in shape))
    buf = payload if root else np.empty(size, dtype=np.uint8)
    _bcast_buffer(comm, buf)
    if root:
        return value
    return buf.tobytes() if kind == _KIND_BYTES else json.loads(buf.tobytes().decode())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (an ``Allreduce`` of one
    int: also a barrier); ``flag`` itself without MPI. Every rank must call it."""
    comm = comm_world()
    if comm is None or comm.Get_size() == 1:
        return bool(flag)
    mine = np.array([1 if flag else 0], dtype=np.int64)
    total = np.zeros(1, dtype=np.int64)
    comm.Allreduce(mine, total)
    return bool(total[0])
