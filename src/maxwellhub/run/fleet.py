"""The driver fleet of a run: which driver processes start for which molecules, how they
start, how a run waits for external ones, and the supervisor that restarts dead ones.

:mod:`~maxwellhub.run.runner` decides when; this module decides what to start and
with which arguments (:func:`~maxwellhub.run.launch.start_driver` does the starting). It
never talks to a driver itself (the hub does), never builds a model (it asks the model
class how to slice parameters) and never waits without a deadline except where a run is
configured without one, in which case a driver's exit or a stop ends the wait.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import select
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import DriverLost, MaxwellHubError
from .config import Config
from .launch import start_driver

__all__ = [
    "Supervisor",
    "await_external_drivers",
    "dead_drivers_message",
    "driver_batches",
    "start_batch",
    "within",
]

log = logging.getLogger("maxwellhub.run")


def driver_batches(config: Config, ids_by_group: list[np.ndarray]):
    """(ids, model, params) per batch of drivers to start together, in id order.

    With ``transport.molecules_per_driver`` = 1 a batch is a run of molecules with the
    same parameters (one driver each; they may bind in any order among themselves).
    With K > 1 each batch is one ensemble driver hosting up to K consecutive molecules of
    a group, its per-molecule list parameters sliced to them (shared ones, and a single
    3-vector given for all, stay whole: the model class says which); ensembles are
    started one at a time so that each binds to exactly its ids.
    """
    from maxwellhub.models import get_model_class

    per = config.transport.molecules_per_driver
    batches: list[tuple[list[int], str, dict]] = []
    for group, ids in zip(config.molecules, ids_by_group, strict=True):
        cls = get_model_class(group.model)
        ids = ids.tolist()
        if per > 1:
            for lo in range(0, len(ids), per):
                params = cls.slice_params(group.params, lo, min(lo + per, len(ids)))
                batches.append((ids[lo : lo + per], group.model, params))
            continue
        for k, mid in enumerate(ids):
            params = cls.slice_params(group.params, k, k + 1)
            if batches and batches[-1][1] == group.model and batches[-1][2] == params:
                batches[-1][0].append(mid)
            else:
                batches.append(([mid], group.model, params))
    return batches


def start_batch(
    ids: list[int],
    model: str,
    params: dict,
    per: int,
    logs: Path,
    where: dict,
    timeout: float | None,
    extra: Sequence[str] = (),
    new_session: bool = False,
    secret=None,
) -> list:
    """Start the driver(s) of one batch; returns [(first molecule id, process)].
    ``extra``: more driver options (checkpoints); ``new_session``: see start_driver.
    The parameters travel in a JSON file (--params-file), typed as validated: a string
    that looks like a number, a path with a comma or a 3-vector arrive as they are."""
    if per == 1:
        params_file = logs / f"params_{ids[0]}.json"
        params_file.write_text(json.dumps(params))
        return [
            (
                mid,
                start_driver(
                    model,
                    None,
                    timeout=timeout,
                    log_path=logs / f"molecule_{mid}.log",
                    extra_args=["--params-file", str(params_file), *extra],
                    new_session=new_session,
                    secret=secret,
                    **where,
                ),
            )
            for mid in ids
        ]
    params_file = logs / f"ensemble_{ids[0]}.json"
    params_file.write_text(json.dumps(params))
    proc = start_driver(
        model,
        None,
        timeout=timeout,
        log_path=logs / f"molecule_{ids[0]}.log",
        extra_args=["--molecules", str(len(ids)), "--params-file", str(params_file), *extra],
        new_session=new_session,
        secret=secret,
        **where,
    )
    return [(ids[0], proc)]


class Supervisor:
    """Restarts the socket drivers that die during a run with checkpoints: the new process
    restores the molecule's newest checkpoint and the hub replays the steps it misses, so
    the run goes on exactly (``MeepCoupling(on_lost=supervisor)``). At most ``limit``
    restarts in a run; after that, or if a driver's connection is lost while its process
    lives on, the run ends as without checkpoints."""

    def __init__(self, procs: list, limit: int, grace: float = 5.0) -> None:
        self.procs = procs  # [(first molecule id, Popen)], shared with run()
        self.limit = limit
        self.grace = grace
        self.restarts = 0
        self._replaced: set = set()  # (mid, Popen) already restarted
        self._relaunch: dict[int, Callable[[], list]] = {}

    def track(self, entries: list, ids: list[int], relaunch: Callable[[list[int]], list]) -> None:
        for mid, _ in entries:
            sub = [mid] if len(entries) > 1 or len(ids) == 1 else ids
            self._relaunch[mid] = functools.partial(relaunch, sub)

    def __call__(self, exc: DriverLost) -> bool:
        # Drivers started together bind in any order, so the process that died is not
        # necessarily the one started "for" the lost molecule: restart the processes that
        # died (each with its own command line; it binds to the molecule left free).
        dead = self._dead()
        if not dead:  # the connection went first; the process follows within moments
            self._await_an_exit(self.grace)
            dead = self._dead()
        if not dead:
            log.error(
                "molecule(s) %s lost their driver's connection but every driver "
                "process lives on; not restarting any",
                exc.molecules,
            )
            return False
        if self.restarts + len(dead) > self.limit:
            log.error("driver restarts exhausted (checkpoint.restart_drivers = %d)", self.limit)
            return False
        for mid, proc in dead:
            self.restarts += 1
            self._replaced.add((mid, proc))
            log.warning(
                "a driver process (pid %d) exited with code %s, molecule(s) %s left "
                "without a driver; restarting it from its checkpoint (restart %d of "
                "at most %d)",
                proc.pid,
                proc.returncode,
                exc.molecules,
                self.restarts,
                self.limit,
            )
            self.procs.extend(self._relaunch[mid]())
        return True

    def _dead(self) -> list:
        return [
            (mid, p)
            for mid, p in self.procs
            if p.poll() is not None and p.returncode != 0 and (mid, p) not in self._replaced
        ]

    def _await_an_exit(self, timeout: float) -> None:
        """Wait until one of the live driver processes exits, at most ``timeout`` s (a
        pidfd per process, awaited with one select)."""
        fds = []
        try:
            for _, p in self.procs:
                if p.poll() is None:
                    with contextlib.suppress(OSError):
                        fds.append(os.pidfd_open(p.pid))
            if fds:
                select.select(fds, [], [], timeout)
        finally:
            for fd in fds:
                os.close(fd)


def await_external_drivers(hub, ids: list[int], transport) -> None:
    """``transport.drivers = "external"``: the user starts the drivers (another job, other
    nodes; ``maxwellhub-driver --address-file``); wait for all of them."""
    where = (
        f"the address file {transport.address_file}" if transport.address_file else f"{hub.address}"
    )
    log.warning(
        "waiting %s for %d external driver(s) to connect through %s",
        "without a deadline" if transport.timeout is None else f"up to {transport.timeout:g} s",
        len(ids),
        where,
    )
    if not hub.wait_until_bound(ids, require_init=False, timeout=transport.timeout):
        missing = [m for m in ids if not hub.all_bound([m], require_init=False)]
        raise MaxwellHubError(
            f"no external driver connected for molecule(s) "
            f"{missing[:20]}{' ...' if len(missing) > 20 else ''} "
            + within(transport.timeout, "transport.timeout = ")
            + " (start them with maxwellhub-driver --address-file or the "
            "hub's address)"
        )


def within(timeout: float | None, what: str = "") -> str:
    """How long a wait for drivers lasted, for its error message."""
    if timeout is None:  # no deadline: only an exited driver or a stop ends such a wait
        return "(a driver process exited, or a stop was requested)"
    return f"within {what}{timeout:g} s"


def dead_drivers_message(procs, logs: Path) -> str:
    dead = [(mid, p.poll()) for mid, p in procs if p.poll() not in (None, 0)]
    if not dead:
        return ""
    mid, code = dead[0]
    tail = ""
    log_file = logs / f"molecule_{mid}.log"
    with contextlib.suppress(OSError):
        lines = log_file.read_text(errors="replace").strip().splitlines()
        tail = f": {lines[-1]}" if lines else ""
    return f"the driver of molecule {mid} exited with code {code}{tail} (log {log_file})" + (
        f"; {len(dead) - 1} more drivers died" if len(dead) > 1 else ""
    )
