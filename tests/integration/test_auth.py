"""Shared-secret authentication: the MXHAUTH/MXHPROOF frames, secrets, and the hub's gate."""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
import subprocess

import numpy as np
import pytest
from _events import one
from _util import scaled
from fakes import FakeDriver, fake_source

from maxwellhub import Hub, ProtocolError, SocketHub, UsageError
from maxwellhub.models import create_model
from maxwellhub.protocol import wire
from maxwellhub.protocol.auth import SECRET_ENV, Secret, is_loopback, load_secret
from maxwellhub.run.launch import driver_command, driver_env, reap, start_driver
from maxwellhub_drivers.client import NO_SECRET

SECRET = Secret(b"correct horse battery staple", source="test")
NONCE = bytes(range(32))
# HMAC-SHA256(b"correct horse battery staple", b"maxwellhub-auth-v1" + bytes(range(32)))
PROOF = bytes.fromhex("be5d3a51e0add62623ed19652da4f1bc3ea3f9a4bb3fb587f11bbd9128855694")
DT_AU = 0.5
TLS = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}

# ----------------------------------------------------------------------------- codec


def test_challenge_golden_bytes():
    """MXHAUTH is the padded header, int32 LE version 1 and the 32-byte nonce (48 bytes)."""
    data = wire.encode_auth_challenge(NONCE)
    assert data == b"MXHAUTH     " + b"\x01\x00\x00\x00" + NONCE
    assert wire.encode(wire.AuthChallenge(1, NONCE)) == data


def test_proof_golden_bytes():
    """MXHPROOF is the padded header, int32 LE version 1 and the 32-byte HMAC."""
    data = wire.encode_auth_proof(PROOF)
    assert data == b"MXHPROOF    " + b"\x01\x00\x00\x00" + PROOF
    assert wire.encode(wire.AuthProof(1, PROOF)) == data


@pytest.mark.parametrize("split", ["whole", "bytewise", "trailing"])
def test_auth_frames_decode_at_any_split(split):
    """Both frames decode whole, one byte at a time, and with a message after them."""
    cases = [
        ("driver", wire.encode_auth_challenge(NONCE), wire.AuthChallenge(1, NONCE)),
        ("hub", wire.encode_auth_proof(PROOF), wire.AuthProof(1, PROOF)),
    ]
    for reader, data, expected in cases:
        dec = wire.Decoder(reader)
        if split == "whole":
            events = dec.feed(data)
        elif split == "bytewise":
            events = [ev for i in range(len(data)) for ev in dec.feed(data[i : i + 1])]
        else:
            extra = wire.encode_header(wire.STATUS if reader == "driver" else wire.NEEDINIT)
            events = dec.feed(data + extra)[:1]
            assert dec.buffered == 0
        assert events == [expected]


def test_auth_frames_checked():
    """Wrong version, wrong direction and wrong lengths are refused."""
    bad_version = bytearray(wire.encode_auth_proof(PROOF))
    bad_version[12] = 2
    with pytest.raises(ProtocolError, match="authentication version 2"):
        wire.Decoder("hub").feed(bytes(bad_version))
    with pytest.raises(ProtocolError, match="not valid from the driver"):
        wire.Decoder("hub").feed(wire.encode_auth_challenge(NONCE))
    with pytest.raises(ProtocolError, match="not valid from the hub"):
        wire.Decoder("driver").feed(wire.encode_auth_proof(PROOF))
    with pytest.raises(ValueError):
        wire.encode_auth_proof(PROOF[:31])


# ----------------------------------------------------------------------------- secrets


def test_proof_is_hmac_sha256_with_context():
    """The proof matches the golden HMAC vector and verifies; another secret does not."""
    assert SECRET.proof(NONCE) == PROOF
    assert SECRET.verify(NONCE, PROOF)
    assert not Secret(b"wrong").verify(NONCE, PROOF)
    assert not SECRET.verify(bytes(32), PROOF)


def test_secret_file_owner_only_and_trimmed(tmp_path):
    """A 0600 file loads without its trailing newline; the value never shows in repr."""
    path = tmp_path / "secret"
    path.write_bytes(b"correct horse battery staple\n")
    path.chmod(0o600)
    secret = load_secret(path)
    assert secret is not None and secret.proof(NONCE) == PROOF
    assert "horse" not in repr(secret) and str(path) in repr(secret)
    with pytest.raises(TypeError):
        pickle.dumps(secret)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_secret_file_readable_by_others_refused(tmp_path, mode):
    """A secret file with group or other permission bits is refused with a clear error."""
    path = tmp_path / "secret"
    path.write_bytes(b"s3cret")
    path.chmod(mode)
    with pytest.raises(UsageError, match=f"mode {mode:04o}.*chmod 600"):
        load_secret(path)


def test_secret_from_environment(monkeypatch, tmp_path):
    """MAXWELLHUB_SECRET is used when no file is given; a file wins; empty means none."""
    monkeypatch.setenv(SECRET_ENV, "correct horse battery staple")
    from_env = load_secret()
    assert from_env is not None and from_env.proof(NONCE) == PROOF
    path = tmp_path / "other"
    path.write_bytes(b"other")
    path.chmod(0o600)
    from_file = load_secret(path)
    assert from_file is not None and from_file.proof(NONCE) != PROOF
    monkeypatch.setenv(SECRET_ENV, "")
    assert load_secret() is None
    with pytest.raises(UsageError, match="empty"):
        Secret(b"")


def test_loopback_detection():
    """127.0.0.0/8, ::1 and localhost are loopback; wildcard and real addresses are not."""
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "", "10.0.0.1", "example.org"]))


def test_hub_auth_must_be_a_secret():
    """Hub(auth=...) takes a Secret, not a string that might be the secret itself."""
    with pytest.raises(UsageError, match=r"maxwellhub\.protocol\.auth\.Secret"):
        # A deliberately wrong type: the run-time check is what is under test.
        Hub(port=0, auth="s3cret")  # type: ignore[arg-type]


def test_driver_cli_refuses_readable_secret_file(tmp_path, capsys):
    """maxwellhub-driver --secret-file with mode 0644 exits 2 before connecting."""
    from maxwellhub_drivers.cli import main

    path = tmp_path / "secret"
    path.write_bytes(b"s3cret")
    path.chmod(0o644)
    with pytest.raises(SystemExit) as info:
        main(["--host", "127.0.0.1", "--port", "1", "--secret-file", str(path)])
    assert info.value.code == 2
    assert "chmod 600" in capsys.readouterr().err


# ----------------------------------------------------------------------------- live hub


class AuthFake(FakeDriver):
    """A fake driver that answers MXHAUTH with ``secret`` before the usual session."""

    def __init__(self, address, secret: Secret, **kw) -> None:
        super().__init__(address, **kw)
        self.secret = secret
        self.sockname = None

    async def _open(self):
        reader, writer = await super()._open()
        self.sockname = writer.get_extra_info("sockname")
        challenge = one(
            wire.Decoder("driver").feed(await reader.readexactly(48)), wire.AuthChallenge
        )
        writer.write(wire.encode_auth_proof(self.secret.proof(challenge.nonce)))
        return reader, writer


def requests_for(ids, step):
    return {m: {"efield_au": np.array([0.1 * step, 0.01 * m, 1.0 + step])} for m in ids}


async def step_and_check(hub, ids, step):
    results = await hub.step(requests_for(ids, step), timeout=scaled(10))
    assert sorted(results) == sorted(ids)
    for m in ids:
        assert tuple(results[m]["amp"]) == fake_source(m, requests_for(ids, step)[m]["efield_au"])


async def started_hub(**kw) -> Hub:
    hub = Hub(**{"port": 0, "timeout": scaled(10), "auth": SECRET, **kw})
    await hub.start()
    return hub


async def bind_fakes(hub, n, secret=SECRET):
    ids = [hub.register_molecule_return_id() for _ in range(n)]
    fakes = [AuthFake(hub.address, secret).start() for _ in ids]
    assert await hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(10))
    return ids, fakes


def refusals(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "authentication failed" in r.getMessage()]


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_right_secret_steps_normally(transport, unix_name):
    """In-process drivers with the secret are challenged, then bind and step as usual."""
    hub = await started_hub(**({"unixsocket": unix_name} if transport == "unix" else {}))
    try:
        ids, fakes = await bind_fakes(hub, 3)
        for step in range(4):
            await step_and_check(hub, ids, step)
        assert all(f.messages[:2] == ["Status", "Init"] for f in fakes)
    finally:
        await hub.stop(wait=scaled(2))


async def test_wrong_secret_refused_before_init(caplog):
    """A wrong proof is refused with one ERROR line naming the peer; others keep stepping."""
    caplog.set_level(logging.INFO, logger="maxwellhub.hub")
    hub = await started_hub()
    try:
        ids, _ = await bind_fakes(hub, 2)
        bad = AuthFake(hub.address, Secret(b"wrong secret")).start()
        for step in range(4):
            await step_and_check(hub, ids, step)
        await asyncio.wait_for(bad.closed.wait(), scaled(10))
        for step in range(4, 6):
            await step_and_check(hub, ids, step)
        assert bad.messages == []  # not even STATUS, let alone INIT
        (line,) = refusals(caplog)
        assert line.levelno == logging.ERROR
        assert bad.sockname is not None
        assert f"127.0.0.1:{bad.sockname[1]}" in line.getMessage()
        assert "wrong MXHPROOF" in line.getMessage()
    finally:
        await hub.stop(wait=scaled(2))


async def read_to_end(reader) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), scaled(10))
    except ConnectionResetError:
        return b""


async def test_stock_peer_refused(caplog):
    """A stock i-PI peer that answers NEEDINIT gets only the challenge, then is dropped."""
    caplog.set_level(logging.INFO, logger="maxwellhub.hub")
    hub = await started_hub()
    try:
        reader, writer = await asyncio.open_connection(*hub.address)
        port = writer.get_extra_info("sockname")[1]
        challenge = await asyncio.wait_for(reader.readexactly(48), scaled(10))
        assert challenge.startswith(b"MXHAUTH     \x01\x00\x00\x00")
        writer.write(wire.encode_header(wire.NEEDINIT))
        assert await read_to_end(reader) == b""  # no STATUS, no INIT
        writer.close()
        (line,) = refusals(caplog)
        assert f"127.0.0.1:{port}" in line.getMessage() and "NEEDINIT" in line.getMessage()
    finally:
        await hub.stop(wait=scaled(2))


async def test_silent_peer_dropped_at_the_timeout(caplog):
    """A peer that never answers MXHAUTH is dropped when the hub's timeout passes."""
    caplog.set_level(logging.INFO, logger="maxwellhub.hub")
    hub = await started_hub(timeout=scaled(0.5))
    try:
        reader, writer = await asyncio.open_connection(*hub.address)
        assert (await asyncio.wait_for(reader.readexactly(48), scaled(10)))[:7] == b"MXHAUTH"
        assert await read_to_end(reader) == b""
        writer.close()
        (line,) = refusals(caplog)
        assert "no MXHPROOF within" in line.getMessage()
    finally:
        await hub.stop(wait=scaled(2))


@pytest.mark.parametrize(
    ("host", "auth", "warned"),
    [("0.0.0.0", None, True), ("0.0.0.0", SECRET, False), ("127.0.0.1", None, False)],
)
async def test_warning_for_exposed_address_without_auth(caplog, host, auth, warned):
    """Binding a non-loopback address without a secret warns once, naming the address."""
    caplog.set_level(logging.WARNING, logger="maxwellhub.hub")
    hub = await started_hub(host=host, auth=auth)
    await hub.stop(wait=scaled(2))
    lines = [r for r in caplog.records if "without authentication" in r.getMessage()]
    assert len(lines) == (1 if warned else 0)
    if warned:
        assert lines[0].levelno == logging.WARNING
        assert f"{host}:{hub.port}" in lines[0].getMessage()


# ----------------------------------------------------------------------------- real drivers


def test_real_drivers_with_secret_match_the_model():
    """Real single and ensemble drivers get the secret via the environment (never argv),
    authenticate over TCP and step exactly like the model run in-process."""
    hub = SocketHub(port=0, timeout=scaled(30), auth=SECRET)
    procs = []
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(3)]
        procs.append(
            start_driver(
                "tls", TLS, timeout=scaled(30), secret=SECRET, host="127.0.0.1", port=hub.port
            )
        )
        assert hub.wait_until_bound({ids[0]: {"dt_au": DT_AU}}, timeout=scaled(30))
        procs.append(
            start_driver(
                "tls",
                TLS,
                timeout=scaled(30),
                secret=SECRET,
                host="127.0.0.1",
                port=hub.port,
                extra_args=["--molecules", "2"],
            )
        )
        assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(30))
        for p in procs:
            assert isinstance(p.args, list)
            argv = " ".join(p.args)
            with open(f"/proc/{p.pid}/cmdline", "rb") as f:
                cmdline = f.read()
            assert b"horse" not in cmdline and "horse" not in argv
        ref = create_model("tls", n=3, **TLS)
        ref.initialize(dt_au=DT_AU, molecule_ids=list(range(3)))
        rng = np.random.default_rng(5)
        for _ in range(10):
            fields = 1e-3 * rng.standard_normal((3, 3))
            result = hub.step_arrays(ids, fields)
            np.testing.assert_allclose(result.sources, ref.step(fields), rtol=1e-12, atol=1e-300)
    assert reap(procs, scaled(10)) == [0, 0]


@pytest.mark.parametrize(
    ("secret", "code", "message"),
    [(None, 2, NO_SECRET), (Secret(b"wrong"), 1, "refused the secret")],
)
async def test_real_driver_without_the_secret_is_refused(caplog, secret, code, message):
    """A real driver without the secret exits 2 naming the remedy; with a wrong one exits 1;
    the hub logs one refusal either way."""
    caplog.set_level(logging.INFO, logger="maxwellhub.hub")
    hub = await started_hub(timeout=scaled(30))
    env = {
        k: v
        for k, v in driver_env(secret.environ() if secret else None).items()
        if secret or k != SECRET_ENV
    }
    try:
        proc = await asyncio.create_subprocess_exec(
            *driver_command("tls", TLS, host="127.0.0.1", port=hub.port, timeout=scaled(30)),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), scaled(30))
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == code, err
        assert message in err.decode()
        for _ in range(100):  # the hub may read the peer's close a moment later
            if refusals(caplog):
                break
            await asyncio.sleep(scaled(0.05))
        assert len(refusals(caplog)) == 1, caplog.text
    finally:
        await hub.stop(wait=scaled(2))


def test_auth_off_leaves_the_wire_unchanged(monkeypatch):
    """Without auth the hub greets with STATUS, as MaxwellLink's peers expect, even when
    MAXWELLHUB_SECRET is set (the hub takes a secret only from its auth argument)."""
    monkeypatch.setenv(SECRET_ENV, "ignored by the hub")
    hub = SocketHub(port=0, timeout=scaled(10))
    with hub, socket.create_connection(("127.0.0.1", hub.port), timeout=scaled(10)) as s:
        assert not hub.wait_until_bound([0], timeout=scaled(0.3))  # runs the loop a while
        assert s.recv(12) == wire.encode_header(wire.STATUS)
