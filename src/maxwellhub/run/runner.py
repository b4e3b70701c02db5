"""``maxwellhub run CONFIG.toml``: the main job.

Builds the Meep problem of the config, starts the hub and the configured local drivers
(rank 0 only under MPI), runs, writes the HDF5 file and the population plot, and prints
one JSON line: fitted decay rate, golden-rule rate, relative error, steps, wall time and
output paths. A bad config is refused before anything starts; a driver that dies ends
the run with a message naming it, and the data recorded until then is written. With a
``[checkpoint]`` table the whole coupled state is checkpointed every N steps and on
SIGTERM/SIGINT, and ``--resume DIR`` continues bit for bit (:mod:`maxwellhub.checkpoint`).

This module is the order of things (:func:`run`, :func:`main`); the parts live beside
it: the config checked against the models in :mod:`~maxwellhub.run.validate`, the driver
processes in :mod:`~maxwellhub.run.fleet`, the output and the summary in
:mod:`~maxwellhub.run.summary`. It never parses a config (:mod:`~maxwellhub.run.config`
does), never builds a model (the couplings do) and never talks to a driver (the hub does).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import MaxwellHubError, UsageError
from ..parallel.mpi import am_master, rank_and_size
from .config import (
    Checkpoint,
    Config,
    ConfigError,
    MoleculeGroup,
    ScheduledChange,
    load_config,
    parse_config_text,
)
from .fleet import (
    Supervisor,
    await_external_drivers,
    dead_drivers_message,
    driver_batches,
    start_batch,
    within,
)
from .launch import reap
from .output import Progress
from .summary import analytic_reference as analytic_reference  # its old home
from .summary import finish
from .validate import validate_models

if TYPE_CHECKING:
    from ..hub import SocketHub
    from ..protocol.auth import Secret
    from .checkpoint import LoadedCheckpoint, RunCheckpointer, RunInterrupted

__all__ = ["DEFAULT_CONFIG", "main", "run", "validate_models"]

log = logging.getLogger("maxwellhub.run")

# The default main job ships inside the package (src/maxwellhub/data/), so `maxwellhub run`
# without a config works from a wheel as from the source tree; examples/relax_2d.toml is
# the same file for readers of the repository (tests/system/test_packaging.py keeps them equal).
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "data" / "relax_2d.toml"


def _center(dims: int, position: tuple[float, ...]) -> tuple[float, float, float]:
    """Config coordinates to Meep's: a 1D cell lies along z, 2D in the x-y plane."""
    if dims == 1:
        return (0.0, 0.0, position[0])
    padded = (*position, 0.0, 0.0)  # a position has as many coordinates as dimensions
    return (padded[0], padded[1], padded[2])


def build_simulation(config: Config):
    """The ``mp.Simulation`` the config describes (no sources of its own)."""
    import meep as mp

    s = config.simulation
    # Meep's own chatter only with -vv: the last line of a run is our JSON summary.
    chatty = logging.getLogger().isEnabledFor(logging.DEBUG)
    mp.verbosity(1 if chatty else 0)
    if not chatty and hasattr(mp, "report_elapsed_time"):
        atexit.unregister(mp.report_elapsed_time)  # it prints after our summary line
    cell = mp.Vector3(0, 0, s.cell[0]) if s.dimensions == 1 else mp.Vector3(*s.cell)
    boundary = [mp.PML(s.pml)] if s.pml > 0 else []
    return mp.Simulation(
        cell_size=cell, resolution=s.resolution, boundary_layers=boundary, dimensions=s.dimensions
    )


def run(config: Config, echo=print, resume: str | os.PathLike | None = None) -> dict:
    """Run the job; returns the summary (also printed as one JSON line on rank 0).

    ``resume``: a checkpoint directory (``[checkpoint] dir`` or one ``step_*`` in it) to
    continue from; its config must match ``config`` (:mod:`maxwellhub.checkpoint`). With
    a ``[checkpoint]`` table, SIGTERM/SIGINT write a checkpoint and end the run with
    ``summary["stopped_by_signal"]`` set (``main`` then exits with status 75).
    """
    t_start = time.perf_counter()
    config = validate_models(config)  # idempotent: main() has done it already
    job = _Run(config, t_start)
    job.set_up(resume)
    return job.execute(echo)


class _Run:
    """One :func:`run`, in steps that share its state: :meth:`set_up` (the checkpoint to
    resume, the simulation, the hub, the coupling, the checkpointer), then
    :meth:`execute`: the drivers' launch, the resume, the Meep run itself and the
    summary."""

    def __init__(self, config: Config, t_start: float) -> None:
        self.config = config
        self.t_start = t_start
        self.master = am_master()
        self.out_dir = config.output.directory
        self.ck_config = config.checkpoint
        self.transport = config.transport
        self.loaded: LoadedCheckpoint | None = None
        self.hub: SocketHub | None = None
        self.where: dict[str, Any] = {}  # how drivers reach the hub (start_driver keywords)
        self.secret: Secret | None = None
        self.procs: list[tuple[int, subprocess.Popen]] = []  # (first molecule id, process)
        self.checkpointer: RunCheckpointer | None = None
        self.supervisor: Supervisor | None = None
        # a MeepCoupling, or an EngineCoupling for the other engines (same molecule API)
        self.coupling: Any = None

    # ------------------------------------------------------------------ set-up

    def set_up(self, resume: str | os.PathLike | None) -> None:
        from . import checkpoint as ckpt

        config = self.config
        self.identity = ckpt.config_identity(config)
        if resume is not None:  # collective under MPI: every rank the same one, or refused
            self.loaded = ckpt.load_checkpoint(resume)
            ckpt.check_identity(self.loaded, self.identity)
        if self.master:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if config.em.engine != "meep" and rank_and_size()[1] > 1:
            raise ConfigError(
                f"em.engine = {config.em.engine!r} runs in one process; under mpirun only "
                "the Meep engine spreads over ranks (spread many drivers with relays instead)"
            )
        self.sim = build_simulation(config) if config.em.engine == "meep" else None
        self.steps_total = self._steps_total()
        self._start_hub()
        self._make_coupling()
        if self.hub is not None and self.master:
            log.warning(
                "control endpoint: %s (maxwellhub status|stop %s)",
                self.hub.control_address,
                self.hub.control_address,
            )
        start_step = self.loaded.step if self.loaded is not None else 0
        # the live bar on rank 0's terminal only (the other ranks' progress is the same)
        # Meep calls the step functions at fields.t = start ... steps_total (both ends);
        # the other engines do steps start_step ... steps_total - 1
        calls = self.steps_total - start_step + (1 if self.sim is not None else 0)
        self.progress = Progress(calls, bar=self.master)
        if self.ck_config is not None:
            self._make_checkpointer(self.ck_config)

    def _steps_total(self) -> int:
        from . import checkpoint as ckpt

        until = self.config.simulation.until
        if self.sim is not None:
            steps_total = round(until / (self.sim.Courant / self.sim.resolution))
        else:
            steps_total = self.config.steps_total
        loaded = self.loaded
        if loaded is not None and loaded.step > steps_total:
            raise ckpt.CheckpointError(
                f"simulation.until = {until:g} ends at step {steps_total}, "
                f"before the checkpoint's step {loaded.step} ({loaded.path})"
            )
        return steps_total

    def _hub_options(self) -> dict[str, Any]:
        """SocketHub's keywords beyond the address: history, auth, address_file."""
        transport, loaded = self.transport, self.loaded
        hub_kw: dict[str, Any] = {}
        if transport.kind != "embedded" and (self.ck_config is not None or loaded is not None):
            # replayable history: K + 1 steps reach back to the drivers' last checkpoint
            k = self.ck_config.driver_every if self.ck_config is not None else 1
            saved = (
                int(loaded.hub_snapshot.get("history", 0))
                if loaded is not None and loaded.hub_snapshot is not None
                else 0
            )
            hub_kw["history"] = max(k + 1, saved)
        if transport.kind != "embedded" and transport.secret_file is not None:
            from ..protocol.auth import load_secret

            self.secret = load_secret(transport.secret_file)  # a bad file: UsageError naming it
            hub_kw["auth"] = self.secret
        if transport.address_file is not None:
            hub_kw["address_file"] = transport.address_file
        return hub_kw

    def _start_hub(self) -> None:
        from ..hub import SocketHub

        transport = self.transport
        hub_kw = self._hub_options()
        if transport.kind == "embedded":
            return
        control = f"mxh_run_{os.getpid()}"  # maxwellhub status|stop /tmp/maxwellhub_control_...
        if transport.kind == "unix":
            name = transport.name or f"mxh_run_{os.getpid()}"
            self.hub = SocketHub(
                unixsocket=name, timeout=transport.timeout, control=control, **hub_kw
            )
            self.where = {"unix": name}
        else:
            hub = self.hub = SocketHub(
                host=transport.host,
                port=transport.port,
                timeout=transport.timeout,
                control=control,
                **hub_kw,
            )
            self.where = {
                "host": transport.host if transport.host != "0.0.0.0" else "127.0.0.1",
                "port": hub.port,
            }

    def _make_coupling(self) -> None:
        from ..em import EngineCoupling, MeepCoupling
        from ..em.engines import build_engine

        config = self.config
        if self.sim is None:
            assert config.simulation.dt_au is not None
            self.coupling = EngineCoupling(
                build_engine(config.em.engine, config.em.params, config.base_dir),
                config.simulation.dt_au,
                hub=self.hub,
                record_every=config.output.record_every,
                timeout=self.transport.timeout,
                on_lost="abort",
            )
            self.ids_by_group = [
                _add_engine_group(self.coupling, g, socket=self.hub is not None)
                for g in config.molecules
            ]
            return
        self.coupling = MeepCoupling(
            self.sim,
            time_units_fs=config.simulation.time_units_fs,
            hub=self.hub,
            record_every=config.output.record_every,
            timeout=self.transport.timeout,
            on_lost="abort",
        )
        self.ids_by_group = [
            _add_group(self.coupling, config, g, socket=self.hub is not None)
            for g in config.molecules
        ]

    def _make_checkpointer(self, ck_config: Checkpoint) -> None:
        from . import checkpoint as ckpt

        config = self.config
        try:  # before anything is written: a locked directory must not cost the output
            self.checkpointer = ckpt.RunCheckpointer(
                ck_config.directory,
                self.sim,
                self.coupling,
                hub=self.hub,
                every=ck_config.every,
                keep=ck_config.keep,
                identity=self.identity,
                config_text=config.text,
                overrides=config.overrides,
                config_dir=config.base_dir,
            )
        except BaseException:
            if self.hub is not None:
                self.hub.stop()
            raise

    # ------------------------------------------------------------------ the run

    def execute(self, echo) -> dict:
        """Drivers, resume, the run itself, then the summary (written also when the run
        fails: the data so far is kept); returns the summary."""
        from . import checkpoint as ckpt

        summary: dict = {}
        failure: BaseException | None = None
        interrupted: ckpt.RunInterrupted | None = None
        try:
            driver_args = self._driver_args()
            checkpointer = self.checkpointer
            signals = (
                checkpointer.signals() if checkpointer is not None else contextlib.nullcontext()
            )
            with signals:
                if self.hub is not None and self.master:
                    self._start_drivers(self.hub, driver_args)
                self._resume()
                self._run_steps()
        except ckpt.RunInterrupted as exc:
            interrupted = failure = exc
        except BaseException as exc:  # the data is written, then re-raised
            failure = exc
        finally:
            stopped = self.hub is not None and self.hub.stop_requested
            if self.master:
                summary = self._summary(failure, interrupted, stopped)
            self._release(summary)
        return self._conclude(summary, failure, interrupted, stopped, echo)

    def _driver_args(self) -> list[str]:
        """Checkpoint options for the socket drivers."""
        if self.hub is None:
            return []
        if self.checkpointer is not None and self.ck_config is not None:
            return self.checkpointer.driver_args(self.ck_config.driver_every)
        if self.loaded is not None:
            return ["--checkpoint-dir", str(self._driver_dir(self.loaded))]
        return []

    def _driver_dir(self, loaded: LoadedCheckpoint) -> Path:
        """Where the socket drivers keep their checkpoints: the checkpointer's directory,
        else (a resume without a [checkpoint] table) the resumed checkpoint's."""
        if self.checkpointer is not None:
            return self.checkpointer.driver_dir
        return loaded.path.parent / "drivers"

    def _start_drivers(self, hub: SocketHub, driver_args: list[str]) -> None:
        """Rank 0 with a hub: register the molecules, put a resumed hub's state back, then
        start (or await) the drivers until each one is bound."""
        from . import checkpoint as ckpt

        logs = self.out_dir / "drivers"
        logs.mkdir(exist_ok=True)
        for mid in np.concatenate(self.ids_by_group).tolist():
            hub.register_molecule(mid)
        loaded = self.loaded
        if loaded is not None:
            if loaded.hub_snapshot is None:
                raise ckpt.CheckpointError(f"{loaded.path} has no hub snapshot")
            hub.restore(loaded.hub_snapshot)
            ckpt.restore_driver_files(loaded, self._driver_dir(loaded))
        local = self.transport.drivers == "local"
        ck_config = self.ck_config
        if (
            self.checkpointer is not None
            and ck_config is not None
            and ck_config.restart_drivers
            and local
        ):
            self.supervisor = Supervisor(self.procs, ck_config.restart_drivers)
            self.coupling.on_lost = self.supervisor
        if local:
            # Every wait for drivers to bind or initialise (here and in the coupling)
            # ends when one of ours exits: the run fails at once with its log tail,
            # with no deadline needed. Replaced ones are not watched.
            hub.watch_processes(self._watched_processes)
        if self.transport.drivers == "external":
            await_external_drivers(hub, np.concatenate(self.ids_by_group).tolist(), self.transport)
        if local:
            self._launch_local_drivers(hub, logs, driver_args)

    def _watched_processes(self) -> list[subprocess.Popen]:
        supervisor = self.supervisor
        return [
            p for mid, p in self.procs if supervisor is None or (mid, p) not in supervisor._replaced
        ]

    def _launch_local_drivers(self, hub: SocketHub, logs: Path, driver_args: list[str]) -> None:
        """Start the local drivers batch by batch, each bound before the next starts."""
        transport = self.transport
        for ids, model, params in driver_batches(self.config, self.ids_by_group):
            launch = functools.partial(
                start_batch,
                model=model,
                params=params,
                per=transport.molecules_per_driver,
                logs=logs,
                where=self.where,
                timeout=transport.timeout,
                extra=driver_args,
                new_session=self.checkpointer is not None,
                secret=self.secret,
            )
            entries = launch(ids)
            self.procs.extend(entries)  # the list the supervisor and the hub watch
            if self.supervisor is not None:
                self.supervisor.track(entries, ids, launch)
            if not hub.wait_until_bound(ids, require_init=False, timeout=transport.timeout):
                raise MaxwellHubError(
                    dead_drivers_message(self.procs, logs)
                    or f"drivers for molecules {ids} did not connect " + within(transport.timeout)
                )

    def _resume(self) -> None:
        """Put the simulation and the coupling back to the resumed checkpoint's step."""
        from . import checkpoint as ckpt

        loaded = self.loaded
        if loaded is None:
            return
        ckpt.restore(loaded, self.sim, self.coupling)
        if self.checkpointer is not None:
            self.checkpointer.mark_restored(loaded.step)
        log.warning("resumed from %s at step %d", loaded.path, loaded.step)

    def _run_steps(self) -> None:
        if self.sim is None:
            engine_steps = []
            if self.config.schedule:
                engine_steps.append(self._schedule_function())
            if self.checkpointer is not None:
                engine_steps.append(self.checkpointer.tick)
            tick = self.progress.tick
            engine_steps.append(lambda coupling: tick())
            self.coupling.run(*engine_steps, until=self.config.simulation.until)
            return
        steps = [self.coupling.step_function()]
        if self.config.schedule:
            steps.append(self._schedule_function())
        if self.checkpointer is not None:
            steps.append(self.checkpointer.step_function())
        until = self.config.simulation.until
        # an absolute end, so that a resumed run stops where the uninterrupted one does
        self.sim.run(
            *steps, self.progress.step_function(), until=lambda sim: sim.round_time() >= until
        )

    def _schedule_function(self):
        """A step function that queues each ``[[schedule]]`` entry after the coupling's
        step ``entry.step - 1``, so it applies before step ``entry.step`` (before a
        checkpoint written at that boundary, which then holds it). Entries at or before a
        resumed step are already in the checkpoint's state. A change the models refuse at
        run time (a check across parameters) is logged naming it, and the run goes on."""
        due: dict[int, list[tuple[int, ScheduledChange]]] = {}
        # the boundary before step k is Meep's fields.t = k - 1 (its step functions run
        # after the coupling's step k - 1), and the other engines' step_index = k
        meep = self.sim is not None
        start = -1 if self.loaded is None else self.loaded.step + (1 if meep else 0)
        for i, entry in enumerate(self.config.schedule):
            if entry.step > start:
                due.setdefault(entry.step, []).append((i, entry))
        coupling, total = self.coupling, self.config.molecule_count

        def maxwellhub_schedule(sim) -> None:
            boundary = sim.fields.t + 1 if meep else coupling.step_index
            for i, entry in due.pop(boundary, ()):
                ids = list(range(total)) if entry.molecules is None else list(entry.molecules)
                try:
                    if entry.kick is not None:
                        coupling.apply_kick(ids, entry.kick)
                    else:
                        coupling.set_params(ids, entry.changes)
                except UsageError as exc:
                    log.error(
                        "schedule[%d] at step %d refused, the run goes on: %s", i, entry.step, exc
                    )
                    continue
                log.info(
                    "schedule[%d]: %s for molecule(s) %s before step %d",
                    i,
                    f"kick {list(entry.kick)}" if entry.kick is not None else entry.changes,
                    "all" if entry.molecules is None else ids,
                    entry.step,
                )

        return maxwellhub_schedule

    # ------------------------------------------------------------------ the end

    def _summary(
        self, failure: BaseException | None, interrupted: RunInterrupted | None, stopped
    ) -> dict:
        """Rank 0: write the output (:func:`finish`) and complete its summary;
        ``stopped``: the hub's stop request, as it was when the run ended."""
        summary = finish(
            self.config, self.coupling, failure, self.procs, self.t_start, self.progress
        )
        hub, loaded, checkpointer = self.hub, self.loaded, self.checkpointer
        if hub is not None:
            summary["control"] = hub.control_address
        if stopped:
            summary["stopped"] = stopped
        if loaded is not None:
            summary["resumed_from"] = str(loaded.path)
            summary["resumed_at_step"] = loaded.step
        if checkpointer is not None:
            summary["checkpoints_written"] = len(checkpointer.write_seconds)
            if checkpointer.write_seconds:
                summary["checkpoint_write_ms"] = round(
                    1e3 * float(np.mean(checkpointer.write_seconds)), 3
                )
            summary["checkpoint"] = str(checkpointer.last_path) if checkpointer.last_path else None
        if self.supervisor is not None:
            summary["drivers_restarted"] = self.supervisor.restarts
        if interrupted is not None:
            summary["stopped_by_signal"] = signal.Signals(interrupted.signum).name
            summary["checkpoint"] = str(interrupted.path)
        return summary

    def _release(self, summary: dict) -> None:
        """Unlock the checkpoint directory, stop the hub, reap the drivers."""
        if self.checkpointer is not None:
            self.checkpointer.close()
        if self.hub is not None:
            self.hub.stop()
        codes = reap([p for _, p in self.procs], 10.0)
        if self.master and self.procs:
            summary["driver_exit_codes"] = codes

    def _conclude(
        self,
        summary: dict,
        failure: BaseException | None,
        interrupted: RunInterrupted | None,
        stopped,
        echo,
    ) -> dict:
        """Raise the run's failure (naming a dead driver), or print the summary line."""
        if interrupted is not None and not self.master:  # every rank exits 75 (mpirun passes it on)
            summary["stopped_by_signal"] = signal.Signals(interrupted.signum).name
        if failure is not None and not stopped and interrupted is None:
            if self.master:
                dead = dead_drivers_message(self.procs, self.out_dir / "drivers")
                raise MaxwellHubError(
                    f"run failed: {failure}"
                    + (f"; {dead}" if dead else "")
                    + f"; data so far written to {summary.get('hdf5')}"
                ) from failure
            raise failure
        if self.master:
            echo(json.dumps(summary))
        return summary


def _add_engine_group(coupling, group: MoleculeGroup, socket: bool) -> np.ndarray:
    """A group of a non-Meep engine: positions (a.u.) when the config gives them."""
    n = len(group.positions)
    positions = None
    if any(group.positions):
        positions = [
            (*p, *([np.nan] * (3 - len(p)))) if p else (np.nan,) * 3 for p in group.positions
        ]
    if socket:
        return coupling.add_socket_molecules(n, positions=positions, rescaling=group.rescaling)
    return coupling.add_molecules(
        group.model, n, positions=positions, rescaling=group.rescaling, **group.params
    )


def _add_group(coupling, config: Config, group: MoleculeGroup, socket: bool) -> np.ndarray:
    centers = [_center(config.simulation.dimensions, p) for p in group.positions]
    kw = dict(sigma=group.sigma, axis=group.axis, rescaling=group.rescaling)
    if socket:
        return coupling.add_socket_molecules(centers, **kw)
    return coupling.add_molecules(group.model, centers, **kw, **group.params)


def main(
    config_path: str | None = None,
    overrides: dict | None = None,
    resume: str | None = None,
    missing_extras: bool = False,
) -> int:
    """Entry of ``maxwellhub run``; returns the exit status: 0 done, 1 the run failed,
    2 bad config or a checkpoint that does not fit, 75 stopped by SIGTERM/SIGINT with a
    checkpoint written (continue with ``--resume``).

    With ``resume`` and no ``config_path`` the config saved in the checkpoint is used
    (with its ``--set`` overrides, then these). ``missing_extras``: run nothing; print
    the pip extras of maxwellhub that the config's models need and that are not
    installed, one per line (``./dev.sh run`` installs them before the run)."""
    from .checkpoint import STOPPED_BY_SIGNAL, CheckpointError, load_checkpoint

    path = Path(config_path) if config_path else DEFAULT_CONFIG
    try:
        if resume is not None and config_path is None:
            try:
                manifest = load_checkpoint(resume).manifest
            except CheckpointError as exc:
                if am_master():
                    print(f"maxwellhub run: {exc}", file=sys.stderr)
                return 2
            path = Path(resume)
            saved_dir = manifest.get("config_dir")
            config = parse_config_text(
                manifest.get("config_text", ""),
                None,
                {**manifest.get("overrides", {}), **(overrides or {})},
                base_dir=Path(saved_dir) if saved_dir else None,
            )
        else:
            config = load_config(path, overrides)
        if missing_extras:
            from maxwellhub.models import missing_extra

            needed = {missing_extra(g.model) for g in config.molecules} - {None}
            for extra in sorted(str(e) for e in needed):
                print(extra)
            return 0
        config = validate_models(config)  # cheap: no model is built in this process yet
    except ConfigError as exc:
        print(f"maxwellhub run: bad config {path}: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run(config, resume=resume)
    except CheckpointError as exc:
        if am_master():
            print(f"maxwellhub run: {exc}", file=sys.stderr)
        return 2
    except MaxwellHubError as exc:
        if am_master():
            print(f"maxwellhub run: {exc}", file=sys.stderr)
        return 1
    return STOPPED_BY_SIGNAL if summary.get("stopped_by_signal") else 0
