"""The owner-only UNIX socket lifecycle: clear a stale socket file (only after a probe shows
nobody listens), bind it born owner-only (0600), and remove it at the end only if it is
still the file this process made. Shared by the hub and the control endpoint."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

from ..errors import UsageError

__all__ = ["bind_owner_only", "clear_stale_unix_socket", "remove_if_ours"]

log = logging.getLogger("maxwellhub.hub")


def clear_stale_unix_socket(path: str) -> None:
    """Remove a leftover socket file only after a probe shows nobody listens on it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise UsageError(f"cannot probe existing socket {path}: {exc}") from exc
        log.info("removing stale socket file %s (nobody listens)", path)
        os.unlink(path)
    else:
        raise UsageError(
            f"another hub is listening on {path}; choose another name or stop that hub first"
        )
    finally:
        probe.close()


def bind_owner_only(path: str, backlog: int) -> tuple[socket.socket, tuple[int, int]]:
    """A listening UNIX socket at ``path``, born owner-only (0600), and its file's
    (device, inode) for :func:`remove_if_ours`."""
    clear_stale_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the socket file is born owner-only (0600)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    st = os.stat(path)
    return sock, (st.st_dev, st.st_ino)


def remove_if_ours(path: str, inode: tuple[int, int] | None) -> None:
    """Remove ``path`` if it is still the socket file with ``inode`` (a later process may
    own the name now)."""
    if inode is None:
        return
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
