"""maxwellhub.net.steadyio: the steady step's two calls, the C extension and its Python twin
held to the same contract on real socket pairs (every test runs on both)."""

from __future__ import annotations

import math
import os
import select
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from _util import scaled

from maxwellhub import speedups
from maxwellhub.net import steadyio
from maxwellhub.protocol import wire

MAX_EXTRAS = 1 << 20


def _twins() -> list[Any]:
    c = steadyio.compiled()  # tested whenever it is built, MAXWELLHUB_PURE_PYTHON or not
    return [
        pytest.param((c.send, c.collect) if c else None, id="C"),
        pytest.param((steadyio.python_send, steadyio.python_collect), id="python"),
    ]


def test_the_extension_is_built_where_a_compiler_is() -> None:
    """CI must not lose the compiled path silently: with a C compiler present (./dev.sh setup
    installs gcc and the Python headers) the extension is built, and it is the one in use
    unless MAXWELLHUB_PURE_PYTHON asks for the Python twin."""
    assert shutil.which("cc") or shutil.which("gcc"), "no C compiler: ./dev.sh setup installs gcc"
    assert steadyio.compiled() is not None, "pip install -e . did not build maxwellhub.net._steadyc"
    assert ("python" if speedups.pure_python() else "C") == steadyio.IMPL


class Pairs:
    """n socket pairs: hub ends (non-blocking, in one epoll) and driver ends."""

    def __init__(self, n: int) -> None:
        self.hub: list[socket.socket] = []
        self.drv: list[socket.socket] = []
        self.epoll = select.epoll()
        for _ in range(n):
            a, b = socket.socketpair()
            a.setblocking(False)
            self.epoll.register(a.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            self.hub.append(a)
            self.drv.append(b)
        self.fds = np.array([s.fileno() for s in self.hub], dtype=np.int32)
        self.table = np.full(max(self.fds) + 64, -1, dtype=np.int32)
        self.table[self.fds] = np.arange(n, dtype=np.int32)
        self.raw = np.zeros(n, dtype=np.uint8)
        self.rows = np.arange(n, dtype=np.int64)[::-1].copy()  # driver k holds row n-1-k
        self.sources = np.zeros((n, 3))
        self.done = np.zeros(n, dtype=bool)
        self.extras: dict[int, bytes] = {}
        self.answered: list[int] = []

    def collect(self, twin: Any, waiting: int, seconds: float = 5.0, **kw: Any) -> tuple:
        return twin[1](
            self.epoll,
            kw.get("loop_fd", -1),
            kw.get("outer_fd", -1),
            self.table,
            self.raw,
            self.rows,
            self.sources,
            self.done,
            waiting,
            time.monotonic() + scaled(seconds) if math.isfinite(seconds) else seconds,
            MAX_EXTRAS,
            self.extras,
            self.answered,
        )

    def close(self) -> None:
        for s in self.hub + self.drv:
            s.close()
        self.epoll.close()


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    p = Pairs(5)
    yield p
    p.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    sock.settimeout(scaled(5))
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


@pytest.mark.parametrize("twin", _twins())
def test_send_writes_each_rows_field_block(twin: Any, pairs: Pairs) -> None:
    if twin is None:
        pytest.fail("the C extension is not built (see test_the_extension_is_built...)")
    fields = np.arange(15, dtype=float).reshape(5, 3) * 0.25 - 1.0
    assert twin[0](pairs.fds, pairs.rows, fields) == []
    for k, drv in enumerate(pairs.drv):
        expected = wire.encode_field_step(fields[pairs.rows[k]])  # FIELDDATA + GETSOURCE
        assert _recv_exactly(drv, len(expected)) == expected


@pytest.mark.parametrize("twin", _twins())
def test_send_reports_a_write_the_socket_did_not_take(twin: Any) -> None:
    if twin is None:
        pytest.fail("the C extension is not built")
    p = Pairs(2)
    try:
        p.hub[1].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        while True:  # fill driver 1's socket until it takes nothing
            try:
                p.hub[1].send(b"x" * 65536)
            except BlockingIOError:
                break
        short = twin[0](p.fds, p.rows, np.ones((2, 3)))
        assert short == [(1, 0)]
        closed = Pairs(1)
        closed.drv[0].close()
        assert twin[0](closed.fds, closed.rows, np.ones((1, 3))) == [(0, 0)]  # EPIPE
        closed.hub[0].close()
        closed.epoll.close()
    finally:
        p.close()


@pytest.mark.parametrize("twin", _twins())
def test_collect_takes_clean_replies_until_done(twin: Any, pairs: Pairs) -> None:
    if twin is None:
        pytest.fail("the C extension is not built")
    for k, drv in enumerate(pairs.drv):
        extras = b'{"Pe": 0.5}' if k % 2 else b""
        drv.sendall(wire.encode_source_ready((k, -k, 0.5 * k), extras))
    status, waiting, last, _who, data = pairs.collect(twin, 5)
    assert (status, waiting, data) == (steadyio.DONE, 0, None)
    assert sorted(pairs.answered) == [0, 1, 2, 3, 4] and last == pairs.answered[-1]
    for k in range(5):
        row = pairs.rows[k]
        assert pairs.sources[row].tolist() == [k, -k, 0.5 * k]
        assert pairs.done[row]
    assert pairs.extras == {int(pairs.rows[1]): b'{"Pe": 0.5}', int(pairs.rows[3]): b'{"Pe": 0.5}'}


@pytest.mark.parametrize("twin", _twins())
def test_collect_hands_everything_else_to_python(twin: Any, pairs: Pairs) -> None:
    if twin is None:
        pytest.fail("the C extension is not built")
    reply = wire.encode_source_ready((1.0, 2.0, 3.0))
    cases = {
        "partial": reply[:50],
        "two replies in one read": reply + reply,
        "non-finite source": wire.encode_source_ready((math.nan, 0.0, 0.0)),
        "a virial": wire.encode_forceready(0.0, np.ones((1, 3)), np.eye(3)),
        "energy": wire.encode_forceready(1.0, np.ones((1, 3))),
        "another message": wire.encode_header(wire.READY),
    }
    for what, data in cases.items():
        pairs.drv[2].sendall(data)
        status, waiting, _last, who, got = pairs.collect(twin, 5)
        assert (status, waiting, who, got) == (steadyio.DATA, 5, 2, data), what
        assert not pairs.done.any()
    pairs.raw[3] = 1  # its protocol machine holds part of a frame: every read goes to it
    pairs.drv[3].sendall(reply)
    status, _, _, who, got = pairs.collect(twin, 5)
    assert (status, who, got) == (steadyio.DATA, 3, reply)
    pairs.raw[3] = 0
    pairs.done[pairs.rows[4]] = True  # a second reply for a row already answered
    pairs.drv[4].sendall(reply)
    assert pairs.collect(twin, 4)[0] == steadyio.DATA
    assert pairs.answered == []


@pytest.mark.parametrize("twin", _twins())
def test_collect_end_of_file_foreign_loop_and_timeout(twin: Any, pairs: Pairs) -> None:
    if twin is None:
        pytest.fail("the C extension is not built")
    assert pairs.collect(twin, 5, seconds=0.01)[0] == steadyio.TIMEOUT
    r, w = os.pipe()
    try:
        os.write(w, b"!")
        # the loop's selector inside the set, as the synchronous hub's detached wait has it
        pairs.epoll.register(r, select.EPOLLIN)
        assert pairs.collect(twin, 5, loop_fd=r)[0] == steadyio.LOOP
        # ... a descriptor in the set that is not in the table is left for Python
        status, _, _, who, _ = pairs.collect(twin, 5)
        assert (status, who) == (steadyio.FOREIGN, r)
        pairs.epoll.unregister(r)
        # ... and watched beside the set, as the async hub's loop selector is
        assert pairs.collect(twin, 5, outer_fd=r)[0] == steadyio.LOOP
        # a reply that completes the step wins over a ready loop
        pairs.drv[0].sendall(wire.encode_source_ready((1.0, 1.0, 1.0)))
        deadline = time.monotonic() + scaled(5)
        while not select.select([pairs.hub[0]], [], [], 0)[0]:  # delivered (a socketpair
            assert time.monotonic() < deadline  # is immediate; this is belt and braces)
        assert pairs.collect(twin, 1, outer_fd=r)[:2] == (steadyio.DONE, 0)
    finally:
        os.close(r)
        os.close(w)
    pairs.drv[1].close()
    status, _, _, who, _ = pairs.collect(twin, 4, seconds=math.inf)
    assert (status, who) == (steadyio.GONE, 1)


@pytest.mark.parametrize("twin", _twins())
def test_collect_outer_selector_ready_for_our_set_alone_is_no_loop_work(twin: Any) -> None:
    """The async hub's loop selector holds the drivers' epoll set: a reply makes both
    ready, which is no work for the loop; anything else in the selector is."""
    if twin is None:
        pytest.fail("the C extension is not built")
    p = Pairs(2)
    outer = select.epoll()
    outer.register(p.epoll.fileno(), select.EPOLLIN)
    r, w = os.pipe()
    try:
        p.drv[0].sendall(wire.encode_source_ready((1.0, 2.0, 3.0)))
        status, waiting, *_ = p.collect(twin, 2, seconds=0.05, outer_fd=outer.fileno())
        assert (status, waiting) == (steadyio.TIMEOUT, 1)  # not LOOP: only our set was ready
        outer.register(r, select.EPOLLIN)
        os.write(w, b"!")
        assert p.collect(twin, 1, outer_fd=outer.fileno())[0] == steadyio.LOOP
    finally:
        os.close(r)
        os.close(w)
        outer.close()
        p.close()


def test_request_fields_takes_the_plain_shape_and_declines_the_rest() -> None:
    """The compiled reading of MaxwellLink's request dict gives the arrays the Python path
    gives, and declines (False, nothing raised) whatever the Python path must read itself:
    other key types, lists, other dtypes or shapes, a missing field, a non-finite value."""
    c = steadyio.compiled()
    assert c is not None
    f = np.arange(12.0).reshape(4, 3) - 5.5

    def read(requests: dict) -> tuple[bool, Any, Any]:
        ids, fields = np.empty(len(requests), np.int64), np.empty((len(requests), 3))
        return c.request_fields(requests, ids, fields), ids, fields

    ok, ids, fields = read({7: {"efield_au": f[0]}, 3: {"efield_au": f[1], "init": {}}})
    assert ok and ids.tolist() == [7, 3] and fields.tobytes() == f[:2].tobytes()
    view = f[:, 1]  # a strided view: not contiguous
    declined: list[dict[Any, Any]] = [
        {np.int64(7): {"efield_au": f[0]}},  # a numpy int key
        {True: {"efield_au": f[0]}},  # a bool is not an id here
        {7: {"efield_au": [1.0, 2.0, 3.0]}},  # a list
        {7: {"efield_au": f[0].astype(np.float32)}},
        {7: {"efield_au": f[:2].ravel()[:4]}},  # 4 values
        {7: {"efield_au": f[:1]}},  # shape (1, 3)
        {7: {"efield_au": view[:3]}},
        {7: {"field": f[0]}},
        {7: [f[0]]},
        {7: {"efield_au": np.array([0.0, np.inf, 0.0])}},
        {7: {"efield_au": np.array([np.nan, 0.0, 0.0])}},
    ]
    for requests in declined:
        assert read(requests)[0] is False, requests


def test_result_dict_is_maxwelllinks_shape() -> None:
    """The compiled result dict equals the Python one: the ids as ints, each amp the
    sources' own row view, the extras bytes or b""."""
    from maxwellhub.hub.barrier import StepResult

    c = steadyio.compiled()
    assert c is not None
    ids = np.array([4, 9, 2], dtype=np.int64)
    sources = np.arange(9.0).reshape(3, 3)
    extras = {1: b'{"Pe": 0.25}'}
    out = c.result_dict(ids, sources, extras)
    assert list(out) == [4, 9, 2] and all(type(k) is int for k in out)
    assert [e["extra"] for e in out.values()] == [b"", b'{"Pe": 0.25}', b""]
    for r, entry in enumerate(out.values()):
        assert np.shares_memory(entry["amp"], sources[r])  # a view, as list(sources) gives
        assert entry["amp"].tolist() == sources[r].tolist()
    python = StepResult(ids, sources, extras, [])
    slow = {
        m: {"amp": a, "extra": e}
        for m, a, e in zip(ids.tolist(), sources, [b"", extras[1], b""], strict=True)
    }
    fast = python.as_dict()
    assert list(fast) == list(slow)
    for m in slow:
        assert fast[m]["extra"] == slow[m]["extra"]
        assert fast[m]["amp"].tobytes() == slow[m]["amp"].tobytes()
