"""The shared-memory lane (maxwellhub.shm_lane): bitwise round trip across a forked
driver, dead peers seen in the poll, nothing left after close or SIGKILL, stale and torn
sequences refused. No timing is asserted."""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys

import numpy as np
import pytest

from maxwellhub import shm_lane
from maxwellhub.shm_lane import Barrier, LaneError, PeerGone

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memfd/eventfd")

CONST = 0.5
BELLS = pytest.mark.parametrize("bell", ["eventfd", "socket"])


def _memfds(pid: int) -> list[str]:
    """The memfd lanes process ``pid`` holds open (descriptors or mappings)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if "maxwellhub-lane" in target:
            found.append(target)
    with open(f"/proc/{pid}/maps") as maps:
        found += [line for line in maps if "maxwellhub-lane" in line]
    return found


def _fork_driver(steps: int, mode: str = "echo") -> tuple[int, socket.socket]:
    """A forked driver on a socketpair: accepts the lane, answers ``sources = fields *
    CONST`` for ``steps`` steps (``mode="stale"``: answers step 1 with sequence 0)."""
    hub_sock, drv_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            hub_sock.close()
            lane = shm_lane.accept(drv_sock)
            poller = lane.driver_poller()
            for _ in range(steps):
                f = lane.wait_fields(poller)
                if mode == "stale":
                    lane.step -= 1
                np.multiply(f, CONST, out=lane.sources)
                if lane.n_extras:
                    lane.extras[:, 0] = f[:, 0] + 1.0
                lane.post_sources()
            if mode == "hang":
                signal.pause()
        except BaseException:
            code = 1
        os._exit(code)
    drv_sock.close()
    return pid, hub_sock


def _reap(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


@BELLS
def test_round_trip_is_bitwise_and_nothing_is_left_after_close(bell):
    pid, sock = _fork_driver(steps=3)
    lane = shm_lane.create(sock, molecules=5, extras=1, bell=bell)
    rng = np.random.default_rng(7)
    barrier = Barrier([lane])
    for step in (1, 2, 3):
        fields = rng.standard_normal((5, 3)) * 10.0 ** rng.integers(-300, 300, (5, 3))
        lane.fields[...] = fields
        barrier.step(step, timeout=5)
        assert lane.sources.tobytes() == (fields * CONST).tobytes()
        assert lane.extras[:, 0].tobytes() == (fields[:, 0] + 1.0).tobytes()
    assert _reap(pid) == 0
    assert _memfds(os.getpid())  # still mapped here
    barrier.close()
    lane.close()
    lane.close()  # idempotent
    assert _memfds(os.getpid()) == []


@BELLS
def test_killed_driver_is_seen_in_the_poll_and_its_lane_is_freed(bell):
    pid, sock = _fork_driver(steps=1, mode="hang")
    lane = shm_lane.create(sock, molecules=2, bell=bell)
    barrier = Barrier([lane])
    barrier.step(1, timeout=5)
    assert _memfds(pid)  # the driver maps the segment
    os.kill(pid, signal.SIGKILL)
    _reap(pid)
    lane.fields[...] = 1.0
    with pytest.raises(PeerGone, match="lane 0: driver closed its socket"):
        barrier.step(2, timeout=5)
    barrier.close()
    lane.close()
    assert _memfds(os.getpid()) == []  # the kernel freed the segment: no name, no leak
    assert not [n for n in os.listdir("/dev/shm") if "maxwellhub" in n]


@BELLS
def test_killed_hub_is_seen_by_the_driver(bell):
    hub_sock, drv_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the "hub"
        drv_sock.close()
        shm_lane.create(hub_sock, molecules=1, bell=bell)
        signal.pause()
        os._exit(0)
    hub_sock.close()
    lane = shm_lane.accept(drv_sock)
    os.kill(pid, signal.SIGKILL)
    _reap(pid)
    with pytest.raises(PeerGone, match="hub closed its socket"):
        lane.wait_fields(lane.driver_poller())
    lane.close()


@BELLS
def test_stale_sequence_is_refused(bell):
    pid, sock = _fork_driver(steps=1, mode="stale")
    lane = shm_lane.create(sock, molecules=1, bell=bell)
    barrier = Barrier([lane])
    with pytest.raises(LaneError, match="stale sources: sequence 0, expected step 1"):
        barrier.step(1, timeout=5)
    _reap(pid)
    barrier.close()
    lane.close()


def test_torn_and_out_of_order_sequences_are_refused():
    hub_sock, drv_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        hub_sock.close()
        shm_lane.accept(drv_sock).close()
        os._exit(0)
    drv_sock.close()
    lane = shm_lane.create(hub_sock, molecules=1)
    _reap(pid)
    lane.write_fields([[1.0, 2.0, 3.0]], step=1)
    with pytest.raises(LaneError, match="does not follow step 1"):
        lane.write_fields([[1.0, 2.0, 3.0]], step=1)
    assert lane._mm is not None
    struct.pack_into("<qq", lane._mm, 40, 1, 0)  # a writer died between begin and end
    os.eventfd_write(lane.to_hub, 1)
    with pytest.raises(LaneError, match="torn sources: sequence begin 1 != end 0"):
        lane.take_sources()
    lane.close()


def test_a_tcp_socket_stays_on_the_socket():
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s,
        pytest.raises(LaneError, match="needs a UNIX socket"),
    ):
        shm_lane.create(s, molecules=1)


def test_an_unsealed_segment_is_refused():
    """A segment that a peer could shrink under the mapping (SIGBUS) is not accepted."""
    hub_sock, drv_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    *_, size = shm_lane.layout(1)
    seg = os.memfd_create("maxwellhub-lane", os.MFD_CLOEXEC)
    os.ftruncate(seg, size)
    offer = shm_lane._OFFER.pack(shm_lane._H_LANE, shm_lane.LANE_VERSION, 1, 0, 1, size)
    socket.send_fds(hub_sock, [offer], [seg])
    os.close(seg)
    with pytest.raises(LaneError, match="not sealed"):
        shm_lane.accept(drv_sock)
    hub_sock.close()
    drv_sock.close()
    assert _memfds(os.getpid()) == []
