"""The one loopback test: a hub and our drivers talking over loopback TCP and over a UNIX
socket, in one process (the drivers' blocking loops run in threads, no subprocess)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from typing import Any

import numpy as np
import pytest
from _util import scaled

from maxwellhub import Hub, UsageError
from maxwellhub.models import create_model
from maxwellhub.net.addresses import unix_socket_path
from maxwellhub_drivers.client import EXIT_OK, run_client

TLS: dict[str, Any] = {"omega": 0.242, "mu12": 187.0, "orientation": 2, "pe_initial": 0.1}
DT_AU = 0.5


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_hub_and_drivers_over_loopback(transport, unix_name):
    """A single driver and a 2-molecule ensemble bind and step with the model's sources;
    TCP binds 127.0.0.1 with TCP_NODELAY on the drivers' connections; the UNIX socket is
    0600, refused to a second hub while live, and removed at stop."""
    hub = Hub(unixsocket=unix_name, timeout=scaled(10)) if transport == "unix" else Hub(port=0)
    await hub.start()
    if transport == "unix":
        path = unix_socket_path(unix_name)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(UsageError, match=path):
            await Hub(unixsocket=unix_name).start()
        where: dict = {"unix": unix_name}
    else:
        assert hub.address == ("127.0.0.1", hub.port) and hub.port > 0
        where = {"host": "127.0.0.1", "port": hub.port}
    ids = [hub.register_molecule_return_id() for _ in range(3)]
    single, ensemble = create_model("tls", **TLS), create_model("tls", n=2, **TLS)
    runs = [
        asyncio.ensure_future(asyncio.to_thread(run_client, m, timeout=scaled(10), **where))
        for m in (single, ensemble)
    ]
    try:
        assert await hub.wait_until_bound({m: {"dt_au": DT_AU} for m in ids}, timeout=scaled(10))
        if transport == "tcp":
            for conn in hub._connections:
                sock = conn.link.transport.get_extra_info("socket")  # type: ignore[attr-defined]
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        reference = create_model("tls", n=3, **TLS)
        reference.initialize(dt_au=DT_AU, molecule_ids=ids)
        rng = np.random.default_rng(3)
        for _ in range(5):
            fields = 1e-3 * rng.standard_normal((3, 3))
            result = await hub.step_arrays(ids, fields, timeout=scaled(10))
            np.testing.assert_allclose(result.sources, reference.step(fields), rtol=1e-13, atol=0)
    finally:
        await hub.stop(wait=scaled(2))
        codes = await asyncio.wait_for(asyncio.gather(*runs), scaled(10))
    assert codes == [EXIT_OK, EXIT_OK]
    if transport == "unix":
        assert not os.path.exists(path)
