"""The hub's steady step as two calls: fields out to many driver sockets, replies back.

A steady step of single-molecule drivers is the same bytes every time: one FIELDDATA +
GETSOURCE block out per driver, one SOURCEREADY back. This module does exactly that and
nothing else, in C when the extension ``maxwellhub.net._steadyc`` is built (see
:mod:`maxwellhub.speedups`) and in Python otherwise; both have the same contract, tested
side by side. It never decides anything: whatever is not the one clean reply shape (a
partial or merged read, end of file, a socket it was not given, the event loop's own
descriptor) goes back to the caller at once, which hands it to the protocol machine.

``send(fds, rows, fields)``
    For each k, write the block carrying ``fields[rows[k]]`` to ``fds[k]`` (non-blocking
    sockets). Returns ``[(k, sent), ...]`` for the writes that did not complete (the caller
    queues the rest of the block on the transport; 0 also after an error, which the
    transport then meets).

``collect(epoll, loop_fd, outer_fd, table, raw, rows, sources, done, waiting, deadline,
max_extras, extras, answered)``
    Wait on the ``select.epoll`` set ``epoll`` until ``deadline`` (``time.monotonic()``
    seconds, ``inf`` for none) and read the ready sockets: ``table[fd]`` is the index k of
    the driver on ``fd`` (-1: not ours), ``rows[k]`` its row. A read that is exactly one
    SOURCEREADY of the EM profile (energy 0, nat 1, zero virial, extras length matching,
    finite source) for a row not ``done`` and a driver not ``raw`` is taken:
    ``sources[row]`` set, ``done[row]`` set, ``waiting`` decremented, ``extras[row] =
    bytes`` when non-empty, k appended to ``answered``. Returns ``(status, waiting, last,
    who, data)`` as soon as ``waiting`` is 0 (DONE) or Python is needed: LOOP (``loop_fd``
    in the set is readable, or ``outer_fd``, an epoll watched beside the set, is ready
    for anything but the set itself), TIMEOUT, DATA (driver
    ``who``'s read is ``data`` for its protocol machine), GONE (driver ``who`` reached end
    of file or an error), FOREIGN (``who`` is a descriptor not in ``table``; nothing was
    read from it). ``last`` is the last driver that answered (-1: none).
"""

from __future__ import annotations

import math
import os
import select
import struct
import time
from typing import Any

from maxwellhub import speedups
from maxwellhub.protocol import wire

__all__ = [
    "BUSY_POLL_ENV",
    "BUSY_POLL_US",
    "DATA",
    "DONE",
    "FOREIGN",
    "GONE",
    "IMPL",
    "LOOP",
    "TIMEOUT",
    "collect",
    "compiled",
    "python_collect",
    "python_send",
    "request_fields",
    "result_dict",
    "send",
    "set_busy_poll",
]

DONE, LOOP, TIMEOUT, DATA, GONE, FOREIGN = range(6)

HEAD = wire.FIELD_STEP_HEAD  # FIELDDATA's header, identity cells, nat = 1
TAIL = wire.encode_header(wire.GETFORCE)
REPLY_PREFIX = wire.encode_header(wire.FORCEREADY) + struct.pack("<di", 0.0, 1)  # energy 0, nat 1
REPLY_SIZE = wire.SOURCE_READY_PREFIX_SIZE  # 124: everything but the extras
_READ = 1 << 16
_MAX_EVENTS = 512
_SOURCE = struct.Struct("<3d")
_EXTRAS_LEN = struct.Struct("<i")
_VIRIAL = slice(len(REPLY_PREFIX) + 24, len(REPLY_PREFIX) + 24 + 72)
_ZERO_VIRIAL = bytes(72)


def python_send(fds: Any, rows: Any, fields: Any) -> list[tuple[int, int]]:
    """:func:`send` in Python."""
    out: list[tuple[int, int]] = []
    flat = memoryview(fields).cast("B") if not isinstance(fields, bytes) else fields
    write = os.write
    for k, (fd, row) in enumerate(zip(fds, rows, strict=True)):
        r = int(row)
        block = b"".join((HEAD, flat[24 * r : 24 * r + 24], TAIL))
        try:
            sent = write(int(fd), block)
        except OSError:  # EAGAIN, or an error the transport meets and reports
            sent = 0
        if sent < len(block):
            out.append((k, sent))
    return out


def _clean(data: bytes, max_extras: int) -> tuple[float, float, float] | None:
    """The source when ``data`` is exactly one clean SOURCEREADY, else None."""
    if len(data) < REPLY_SIZE or not data.startswith(REPLY_PREFIX):
        return None
    if data[_VIRIAL] != _ZERO_VIRIAL:
        return None
    (m,) = _EXTRAS_LEN.unpack_from(data, _VIRIAL.stop)
    if m < 0 or m != len(data) - REPLY_SIZE or m > max_extras:
        return None
    s = _SOURCE.unpack_from(data, len(REPLY_PREFIX))
    if not all(math.isfinite(x) for x in s):
        return None
    return s


def _wait(
    epoll: select.epoll, outer_fd: int, deadline: float
) -> tuple[list[tuple[int, int]], bool]:
    """One wait, as the C twin's: (epoll events, whether ``outer_fd`` is readable)."""
    timeout = -1.0 if deadline == math.inf else max(0.0, deadline - time.monotonic())
    if outer_fd < 0:
        return epoll.poll(timeout, _MAX_EVENTS), False
    p = select.poll()
    p.register(epoll.fileno(), select.POLLIN)
    p.register(outer_fd, select.POLLIN)
    while True:
        ready = dict(p.poll(None if timeout < 0 else math.ceil(timeout * 1e3)))
        events = epoll.poll(0.0, _MAX_EVENTS) if ready.get(epoll.fileno()) else []
        # the loop's selector holds our set: looked into only when our set has nothing
        outer = not events and bool(ready.get(outer_fd)) and _ready_beside(outer_fd, epoll.fileno())
        if events or outer or not ready:
            return events, outer
        timeout = -1.0 if deadline == math.inf else max(0.0, deadline - time.monotonic())


def _ready_beside(outer_fd: int, ours: int) -> bool:
    """Whether the epoll ``outer_fd`` (the loop's selector) is ready for anything but our
    own set ``ours`` (registered in it while the loop serves the steady reader). Its
    registrations are level-triggered, so looking consumes nothing."""
    try:
        with select.epoll.fromfd(os.dup(outer_fd)) as outer:
            return any(fd != ours for fd, _ in outer.poll(0.0, 64))
    except OSError:  # not an epoll: let the loop look
        return True


def python_collect(
    epoll: select.epoll,
    loop_fd: int,
    outer_fd: int,
    table: Any,
    raw: Any,
    rows: Any,
    sources: Any,
    done: Any,
    waiting: int,
    deadline: float,
    max_extras: int,
    extras: dict[int, bytes],
    answered: list[int],
) -> tuple[int, int, int, int, bytes | None]:
    """:func:`collect` in Python."""
    last = -1
    while waiting > 0:
        events, outer_ready = _wait(epoll, outer_fd, deadline)
        if not events and not outer_ready:
            return TIMEOUT, waiting, last, -1, None
        loop_ready = False
        for fd, _ in events:
            if fd == loop_fd:
                loop_ready = True
                continue
            k = int(table[fd]) if 0 <= fd < len(table) else -1
            if k < 0:
                return FOREIGN, waiting, last, fd, None
            try:
                data = os.read(fd, _READ)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                return GONE, waiting, last, k, None
            row = int(rows[k])
            source = None if raw[k] or done[row] else _clean(data, max_extras)
            if source is None:
                return DATA, waiting, last, k, data
            sources[row] = source
            done[row] = True
            waiting -= 1
            last = k
            answered.append(k)
            if len(data) > REPLY_SIZE:
                extras[row] = data[REPLY_SIZE:]
        if waiting and (loop_ready or outer_ready):
            return LOOP, waiting, last, -1, None
    return DONE, waiting, last, -1, None


def compiled() -> Any:
    """The C extension, configured with this module's frame constants, whether or not
    MAXWELLHUB_PURE_PYTHON is set (the tests hold both twins to one contract); None when
    it is not built."""
    c = speedups.built("maxwellhub.net._steadyc")
    if c is not None:
        c.configure(HEAD, TAIL, REPLY_PREFIX, REPLY_SIZE)
    return c


#: Environment variable: microseconds the compiled wait busy-polls before it sleeps.
BUSY_POLL_ENV = "MAXWELLHUB_BUSY_POLL_US"
#: The default: a reply within 50 us is caught without a sleep and a wake-up (on a virtual
#: machine those are most of a small step's round trip; measured in benchmarks/).
BUSY_POLL_US = 50.0


def set_busy_poll(microseconds: float) -> None:
    """How long the compiled wait polls (yielding the core each turn) before it sleeps; 0
    turns it off. It only polls while replies have been coming that fast (a driver that
    computes for milliseconds costs no polling), and never past a deadline. The Python
    twin never polls."""
    if _c is not None:
        _c.set_spin(float(microseconds))


def _busy_poll_from_env() -> float:
    raw = os.environ.get(BUSY_POLL_ENV, "").strip()
    if not raw:
        return BUSY_POLL_US
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{BUSY_POLL_ENV}={raw!r} is not a number of microseconds") from None
    if not value >= 0:
        raise ValueError(f"{BUSY_POLL_ENV}={raw!r} must be >= 0")
    return value


_c = None if speedups.pure_python() else compiled()
set_busy_poll(_busy_poll_from_env())

#: ``request_fields(requests, ids, fields) -> bool``: MaxwellLink's request dict into the
#: step's arrays when it is the plain shape (int keys, dicts with "efield_au" a contiguous
#: float64 vector of 3, finite); False for anything else, which the caller then reads in
#: Python (and names what is wrong). None without the extension.
request_fields: Any = None if _c is None else _c.request_fields
#: ``result_dict(ids, sources, extras) -> dict``: ``{id: {"amp": sources[r], "extra":
#: extras.get(r, b"")}}``, MaxwellLink's result shape. None without the extension.
result_dict: Any = None if _c is None else _c.result_dict
if _c is not None:
    send = _c.send
    collect = _c.collect
    IMPL = "C"
else:
    send = python_send
    collect = python_collect
    IMPL = "python"
