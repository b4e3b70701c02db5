"""The hub-side connection machine (maxwellhub.protocol.connection) with plain bytes: no
socket, no event loop. Every reader is fed whole, one byte at a time and with trailing
data."""

from __future__ import annotations

import numpy as np
import pytest
from _connection_fakes import (
    BYE,
    NEEDINIT,
    READY,
    STATUS,
    Layout,
    Mol,
    Step,
    feed,
    make,
    ready_single,
)
from _events import one

from maxwellhub.protocol import wire
from maxwellhub.protocol.auth import Secret
from maxwellhub.protocol.connection import TRANSITIONS, State
from maxwellhub.protocol.init import parse_single_init

HOW = ["whole", "bytewise"]


@pytest.mark.parametrize("how", HOW)
def test_handshake_init_bytes_parse_back(how):
    """STATUS, NEEDINIT, INIT (which a driver's parser reads back), READY."""
    conn, hub, _ = ready_single(how)
    decoder = wire.Decoder("driver")
    event = one(decoder.feed(conn._init_msg), wire.Init)
    init = parse_single_init(event.ident, event.payload)
    assert init.molecule_id == 3 and init.dt_au == 0.5
    feed(conn, READY, how)
    assert hub.calls[-1] == ("ready",)


@pytest.mark.parametrize("how", HOW)
def test_step_round_trip_fast_and_slow(how):
    """A field out, its source back: whole reads take the fast path, split reads the
    decoder; both report the same source and extras."""
    conn, hub, _ = ready_single()
    feed(conn, READY, "whole")
    conn.state, conn.stock_steps = State.READY, False
    assert conn.place(Layout([7, 3]))
    out = b"".join(conn.send_step(Step([[0, 0, 0], [1.0, 2.0, 3.0]])))
    assert out == wire.encode_field_step([1.0, 2.0, 3.0])  # POSDATA and GETFORCE
    assert conn.state is State.BUSY
    feed(conn, wire.encode_source_ready((4.0, 5.0, 6.0), b'{"e":1}'), how)
    assert hub.calls[-1] == ("source", (4.0, 5.0, 6.0), b'{"e":1}')
    assert conn.state is State.READY


def test_trailing_data_after_a_source_is_a_protocol_error():
    """A source followed by a message nobody asked for: the source counts, the rest
    drops the connection with one line naming the state and the message."""
    conn, hub, link = ready_single()
    feed(conn, READY, "whole")
    conn.state, conn.stock_steps = State.READY, False
    conn.place(Layout([3]))
    conn.send_step(Step([[1.0, 2.0, 3.0]]))
    feed(conn, wire.encode_source_ready((1.0, 1.0, 1.0)) + READY, "whole")
    assert hub.calls[-1][0] == "source" and link.aborted and conn.reported


def test_missing_table_entry_names_state_and_message(caplog):
    """READY while idle has no entry in the table: a protocol error naming both."""
    conn, _, link = ready_single()
    feed(conn, READY, "whole")
    conn.state = State.READY
    feed(conn, READY, "whole")
    assert link.aborted
    assert "unexpected READY while idle (nothing was asked) (state READY)" in caplog.text
    assert (State.READY, wire.Ready) not in TRANSITIONS


@pytest.mark.parametrize("how", HOW)
def test_ensemble_hello_welcome_and_batch_step(how):
    """MXHHELLO is welcomed; a batched step goes out as MXHFIELDS and MXHSOURCES comes back."""
    conn, hub, link = make()
    conn.start()
    assert feed(conn, wire.encode_hello(2), how) == wire.encode_welcome(2)
    assert link.hosting_n == 2 and conn.size == 2
    feed(conn, NEEDINIT, how)
    conn.bind([Mol(0, {"dt_au": 1}), Mol(1, {"dt_au": 1})])
    conn.send_init()
    feed(conn, READY, how)
    conn.state, conn.stock_steps = State.READY, False
    assert conn.place(Layout([0, 1])) and conn.rows == slice(0, 2)
    out = b"".join(bytes(p) for p in conn.send_step(Step([[1, 0, 0], [0, 1, 0]])))
    assert out.startswith(wire.encode_header(wire.MXHFIELDS))
    sources = np.array([[1.0, 2, 3], [4, 5, 6]])
    feed(conn, wire.encode_sources_batch(sources), how)
    assert hub.calls[-1][0] == "sources" and np.array_equal(hub.calls[-1][1], sources)


@pytest.mark.parametrize("how", HOW)
def test_authentication(how):
    """With a secret: MXHAUTH first, the right MXHPROOF moves to STATUS, a wrong one is
    refused."""
    secret = Secret(b"k" * 32, "test")
    conn, _, _ = make(auth=secret)
    challenge = b"".join(conn.start())
    event = one(wire.Decoder("driver").feed(challenge), wire.AuthChallenge)
    proof = wire.encode_auth_proof(secret.proof(event.nonce))
    assert feed(conn, proof, how) == STATUS and conn.state is State.PROBE
    bad, _, bad_link = make(auth=secret)
    bad.start()
    feed(bad, wire.encode_auth_proof(bytes(32)), how)
    assert bad_link.aborted and bad.state is State.CLOSED


def test_deadline_names_the_wait(caplog):
    """The I/O layer's timer firing in PROBE drops the peer, saying what was awaited."""
    conn, _, link = make()
    conn.start()
    conn.expired(5.0)
    assert link.aborted and "no answer to STATUS within 5 s" in caplog.text


def test_stop_bye_and_exit_fallback():
    """STOP is answered by BYE (polite end); without BYE, EXIT follows."""
    conn, _, link = ready_single()
    feed(conn, READY, "whole")
    assert b"".join(conn.send_end()) == wire.encode_header(wire.STOP)
    feed(conn, BYE, "whole")
    assert link.ends == [True] and link.closed and conn.said_bye is True
    other, _, other_link = ready_single()
    other.send_end()
    [(_seconds, callback)] = other_link.later_calls
    assert b"".join(callback()) == wire.encode_header(wire.EXIT) and other_link.ends == [True]


def test_stock_client_learns_status_each_step():
    """READY before INIT, then NEEDINIT after its first source: STATUS before every step."""
    conn, hub, _ = make()
    conn.start()
    feed(conn, READY, "whole")
    assert conn.stock and not conn.init_needed
    conn.bind([Mol(0, {"dt_au": 1})])
    assert b"".join(conn.send_init()) == STATUS  # no INIT for a client that never asked
    feed(conn, READY, "whole")
    conn.state = State.READY  # what the hub's driver_ready does without a replay
    conn.place(Layout([0]))
    assert b"".join(conn.send_step(Step([[1.0, 0, 0]]))) == wire.encode_field_step([1.0, 0, 0])
    assert conn.state is State.LEARNING
    assert feed(conn, wire.encode_source_ready((0, 0, 0), b"nada"), "whole") == STATUS
    feed(conn, NEEDINIT, "whole")
    assert conn.status_each_step and hub.calls[-1] == ("initialized",)
    assert b"".join(conn.send_step(Step([[2.0, 0, 0]]))) == STATUS and conn.state is State.ASKED
    assert feed(conn, NEEDINIT, "whole").endswith(STATUS)  # INIT again, then STATUS
    hub.field = np.array([2.0, 0, 0])
    assert feed(conn, READY, "whole") == wire.encode_field_step([2.0, 0, 0])
    assert conn.state is State.STOCK_BUSY


def test_connection_lost_reports_the_previous_state():
    """Closing mid-step tells the hub which state the connection was in."""
    conn, hub, _ = ready_single()
    conn.connection_lost(None)
    assert hub.calls[-1] == ("lost", State.INIT) and conn.state is State.CLOSED
