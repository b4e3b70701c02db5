"""The old paths of the wire codec, auth and the network modules stay importable, as the same
objects as the new ones (not copies): ``maxwellhub.wire`` is ``maxwellhub.protocol.wire``,
whose names are those of ``protocol.frames``, ``protocol.encoder`` and
``protocol.decoder``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from _util import scaled

from maxwellhub.errors import ProtocolError
from maxwellhub.protocol import decoder, encoder, frames
from maxwellhub.protocol import wire as new_wire

#: Every name of the old single-file ``maxwellhub.wire.__all__``: still there, same objects.
OLD_WIRE_ALL = (
    "BYE",
    "EXIT",
    "FIELDDATA",
    "FIELD_STEP_HEAD",
    "FIELD_STEP_SIZE",
    "FORCEREADY",
    "GETFORCE",
    "GETSOURCE",
    "HAVEDATA",
    "HEADER_SIZE",
    "INIT",
    "NEEDINIT",
    "POSDATA",
    "READY",
    "SOURCEREADY",
    "SOURCE_READY_PREFIX_SIZE",
    "STATUS",
    "STOP",
    "Bye",
    "Decoder",
    "Event",
    "Exit",
    "ForceReady",
    "GetForce",
    "HaveData",
    "Init",
    "Limits",
    "NeedInit",
    "PosData",
    "ProtocolError",
    "Ready",
    "Status",
    "Stop",
    "encode",
    "encode_field_step",
    "encode_forceready",
    "encode_header",
    "encode_init",
    "encode_posdata",
    "encode_source_ready",
)


def test_old_wire_path_is_the_new_module():
    import maxwellhub.wire as old
    from maxwellhub import wire

    assert old is new_wire and wire is new_wire
    assert sys.modules["maxwellhub.wire"] is new_wire
    assert new_wire.__name__ == "maxwellhub.protocol.wire"


def test_old_wire_attributes_are_the_new_objects():
    from maxwellhub import wire

    assert wire.Decoder is decoder.Decoder
    assert wire.Limits is frames.Limits
    assert wire.FIELD_STEP_HEAD is frames.FIELD_STEP_HEAD
    assert wire.encode_header is frames.encode_header
    assert wire.encode is encoder.encode
    assert wire.ProtocolError is ProtocolError
    missing = [n for n in OLD_WIRE_ALL if n not in new_wire.__all__ or not hasattr(wire, n)]
    assert not missing, missing


def test_wire_namespace_is_exactly_the_three_modules():
    """protocol.wire defines nothing: each of its names is one module's own object, and
    every public name of the three modules is in it."""
    homes = (frames, encoder, decoder)
    union = set().union(*(set(m.__all__) for m in homes))
    assert set(new_wire.__all__) == union
    for name in new_wire.__all__:
        owners = [m for m in homes if name in m.__all__]
        assert len(owners) == 1, (name, owners)
        assert getattr(new_wire, name) is getattr(owners[0], name), name


def test_c_extension_constants_come_from_the_frames():
    """steadyio hands the C extension the frame constants of protocol.frames."""
    from maxwellhub.net import steadyio

    assert steadyio.HEAD is frames.FIELD_STEP_HEAD
    assert frames.encode_header(frames.GETFORCE) == steadyio.TAIL
    assert steadyio.REPLY_SIZE == frames.SOURCE_READY_PREFIX_SIZE


def test_old_wire_path_first_in_a_fresh_interpreter():
    """Imported by the old path before anything else: one module under both names, and
    the old attribute access works."""
    code = (
        "from maxwellhub.wire import Decoder, FIELD_STEP_HEAD\n"
        "from maxwellhub import wire\n"
        "import maxwellhub.protocol.decoder as d, maxwellhub.protocol.frames as f\n"
        "assert Decoder is d.Decoder and FIELD_STEP_HEAD is f.FIELD_STEP_HEAD\n"
        "ev = wire.Decoder('hub', wire.Limits()).feed(wire.encode_header(wire.READY))\n"
        "assert ev == [wire.Ready()], ev\n"
        "print('same')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(60)
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "same", proc.stderr[-2000:]


#: Old module path -> new one, for the modules that moved into the protocol and net layers.
MOVED = {
    "maxwellhub.addresses": "maxwellhub.net.addresses",
    "maxwellhub.auth": "maxwellhub.protocol.auth",
    "maxwellhub.rendezvous": "maxwellhub.net.rendezvous",
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_modules_keep_their_old_path(old):
    new = importlib.import_module(MOVED[old])
    assert importlib.import_module(old) is new
    assert sys.modules[old] is new and new.__name__ == MOVED[old]
    assert getattr(importlib.import_module("maxwellhub"), old.rpartition(".")[2]) is new


def test_old_network_names_are_the_same_objects():
    from maxwellhub.addresses import connect_once, unix_socket_path
    from maxwellhub.auth import Secret, load_secret
    from maxwellhub.net import addresses, rendezvous
    from maxwellhub.protocol import auth
    from maxwellhub.rendezvous import RendezvousError, wait_and_connect

    assert connect_once is addresses.connect_once
    assert unix_socket_path is addresses.unix_socket_path
    assert RendezvousError is rendezvous.RendezvousError
    assert wait_and_connect is rendezvous.wait_and_connect
    assert Secret is auth.Secret and load_secret is auth.load_secret
