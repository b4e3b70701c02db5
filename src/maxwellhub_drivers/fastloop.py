"""The single-molecule driver's steady step loop, in C when it is built.

Once a driver's session is READY (bound, nothing staged, nothing buffered) and its model
is a plain :class:`~maxwellhub.models.tls.TLSModel` or
:class:`~maxwellhub.models.sho.SHOModel` of one molecule, the driver hands its socket and
the model's state to ``maxwellhub_drivers._driverc.tls_loop`` (``sho_loop``), which answers
the steady steps (one fused FIELDDATA + GETSOURCE block of 196 bytes in, one SOURCEREADY
with the extras JSON out) without returning to Python. It returns the bytes it read and
did not handle (any other message, a partial or merged read, a field or source that is not
finite), or b"" at EOF; :class:`FastLoop` then puts the model in the state its own
``stage``/``commit`` would have left it in, counts the steps in the session, and the
session machine reads the bytes as before. So everything but the steady step (STATUS,
MXHPARAMS and their kicks, STOP, EXIT, errors) goes through
:class:`~maxwellhub.protocol.session.Session` unchanged.

The C loop computes exactly what the Python path computes: the same operations in the
same order, numpy's own ``cos`` and ``sin`` (called on 0-d arrays: the loop, and the
value, of the model's ``np.cos(angle)``; or those loops called directly, see
:func:`trig_loops`), and the floats of the extras printed as
``float.__repr__`` and ``json.dumps`` print them (a fast shortest-decimal printer that
leaves every value it cannot prove to ``PyOS_double_to_string``, Python's own).
tests/integration/test_driver_fastloop.py checks the reply bytes of both paths.

When the extension is not built (no C compiler at install time), or
``MAXWELLHUB_PURE_PYTHON=1``, :meth:`FastLoop.for_side` returns None and the driver runs
its pure-Python path, the session machine's own fast step.

What the loop does not cover, so it is not entered (the Python path serves those steps):
a model other than exactly ``TLSModel`` or ``SHOModel`` (a subclass may step otherwise),
n > 1, a model with a random generator, checkpoints or a kept previous state
(``--checkpoint-dir``, ``--reconnect``: both act per step), DEBUG logging (it logs every
field), a socket with a timeout, a driver class that overrides how it reads
(:meth:`DriverSide.receiver`).
"""

from __future__ import annotations

import logging
import socket
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from maxwellhub import speedups, wire
from maxwellhub.models.sho import SHOModel
from maxwellhub.models.tls import TLSModel
from maxwellhub.protocol.session import SessionState

if TYPE_CHECKING:
    from .client import DriverSide

__all__ = ["EXTENSION", "LOOPS", "FastLoop", "compiled", "trig_loops"]

#: The compiled module's name (see setup.py and :mod:`maxwellhub.speedups`).
EXTENSION = "maxwellhub_drivers._driverc"

_HEAD = wire.FIELD_STEP_HEAD  # the 160 bytes a steady block starts with
_TAIL = wire.encode_header(wire.GETFORCE)
_ANSWER = wire.encode_header(wire.SOURCEREADY)
_READY = SessionState.READY
# the state buffer: the model's three numbers and the time, steps committed, steps sent
_COMMITTED, _SENT = 4, 5
#: The models the compiled loop steps: exactly these classes, and their loop's name.
LOOPS: dict[type, str] = {TLSModel: "tls_loop", SHOModel: "sho_loop"}


def compiled() -> ModuleType | None:
    """The compiled loop's module, or None (not built, or MAXWELLHUB_PURE_PYTHON=1)."""
    return speedups.load(EXTENSION)


_TRIG_LOOPS: list[tuple[Any, Any]] = []  # the checked loops of np.cos and np.sin, once


def trig_loops(module: ModuleType) -> tuple[Any, Any]:
    """Capsules with the loops ``np.cos(angle)`` and ``np.sin(angle)`` run for a float
    angle (``ufunc._get_strided_loop``, numpy >= 1.24, documented as unstable), for the
    compiled loop to call without the ufunc call's cost; checked first to give exactly
    the ufuncs' numbers on 4096 angles (a different implementation, such as libm's
    against numpy's SIMD one, differs on about half of all angles). ``(None, None)``:
    the loop calls the ufuncs."""
    if not _TRIG_LOOPS:
        _TRIG_LOOPS.append(_checked_trig_loops(module))
    return _TRIG_LOOPS[0]


def _checked_trig_loops(module: ModuleType) -> tuple[Any, Any]:
    angles = np.random.default_rng(0).uniform(-4.0, 4.0, 4096)
    angles[:64] *= 1e-6
    angles[64:128] *= 1e3
    infos = []
    ufuncs: tuple[Any, ...] = (np.cos, np.sin)  # their private methods are not typed
    for ufunc in ufuncs:
        try:
            _, info = ufunc._resolve_dtypes_and_context((np.dtype(np.float64), None))
            ufunc._get_strided_loop(info, fixed_strides=(0, 8))  # a 0-d in, a 0-d out
            direct = module.trig_loop
            if any(direct(info, a) != float(ufunc(a)) for a in angles.tolist()):
                return None, None
        except (AttributeError, TypeError, ValueError, RuntimeError):
            return None, None
        infos.append(info)
    return infos[0], infos[1]


class FastLoop:
    """The compiled steady loop of one :class:`~maxwellhub_drivers.client.DriverSide`."""

    def __init__(self, side: DriverSide, module: ModuleType) -> None:
        self.side = side
        self.model: TLSModel | SHOModel = side.model  # type: ignore[assignment]
        self._loop = getattr(module, LOOPS[type(side.model)])
        self._state = np.zeros(6)
        self._extra: tuple = ()
        if isinstance(self.model, TLSModel):
            # numpy's cos and sin, called by the C loop on these 0-d arrays (as the
            # model's np.cos(angle) is on the 0-d array numpy makes of the float), or
            # their loops called directly when they proved to give the same numbers
            zeros = (np.zeros(()), np.zeros(()), np.zeros(()))
            self._extra = ((np.cos, np.sin, *zeros, *trig_loops(module)),)

    @classmethod
    def for_side(cls, side: DriverSide) -> FastLoop | None:
        """The loop for ``side``, or None when it can never apply to this session (see the
        module docstring); :meth:`usable` says whether it applies right now."""
        from .client import DriverSide

        module = compiled()
        if (
            module is None
            or type(side.model) not in LOOPS
            or side.model.n != 1
            or type(side).receiver is not DriverSide.receiver
            or not isinstance(side.sock, socket.socket)
        ):
            return None
        return cls(side, module)

    def usable(self) -> bool:
        """Whether the next read may go to the compiled loop: the session is READY with
        nothing buffered or owed, and nothing is due per step that the loop skips."""
        side = self.side
        session = side.session
        continuity = side.continuity
        return (
            session.state is _READY
            and not session.buffered
            and not session.batched
            and continuity.directory is None
            and not continuity.memory
            and "_rng" not in self.model.__dict__
            and not side.log.isEnabledFor(logging.DEBUG)
            and side.sock.gettimeout() is None
        )

    def run(self) -> bytes | None:
        """Answer steady steps in C until anything else arrives; the bytes read and not
        handled (b"" at EOF), or None when the model cannot be stepped there now (the
        caller reads as usual). The model and the session count every step answered,
        also when this raises (a signal handler, a failed send)."""
        inputs = self.model.scalar_loop_inputs()
        if inputs is None:
            return None
        constants, values = inputs
        state = self._state
        state[:] = (*values, 0.0, 0.0)
        try:
            fd = self.side.sock.fileno()
            return self._loop(fd, _HEAD, _TAIL, _ANSWER, constants, state, *self._extra)
        finally:
            self._done(state)

    def _done(self, state: np.ndarray) -> None:
        committed, sent = int(state[_COMMITTED]), int(state[_SENT])
        if not committed:
            return
        a, b, c, time_au = state[:4].tolist()
        self.model.scalar_loop_done(a, b, c, time_au)
        self.side.fast_steps(committed, sent)
