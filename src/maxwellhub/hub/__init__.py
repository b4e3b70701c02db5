"""The coupling hub: driver connections over TCP or UNIX sockets, molecule binding, and
barrier steps (send every molecule its field, gather every molecule's source).

Two faces, one implementation:

- :class:`Hub` (:mod:`~maxwellhub.hub.core`) is the asyncio core. It runs on the caller's
  event loop; each connection is a sans-I/O :class:`~maxwellhub.protocol.connection.
  Connection` behind a thin asyncio adapter (:mod:`~maxwellhub.hub.adapter`).
  ``await hub.step(requests)`` is the barrier.
- :class:`SocketHub` (:mod:`~maxwellhub.hub.sync`) is MaxwellLink's synchronous API for
  plain functions such as Meep's step callback, on the Hub's public step contract.

The pure parts, unit-tested without sockets: :mod:`~maxwellhub.hub.registry` (molecules
and binding order), :mod:`~maxwellhub.hub.barrier` (the frozen step and its result),
:mod:`~maxwellhub.hub.history` (completed steps and the replay window). The step machinery
the Hub composes (freezing, sending, gathering replies, the step timer) is
:mod:`~maxwellhub.hub.stepping`.
"""

from __future__ import annotations

from ..net.buffers import keep_freed_memory, widen_socket_buffers
from .barrier import StepResult
from .core import Hub, StopRequested, new_event_loop
from .sync import SocketHub

__all__ = [
    "Hub",
    "SocketHub",
    "StepResult",
    "StopRequested",
    "keep_freed_memory",
    "new_event_loop",
    "widen_socket_buffers",
]
