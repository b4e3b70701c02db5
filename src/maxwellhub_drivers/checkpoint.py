"""Exact continuity for drivers: checkpoints on disk, snapshots in memory, and the choice
of the state a new session starts from.

A driver's *committed* state after ``s`` steps is checkpointed as one ``.npz`` file per
driver connection, keyed by its molecule id(s)::

    DIR/molecule_<id>.step_<s>.npz              one molecule
    DIR/molecules_<first>+<count>.step_<s>.npz  an ensemble (consecutive ids)

written atomically (a temporary file in DIR, flush, fsync, rename, fsync of DIR), every
``every`` steps, after the step's source was sent. The newest two are kept, and the
newest two whose step is a multiple of ``keep_every`` (so a run checkpoint taken every
``keep_every`` steps always finds its driver state). Files are read with
``allow_pickle=False``; a file that does not load, belongs to other molecules or another
model, or whose parameters this model cannot take (an immutable one differs) is skipped
with a warning. The state carries the model's parameters and random generator state
(:meth:`Model.get_state`), so parameters changed during the run come back with it.

When a maxwellhub hub binds the driver it offers (INIT JSON, :data:`wire.RESUME_KEY`)
the number ``c`` of steps the molecules completed. :meth:`Continuity.begin` picks the
newest state at or before ``c`` among the live state (after a reconnect), the previous
step's snapshot (``--reconnect``) and the checkpoints, restores it, and the driver
announces its step with MXHRESUME; the hub replays the missing fields. With no state at
or before ``c`` the molecules start from their initial state (step 0).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from maxwellhub.fsutil import atomic_write
from maxwellhub.models.base import Model
from maxwellhub.protocol import wire

__all__ = ["Continuity", "checkpoint_key"]

_LOG = logging.getLogger("maxwellhub.driver")
_NAME = re.compile(r"^(?P<key>molecules?_[0-9+]+)\.step_(?P<step>[0-9]+)\.npz$")
_META = ("__molecule_ids", "__step", "__model")


def checkpoint_key(ids: Sequence[int]) -> str:
    """The file-name key of a driver hosting ``ids``."""
    ids = [int(m) for m in ids]
    if len(ids) == 1:
        return f"molecule_{ids[0]}"
    return f"molecules_{ids[0]}+{len(ids)}"


def _model_name(model: Model) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


class Continuity:
    """What a driver process keeps across sessions: the committed step, checkpoints.

    ``directory``: where checkpoints go (None: none are written). ``every``: write one
    every this many steps. ``keep_every``: also keep the newest two whose step is a
    multiple of it (0: no such rule). ``memory``: keep the previous step's state in memory
    too, so a driver that reconnects can go back one step without a file.
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        every: int = 1,
        keep_every: int = 0,
        memory: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"checkpoint every {every} steps: expected an integer >= 1")
        if keep_every < 0:
            raise ValueError(f"checkpoint keep-every {keep_every}: expected an integer >= 0")
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.every = every
        self.keep_every = keep_every
        self.memory = memory
        self.log = logger or _LOG
        self.step = 0  # steps of the model's committed state
        self.ids: tuple[int, ...] | None = None  # molecules the state belongs to
        self._initial: dict[str, np.ndarray] | None = None
        self._previous: tuple[int, dict[str, np.ndarray]] | None = None
        # the state of ``step`` before the parameter changes made at that step, once one
        # came (memory only): what a resumed session restores, since the hub replays the
        # changes of the step it resumes from
        self._unchanged: dict[str, np.ndarray] | None = None
        self.refused = False  # the last session was refused by auth
        self.offered = False  # a hub offered MXHRESUME (it speaks it)

    # ------------------------------------------------------------ session start

    def begin(self, model: Model, ids: Sequence[int], offer: Mapping | None) -> int | None:
        """Choose the state the molecules ``ids`` continue from, after ``model.initialize``
        on a new connection. ``offer``: the hub's resume offer from INIT, or None. Returns
        the step to announce with MXHRESUME, or None when the hub made no offer."""
        ids = tuple(int(m) for m in ids)
        if self._initial is None:
            self._initial = model.get_state()  # step 0, taken once per process
        same = ids == self.ids
        if offer is None:
            # A hub that does not know MXHRESUME cannot replay: continue the live state
            # of the same molecules (a re-sent step is idempotent), else start fresh.
            if not same:
                self._reset(model, ids)
            else:
                model.set_state(model.get_state())  # drop a step staged before the drop
            return None
        self.offered = True
        target = offer["step"]
        candidates: list[tuple[int, str, dict[str, np.ndarray] | None]] = []
        if same and self.step <= target:
            candidates.append((self.step, "its live state", self._unchanged))
        if same and self._previous is not None and self._previous[0] <= target:
            candidates.append(
                (self._previous[0], "the previous step kept in memory", self._previous[1])
            )
        found = self._newest_file(model, ids, target)
        if found is not None:
            candidates.append((found[0], f"checkpoint {found[2]}", found[1]))
        if not candidates:
            self._reset(model, ids)
            if target:
                self.log.warning(
                    "molecule(s) %s: no state at or before step %d (%s); "
                    "starting from the initial state",
                    _ids(ids),
                    target,
                    "no checkpoint directory"
                    if self.directory is None
                    else f"nothing usable in {self.directory}",
                )
            return 0
        step, what, state = max(candidates, key=lambda c: c[0])
        model.set_state(state if state is not None else model.get_state())
        self.step, self.ids = step, ids
        self._previous = self._unchanged = None
        if step or target:
            self.log.info(
                "molecule(s) %s: resuming from %s (step %d; the hub is at step %d)",
                _ids(ids),
                what,
                step,
                target,
            )
        return step

    def claim(self) -> bytes:
        """MXHCLAIM for the molecules of the state this driver holds, to send before
        NEEDINIT when reconnecting to a hub that spoke the extension; b"" otherwise."""
        ids = self.ids
        if not self.offered or not ids or list(ids) != list(range(ids[0], ids[0] + len(ids))):
            return b""
        return wire.encode_claim(ids[0], len(ids))

    def _reset(self, model: Model, ids: tuple[int, ...]) -> None:
        if self._initial is None:  # begin() takes it before any reset
            raise RuntimeError("Continuity: no initial state to reset to")
        model.set_state(self._initial)
        self.step, self.ids, self._previous, self._unchanged = 0, ids, None, None

    # ------------------------------------------------------------ each step

    def committed(self, model: Model, state_before: dict[str, np.ndarray] | None) -> None:
        """One more step committed (its source already sent): count it, keep the previous
        state if asked, write a checkpoint when due."""
        if self.memory and state_before is not None:
            # (state_before holds the changes made at this step; the hub would replay them)
            kept = state_before if self._unchanged is None else self._unchanged
            self._previous = (self.step, kept)
        self._unchanged = None
        self.step += 1
        if self.directory is not None and self.step % self.every == 0:
            self._write(model, self.directory)

    def changing(self, model: Model) -> None:
        """A parameter change or kick is about to apply to the committed state of
        :attr:`step`: keep that state as it was before the first one (with ``memory``),
        so a resumed session restores it and takes the hub's replay of the changes once.
        Checkpoints need nothing: one is written right after a step's answer, before any
        change of that step."""
        if self.memory and self._unchanged is None:
            self._unchanged = model.get_state()

    def _write(self, model: Model, directory: Path) -> None:
        ids = self.ids or ()
        key = checkpoint_key(ids)
        state = model.get_state()
        arrays = dict(state)
        arrays["__molecule_ids"] = np.asarray(ids, dtype=np.int64)
        arrays["__step"] = np.array(self.step, dtype=np.int64)
        arrays["__model"] = np.array(_model_name(model))
        final = directory / f"{key}.step_{self.step:012d}.npz"
        atomic_write(final, lambda fh: np.savez(fh, **arrays))
        self._prune(key)

    def _steps_on_disk(self, key: str) -> list[tuple[int, Path]]:
        out = []
        for entry in os.scandir(self.directory):
            m = _NAME.match(entry.name)
            if m and m["key"] == key:
                out.append((int(m["step"]), Path(entry.path)))
        out.sort(reverse=True)
        return out

    def _prune(self, key: str) -> None:
        files = self._steps_on_disk(key)
        keep = {step for step, _ in files[:2]}
        if self.keep_every:
            keep.update([step for step, _ in files if step % self.keep_every == 0][:2])
        for step, path in files:
            if step not in keep:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _newest_file(
        self, model: Model, ids: tuple[int, ...], target: int
    ) -> tuple[int, dict[str, np.ndarray], str] | None:
        if self.directory is None:
            return None
        for step, path in self._steps_on_disk(checkpoint_key(ids)):
            if step > target:
                continue
            try:
                with np.load(path, allow_pickle=False) as data:
                    arrays = {k: data[k] for k in data.files}
                stored = tuple(int(m) for m in arrays["__molecule_ids"].tolist())
                if stored != ids:
                    raise ValueError(f"it holds molecules {_ids(stored)}")
                if int(arrays["__step"]) != step:
                    raise ValueError(f"it holds step {int(arrays['__step'])}")
                if str(arrays["__model"]) != _model_name(model):
                    raise ValueError(f"it holds a {arrays['__model']} state")
                state = {k: v for k, v in arrays.items() if k not in _META}
                # keys, shapes, finiteness and the parameters, without applying them (a
                # model with other parameters would re-prepare twice for nothing)
                model.check_state(state)
            except Exception as exc:  # a torn or foreign file: say which, try older ones
                self.log.warning("skipping checkpoint %s: %s: %s", path, type(exc).__name__, exc)
                continue
            return step, state, path.name
        return None


def _ids(ids: Sequence[int]) -> str:
    ids = list(ids)
    return str(ids[0]) if len(ids) == 1 else f"{ids[0]}..{ids[-1]}"
