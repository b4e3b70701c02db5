"""Whole-run checkpoints: the coupled state of a Meep run with molecules, written every N
steps and on SIGTERM/SIGINT, and read back to continue the run bit for bit.

A checkpoint is taken at a step boundary, from a step function placed after the
coupling's: the molecules have done step n, Meep's fields are still at step n. It holds

- Meep's own dump of the fields (``Simulation.dump_fields``: every field component, the
  PML auxiliary fields, the DFT accumulators and the step counter), in ``fields.h5``;
  the structure is rebuilt from the config, not dumped. Meep 1.25 writes the DFT
  accumulators and the step counter in single precision: the coupling's accumulators
  are zero at a checkpoint (and zeroed again after loading), and the step is put back
  from the manifest, so neither costs a bit;
- the coupling's state (:meth:`MeepCoupling.checkpoint_state`: embedded models' states,
  the source amplitudes Meep holds, the last sources and fields, the records so far), in
  ``coupling.npz``;
- for socket molecules, the hub's snapshot (step counter, per-molecule step counts, the
  fields it can replay), in ``hub.npz``, and hard links to the drivers' own checkpoint
  files as they were at that moment, in ``drivers/``;
- ``manifest.json``, written last: format, step, Meep time, what triggered it, the config
  (text, ``--set`` overrides, and the flattened keys a resumed run must match).

Directory layout (``DIR`` is ``[checkpoint] dir``)::

    DIR/step_0000001200/     a complete checkpoint; the newest ``keep`` are kept
    DIR/drivers/             where socket drivers write theirs (--checkpoint-dir)
    DIR/.partial_*           a checkpoint being written: removed when the next run starts
    DIR/.lock                held (flock) by the run that writes into DIR

Writing is atomic: everything goes into a ``.partial_*`` directory, each file is fsynced,
the directory is renamed to ``step_*`` (and the parent fsynced), and only then are older
checkpoints removed; a ``step_*`` directory is therefore always complete, and the
previous one survives until the new one is. Nothing is pickled: arrays are ``.npz`` read
with ``allow_pickle=False``, the rest JSON.

Usage from a script (``maxwellhub run`` does the same from its config)::

    with RunCheckpointer("ckpt", sim, coupling, every=500, identity={"P0": 1e-4}) as ckpt:
        ckpt.resume()                    # the newest checkpoint in ckpt/, if there is one
        with ckpt.signals():             # SIGTERM/SIGINT -> checkpoint, RunInterrupted
            sim.run(coupling.step_function(), ckpt.step_function(),
                    until=lambda sim: sim.round_time() >= 90)

(``examples/restart_api_2d.py`` is the runnable version.)

``until`` must be absolute (a condition on ``sim.round_time()``), not Meep's relative
number, so that a resumed run stops where the uninterrupted one does.

Under MPI (``mpirun -np K``, hub and drivers on rank 0) every rank makes the same
:class:`RunCheckpointer` and calls the step function; the ranks agree on the step of a
signal-triggered checkpoint through the coupling's per-step Reduce/Bcast (no extra
collective per step), every rank writes its own ``coupling.rank<r>.npz`` (rank 0:
``coupling.npz``) with the source amplitudes Meep holds in its chunks, Meep writes one
parallel HDF5 ``fields.h5``, and rank 0 alone writes the hub's snapshot, the driver links
and, after an ``Allreduce`` that says every rank is done, the manifest (with
``mpi_ranks``) and the rename. A checkpoint is resumed only with the number of ranks
that wrote it (Meep's dump is per chunk; refused with both counts named). MPI
collectives have no deadline: a rank that dies makes mpirun end the job.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal, overload

import numpy as np

from ..errors import MaxwellHubError, UsageError
from ..fsutil import fsync_dir, fsync_file
from ..parallel.mpi import any_rank, comm_world, mpi_bcast_from_master, rank_and_size

__all__ = [
    "FORMAT",
    "STOPPED_BY_SIGNAL",
    "CheckpointError",
    "LoadedCheckpoint",
    "RunCheckpointer",
    "RunInterrupted",
    "config_identity",
    "find_checkpoint",
    "identity_differences",
    "load_checkpoint",
    "restore",
]

log = logging.getLogger("maxwellhub.checkpoint")

# 2: embedded models' states carry their parameters (model.<g>.param.<name>) and random
# generator state; the manifest says where relative parameter paths were resolved
FORMAT = 2
#: exit status of ``maxwellhub run`` stopped by SIGTERM/SIGINT after writing a checkpoint
#: (EX_TEMPFAIL of sysexits.h: "try again", here with ``--resume``)
STOPPED_BY_SIGNAL = 75

_STEP_DIR = re.compile(r"^step_(\d{10})$")
_MANIFEST = "manifest.json"


def _coupling_file(rank: int) -> str:
    """The coupling state file of one MPI rank (``coupling.npz`` for rank 0 and a serial
    run)."""
    return "coupling.npz" if rank == 0 else f"coupling.rank{rank}.npz"


class CheckpointError(UsageError):
    """A checkpoint is missing, incomplete, unreadable or does not fit this run."""


class RunInterrupted(MaxwellHubError):
    """SIGTERM/SIGINT arrived; a checkpoint was written at ``step`` into ``path``."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        self.signum = signum
        self.step = step
        self.path = path
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {path}"
        )


# ---------------------------------------------------------------------- config identity

# keys of maxwellhub run's config that a resumed run may change: where things go and how
# they travel, not what is computed
_FREE_KEYS = (
    "simulation.until",
    "transport.name",
    "transport.host",
    "transport.port",
    "transport.timeout",
    "output.directory",
    "output.plot",
    "checkpoint.",
)


def config_identity(config) -> dict[str, Any]:
    """The config as flat ``dotted key -> JSON value``, for comparing a resumed run's
    config with the checkpoint's (see :func:`identity_differences`)."""
    flat: dict[str, Any] = {}

    def put(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key in sorted(value):
                put(f"{prefix}.{key}", value[key])
        else:
            flat[prefix] = json.loads(json.dumps(value, default=str))

    s, t, o = config.simulation, config.transport, config.output
    for name in ("dimensions", "cell", "resolution", "pml", "time_units_fs", "until"):
        put(f"simulation.{name}", getattr(s, name))
    em = getattr(config, "em", None)
    if em is not None and em.engine != "meep":  # Meep runs keep their old identity
        put("simulation.dt_au", s.dt_au)
        put("em.engine", em.engine)
        put(f"em.{em.engine}", dict(em.params))
    for name in ("kind", "name", "host", "port", "timeout", "molecules_per_driver"):
        put(f"transport.{name}", getattr(t, name))
    put("output.directory", str(o.directory))
    put("output.record_every", o.record_every)
    put("output.plot", o.plot)
    put("molecules", len(config.molecules))
    for i, g in enumerate(config.molecules):
        for name in ("model", "positions", "sigma", "axis", "rescaling"):
            put(f"molecules[{i}].{name}", getattr(g, name))
        put(f"molecules[{i}].params", dict(g.params))
    return flat


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two :func:`config_identity` results,
    leaving out the keys a resumed run may change (paths, transport addresses, timeouts,
    ``simulation.until``, the ``[checkpoint]`` table)."""
    keys = sorted(set(saved) | set(current))
    return [
        k
        for k in keys
        if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in _FREE_KEYS)
        and saved.get(k, "<absent>") != current.get(k, "<absent>")
    ]


# ---------------------------------------------------------------------- writing


def _save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``root``, oldest first."""
    found = []
    with contextlib.suppress(FileNotFoundError):
        for entry in root.iterdir():
            m = _STEP_DIR.match(entry.name)
            if m and entry.is_dir() and (entry / _MANIFEST).is_file():
                found.append((int(m.group(1)), entry))
    return sorted(found)


class RunCheckpointer:
    """Writes whole-run checkpoints of ``sim`` + ``coupling`` (+ ``hub``) into
    ``directory``: every ``every`` steps (0: never on a schedule) and when SIGTERM or
    SIGINT arrived (inside :meth:`signals`).

    ``identity`` (JSON-able), ``config_text``/``overrides`` and ``config_dir`` (where
    relative paths among the models' parameters were resolved; a resume without the
    config file resolves them there again) go into the manifest;
    ``driver_dir``: where socket drivers write their own checkpoints (default
    ``directory/drivers``), linked into each run checkpoint. The directory is locked
    for this run (a second run writing into it is refused).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        sim,
        coupling,
        *,
        hub=None,
        every: int = 0,
        keep: int = 2,
        identity: Mapping[str, Any] | None = None,
        config_text: str = "",
        overrides: Mapping[str, Any] | None = None,
        driver_dir: str | os.PathLike | None = None,
        config_dir: str | os.PathLike | None = None,
    ) -> None:
        self._rank, self._size = rank_and_size()
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise UsageError(f"every = {every!r}; expected an int >= 0 (steps)")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise UsageError(f"keep = {keep!r}; expected an int >= 1")
        self.directory = Path(directory)
        self.sim = sim
        self.coupling = coupling
        self.hub = hub
        self.every = every
        self.keep = keep
        self.identity = dict(identity or {})
        self.config_text = config_text
        self.overrides = dict(overrides or {})
        self.config_dir = os.fspath(config_dir) if config_dir is not None else None
        self.driver_dir = Path(driver_dir) if driver_dir else self.directory / "drivers"
        self.requested: int | None = None  # the signal that asked for a stop
        self.last_written: int | None = None
        self.last_path: Path | None = None
        self.write_seconds: list[float] = []
        self._lock: IO[str] | None = None  # DIR/.lock, held (flock) while this run writes
        self._token = os.getpid()  # names this run's partial directories
        if self._size > 1:
            self._init_mpi()
            return
        self._take_directory()

    def _take_directory(self) -> None:
        """Lock the directory for this run (``.lock``, held until :meth:`close`) and remove
        the partial checkpoints a killed run left."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.directory / ".lock", "a+")  # noqa: SIM115 - held for the run
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise CheckpointError(
                    f"another run is writing checkpoints into {self.directory} (its .lock is held)"
                ) from None
            raise
        for entry in self.directory.glob(".partial_*"):  # left by a killed run
            shutil.rmtree(entry, ignore_errors=True)

    def _init_mpi(self) -> None:
        """Under MPI (collective): rank 0 takes the lock and removes stale partial
        directories; every rank learns the outcome and rank 0's pid (the token in the
        partial directories' names), so all raise the same error or none does."""
        error = None
        if self._rank == 0:
            try:
                self._take_directory()
            except (OSError, CheckpointError) as exc:
                error = str(exc)
        agreed = mpi_bcast_from_master({"error": error, "token": self._token})
        if agreed["error"]:
            raise CheckpointError(agreed["error"])
        self._token = int(agreed["token"])

    def close(self) -> None:
        """Release the directory's lock."""
        if self._lock is not None and not self._lock.closed:
            self._lock.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def driver_args(self, driver_every: int) -> list[str]:
        """Options for ``maxwellhub-driver`` so that every run checkpoint finds the
        driver's checkpoint at its step (``every`` must be a multiple of ``driver_every``)."""
        if self.every % driver_every:
            raise UsageError(
                f"every = {self.every} is not a multiple of driver_every = {driver_every}"
            )
        self.driver_dir.mkdir(parents=True, exist_ok=True)
        args = ["--checkpoint-dir", str(self.driver_dir), "--checkpoint-every", str(driver_every)]
        if self.every:
            args += ["--checkpoint-keep-every", str(self.every)]
        return args

    def mark_restored(self, step: int) -> None:
        """The run continues from a checkpoint at ``step``: do not write it again."""
        self.last_written = step

    def resume(self, loaded: LoadedCheckpoint | None = None) -> int | None:
        """Continue from ``loaded`` (default: the newest checkpoint in this directory, if
        any), before ``sim.run``, after checking its config identity against this
        checkpointer's; returns its step, or None when there is none (a fresh start).
        With socket molecules load it first, ``hub.restore(loaded.hub_snapshot)`` and
        :func:`restore_driver_files` before the drivers start, then call this."""
        if loaded is None:
            loaded = load_checkpoint(self.directory, missing_ok=True)
            if loaded is None:
                return None
        check_identity(loaded, self.identity)
        step = restore(loaded, self.sim, self.coupling)
        self.mark_restored(step)
        return step

    # ------------------------------------------------------------------ in the run

    def step_function(self) -> Callable:
        """For ``sim.run``, after the coupling's step function."""

        def maxwellhub_checkpoint(sim) -> None:
            self.tick(sim)

        return maxwellhub_checkpoint

    def boundary_step(self) -> int:
        """The step boundary the run is at: Meep's ``fields.t``, or, for the other engines
        (``sim`` None), the steps the coupling has completed."""
        if self.sim is None:
            return int(self.coupling.step_index)
        return int(self.sim.fields.t)

    def tick(self, sim=None) -> None:
        n = self.boundary_step()
        # under MPI only the stop every rank agreed on at this step counts (a signal
        # reaches the ranks at different moments); serially, the signal this rank got
        signum = self.coupling.stop_agreed if self._size > 1 else self.requested
        if signum:
            path = (
                self.last_path
                if n == self.last_written and self.last_path
                else self.write("signal")
            )
            raise RunInterrupted(signum, n, path)
        if self.every and n % self.every == 0 and n > 0 and n != self.last_written:
            self.write("every")

    @contextlib.contextmanager
    def signals(self, signums=None) -> Iterator[None]:
        """SIGTERM/SIGINT inside the block ask for a checkpoint at the next step boundary
        and then :class:`RunInterrupted` from the step function; a second signal before
        that raises KeyboardInterrupt at once (no checkpoint).

        Under MPI SIGUSR1 does the same (mpirun forwards SIGUSR1 to every rank at once,
        while it answers SIGTERM/SIGINT by SIGCONT, SIGTERM after
        ``odls_base_sigkill_timeout`` seconds and SIGKILL after as many again), the
        request reaches every rank through the coupling's per-step broadcast
        (:attr:`MeepCoupling.stop_agreed`), and a second signal aborts the whole job
        (``MPI_Abort``): an exception on one rank alone could leave the others waiting."""
        if signums is None:
            signums = (signal.SIGTERM, signal.SIGINT)
            if self._size > 1:
                signums += (signal.SIGUSR1,)
        previous = {s: signal.getsignal(s) for s in signums}

        def handler(signum, frame) -> None:
            if self.requested is not None:
                if self._size > 1:
                    log.error(
                        "second %s: aborting the MPI job without a checkpoint",
                        signal.Signals(signum).name,
                    )
                    comm_world().Abort(128 + signum)
                raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
            self.requested = signum
            self.coupling.stop_request = signum
            log.warning(
                "%s: writing a checkpoint at the next step boundary, then stopping",
                signal.Signals(signum).name,
            )

        for s in signums:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def write(self, reason: str = "every") -> Path:
        """Write a checkpoint of the current step boundary now; returns its directory.
        Under MPI every rank must call it at the same step (the step function does)."""
        if self._size > 1:
            return self._write_mpi(reason)
        t0 = time.perf_counter()
        sim = self.sim
        n = self.boundary_step()
        final = self.directory / f"step_{n:010d}"
        partial = self.directory / f".partial_{n:010d}_{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        state = self.coupling.checkpoint_state()
        _save_npz(partial / "coupling.npz", state)
        files = ["coupling.npz"]
        if self.hub is not None:
            _save_npz(partial / "hub.npz", self.hub.snapshot())
            files.append("hub.npz")
            linked = self._link_driver_files(partial / "drivers")
            files += [f"drivers/{name}" for name in linked]
        if sim is not None:  # Meep's fields; the other engines' state is in coupling.npz
            fields_file = partial / "fields.h5"
            sim.dump_fields(str(fields_file))
            fsync_file(fields_file)
            files.append("fields.h5")
        self._publish(partial, final, n, reason, files)
        self.last_written, self.last_path = n, final
        self.write_seconds.append(time.perf_counter() - t0)
        log.info(
            "checkpoint at step %d (%s) in %.1f ms: %s",
            n,
            reason,
            1e3 * self.write_seconds[-1],
            final,
        )
        return final

    def _publish(self, partial: Path, final: Path, n: int, reason: str, files: list[str]) -> None:
        """The manifest last, then the rename that makes ``partial`` the complete
        checkpoint ``final``, then the removal of checkpoints beyond ``keep``."""
        manifest = {
            "format": FORMAT,
            "step": n,
            **(
                {"meep_time": float(self.sim.meep_time())}
                if self.sim is not None
                else {"time_au": float(self.coupling.time_au)}
            ),
            "reason": reason,
            "written_unix": time.time(),
            "files": files,
            "molecules": len(self.coupling.molecule_ids),
            "mpi_ranks": self._size,
            "meep_version": _meep_version() if self.sim is not None else "",
            "identity": self.identity,
            "config_text": self.config_text,
            "overrides": self.overrides,
            "config_dir": self.config_dir,
        }
        _write_json(partial / _MANIFEST, manifest)
        fsync_dir(partial)
        if final.exists():  # a run resumed from an older checkpoint passes this step again
            stale = self.directory / f".partial_stale_{n:010d}_{self._token}"
            final.rename(stale)
            shutil.rmtree(stale, ignore_errors=True)
        partial.rename(final)
        fsync_dir(self.directory)
        for _, old in _step_dirs(self.directory)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def _write_mpi(self, reason: str) -> Path:
        """:meth:`write` on every MPI rank (collective). Rank 0 makes the partial
        directory; every rank writes its coupling state (its own sites' source amplitudes)
        into ``coupling.rank<r>.npz`` (rank 0: ``coupling.npz``, with the models, records
        and the hub's snapshot and drivers' files beside it) and Meep writes one parallel
        HDF5 file with every rank's chunks; after an ``Allreduce`` that says every rank's
        files are there, rank 0 alone writes the manifest (with ``mpi_ranks``) and renames.
        Every rank learns the outcome: all raise the same :class:`CheckpointError`, or
        none does."""
        t0 = time.perf_counter()
        rank, sim = self._rank, self.sim
        n = int(sim.fields.t)
        final = self.directory / f"step_{n:010d}"
        partial = self.directory / f".partial_{n:010d}_{self._token}"
        error = None
        if rank == 0:
            try:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir()
            except OSError as exc:
                error = f"checkpoint at step {n}: cannot create {partial}: {exc}"
        error = mpi_bcast_from_master(error)
        if error:
            raise CheckpointError(error)
        failed = None
        name = _coupling_file(rank)
        try:
            _save_npz(partial / name, self.coupling.checkpoint_state())
        except (OSError, ValueError, UsageError) as exc:
            failed = f"rank {rank} could not write {partial / name}: {exc}"
        fields_file = partial / "fields.h5"
        sim.dump_fields(str(fields_file))  # collective: one file, every rank's chunks
        files = [_coupling_file(r) for r in range(self._size)]
        if rank == 0 and failed is None:
            try:
                fsync_file(fields_file)
                if self.hub is not None:
                    _save_npz(partial / "hub.npz", self.hub.snapshot())
                    files.append("hub.npz")
                    linked = self._link_driver_files(partial / "drivers")
                    files += [f"drivers/{name}" for name in linked]
            except OSError as exc:
                failed = f"rank 0 could not write into {partial}: {exc}"
        files.append("fields.h5")
        if any_rank(failed is not None):  # also the barrier: every rank's files are there
            if failed:
                log.error("%s", failed)
            if rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(
                failed
                or f"checkpoint at step {n}: another MPI rank "
                "could not write its part (see its log)"
            )
        if rank == 0:
            try:
                self._publish(partial, final, n, reason, files)
            except OSError as exc:
                error = f"checkpoint at step {n}: cannot complete {final}: {exc}"
        error = mpi_bcast_from_master(error)
        if error:
            raise CheckpointError(error)
        self.last_written, self.last_path = n, final
        self.write_seconds.append(time.perf_counter() - t0)
        if rank == 0:
            log.info(
                "checkpoint at step %d (%s) in %.1f ms: %s",
                n,
                reason,
                1e3 * self.write_seconds[-1],
                final,
            )
        return final

    def _link_driver_files(self, into: Path) -> list[str]:
        """Hard-link the drivers' checkpoint files as they are now (a driver replaces
        its files by renaming, so a link keeps this version)."""
        into.mkdir()
        names = []
        entries = sorted(self.driver_dir.iterdir()) if self.driver_dir.is_dir() else []
        for entry in entries:
            if entry.is_file() and not entry.name.startswith("."):
                try:
                    os.link(entry, into / entry.name)
                except FileNotFoundError:  # replaced between listing and linking
                    continue
                except OSError:  # no hard links here (another file system): copy
                    shutil.copy2(entry, into / entry.name)
                    fsync_file(into / entry.name)
                names.append(entry.name)
        fsync_dir(into)
        return names


def _meep_version() -> str:
    with contextlib.suppress(Exception):
        import meep as mp

        return str(mp.__version__)
    return ""


# ---------------------------------------------------------------------- reading


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back (see :func:`load_checkpoint`)."""

    path: Path
    manifest: dict[str, Any]
    coupling_state: dict[str, np.ndarray]
    hub_snapshot: dict[str, np.ndarray] | None

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def fields_file(self) -> Path:
        return self.path / "fields.h5"

    @property
    def driver_files(self) -> list[Path]:
        d = self.path / "drivers"
        return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def find_checkpoint(path: str | os.PathLike, missing_ok: bool = False) -> Path | None:
    """The checkpoint ``path`` names: itself if it is one (has a manifest), else the
    newest complete ``step_*`` directory in it."""
    path = Path(path)
    if (path / _MANIFEST).is_file():
        return path
    found = _step_dirs(path)
    if found:
        return found[-1][1]
    if missing_ok:
        return None
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    raise CheckpointError(f"no complete checkpoint in {path} (no step_*/{_MANIFEST})")


@overload
def load_checkpoint(
    path: str | os.PathLike, missing_ok: Literal[False] = False
) -> LoadedCheckpoint: ...
@overload
def load_checkpoint(path: str | os.PathLike, missing_ok: bool) -> LoadedCheckpoint | None: ...
def load_checkpoint(path: str | os.PathLike, missing_ok: bool = False) -> LoadedCheckpoint | None:
    """Read a checkpoint (a ``step_*`` directory or the directory holding them); with
    ``missing_ok``, None when there is none.

    Refused (:class:`CheckpointError`) when it was written by a different number of MPI
    ranks than this run has: Meep's field dump is per chunk and the chunks follow the
    number of ranks. Under MPI it is collective: rank 0 chooses the checkpoint, every
    rank reads its own coupling state from it, and all raise the same error or none."""
    rank, size = rank_and_size()
    if size == 1:
        found = find_checkpoint(path, missing_ok)
        return None if found is None else _load(found, 0, 1)
    error = found = loaded = None
    if rank == 0:
        try:
            found = find_checkpoint(path, missing_ok)
            if found is not None:
                loaded = _load(found, 0, size)
        except CheckpointError as exc:
            error = str(exc)
    agreed = mpi_bcast_from_master({"path": None if found is None else str(found), "error": error})
    if agreed["error"]:
        raise CheckpointError(agreed["error"])
    if agreed["path"] is None:
        return None
    failed = None
    if rank != 0:
        try:
            loaded = _load(Path(agreed["path"]), rank, size)
        except CheckpointError as exc:
            failed = str(exc)
    if any_rank(failed is not None):
        raise CheckpointError(
            failed or f"{agreed['path']}: another MPI rank could not read its part (see its error)"
        )
    return loaded


def _load(found: Path, rank: int, size: int) -> LoadedCheckpoint:
    """Read checkpoint ``found`` as MPI rank ``rank`` of ``size``."""
    try:
        manifest = json.loads((found / _MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{found / _MANIFEST} is unreadable: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{found}: checkpoint format "
            f"{manifest.get('format') if isinstance(manifest, dict) else '?'}"
            f" is not this maxwellhub's ({FORMAT})"
        )
    ranks = manifest.get("mpi_ranks", 1)
    if ranks != size:
        raise CheckpointError(
            f"cannot resume from {found}: it was written by {ranks} MPI rank(s) and this "
            f"run has {size}; Meep's field dump is per chunk and its chunks follow the "
            f"number of ranks: resume with {ranks} rank(s)"
            + (f" (mpirun -np {ranks})" if ranks > 1 else " (without mpirun)")
        )
    for name in manifest.get("files", []):
        if not (found / name).is_file():
            raise CheckpointError(f"{found} is incomplete: {name} is missing")

    def arrays(name: str) -> dict[str, np.ndarray]:
        try:
            with np.load(found / name, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{found / name} is unreadable: {exc}") from None

    hub = arrays("hub.npz") if rank == 0 and "hub.npz" in manifest["files"] else None
    return LoadedCheckpoint(found, manifest, arrays(_coupling_file(rank)), hub)


def check_identity(loaded: LoadedCheckpoint, identity: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose config differs from ``identity`` in a key that matters,
    naming the first such key and both values."""
    saved = loaded.manifest.get("identity", {})
    diff = identity_differences(saved, identity)
    if diff:
        key = diff[0]
        more = f" (and {len(diff) - 1} more: {', '.join(diff[1:4])})" if len(diff) > 1 else ""
        raise CheckpointError(
            f"cannot resume from {loaded.path}: the config differs in {key}: checkpoint "
            f"{json.dumps(saved.get(key, '<absent>'))}, this run "
            f"{json.dumps(identity.get(key, '<absent>'))}{more}"
        )


def restore_driver_files(loaded: LoadedCheckpoint, driver_dir: str | os.PathLike) -> None:
    """Put the drivers' checkpoint files of ``loaded`` back into ``driver_dir`` (before
    the drivers start), replacing files of the same name; other files stay (a driver
    restores its newest checkpoint at or before the step the hub tells it)."""
    driver_dir = Path(driver_dir)
    driver_dir.mkdir(parents=True, exist_ok=True)
    for src in loaded.driver_files:
        tmp = driver_dir / f".{src.name}.restore"
        shutil.copy2(src, tmp)
        fsync_file(tmp)
        os.replace(tmp, driver_dir / src.name)
    fsync_dir(driver_dir)


def restore(loaded: LoadedCheckpoint, sim, coupling) -> int:
    """Continue ``sim`` + ``coupling`` from ``loaded``, before ``sim.run``; returns the
    step. Socket molecules: restore the hub (``hub.restore(loaded.hub_snapshot)``) and
    start the drivers first; this call binds them. ``sim`` None: a non-Meep engine,
    whose whole state is the coupling's."""
    coupling.restore_state(loaded.coupling_state)
    if sim is None:
        return loaded.step
    try:
        sim.load_fields(str(loaded.fields_file))
    except RuntimeError as exc:
        raise CheckpointError(f"Meep cannot load {loaded.fields_file}: {exc}") from None
    coupling.clear_field_reads()
    loaded_t = int(sim.fields.t)
    if loaded_t != loaded.step:
        # Meep 1.25 dumps its step counter as float32: exact only up to 2**24 steps
        if abs(loaded_t - loaded.step) > loaded.step * 2.0**-23:
            raise CheckpointError(
                f"{loaded.fields_file} holds step {loaded_t}, the manifest says {loaded.step}"
            )
        sim.fields.t = loaded.step
    return loaded.step
