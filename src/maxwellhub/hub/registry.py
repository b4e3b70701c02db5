"""Registered molecules and the binding of driver connections to them: pure bookkeeping,
no I/O, testable without a socket.

Binding order: anonymous connections bind in the order they became available, to free
molecule ids in registration order; an ensemble takes as many ids as it hosts. A
connection that claimed its molecules back (MXHCLAIM) gets them once they are all
registered and free; while some are not registered yet it waits, letting others pass; if
another connection holds one of them, it is bound as anonymous ones are.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from ..protocol.connection import State

__all__ = ["Molecule", "Registry"]


class Molecule:
    """A registered molecule id and the connection (if any) bound to it."""

    __slots__ = ("driver", "id", "index", "initialized", "payload")

    def __init__(self, mid: int, index: int) -> None:
        self.id = mid
        self.index = index  # registration order: its slot in the history's counts
        self.driver: Any = None  # a maxwellhub.protocol.connection.Connection
        self.payload: dict[str, Any] | None = None
        self.initialized = False


class Registry:
    """Molecules by id, in registration order, and the connections waiting to bind.

    A connection here is anything with ``state``, ``size``, ``claim`` and ``bind(mols)``
    (:class:`maxwellhub.protocol.connection.Connection`)."""

    def __init__(self, max_spare: int = 256) -> None:
        self.molecules: dict[int, Molecule] = {}
        self.driverless: set[int] = set()  # registered ids with no driver bound
        self.unbound: deque[Any] = deque()  # connections waiting, in arrival order
        self.max_spare = max_spare
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.molecules)

    def get(self, mid: int) -> Molecule | None:
        return self.molecules.get(mid)

    # -- registration
    def register(self, mid: int, init: Mapping[str, Any] | None = None) -> Molecule:
        """Reserve a slot for ``mid``; a :class:`ValueError` if it is registered."""
        if mid in self.molecules:
            raise ValueError(f"Molecule ID {mid} already registered!")
        mol = self.molecules[mid] = Molecule(mid, len(self.molecules))
        self.driverless.add(mid)
        if init is not None:
            mol.payload = dict(init)
        return mol

    def next_free_id(self) -> int:
        while self._next_id in self.molecules:
            self._next_id += 1
        return self._next_id

    def unknown(self, ids: Iterable[int]) -> list[int]:
        return [int(m) for m in ids if int(m) not in self.molecules]

    # -- queries (cheap: no I/O, no event loop)
    def all_bound(self, molecule_ids: Iterable[int], require_init: bool = True) -> bool:
        for mid in molecule_ids:
            mol = self.molecules.get(int(mid))
            if mol is None or mol.driver is None:
                return False
            if require_init and not mol.initialized:
                return False
        return True

    def missing(self, molecule_ids: Iterable[int]) -> list[int]:
        return [
            int(m)
            for m in molecule_ids
            if (mol := self.molecules.get(int(m))) is None or not mol.initialized
        ]

    def waiting_molecules(self) -> int:
        """Molecules that the connections waiting for a binding could host."""
        return sum(d.size for d in self.unbound if d.state is State.UNBOUND)

    def unbound_report(self, ids: Iterable[int], require_init: bool) -> tuple[list[Any], list[Any]]:
        """(ids with no driver, ids whose driver is still initialising)."""
        absent, starting = [], []
        for mid in ids:
            mol = self.molecules[int(mid)]
            if mol.driver is None:
                absent.append(mid)
            elif require_init and not mol.initialized:
                starting.append(mid)
        return absent, starting

    # -- binding
    def offer(self, conn: Any) -> str | None:
        """A connection answered STATUS and waits for molecules; the reason to refuse it
        (too many spares), or None when it was queued."""
        if len(self.unbound) >= self.max_spare and len(self.driverless) < conn.size:
            return (
                f"no free molecule for it and {len(self.unbound)} spare "
                f"driver(s) already waiting (max_spare = {self.max_spare})"
            )
        self.unbound.append(conn)
        return None

    def progress(self) -> list[Any]:
        """Bind what can be bound now (see the module's notes); the connections bound."""
        bound = []
        if any(d.claim for d in self.unbound):
            bound += self._bind_claims()
        while self.unbound:
            conn = self.unbound[0]
            if conn.state is not State.UNBOUND:
                self.unbound.popleft()
                continue
            if conn.claim and self._claim_pending(conn.claim):
                self.unbound.rotate(-1)  # its molecules may still be registered
                if all(d.claim and self._claim_pending(d.claim) for d in self.unbound):
                    break
                continue
            free = []
            for mol in self.molecules.values():
                if mol.driver is None:
                    free.append(mol)
                    if len(free) == conn.size:
                        break
            if len(free) < conn.size:
                break
            self.unbound.popleft()
            self.bind(conn, free)
            bound.append(conn)
        return bound

    def _claim_pending(self, claim: list[int]) -> bool:
        """Whether a claim may still be honoured: none of its ids is held by another
        driver, and some is not registered yet."""
        mols = [self.molecules.get(m) for m in claim]
        return any(m is None for m in mols) and all(m is None or m.driver is None for m in mols)

    def _bind_claims(self) -> list[Any]:
        bound = []
        for conn in list(self.unbound):
            if conn.state is not State.UNBOUND or not conn.claim:
                continue
            found = [self.molecules.get(m) for m in conn.claim]
            mols = [m for m in found if m is not None and m.driver is None]
            if len(mols) == len(found):
                self.unbound.remove(conn)
                self.bind(conn, mols)
                bound.append(conn)
        return bound

    def bind(self, conn: Any, mols: list[Molecule]) -> None:
        for mol in mols:
            mol.driver, mol.initialized = conn, False
            self.driverless.discard(mol.id)
        conn.bind(mols)

    def release(self, conn: Any) -> list[Molecule]:
        """``conn`` is gone: its molecules (those still bound to it) are free again."""
        mols = [m for m in conn.molecules if m.driver is conn]
        for mol in mols:
            mol.driver = None
            mol.initialized = False
            self.driverless.add(mol.id)
        return mols
