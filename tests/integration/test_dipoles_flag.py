"""MXHFIELDS flag WANT_DIPOLES and Model.dipoles(): the codec, an ensemble driver behind a
hub and behind a relay, an older driver that ignores the flag, and the TLS fast paths."""

from __future__ import annotations

import logging
import struct
import threading

import numpy as np
import pytest
from _util import scaled
from test_relay import start_relay

from maxwellhub import SocketHub
from maxwellhub.errors import ProtocolError
from maxwellhub.models import create_model
from maxwellhub.protocol import wire
from maxwellhub.run.launch import reap, start_driver
from maxwellhub_drivers.client import run_client
from maxwellhub_drivers.ensemble import EnsembleSession

DT_AU = 0.5
TLS = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}
M = 4
STEPS = 6


def _fields(step: int, m: int) -> np.ndarray:
    """Even steps: one 3-vector for all (a cavity mode); odd: one per molecule."""
    if step % 2 == 0:
        return np.broadcast_to(1e-3 * np.array([0.2, -0.4, 1.0 + step]), (m, 3))
    return 1e-3 * np.sin(0.3 * step + np.arange(3 * m).reshape(m, 3))


def _decoder(m: int) -> wire.Decoder:
    dec = wire.Decoder("driver")
    dec.batch = m
    return dec


@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_fields_flags_round_trip(flags):
    """Every flag value 0..3 comes back from the decoder, fed whole or one byte at a time."""
    fields = np.arange(9.0).reshape(3, 3) * 0.25
    data = wire.encode_fields_batch(fields, flags)
    (whole,) = _decoder(3).feed(data)
    dec = _decoder(3)
    events = [ev for i in range(len(data)) for ev in dec.feed(data[i : i + 1])]
    assert len(events) == 1
    for event in (whole, events[0]):
        assert isinstance(event, wire.FieldsBatch)
        assert event.flags == flags
        assert np.array_equal(event.fields, fields)


@pytest.mark.parametrize("flags", [4, 7, -1])
def test_unknown_flag_bit_is_a_protocol_error(flags):
    """A flag bit other than WANT_EXTRAS and WANT_DIPOLES: ProtocolError naming the value;
    the encoder refuses it too."""
    good = wire.encode_fields_batch(np.zeros((2, 3)), 0)
    bad = good[:16] + struct.pack("<i", flags) + good[20:]
    with pytest.raises(ProtocolError, match=f"flags {flags} "):
        _decoder(2).feed(bad)
    with pytest.raises(ValueError, match=f"flags {flags} "):
        wire.encode_fields_batch(np.zeros((2, 3)), flags)


def _embedded(ids: list[int]):
    model = create_model("tls", n=len(ids), **TLS)
    model.initialize(dt_au=DT_AU, molecule_ids=ids)
    return model


def _check_dipoles(hub: SocketHub, ids: list[int]) -> None:
    """Step with extras=False, dipoles=True; the extras are the dipole keys, bit for bit
    the embedded model's dipoles(), and the sources its sources."""
    model = _embedded(ids)
    for step in range(STEPS):
        fields = _fields(step, len(ids))
        result = hub.step_arrays(ids, fields, extras=False, dipoles=True)
        sources = model.step(fields)
        extras = result.extras()
        assert set(extras) == set(wire.DIPOLE_KEYS)
        got = np.column_stack([extras[k] for k in wire.DIPOLE_KEYS])
        assert np.array_equal(got, model.dipoles()), step
        assert np.array_equal(result.sources, sources), step
    assert hub.step_arrays(ids, _fields(0, len(ids)), extras=False).extras() == {}


def test_ensemble_answers_dipoles_only_behind_a_hub(unix_name):
    """An ensemble driver asked with extras=False, dipoles=True returns exactly the dipole
    keys, equal to the embedded model's dipoles() bit for bit."""
    hub = SocketHub(unixsocket=unix_name, timeout=scaled(30))
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(M)]
        proc = start_driver(
            "tls", TLS, timeout=scaled(30), unix=unix_name, extra_args=["--molecules", str(M)]
        )
        try:
            assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(30))
            _check_dipoles(hub, ids)
        finally:
            hub.stop()
            assert reap([proc], scaled(10)) == [0]


def test_dipoles_through_a_relay(unix_name, tmp_path):
    """The flag goes down through a relay to its local ensemble and the dipole keys (only
    them) come back up, bit for bit."""
    hub = SocketHub(unixsocket=unix_name, timeout=scaled(30))
    listen = f"{unix_name}_r"
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(M)]
        relay, log = start_relay(tmp_path, listen, M, ["--unix", unix_name])
        proc = start_driver(
            "tls", TLS, timeout=scaled(30), unix=listen, extra_args=["--molecules", str(M)]
        )
        try:
            assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(30))
            _check_dipoles(hub, ids)
        finally:
            hub.stop()
            codes = reap([relay, proc], scaled(10))
        assert codes == [0, 0], log.read_text()[-2000:]


def test_older_ensemble_ignoring_the_flag_is_named(unix_name, monkeypatch):
    """An ensemble that ignores WANT_DIPOLES (an older driver) sends no dipoles: the step
    completes and step_arrays raises ProtocolError naming its molecules."""

    def old_extras(self):
        return self.model.extras() if self.flags & wire.WANT_EXTRAS else None

    monkeypatch.setattr(EnsembleSession, "extras", old_extras)
    hub = SocketHub(unixsocket=unix_name, timeout=scaled(30))
    codes: list[int] = []
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(2)]
        model = create_model("tls", n=2, **TLS)
        thread = threading.Thread(
            target=lambda: codes.append(
                run_client(
                    model,
                    unix=unix_name,
                    timeout=scaled(20),
                    logger=logging.getLogger("old-ensemble"),
                )
            )
        )
        thread.start()
        try:
            assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(30))
            with pytest.raises(ProtocolError, match=rf"molecule {ids[0]} \(and \[{ids[1]}\]\)"):
                hub.step_arrays(ids, np.zeros((2, 3)), extras=False, dipoles=True)
            assert hub.hub is not None and hub.hub.step_index == 1  # the step completed
            result = hub.step_arrays(ids, np.zeros((2, 3)), extras=True, dipoles=True)
            assert set(wire.DIPOLE_KEYS) <= set(result.extras())
        finally:
            hub.stop()
            thread.join(scaled(20))
    assert codes == [0]


@pytest.mark.parametrize("orientation", [1, [0, 2, 1]])
def test_tls_shared_field_and_dipoles_bit_for_bit(orientation):
    """n TLS stepped by one shared field (the one-angle path) follow n single molecules
    bit for bit, and dipoles() equals the extras' dipole columns."""
    n = 3
    params = {
        "omega": 0.242,
        "mu12": 187.0,
        "pe_initial": [0.1, 0.3, 0.0],
        "orientation": orientation,
    }
    batch = create_model("tls", n=n, **params)
    batch.initialize(dt_au=DT_AU)
    singles = [create_model("tls", n=1, **batch.slice_params(params, k, k + 1)) for k in range(n)]
    for single in singles:
        single.initialize(dt_au=DT_AU)
    for step in range(5):
        field = 1e-3 * np.array([0.5, -1.0, 2.0 + step])
        sources = batch.step(np.broadcast_to(field, (n, 3)))
        for k, single in enumerate(singles):
            assert np.array_equal(single.step(field[None, :]), sources[k : k + 1]), (step, k)
            assert np.array_equal(single.dipoles(), batch.dipoles()[k : k + 1])
        extras = batch.extras()
        assert np.array_equal(
            batch.dipoles(), np.column_stack([extras[k] for k in wire.DIPOLE_KEYS])
        )


def test_base_dipoles_are_the_extras_columns():
    """Model.dipoles() of a model without its own is built from its extras."""
    model = create_model("sho", n=2)
    model.initialize(dt_au=DT_AU)
    model.step(1e-3 * np.ones((2, 3)))
    extras = model.extras()
    expected = np.column_stack([extras[k] for k in wire.DIPOLE_KEYS])
    assert np.array_equal(model.dipoles(), expected)


def test_sources_with_dipoles_received_in_place():
    """An MXHSOURCES with dipole arrays, written piecewise into read_buffer() and handed
    over with received(), decodes as when fed whole; the buffer is reused for the next."""
    m = 5
    sources = np.asfortranarray(np.arange(3.0 * m).reshape(m, 3))
    extras = {k: np.linspace(0, 1, m) + i for i, k in enumerate(wire.DIPOLE_KEYS)}
    data = wire.encode_sources_batch(sources, extras)
    assert data == b"".join(bytes(p) for p in wire.sources_batch_parts(sources, extras))
    dec = wire.Decoder("hub")
    dec.batch = m
    for _ in range(2):
        events = []
        for i in range(0, len(data), 7):
            chunk = data[i : i + 7]
            dec.read_buffer(len(chunk))[: len(chunk)] = chunk
            events += dec.received(len(chunk))
        (event,) = events
        assert isinstance(event, wire.SourcesBatch)
        assert np.array_equal(event.sources, sources)
        assert list(event.extras) == list(wire.DIPOLE_KEYS)
        for key, values in extras.items():
            assert np.array_equal(event.extras[key], values)
        assert dec.buffered == 0
