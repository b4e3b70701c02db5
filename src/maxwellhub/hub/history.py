"""How many steps each molecule completed, and the replay window: the fields of the last
``depth`` completed steps, kept so that a driver restored from an older checkpoint is
brought to the current step (the continuity contract). Pure arrays, no I/O.

Counting is lazy: while consecutive steps use the same layout, a completed step adds one
to the layout's ``pending`` and nothing else; :meth:`History.flush` adds it to every
molecule of the layout when a count is read or the layout changes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import UsageError
from .barrier import Layout, ids_text

__all__ = ["History", "Replay"]


class Replay:
    """A completed step kept for replay: its layout, its fields and how many steps each
    of its molecules had completed before it."""

    __slots__ = ("before", "fields", "layout")

    def __init__(self, layout: Layout, fields: npt.NDArray[Any], before: npt.NDArray[Any]) -> None:
        self.layout = layout
        self.fields = fields
        self.before = before


class History:
    """Completed steps per molecule slot (registration order) and the replay window of
    ``depth`` steps (0: nothing kept, nothing replayed)."""

    def __init__(self, depth: int = 0) -> None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise UsageError(f"history must be a whole number of steps >= 0, not {depth!r}")
        self.depth = depth
        self.counts = np.zeros(64, dtype=np.int64)  # completed steps, by molecule slot
        self.replays: deque[Replay] = deque(maxlen=depth or 1)
        self.layout: Layout | None = None  # the layout whose steps are counted lazily

    def grow(self, slots: int) -> None:
        """Room for ``slots`` molecules."""
        while slots > len(self.counts):
            self.counts = np.concatenate([self.counts, np.zeros_like(self.counts)])

    def follow(self, layout: Layout) -> None:
        """Steps from now on use ``layout`` (counts of the previous one are flushed)."""
        self.flush()
        self.layout = layout

    def flush(self) -> None:
        layout = self.layout
        if layout is not None and layout.pending:
            self.counts[layout.index] += layout.pending
            layout.pending = 0

    def completed(self, layout: Layout, fields: npt.NDArray[Any]) -> None:
        """A step of ``layout`` with ``fields`` completed."""
        if self.depth:
            self.flush()
            self.replays.append(
                Replay(layout, np.array(fields, np.float64), self.counts[layout.index])
            )
        layout.pending += 1  # added to counts when they are read (see flush)

    def steps(self, index: int) -> int:
        self.flush()
        return int(self.counts[index])

    def set_steps(self, indices: Iterable[int], step: int) -> None:
        self.flush()
        for i in indices:
            self.counts[i] = int(step)

    def offer(self, index: int, mid: int) -> tuple[int, int]:
        """(steps the molecule completed, how many of the latest of them can be replayed)."""
        done = self.steps(index)
        kept = sum(1 for rep in self.replays if mid in rep.layout.row)
        return done, min(kept, done)

    def fields(
        self, ids: Sequence[int], ensemble: bool, start: int, done: int
    ) -> list[npt.NDArray[Any]] | None:
        """The fields of steps ``start`` .. ``done - 1`` of molecules ``ids`` (one array
        per step, oldest first), or None if the window does not reach back that far."""
        out: list[npt.NDArray[Any]] = []
        for rep in self.replays:
            row = rep.layout.row
            r = row.get(ids[0])
            if r is None or rep.before[r] < start:
                continue
            if not ensemble:
                out.append(rep.fields[r : r + 1])
            else:
                rows = [row.get(m, -1) for m in ids]
                if min(rows) < 0:
                    return None
                out.append(rep.fields[rows])
        return out if len(out) == done - start else None

    # -- run checkpoints
    def snapshot(self, ids: npt.NDArray[Any]) -> dict[str, npt.NDArray[Any]]:
        self.flush()
        out = {
            "molecule_ids": ids,
            "molecule_steps": self.counts[: len(ids)].copy(),
            "history": np.array(self.depth, dtype=np.int64),
            "replays": np.array(len(self.replays), dtype=np.int64),
        }
        for j, rep in enumerate(self.replays):
            out[f"replay{j}_ids"] = rep.layout.ids
            out[f"replay{j}_fields"] = rep.fields
            out[f"replay{j}_before"] = rep.before
        return out

    def restore(
        self,
        snapshot: Mapping[str, Any],
        slot: Mapping[int, int],
        new_layout: Callable[..., Any],
    ) -> None:
        """Counts and window from :meth:`snapshot`; ``slot`` maps every registered id to
        its slot, ``new_layout(ids, index)`` makes a layout."""
        try:
            ids = np.asarray(snapshot["molecule_ids"], dtype=np.int64)
            steps = np.asarray(snapshot["molecule_steps"], dtype=np.int64)
            count = int(snapshot["replays"])
        except KeyError as exc:
            raise UsageError(f"hub snapshot lacks {exc.args[0]!r}") from None
        unknown = [int(m) for m in ids.tolist() if int(m) not in slot]
        if unknown or len(ids) != len(slot) or steps.shape != ids.shape:
            raise UsageError(
                f"hub snapshot is of molecules {ids_text(sorted(ids.tolist()))}; this hub "
                f"registered {ids_text(sorted(slot))}"
            )
        self.flush()
        for mid, n in zip(ids.tolist(), steps.tolist(), strict=True):
            self.counts[slot[mid]] = n
        self.replays.clear()
        for j in range(max(0, count - (self.depth or 0)), count):
            rids = np.asarray(snapshot[f"replay{j}_ids"], dtype=np.int64)
            fields = np.asarray(snapshot[f"replay{j}_fields"], dtype=np.float64)
            before = np.asarray(snapshot[f"replay{j}_before"], dtype=np.int64)
            if (
                fields.shape != (len(rids), 3)
                or before.shape != rids.shape
                or any(int(m) not in slot for m in rids.tolist())
            ):
                raise UsageError(
                    f"hub snapshot: replay entry {j} is inconsistent "
                    f"(ids {rids.shape}, fields {fields.shape}, "
                    f"before {before.shape})"
                )
            index = np.fromiter((slot[m] for m in rids.tolist()), dtype=np.intp, count=len(rids))
            self.replays.append(Replay(new_layout(rids, index), fields, before))
