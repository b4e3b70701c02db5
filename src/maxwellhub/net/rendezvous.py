"""Rendezvous files: how drivers started elsewhere (another job, another node, an array
job) find a hub without knowing its address in advance.

The hub writes one small JSON file when it is listening and removes it when it stops::

    {"format": "maxwellhub-address", "version": 1, "run_id": "9f0c...",
     "transport": "tcp", "host": "node017", "port": 40213, "unix": null,
     "pid": 4242, "pid_start": 1234567, "hostname": "node017", "boot_id": "6b1e...",
     "created": 1718000000.123, "auth": true, "secret_file": "/home/me/hub.secret"}

The file is written atomically (a temporary file in the same directory, ``fsync``, then
``rename``), so a reader sees either nothing or a whole file, also on shared file systems
that honour rename. It names where the secret is (``secret_file``), never the secret.

``maxwellhub-driver --address-file PATH`` waits for the file until its deadline, checks
that it is not a leftover of a dead run, and connects:

- a file whose hub ran on this machine (same host name and boot id) but whose process is
  gone, or whose pid now belongs to another process (a different start time), is rejected;
- a file whose address refuses the connection is rejected (the hub is gone);
- a rejected file is reported once (the file and the reason) and the driver keeps waiting
  for a *new* file (another inode, size or modification time) until the deadline.

Files cannot be awaited portably (inotify is Linux-only and does not see changes made on
other NFS/Lustre clients), so waiting is a bounded backoff: the first check after 0.05 s,
then each interval 1.5 times longer, capped at 1 s, never past the deadline. That is at
most one ``stat`` per second in steady state.

This module never reads the secret and never trusts a file it has not validated field by
field; every error names the file and the field.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import secrets
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import MaxwellHubError, UsageError
from ..fsutil import atomic_write
from ..liveness import within
from .addresses import connect_once
from .backoff import Backoff

__all__ = [
    "FORMAT",
    "VERSION",
    "AddressFile",
    "RendezvousError",
    "StaleAddressFile",
    "advertised_host",
    "read_address_file",
    "remove_address_file",
    "stale_reason",
    "wait_and_connect",
    "write_address_file",
]

FORMAT = "maxwellhub-address"
VERSION = 1

_LOG = logging.getLogger("maxwellhub.rendezvous")
_POLL_FIRST = 0.05
_POLL_GROWTH = 1.5
_POLL_MAX = 1.0
_MAX_FILE_BYTES = 1 << 16
# A connection attempt to an address from a file: refused or missing means the hub is
# gone; these mean "maybe not reachable yet" and are retried with the same file.
_TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.ECONNRESET,
    errno.ECONNABORTED,
}
_GONE_ERRNOS = {errno.ECONNREFUSED, errno.ENOENT}
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


class RendezvousError(MaxwellHubError, ValueError):
    """An address file is malformed (the message names the file and the field)."""


class StaleAddressFile(RendezvousError):
    """An address file is a leftover of a dead run (the message says why)."""


@dataclass(frozen=True)
class AddressFile:
    """The contents of a rendezvous file (see the module docstring)."""

    run_id: str
    transport: str  # "tcp" or "unix"
    host: str | None
    port: int | None
    unix: str | None
    pid: int
    pid_start: int | None  # the process's start time in clock ticks after boot (Linux)
    hostname: str
    boot_id: str | None  # /proc/sys/kernel/random/boot_id (Linux)
    created: float  # time.time() when written
    auth: bool
    secret_file: str | None
    format: str = FORMAT
    version: int = VERSION

    @property
    def where(self) -> str:
        """``tcp:HOST:PORT`` or ``unix:PATH``, for messages."""
        return f"unix:{self.unix}" if self.transport == "unix" else f"tcp:{self.host}:{self.port}"

    def to_json(self) -> str:
        data = asdict(self)
        order = [
            "format",
            "version",
            "run_id",
            "transport",
            "host",
            "port",
            "unix",
            "pid",
            "pid_start",
            "hostname",
            "boot_id",
            "created",
            "auth",
            "secret_file",
        ]
        return json.dumps({k: data[k] for k in order}, indent=1) + "\n"


# ---------------------------------------------------------------- this machine


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time after boot, clock ticks), None if unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may contain spaces and parentheses
        return int(text[text.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def advertised_host(bind_host: str) -> str:
    """The host name drivers should connect to for a hub bound to ``bind_host``: the
    address itself, or this machine's host name for a wildcard bind."""
    return socket.gethostname() if bind_host in _WILDCARD_HOSTS else bind_host


# ---------------------------------------------------------------- writing (the hub)


def write_address_file(
    path: str | os.PathLike,
    *,
    address: str | tuple[str, int],
    secret_file: str | os.PathLike | None = None,
    auth: bool = False,
    run_id: str | None = None,
) -> AddressFile:
    """Write the rendezvous file for a hub listening at ``address`` (a UNIX path or
    ``(host, port)``) and return what was written.

    Refuses (:class:`~maxwellhub.errors.UsageError`) to replace a file that belongs to a
    live hub on this machine; a leftover of a dead run is replaced (and logged).
    """
    path = Path(os.fspath(path)).expanduser().absolute()
    if path.exists():
        try:
            old = read_address_file(path)
        except RendezvousError as exc:
            _LOG.warning("replacing unreadable address file: %s", exc)
        else:
            reason = stale_reason(old)
            if reason is None and old.pid != os.getpid() and _same_machine(old):
                raise UsageError(
                    f"address file {path} belongs to a live hub (pid {old.pid}, run "
                    f"{old.run_id}, {old.where}); choose another path or stop that hub"
                )
            if reason is not None:
                _LOG.info("replacing stale address file %s: %s", path, reason)
    if isinstance(address, tuple):
        transport, host, port, unix = "tcp", advertised_host(address[0]), int(address[1]), None
    else:
        transport, host, port, unix = "unix", None, None, os.path.abspath(address)
    info = AddressFile(
        run_id=run_id or secrets.token_hex(16),
        transport=transport,
        host=host,
        port=port,
        unix=unix,
        pid=os.getpid(),
        pid_start=_process_start(os.getpid()),
        hostname=socket.gethostname(),
        boot_id=_boot_id(),
        created=time.time(),
        auth=bool(auth),
        secret_file=None
        if secret_file is None
        else os.path.abspath(os.path.expanduser(os.fspath(secret_file))),
    )
    # contents are not secret; readers may be other jobs' users
    atomic_write(path, info.to_json().encode(), mode=0o644)
    return info


def remove_address_file(path: str | os.PathLike, run_id: str) -> bool:
    """Remove ``path`` if it still holds run ``run_id`` (another hub may have replaced it);
    return whether it was removed."""
    path = Path(os.fspath(path)).expanduser().absolute()
    try:
        current = read_address_file(path)
    except FileNotFoundError:
        return False
    except RendezvousError:
        return False  # not ours any more: leave it
    if current.run_id != run_id:
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


# ---------------------------------------------------------------- reading (the drivers)


def read_address_file(path: str | os.PathLike) -> AddressFile:
    """Parse and validate a rendezvous file. Raises :class:`FileNotFoundError` when it is
    absent and :class:`RendezvousError` (naming the file and the field) when it is bad."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read(_MAX_FILE_BYTES + 1)
    if len(raw) > _MAX_FILE_BYTES:
        raise RendezvousError(f"address file {path}: larger than {_MAX_FILE_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RendezvousError(f"address file {path}: not UTF-8 JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RendezvousError(
            f"address file {path}: expected a JSON object, got {type(data).__name__}"
        )
    return _validate(path, data)


def _field(
    path: str, data: dict, key: str, kinds: tuple[type, ...], *, optional: bool = False
) -> Any:
    if key not in data:
        if optional:
            return None
        raise RendezvousError(f"address file {path}: field {key!r} is missing")
    value = data[key]
    if value is None and optional:
        return None
    # bool is an int subclass: never accept it where a number is meant
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds) + (" or null" if optional else "")
        raise RendezvousError(f"address file {path}: field {key!r} = {value!r}: expected {names}")
    return value


def _validate(path: str, data: dict) -> AddressFile:
    fmt = _field(path, data, "format", (str,))
    if fmt != FORMAT:
        raise RendezvousError(f"address file {path}: field 'format' = {fmt!r}: expected {FORMAT!r}")
    version = _field(path, data, "version", (int,))
    if version != VERSION:
        raise RendezvousError(
            f"address file {path}: field 'version' = {version}: this "
            f"maxwellhub reads version {VERSION}"
        )
    transport = _field(path, data, "transport", (str,))
    host = port = unix = None
    if transport == "tcp":
        host = _field(path, data, "host", (str,))
        port = _field(path, data, "port", (int,))
        if not host:
            raise RendezvousError(f"address file {path}: field 'host' is empty")
        if not 0 < port < 65536:
            raise RendezvousError(f"address file {path}: field 'port' = {port}: expected 1..65535")
    elif transport == "unix":
        unix = _field(path, data, "unix", (str,))
        if not os.path.isabs(unix):
            raise RendezvousError(
                f"address file {path}: field 'unix' = {unix!r}: expected an absolute path"
            )
    else:
        raise RendezvousError(
            f"address file {path}: field 'transport' = {transport!r}: expected 'tcp' or 'unix'"
        )
    pid = _field(path, data, "pid", (int,))
    if pid <= 0:
        raise RendezvousError(f"address file {path}: field 'pid' = {pid}: expected > 0")
    created = float(_field(path, data, "created", (int, float)))
    if not math.isfinite(created):
        raise RendezvousError(f"address file {path}: field 'created' is not finite")
    run_id = _field(path, data, "run_id", (str,))
    if not run_id:
        raise RendezvousError(f"address file {path}: field 'run_id' is empty")
    secret_file = _field(path, data, "secret_file", (str,), optional=True)
    if secret_file is not None and not os.path.isabs(secret_file):
        raise RendezvousError(
            f"address file {path}: field 'secret_file' = {secret_file!r}: expected an absolute path"
        )
    return AddressFile(
        run_id=run_id,
        transport=transport,
        host=host,
        port=port,
        unix=unix,
        pid=pid,
        pid_start=_field(path, data, "pid_start", (int,), optional=True),
        hostname=_field(path, data, "hostname", (str,)),
        boot_id=_field(path, data, "boot_id", (str,), optional=True),
        created=created,
        auth=_field(path, data, "auth", (bool,)),
        secret_file=secret_file,
    )


def _same_machine(info: AddressFile) -> bool:
    if info.hostname != socket.gethostname():
        return False
    mine = _boot_id()
    return info.boot_id is None or mine is None or info.boot_id == mine


def stale_reason(info: AddressFile) -> str | None:
    """Why ``info`` is certainly a leftover of a dead run, or None when it may be live.

    Only a hub on this machine can be checked without connecting: its pid must exist and,
    where /proc tells, have the start time recorded in the file (pids are reused). A hub on
    another machine is checked by connecting to it (:func:`wait_and_connect`).
    """
    if info.hostname == socket.gethostname():
        mine = _boot_id()
        if info.boot_id and mine and info.boot_id != mine:
            return f"written before this machine last booted (boot id {info.boot_id})"
        if not _pid_alive(info.pid):
            return f"its hub (pid {info.pid} on {info.hostname}) is not running"
        start = _process_start(info.pid)
        if info.pid_start is not None and start is not None and start != info.pid_start:
            return (
                f"pid {info.pid} on {info.hostname} is now another process (started at "
                f"tick {start}, the hub at tick {info.pid_start})"
            )
    return None


def _signature(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _connect(info: AddressFile, limit: float) -> socket.socket:
    if info.transport == "unix":
        return connect_once(limit, unix=info.unix)
    if info.host is None or info.port is None:  # read_address_file checks; said plainly
        raise RendezvousError(f"{info.where}: a TCP address needs both host and port")
    return connect_once(limit, address=(info.host, info.port))


def _try_file(
    path: str, limit: float
) -> tuple[tuple[socket.socket, AddressFile] | None, str | None, str | None]:
    """One look at the address file: ``(connection, None, None)`` when its hub answered
    within ``limit`` s; ``(None, problem, None)`` when this version of the file is
    unusable; ``(None, None, why)`` to look again (not there, or its hub not reachable
    yet)."""
    try:
        info = read_address_file(path)
    except FileNotFoundError:  # removed between stat and open: look again after a pause
        return None, None, None
    except (RendezvousError, OSError) as exc:
        return None, str(exc), None
    reason = stale_reason(info)
    if reason is not None:
        return None, f"address file {path} is a leftover of a dead run: {reason}", None
    try:
        sock = _connect(info, limit)
    except socket.gaierror as exc:
        return None, f"address file {path}: cannot resolve host {info.host!r}: {exc}", None
    except OSError as exc:
        if exc.errno in _GONE_ERRNOS:
            return (
                None,
                f"address file {path} is a leftover of a dead run: "
                f"{info.where} refuses connections ({exc.strerror})",
                None,
            )
        if exc.errno in _TRANSIENT_ERRNOS or isinstance(exc, TimeoutError):
            return None, None, f"{info.where} from {path} not reachable yet: {exc}"
        return None, f"address file {path}: cannot connect to {info.where}: {exc}", None
    return (sock, info), None, None


def wait_and_connect(
    path: str | os.PathLike, timeout: float | None, logger: logging.Logger | None = None
) -> tuple[socket.socket, AddressFile]:
    """Wait for the rendezvous file ``path``, reject leftovers, connect to the hub it names.

    Returns the connected (blocking) socket and the file's contents. Raises
    :class:`TimeoutError` after ``timeout`` seconds, naming the file and, if one was
    seen, why it was not used. ``timeout`` None waits as long as it takes (a hub job may
    sit in a batch queue for hours), saying what it waits for on the growing schedule of
    :func:`maxwellhub.liveness.report_delays`.
    """
    log = logger or _LOG
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    backoff = Backoff(timeout, first=_POLL_FIRST, cap=_POLL_MAX, growth=_POLL_GROWTH)
    rejected: tuple | None = None  # signature of the file version we gave up on
    last_problem = "it never appeared"
    while True:
        sig = _signature(path)
        if sig is not None and sig != rejected:
            connected, problem, transient = _try_file(path, backoff.attempt_timeout(5.0))
            if connected is not None:
                log.info(
                    "connected to %s (run %s, from %s)",
                    connected[1].where,
                    connected[1].run_id,
                    path,
                )
                return connected
            if transient is not None:
                last_problem = transient
                log.debug("%s", transient)  # retry this same file
            if problem is not None:
                log.warning("%s; waiting for a new one", problem)
                rejected, last_problem = sig, problem
        delay = backoff.next_delay()
        if delay is None:
            raise TimeoutError(f"no usable address file {path} {within(timeout)} ({last_problem})")
        if backoff.report_due():
            log.warning(
                "still waiting for a usable address file %s after %.0f s (%s)",
                path,
                backoff.waited,
                last_problem,
            )
        time.sleep(delay)  # a file on a shared file system: nothing to await (see Backoff)
