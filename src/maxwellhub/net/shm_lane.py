"""A shared-memory lane for an ensemble driver on the same node as the hub.

One :class:`Lane` is one anonymous shared-memory segment plus two doorbells:

* the segment is an ``os.memfd_create`` file (no name anywhere in the file system). The hub
  creates it, sizes it, maps it and passes the descriptor to the driver over the UNIX
  socket the driver is already connected on (``SCM_RIGHTS``), then closes its own
  descriptor. Only processes that hold the descriptor or the mapping can reach it -- that is
  owner-only without a mode to get wrong -- and the kernel frees it when the last mapping
  goes, so nothing is left behind at stop *or* after a SIGKILL of either side. The size
  is sealed (``F_SEAL_SHRINK | F_SEAL_GROW``) before it is passed, and the driver checks
  the seals: a peer that truncated the file would otherwise SIGBUS the other side. (The
  alternative, a 0600 file in ``/dev/shm`` unlinked once both sides mapped it, leaks the
  file if the hub dies between create and unlink and needs a name that a same-uid process
  can race for; memfd has neither problem and costs the same.)
* doorbells are two ``os.eventfd`` objects, one per direction, passed with the segment.
  ``to_driver`` is rung by the hub after it wrote the fields of a step; ``to_hub`` by the
  driver after it wrote the sources. The hub waits on many lanes' ``to_hub`` bells in one
  epoll: that is the N-driver barrier.
* the UNIX socket stays open beside the lane and carries nothing in steady state. Its
  EOF/HUP is in the same poll set as the bell, so a dead peer (crash, SIGKILL) is seen in
  the very poll that would have waited for its bell -- exactly as fast as on a socket
  lane. Any *byte* on it during lane mode is a protocol error (the lane is the data path).
* the variant ``bell="socket"`` (offer flag :data:`BELL_ON_SOCKET`) passes only the segment
  and rings with one byte on that socket each way (``F`` hub -> driver, ``S`` back): one fd
  per driver, EOF and bell on the same descriptor, a blocking ``recv(1)`` in the driver
  instead of poll + eventfd read. The benchmark measures both.

Segment layout (little-endian, every slot 64-byte aligned)::

    0   magic    8s   b"MXHSHM\\x00\\x01"
    8   version  u32  LANE_VERSION
    12  M        u32  molecules
    16  K        u32  extras arrays per molecule (0 = no extras slot)
    20  flags    u32  the step's MXHFIELDS flags (WANT_EXTRAS, WANT_DIPOLES), by the hub
    24  f_begin  i64  field sequence: written by the hub before the fields
    32  f_end    i64  field sequence: written by the hub after the fields
    40  s_begin  i64  source sequence: written by the driver before the sources
    48  s_end    i64  source sequence: written by the driver after the sources
    56  nkeys    i32  extras arrays in this step's answer (0..K), by the driver
    64  fields   (M, 3) float64
    ..  sources  (M, 3) float64
    ..  keys     K x 64 bytes: the extras names, ASCII, zero-padded
    ..  extras   (K, M) float64: one contiguous array per name

The sequence of step ``k`` is ``k``. A reader checks ``begin == end == expected``: an old
sequence (a peer answering a previous step, or replaying) and a torn one (a writer died or
wrote out of turn mid-slot) both raise :class:`LaneError` naming the numbers. The eventfd
write/read pair is a system call on each side, which orders the slot stores before the
bell on every architecture Linux runs on; the begin/end pair is the check, not the fence.

Handshake: the hub sends ``MXHSHMLANE`` (:func:`maxwellhub.protocol.wire.encode_shm_lane`) with
three descriptors attached (segment, to_driver, to_hub; only the segment with
:data:`BELL_ON_SOCKET`); the driver maps it (:func:`map_offer`), checks magic, version,
M, K and the seals, and answers ``MXHSHMOK``. The hub negotiates it inside the maxwellhub
handshake (:mod:`maxwellhub.hub.shm`, :mod:`drivers.shm_driver`); :func:`create` and
:func:`accept` here are the same exchange as blocking helpers over a connected UNIX socket
(benchmarks, tests). A driver that cannot (not Linux, TCP, an old driver) never offers it
and stays on the socket.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
import struct
from typing import Any, NoReturn

import numpy as np

from ..protocol import wire

LANE_VERSION = 1
MAGIC = b"MXHSHM\x00\x01"
_OFFER = struct.Struct("<12siiiiq")  # MXHSHMLANE: version, M, K, flags, segment size
#: Offer flag: the doorbells are one byte on the companion socket, not eventfds.
BELL_ON_SOCKET = 1
_RING_DRIVER, _RING_HUB = b"F", b"S"
_ACK = struct.Struct("<12si")
_H_OK = wire.encode_header(wire.MXHSHMOK)
_HEAD = struct.Struct("<8sIIII")  # magic, version, M, K, flags
_SEQ = struct.Struct("<qq")
_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_FLAGS, _F_SEQ, _S_SEQ, _NKEYS = 20, 24, 40, 56
KEY_BYTES = 64  # one extras name, zero-padded
HEADER_BYTES = 64
#: Sealed at creation: a peer that could shrink the segment would SIGBUS the other side.
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_ALIGN = 64


class LaneError(Exception):
    """A lane protocol violation: stale or torn sequence, bad segment, bad handshake."""


class PeerGone(Exception):
    """The companion socket reported EOF/HUP: the peer is dead or closed its end."""


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def layout(molecules: int, extras: int = 0) -> tuple[int, int, int, int, int]:
    """Offsets of fields, sources, extras names and extras, and the segment size."""
    if molecules < 1 or not 0 <= extras <= wire.SHM_MAX_EXTRAS:
        raise ValueError(
            f"a lane needs M >= 1 and 0 <= K <= {wire.SHM_MAX_EXTRAS}, not M = {molecules}, "
            f"K = {extras}"
        )
    f = HEADER_BYTES
    s = f + _align(24 * molecules)
    k = s + _align(24 * molecules)
    e = k + _align(KEY_BYTES * extras)
    return f, s, k, e, max(e + _align(8 * molecules * extras), mmap.PAGESIZE)


class Lane:
    """One side of a lane: the mapping, numpy views on it, the two bells, the socket.

    Build it with :func:`create` (hub) or :func:`accept` (driver). ``fields``, ``sources``
    and ``extras`` are numpy views on the mapping: writing them writes the segment.
    """

    def __init__(
        self,
        side: str,
        mm: mmap.mmap,
        molecules: int,
        extras: int,
        to_driver: int,
        to_hub: int,
        sock: socket.socket | None,
        bell_on_socket: bool = False,
    ) -> None:
        self.side = side
        #: True: each bell is one byte on ``sock`` (``to_driver``/``to_hub`` are -1).
        self.bell_on_socket = bell_on_socket
        self.molecules, self.n_extras = molecules, extras
        self.to_driver, self.to_hub = to_driver, to_hub
        self.sock = sock
        self._mm: mmap.mmap | None = mm
        f, s, k, e, _ = layout(molecules, extras)
        self._keys_at = k
        buf = memoryview(mm)
        self._buf: memoryview | None = buf
        self.fields = np.frombuffer(buf, np.float64, 3 * molecules, f).reshape(molecules, 3)
        self.sources = np.frombuffer(buf, np.float64, 3 * molecules, s).reshape(molecules, 3)
        #: (M, K): column j is the contiguous array of the j-th extras name.
        self.extras = (
            np.frombuffer(buf, np.float64, extras * molecules, e).reshape(extras, molecules).T
        )
        self._names: list[bytes] = []  # driver: the names last written to the table
        #: Sequence of the last step written (hub: fields) or answered (driver: sources).
        self.step = 0

    # ------------------------------------------------------------------ sequences
    def _seq(self, at: int) -> tuple[int, int]:
        assert self._mm is not None, "lane closed"
        return _SEQ.unpack_from(self._mm, at)

    def _set(self, at: int, value: int) -> None:
        assert self._mm is not None, "lane closed"
        struct.pack_into("<q", self._mm, at, value)

    def _check(self, at: int, expected: int, what: str) -> None:
        begin, end = self._seq(at)
        if begin != end:
            raise LaneError(
                f"torn {what}: sequence begin {begin} != end {end} (expected step {expected})"
            )
        if end != expected:
            raise LaneError(f"stale {what}: sequence {end}, expected step {expected}")

    # ------------------------------------------------------------------ flags, extras
    @property
    def flags(self) -> int:
        """The step's MXHFIELDS flags (hub writes them before :meth:`post`)."""
        assert self._mm is not None, "lane closed"
        return int(_U32.unpack_from(self._mm, _FLAGS)[0])

    @flags.setter
    def flags(self, value: int) -> None:
        assert self._mm is not None, "lane closed"
        _U32.pack_into(self._mm, _FLAGS, value)

    def write_extras(self, extras: dict | None) -> bool:
        """Driver: put ``{name: (M,) array}`` in the extras slot; False (nothing written)
        when they do not fit (more than K arrays, or a name that is not short ASCII):
        the caller answers that step with a batched frame instead."""
        mm = self._mm
        assert mm is not None, "lane closed"
        extras = extras or {}
        if len(extras) > self.n_extras:
            return False
        names = []
        for key in extras:
            try:
                name = key.encode("ascii")
            except UnicodeEncodeError:
                return False
            if not name or len(name) >= KEY_BYTES or b"\0" in name:
                return False
            names.append(name)
        m = self.molecules
        for j, (key, values) in enumerate(extras.items()):
            v = np.asarray(values, dtype=np.float64)
            if v.shape != (m,):
                raise ValueError(f"extras {key!r} must have shape ({m},), got {v.shape}")
            self.extras[:, j] = v
        if names != self._names:
            for j, name in enumerate(names):
                mm[self._keys_at + KEY_BYTES * j : self._keys_at + KEY_BYTES * (j + 1)] = (
                    name.ljust(KEY_BYTES, b"\0")
                )
            self._names = names
        _I32.pack_into(mm, _NKEYS, len(names))
        return True

    def read_extras(self) -> dict[str, np.ndarray]:
        """Hub: the extras the driver answered with, as copies keyed by name (a bad count
        or name is a :class:`LaneError`)."""
        mm = self._mm
        assert mm is not None, "lane closed"
        (n,) = _I32.unpack_from(mm, _NKEYS)
        if not 0 <= n <= self.n_extras:
            raise LaneError(f"{n} extras arrays in the lane, which holds 0..{self.n_extras}")
        out = {}
        for j in range(n):
            at = self._keys_at + KEY_BYTES * j
            raw = bytes(mm[at : at + KEY_BYTES]).rstrip(b"\0")
            try:
                key = raw.decode("ascii")
            except UnicodeDecodeError:
                key = ""
            if not key or key in out:
                raise LaneError(f"extras name {raw!r} in the lane is empty, repeated or not ASCII")
            out[key] = self.extras[:, j].copy()
        return out

    # ------------------------------------------------------------------ hub side
    def write_fields(self, fields: Any, step: int) -> None:
        """Hub: write the fields of ``step`` (> the previous step) and ring the driver."""
        if step <= self.step:
            raise LaneError(f"step {step} does not follow step {self.step}")
        self._set(_F_SEQ, step)
        self.fields[...] = fields
        self._set(_F_SEQ + 8, step)
        self.step = step
        self._ring(self.to_driver, _RING_DRIVER)

    def post(self, step: int) -> None:
        """Hub: the fields view was filled in place; publish it as ``step``, ring."""
        self._set(_F_SEQ, step)
        self._set(_F_SEQ + 8, step)
        self.step = step
        self._ring(self.to_driver, _RING_DRIVER)

    def take_sources(self) -> np.ndarray:
        """Hub, after its bell rang: check the sequence and return the sources view."""
        self._answer(self.to_hub, _RING_HUB)
        self._check(_S_SEQ, self.step, "sources")
        return self.sources

    # ------------------------------------------------------------------ driver side
    def wait_fields(self, poller: select.poll | None = None) -> np.ndarray:
        """Driver: block until the hub rings (or raise :class:`PeerGone` when its socket
        closes), check the sequence is the next step and return the fields view."""
        if poller is not None and not self.bell_on_socket:
            for fd, _ in poller.poll():
                if fd != self.to_driver:
                    self._socket_event()
        self._answer(self.to_driver, _RING_DRIVER)
        self._check(_F_SEQ, self.step + 1, "fields")
        self.step += 1
        return self.fields

    def driver_poller(self) -> select.poll:
        """A poll set over this driver's bell and its companion socket."""
        p = select.poll()
        if not self.bell_on_socket:
            p.register(self.to_driver, select.POLLIN)
        if self.sock is not None:
            p.register(self.sock.fileno(), select.POLLIN | select.POLLHUP)
        return p

    def post_sources(self, sources: Any = None) -> None:
        """Driver: write ``sources`` (or keep what was written into the view) for the
        current step and ring the hub."""
        self._set(_S_SEQ, self.step)
        if sources is not None:
            _copy_rows(self.sources, sources)
        self._set(_S_SEQ + 8, self.step)
        self._ring(self.to_hub, _RING_HUB)

    def _ring(self, fd: int, byte: bytes) -> None:
        if self.bell_on_socket:
            assert self.sock is not None
            try:
                self.sock.send(byte)
            except (BrokenPipeError, ConnectionResetError):
                raise PeerGone(self._gone()) from None
        else:
            os.eventfd_write(fd, 1)

    def _gone(self) -> str:
        return f"{'driver' if self.side == 'hub' else 'hub'} closed its socket"

    def _answer(self, fd: int, byte: bytes) -> None:
        """Consume one ring of the bell ``fd`` (or the socket's ``byte``)."""
        if not self.bell_on_socket:
            os.eventfd_read(fd)
            return
        assert self.sock is not None
        try:
            data = self.sock.recv(1)
        except ConnectionError:
            data = b""
        if not data:
            raise PeerGone(self._gone())
        if data != byte:
            raise LaneError(f"doorbell byte {data!r} on the socket, expected {byte!r}")

    def _socket_event(self) -> NoReturn:
        """The companion socket is readable: EOF means the peer is gone; data is an error."""
        assert self.sock is not None
        try:
            data = self.sock.recv(1)
        except ConnectionError:
            data = b""
        if not data:
            raise PeerGone(self._gone())
        raise LaneError(f"unexpected byte {data!r} on the socket of a lane")

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Unmap and close the bells and the socket (idempotent). Views handed out
        earlier keep the mapping alive until they are dropped."""
        if self._mm is None:
            return
        self.fields = self.sources = self.extras = np.empty((0, 3))
        assert self._buf is not None
        try:
            self._buf.release()
            self._mm.close()
        except BufferError:
            pass  # a caller still holds a view: the mapping goes with the last view
        self._buf = None
        self._mm = None
        for fd in (self.to_driver, self.to_hub):
            if fd >= 0:
                os.close(fd)
        if self.sock is not None:
            self.sock.close()

    def __enter__(self) -> Lane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _copy_rows(out: np.ndarray, rows: Any) -> None:
    """``out[...] = rows`` for (M, 3) arrays; a column-major ``rows`` (what a model fed
    the fields of an MXHFIELDS frame returns) column by column, 3x faster than numpy's
    strided copy of the whole at 10^6 molecules."""
    a = np.asarray(rows, dtype=np.float64)
    if a.ndim == 2 and a.shape == out.shape and a.flags.f_contiguous and not a.flags.c_contiguous:
        for k in range(a.shape[1]):
            out[:, k] = a[:, k]
    else:
        out[...] = a


def new_segment(molecules: int, extras: int = 0) -> tuple[int, mmap.mmap, int]:
    """A sealed memfd segment for the lane, mapped, header written: (fd, mapping, size).
    The caller passes the fd on and closes it (the mapping keeps the segment)."""
    *_, size = layout(molecules, extras)
    seg = os.memfd_create("maxwellhub-lane", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(seg, size)
        fcntl.fcntl(seg, fcntl.F_ADD_SEALS, _SEALS)  # nobody can shrink it under a mapping
        mm = mmap.mmap(seg, size)
    except BaseException:
        os.close(seg)
        raise
    _HEAD.pack_into(mm, 0, MAGIC, LANE_VERSION, molecules, extras, 0)
    return seg, mm, size


def create(sock: socket.socket, molecules: int, extras: int = 0, bell: str = "eventfd") -> Lane:
    """Hub: build a lane for ``molecules`` molecules, offer it on ``sock`` (a connected
    AF_UNIX stream socket) and wait for the driver's MXHSHMOK. Blocking; for a handshake.
    ``bell="socket"`` rings with one byte on ``sock`` instead of two eventfds."""
    if bell not in ("eventfd", "socket"):
        raise ValueError(f"bell must be 'eventfd' or 'socket', not {bell!r}")
    on_socket = bell == "socket"
    if sock.family != socket.AF_UNIX:
        raise LaneError("a shared-memory lane needs a UNIX socket (stay on the socket)")
    seg, mm, size = new_segment(molecules, extras)
    try:
        flags = BELL_ON_SOCKET if on_socket else 0
        if on_socket:
            to_driver = to_hub = -1
            fds = [seg]
        else:
            to_driver = os.eventfd(0, os.EFD_CLOEXEC)
            to_hub = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            fds = [seg, to_driver, to_hub]
        offer = wire.encode_shm_lane(molecules, extras, size, flags, LANE_VERSION)
        socket.send_fds(sock, [offer], fds)
    finally:
        os.close(seg)  # the mapping (and the driver's) keeps the segment alive
    lane = Lane("hub", mm, molecules, extras, to_driver, to_hub, sock, on_socket)
    ack = _recv_exact(sock, _ACK.size)
    head, version = _ACK.unpack(ack)
    if head != _H_OK or version != LANE_VERSION:
        lane.close()
        raise LaneError(f"driver refused the lane: {ack!r}")
    return lane


def accept(sock: socket.socket) -> Lane:
    """Driver: receive the hub's MXHSHMLANE offer on ``sock``, map it, check it, ack it."""
    msg, fds, _, _ = socket.recv_fds(sock, _OFFER.size, 3)
    if len(msg) != _OFFER.size:
        for fd in fds:
            os.close(fd)
        raise LaneError(f"MXHSHMLANE needs {_OFFER.size} bytes, got {len(msg)}")
    head, version, molecules, extras, flags, size = _OFFER.unpack(msg)
    if head != wire.encode_header(wire.MXHSHMLANE) or version != LANE_VERSION:
        for fd in fds:
            os.close(fd)
        raise LaneError(f"not a version-{LANE_VERSION} MXHSHMLANE offer: {msg[:16]!r}")
    lane = map_offer(wire.ShmLane(version, molecules, extras, flags, size), fds, sock)
    sock.sendall(_ACK.pack(_H_OK, LANE_VERSION))
    return lane


def map_offer(offer: wire.ShmLane, fds: list[int], sock: socket.socket | None) -> Lane:
    """Driver: map the segment of ``offer`` from the descriptors that came with it and
    check it (magic, version, M, K, size, seals). The descriptors are consumed (closed,
    or owned by the lane) whatever happens; a bad offer is a :class:`LaneError`."""
    want = 1 if offer.flags & BELL_ON_SOCKET else 3
    if len(fds) != want:
        for fd in fds:
            os.close(fd)
        raise LaneError(f"MXHSHMLANE needs {want} descriptors, got {len(fds)}")
    seg, to_driver, to_hub = (*fds, -1, -1) if want == 1 else fds
    molecules, extras, size = offer.molecules, offer.extras, offer.size
    try:
        if offer.version != LANE_VERSION:
            raise LaneError(f"lane version {offer.version}; this side speaks {LANE_VERSION}")
        if size != layout(molecules, extras)[-1] or os.fstat(seg).st_size != size:
            raise LaneError(f"segment size {size} does not match M = {molecules}, K = {extras}")
        if fcntl.fcntl(seg, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
            raise LaneError("the segment is not sealed against resizing")
        mm = mmap.mmap(seg, size)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    os.close(seg)
    magic, v2, m2, k2, _ = _HEAD.unpack_from(mm, 0)
    lane = Lane("driver", mm, molecules, extras, to_driver, to_hub, sock, want == 1)
    if (magic, v2, m2, k2) != (MAGIC, LANE_VERSION, molecules, extras):
        lane.sock = None  # the caller's socket is not the lane's to close
        lane.close()
        raise LaneError(f"segment header {magic!r} v{v2} M={m2} K={k2} disagrees with the offer")
    return lane


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise PeerGone("peer closed the socket during the lane handshake")
        buf += chunk
    return bytes(buf)


class Barrier:
    """Hub: the N-lane barrier in one epoll over every lane's ``to_hub`` bell and socket.

    :meth:`step` posts each lane's fields (already in its view, or given) and returns when
    every lane answered; a socket EOF/HUP raises :class:`PeerGone` naming the lane.
    """

    def __init__(self, lanes: list[Lane]) -> None:
        self.lanes = lanes
        self._ep = select.epoll()
        self._bell: dict[int, int] = {}
        self._sock: dict[int, int] = {}
        self._dead: set[int] = set()
        for i, lane in enumerate(lanes):
            if lane.bell_on_socket:  # the socket is the bell; its EOF is the death
                assert lane.sock is not None
                fd = lane.sock.fileno()
                self._ep.register(fd, select.EPOLLIN)
                self._bell[fd] = i
                continue
            self._ep.register(lane.to_hub, select.EPOLLIN)
            self._bell[lane.to_hub] = i
            if lane.sock is not None:
                fd = lane.sock.fileno()
                self._ep.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
                self._sock[fd] = i

    def step(self, step: int, timeout: float = -1) -> None:
        for i in self._dead:
            raise PeerGone(f"lane {i}: driver closed its socket")
        for i, lane in enumerate(self.lanes):
            try:
                lane.post(step)
            except PeerGone as exc:
                raise PeerGone(f"lane {i}: {exc}") from None
        self.wait(timeout)

    def wait(self, timeout: float = -1) -> None:
        """Wait for every lane's sources of its current step (checks the sequences).

        Bells are handled before sockets of the same poll: a driver that answered and then
        exited delivered this step; its EOF is reported at the next :meth:`step`.
        """
        answered: set[int] = set()
        bell, lanes = self._bell, self.lanes
        while len(answered) < len(lanes):
            events = self._ep.poll(timeout)
            if not events:
                raise TimeoutError(
                    f"{len(lanes) - len(answered)} of {len(lanes)} lanes did not answer"
                )
            closed = []
            for fd, _ in events:
                i = bell.get(fd)
                if i is None:
                    closed.append(fd)
                else:
                    try:
                        lanes[i].take_sources()
                    except PeerGone as exc:
                        raise PeerGone(f"lane {i}: {exc}") from None
                    answered.add(i)
            for fd in closed:
                j = self._sock[fd]
                if j in answered:  # answered, then went away: report it next step
                    self._ep.unregister(fd)
                    self._dead.add(j)
                    continue
                try:
                    lanes[j]._socket_event()
                except PeerGone as exc:
                    raise PeerGone(f"lane {j}: {exc}") from None

    def close(self) -> None:
        self._ep.close()
