"""Where hubs listen and drivers connect: socket-path resolution and free TCP ports.

Shared by the hub and the driver so both sides resolve a name the same way. A bare UNIX
socket name maps to ``/tmp/socketmxl_<name>`` (the path MaxwellLink's drivers look for).
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

from ..liveness import keepalive

__all__ = [
    "DEFAULT_PORT",
    "UNIX_PREFIX",
    "connect_once",
    "get_available_host_port",
    "unix_socket_path",
]

UNIX_PREFIX = "/tmp/socketmxl_"
DEFAULT_PORT = 31415


def unix_socket_path(name_or_path: str | os.PathLike) -> str:
    """``/tmp/socketmxl_<name>`` for any name that does not start with ``/`` (MaxwellLink's
    rule, which its hub and ``mxl_driver --unix`` share: ``a/b`` is
    ``/tmp/socketmxl_a/b``); an absolute path is used as given."""
    text = os.fspath(name_or_path)
    if not text:
        raise ValueError("a UNIX socket name must not be empty")
    path = text if text.startswith("/") else UNIX_PREFIX + text
    if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes with the terminating NUL
        raise ValueError(f"UNIX socket path {path!r} is longer than 107 bytes")
    return path


def connect_once(
    limit: float, *, unix: str | None = None, address: tuple[str, int] | None = None
) -> socket.socket:
    """One attempt to connect to a hub: the UNIX socket path ``unix``, else TCP
    ``address`` (with TCP_NODELAY and :func:`maxwellhub.liveness.keepalive`), within
    ``limit`` seconds. Returns a blocking socket
    with no timeout; the OSError of a failed attempt propagates."""
    if unix is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A blocking connect bounded by SO_SNDTIMEO: while the hub's listen backlog is
            # full (a flood of connections) the kernel queues this connect and wakes it as
            # room appears (EAGAIN only after `limit`). A timeout socket would get EAGAIN
            # at once and back off, losing every race to the flood.
            sec = max(limit, 0.001)
            sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_SNDTIMEO,
                struct.pack("ll", int(sec), int(sec % 1 * 1e6)),
            )
            sock.connect(unix)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
        except BaseException:
            sock.close()
            raise
    elif address is not None:
        sock = socket.create_connection(address, timeout=limit)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keepalive(sock)  # a vanished hub host is noticed in LOST_HOST_SECONDS
    else:
        raise ValueError("connect_once needs a UNIX socket path (unix) or a TCP address")
    sock.settimeout(None)
    return sock


def get_available_host_port(
    localhost: bool = True, save_to_file: str | os.PathLike | None = None
) -> tuple[str, int]:
    """Ask the OS for a free TCP port; return ``(host, port)``.

    With ``save_to_file`` the host and the port are written on two lines (written to a
    temporary file and renamed, so a reader never sees half a file).
    """
    host = "127.0.0.1" if localhost else "0.0.0.0"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    if save_to_file is not None:
        target = Path(save_to_file)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(f"{host}\n{port}\n")
        os.replace(tmp, target)
    return host, port
