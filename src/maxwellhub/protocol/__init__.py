"""Sans-I/O protocol layer: bytes and state, no sockets, no asyncio, no hub.

- :mod:`maxwellhub.protocol.frames`: the i-PI frames and maxwellhub's extensions (message
  names, layouts, versions, flags, :class:`~maxwellhub.protocol.frames.Limits`, the events);
- :mod:`maxwellhub.protocol.encoder`: events into bytes;
- :mod:`maxwellhub.protocol.decoder`: bytes into events (the incremental ``Decoder``);
- :mod:`maxwellhub.protocol.wire`: the three in one namespace (old path ``maxwellhub.wire``);
- :mod:`maxwellhub.protocol.init`: the INIT JSON, built and parsed once for every party;
- :mod:`maxwellhub.protocol.connection`: the hub side of one driver connection as a state
  machine (bytes in, events handled by a table, bytes out);
- :mod:`maxwellhub.protocol.session`: the driver side, one machine for a single molecule
  and for an ensemble, under the blocking driver and the relay's upstream connection.

Nothing in this package may import :mod:`maxwellhub.hub`, :mod:`maxwellhub.net` or
:mod:`asyncio` (``tests/unit/test_layers.py`` checks it).
"""
