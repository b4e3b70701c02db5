"""Exact continuity when a driver dies: driver checkpoints, the hub's replay of missed
steps (MXHRESUME), driver auto-reconnect, and the policy without a checkpoint.

Reference: one in-process model per molecule fed the same fields, i.e. the same code path
as a driver process (``n = 1``), so sources and populations must match *exactly*.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import threading

import numpy as np
import pytest
from _util import scaled

from maxwellhub import Hub, SocketHub
from maxwellhub.models import create_model
from maxwellhub.protocol import wire
from maxwellhub.run.launch import reap, start_driver
from maxwellhub_drivers.checkpoint import Continuity, checkpoint_key

DT_AU = 0.5
TLS = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}
N = 4


def fields_for(steps: int, seed: int = 3) -> np.ndarray:
    """(steps, N, 3) fields, different per molecule, strong enough to move populations."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps) * DT_AU
    base = 2e-3 * np.sin(0.242 * t)[:, None, None] * np.array([0.3, -0.5, 1.0])
    scale = np.arange(1, N + 1)[None, :, None]
    return base * scale + 1e-4 * rng.standard_normal((steps, N, 3))


def reference(fields: np.ndarray) -> tuple[np.ndarray, list[list[dict]]]:
    """Sources (steps, N, 3) and extras per step and molecule, from in-process models."""
    models = []
    for m in range(N):
        model = create_model("tls", n=1, **TLS)
        model.initialize(dt_au=DT_AU, molecule_ids=[m])
        models.append(model)
    sources = np.zeros(fields.shape)
    extras = []
    for step in range(fields.shape[0]):
        row = []
        for m, model in enumerate(models):
            model.stage(fields[step, m : m + 1])
            sources[step, m] = model.commit()[0]
            row.append(model.extras_of(0))
        extras.append(row)
    return sources, extras


def run(
    unix_name,
    tmp_path,
    *,
    steps,
    every,
    kill_at=None,
    victim=1,
    mid_step=False,
    driver_args=(),
    history=None,
    caplog=None,
):
    """Step N TLS drivers through ``fields_for(steps)``; at ``kill_at`` SIGKILL the driver
    of molecule ``victim`` and start a replacement with the same checkpoint directory.
    Returns (sources, extras) as :func:`reference`."""
    fields = fields_for(steps)
    ckpt = tmp_path / "ckpt"
    args = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", str(every), *driver_args]
    hub = SocketHub(
        unixsocket=unix_name, timeout=scaled(30), history=every + 1 if history is None else history
    )
    procs = []
    sources = np.zeros(fields.shape)
    extras = []
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(N)]
        # One at a time, so driver k is bound to molecule k.
        for m in ids:
            procs.append(
                start_driver("tls", TLS, unix=unix_name, timeout=scaled(30), extra_args=args)
            )
            assert hub.wait_until_bound({m: {"dt_au": DT_AU}}, timeout=scaled(30))
        try:
            for step in range(steps):
                if step == kill_at:

                    def kill_and_replace(proc=procs[victim]):
                        proc.kill()
                        proc.wait(timeout=scaled(10))
                        procs.append(
                            start_driver(
                                "tls", TLS, unix=unix_name, timeout=scaled(30), extra_args=args
                            )
                        )

                    if mid_step:  # frozen (SIGSTOP) so it cannot answer; killed in the step
                        os.kill(procs[victim].pid, signal.SIGSTOP)
                        killer = threading.Timer(scaled(0.2), kill_and_replace)
                        killer.start()
                    else:
                        kill_and_replace()
                res = hub.step({m: {"efield_au": fields[step, m]} for m in ids}, timeout=scaled(30))
                sources[step] = [res[m]["amp"] for m in ids]
                extras.append([json.loads(res[m]["extra"]) for m in ids])
        finally:
            hub.graceful_shutdown(wait=scaled(5))
            codes = reap(procs, timeout=scaled(10))
    assert (
        codes[:victim] + codes[victim + 1 :] == [0] * (len(codes) - 1)
        if kill_at is not None
        else codes == [0] * len(codes)
    ), codes
    return sources, extras


def assert_same(got, want, label):
    (gs, ge), (ws, we) = got, want
    assert np.array_equal(gs, ws), (
        f"{label}: sources differ, max |diff| {np.abs(gs - ws).max():.3e}"
    )
    for step, (grow, wrow) in enumerate(zip(ge, we, strict=True)):
        for m in range(N):
            for key in ("time_au", "Pe", "Pg", "Pge_real", "Pge_imag"):
                assert grow[m][key] == wrow[m][key], (
                    f"{label}: step {step} molecule {m} {key} {grow[m][key]!r} != {wrow[m][key]!r}"
                )


@pytest.mark.parametrize("every", [1, 10])
def test_killed_driver_restored_from_checkpoint_is_exact(unix_name, tmp_path, caplog, every):
    """SIGKILL one of four drivers at a random step; its replacement restores the newest
    checkpoint and the hub replays the missed steps: every source and population of every
    molecule equals the uninterrupted run exactly, and the others' time_au shows they
    stepped exactly once per step."""
    steps = 120
    kill_at = random.Random(every).randrange(21, steps - 10)
    if every > 1 and kill_at % every == 0:
        kill_at += 3  # make the replay non-empty
    caplog.set_level(logging.INFO, logger="maxwellhub.hub")
    got = run(unix_name, tmp_path, steps=steps, every=every, kill_at=kill_at)
    assert_same(got, reference(fields_for(steps)), f"K={every}, killed at {kill_at}")
    replays = [r.getMessage() for r in caplog.records if "replaying" in r.getMessage()]
    if every > 1:  # between checkpoints: the steps since the last one are replayed
        assert len(replays) == 1, replays
        assert f"replaying {kill_at % every} missed step" in replays[0], replays[0]
        assert "molecule 1" in replays[0]
    else:  # K = 1: the kill may land before or after the last checkpoint was written
        assert len(replays) <= 1 and all("replaying 1 missed step" in r for r in replays)


def test_killed_mid_step(unix_name, tmp_path):
    """The driver dies while the step is in flight: the replacement gets the frozen field
    after its replay, and the result is still exact."""
    steps = 60
    got = run(unix_name, tmp_path, steps=steps, every=5, kill_at=33, victim=2, mid_step=True)
    assert_same(got, reference(fields_for(steps)), "mid-step")


def test_without_checkpoint_history_continuity_is_lost_and_said(unix_name, tmp_path, caplog):
    """The documented policy without a usable checkpoint: the replacement starts from the
    initial state, the run goes on, and a WARNING names the molecule and the steps."""
    steps = 40
    caplog.set_level(logging.WARNING, logger="maxwellhub.hub")
    got_sources, _ = run(
        unix_name,
        tmp_path,
        steps=steps,
        every=1,
        kill_at=25,
        history=0,
        driver_args=["--checkpoint-every", "1000"],
    )
    ref_sources, _ = reference(fields_for(steps))
    assert np.array_equal(got_sources[:25], ref_sources[:25])
    assert not np.array_equal(got_sources[25:, 1], ref_sources[25:, 1])  # state was lost
    msgs = [r.getMessage() for r in caplog.records if "continuity is lost" in r.getMessage()]
    assert len(msgs) == 1 and "molecule 1" in msgs[0] and "step 25" in msgs[0], msgs


def test_driver_reconnects_and_resumes(unix_name, tmp_path):
    """--reconnect: the hub drops healthy drivers' connections; each connects again, claims
    its molecule back, resumes from its live state, and the run stays exact."""
    steps = 50
    fields = fields_for(steps)
    hub = SocketHub(unixsocket=unix_name, timeout=scaled(30), history=2)
    procs, sources, extras = [], np.zeros(fields.shape), []
    with hub:
        inner = hub.hub
        assert inner is not None  # a single-rank run: this rank is the master
        ids = [hub.register_molecule_return_id() for _ in range(N)]
        for m in ids:
            procs.append(
                start_driver(
                    "tls", TLS, unix=unix_name, timeout=scaled(30), extra_args=["--reconnect"]
                )
            )
            assert hub.wait_until_bound({m: {"dt_au": DT_AU}}, timeout=scaled(30))
        for step in range(steps):
            if step == 17:
                inner._molecules[3].driver.link.abort()  # a network hiccup
            if step == 31:  # two at once: each claims its molecule back (MXHCLAIM)
                inner._molecules[3].driver.link.abort()
                inner._molecules[1].driver.link.abort()
            res = hub.step({m: {"efield_au": fields[step, m]} for m in ids}, timeout=scaled(30))
            sources[step] = [res[m]["amp"] for m in ids]
            extras.append([json.loads(res[m]["extra"]) for m in ids])
        hub.graceful_shutdown(wait=scaled(5))
    assert reap(procs, timeout=scaled(10)) == [0] * N
    assert_same((sources, extras), reference(fields), "reconnect")


# ------------------------------------------------------------ checkpoint files


def _model():
    model = create_model("tls", n=1, **TLS)
    model.initialize(dt_au=DT_AU, molecule_ids=[7])
    return model


def _advance(model, cont, steps):
    for _ in range(steps):
        model.stage([[1e-3, 0.0, 2e-3]])
        model.commit()
        cont.committed(model, None)


def test_checkpoints_are_pruned_and_chosen_at_or_before_the_hub_step(tmp_path):
    cont = Continuity(tmp_path, every=3, keep_every=10)
    model = _model()
    assert cont.begin(model, [7], {"version": 1, "step": 0, "history": 0}) == 0
    _advance(model, cont, 25)
    steps = sorted(int(p.name.split("step_")[1][:12]) for p in tmp_path.glob("*.npz"))
    # newest two (24, 21) and, of the multiples of 10 written (every 3: 30 not yet), none
    # but the rule keeps multiples of 10 among those written: 3, 6, ..., 24 has none.
    assert steps == [21, 24], steps
    assert not list(tmp_path.glob(".*.tmp"))
    fresh = _model()
    again = Continuity(tmp_path, every=3)
    assert again.begin(fresh, [7], {"version": 1, "step": 23, "history": 5}) == 21
    assert fresh.time_au == 21 * DT_AU
    assert again.begin(_model(), [7], {"version": 1, "step": 20, "history": 5}) == 0


@pytest.mark.parametrize("stepped_on", [False, True], ids=["live", "previous"])
def test_memory_resumes_from_the_state_before_a_kick_of_its_step(stepped_on):
    """With memory (--reconnect), a kick after step 3 is kept out of the state a resumed
    session restores, for the live state (hub at step 3) and for the previous step's
    (the driver stepped to 4 after the kick; the hub is at 3 and replays the kick):
    either way the state is the kick-free one of step 3."""
    cont = Continuity(memory=True)
    model = _model()
    cont.begin(model, [7], {"version": 1, "step": 0, "history": 0})
    _advance(model, cont, 3)
    before = model.get_state()
    cont.changing(model)
    model.apply_kick([0.0, 0.0, 2e-2])
    if stepped_on:  # one more step, its answer lost: the hub is still at step 3
        state_before = model.get_state()
        model.stage([[1e-3, 0.0, 2e-3]])
        model.commit()
        cont.committed(model, state_before)
    assert cont.begin(model, [7], {"version": 1, "step": 3, "history": 3}) == 3
    got = model.get_state()
    assert sorted(got) == sorted(before)
    assert all(np.array_equal(got[k], before[k]) for k in before)


def test_keep_every_keeps_run_checkpoint_steps(tmp_path):
    cont = Continuity(tmp_path, every=2, keep_every=4)
    model = _model()
    cont.begin(model, [7], {"version": 1, "step": 0, "history": 0})
    _advance(model, cont, 15)
    steps = sorted(int(p.name.split("step_")[1][:12]) for p in tmp_path.glob("*.npz"))
    assert steps == [8, 12, 14], steps  # newest two (14, 12) + multiples of 4 (12, 8)


def test_torn_or_foreign_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    cont = Continuity(tmp_path, every=1)
    model = _model()
    cont.begin(model, [7], {"version": 1, "step": 0, "history": 0})
    _advance(model, cont, 4)
    newest = tmp_path / f"{checkpoint_key([7])}.step_{4:012d}.npz"
    newest.write_bytes(newest.read_bytes()[:100])  # torn
    (tmp_path / f"{checkpoint_key([7])}.step_{9:012d}.npz").write_bytes(b"junk")  # too new
    caplog.set_level(logging.WARNING)
    fresh = _model()
    step = Continuity(tmp_path).begin(fresh, [7], {"version": 1, "step": 4, "history": 4})
    assert step == 3
    assert any(
        "skipping checkpoint" in r.getMessage() and "step_000000000004" in r.getMessage()
        for r in caplog.records
    )
    # Another molecule's driver finds nothing: initial state.
    other = create_model("tls", n=1, **TLS)
    other.initialize(dt_au=DT_AU, molecule_ids=[8])
    assert Continuity(tmp_path).begin(other, [8], {"version": 1, "step": 4, "history": 4}) == 0


async def test_resume_frame_on_the_wire_and_bad_resume_rejected(unix_name, caplog):
    """INIT offers the resume; a driver claiming a step the hub has not reached is
    dropped with a line naming it; a proper MXHRESUME(0) at step 0 binds normally."""
    hub = Hub(unixsocket=unix_name, timeout=scaled(10), history=2)
    await hub.start()
    try:
        hub.register_molecule(0, {"dt_au": DT_AU})
        path = hub.address
        assert isinstance(path, str)  # a UNIX socket's path, not a TCP (host, port)
        for claim, ok in ((5, False), (0, True)):
            reader, writer = await asyncio.open_unix_connection(path)
            dec = wire.Decoder("driver")
            events: list = []

            async def until(kind, reader=reader, dec=dec, events=events):
                while not any(isinstance(e, kind) for e in events):
                    data = await asyncio.wait_for(reader.read(4096), scaled(10))
                    assert data, "the hub closed the connection"
                    events.extend(dec.feed(data))
                return next(e for e in events if isinstance(e, kind))

            await until(wire.Status)
            writer.write(wire.encode_header(wire.NEEDINIT))
            init = await until(wire.Init)
            assert json.loads(init.payload)["mxh_resume"] == {"version": 1, "step": 0, "history": 0}
            writer.write(wire.encode_resume(claim) + wire.encode_header(wire.READY))
            bound = await hub.wait_until_bound([0], timeout=scaled(2) if ok else 0.5)
            assert bound is ok
            if not ok:
                assert await asyncio.wait_for(reader.read(4096), scaled(10)) == b""
                assert any(
                    "MXHRESUME says its state belongs to step 5" in r.getMessage()
                    and "molecule 0" in r.getMessage()
                    for r in caplog.records
                )
            writer.close()
    finally:
        await hub.stop()


def run_ensembles(unix_name, ckpt, steps, kill_at=None):
    """Two ensemble drivers of two molecules each; returns the (steps, 4) Pe history."""
    fields = fields_for(steps)
    args = ["--molecules", "2", "--checkpoint-dir", str(ckpt), "--checkpoint-every", "4"]
    hub = SocketHub(unixsocket=unix_name, timeout=scaled(30), history=5)
    procs, pe = [], np.zeros((steps, N))
    with hub:
        ids = [hub.register_molecule_return_id() for _ in range(N)]
        for pair in (ids[:2], ids[2:]):
            procs.append(
                start_driver("tls", TLS, unix=unix_name, timeout=scaled(30), extra_args=args)
            )
            assert hub.wait_until_bound({m: {"dt_au": DT_AU} for m in pair}, timeout=scaled(30))
        for step in range(steps):
            if step == kill_at:
                procs[1].kill()
                procs[1].wait(timeout=scaled(10))
                procs.append(
                    start_driver("tls", TLS, unix=unix_name, timeout=scaled(30), extra_args=args)
                )
            res = hub.step_arrays(ids, fields[step], timeout=scaled(30))
            pe[step] = res.extras()["Pe"]
        hub.graceful_shutdown(wait=scaled(5))
    reap(procs, timeout=scaled(10))
    return pe


def test_killed_ensemble_driver_is_replayed_with_batched_frames(unix_name, tmp_path):
    """An ensemble driver (2 molecules, checkpoint every 4 steps) killed at step 27: its
    replacement restores step 24 and is replayed steps 24..26 with MXHFIELDS; the
    populations equal the uninterrupted run's bitwise."""
    want = run_ensembles(unix_name, tmp_path / "a", 40)
    got = run_ensembles(unix_name, tmp_path / "b", 40, kill_at=27)
    assert np.array_equal(got, want), np.abs(got - want).max()
    assert sorted(p.name for p in (tmp_path / "b").iterdir())[-1].startswith("molecules_2+2.step_")
