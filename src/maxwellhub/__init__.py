"""maxwellhub: the coupling hub between an FDTD solver (Meep) and molecular drivers.

Public API: :class:`SocketHub` (synchronous, MaxwellLink-compatible), :class:`Hub`
(asyncio), the MPI helpers and the errors. The wire codec is :mod:`maxwellhub.protocol.wire`.
"""

from __future__ import annotations

from .errors import BarrierTimeout, DriverLost, MaxwellHubError, ProtocolError, UsageError
from .hub import Hub, SocketHub, new_event_loop
from .net.addresses import get_available_host_port, unix_socket_path
from .parallel.mpi import am_master, mpi_bcast_from_master

__version__ = "0.1.0"

__all__ = [
    "BarrierTimeout",
    "DriverLost",
    "Hub",
    "MaxwellHubError",
    "ProtocolError",
    "SocketHub",
    "UsageError",
    "__version__",
    "am_master",
    "get_available_host_port",
    "mpi_bcast_from_master",
    "new_event_loop",
    "unix_socket_path",
]
