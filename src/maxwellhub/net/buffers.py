"""Socket buffers and process memory for connections that move large batched frames."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket

__all__ = ["keep_freed_memory", "widen_socket_buffers"]

log = logging.getLogger("maxwellhub.hub")


def widen_socket_buffers(sock: socket.socket | None, molecules: int) -> None:
    """Ask for 4 MB socket buffers (the kernel caps them at net.core.wmem_max/rmem_max)
    on a connection exchanging frames of ``molecules`` >= 10^4 molecules: a 48 MB frame
    then moves in a few large reads instead of hundreds of 200 kB ones."""
    if sock is None or molecules < _KEEP_MEMORY_FROM:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)


def keep_freed_memory(molecules: int) -> None:
    """Let glibc keep freed memory in a process that exchanges frames of ``molecules``
    molecules, instead of handing it back to the system: every step of a large ensemble
    allocates frames and arrays of tens of MB, and faulting their pages in again each
    step cost more than the model (10^6 TLS molecules: 2 to 3 times slower, in the hub
    and in the driver alike). Applied once the first ensemble of at least 10^4 molecules
    appears; freed memory up to 1 GB then stays with the process (arrays up to 32 MB come
    from the heap instead of fresh mappings). Nothing changes without glibc or with the
    environment variable ``MAXWELLHUB_KEEP_MEMORY=0``."""
    global _kept_memory
    if _kept_memory or molecules < _KEEP_MEMORY_FROM:
        return
    _kept_memory = True
    if os.environ.get("MAXWELLHUB_KEEP_MEMORY", "1") == "0":
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return  # not glibc
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    log.debug("glibc keeps freed memory (ensembles of %d molecules)", molecules)


_kept_memory = False
_KEEP_MEMORY_FROM = 10_000
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
