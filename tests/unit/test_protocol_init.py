"""The INIT JSON, built and parsed by maxwellhub.protocol.init: plain bytes, no sockets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from maxwellhub.errors import ProtocolError
from maxwellhub.protocol.init import (
    build_init,
    parse_ensemble_init,
    parse_single_init,
)
from maxwellhub.protocol.wire import RESUME_KEY


def test_single_round_trip():
    """What the hub builds for one molecule, a driver parses back: dt_au, keys, offer."""
    body = build_init([7], [{"dt_au": 0.5, "tag": np.float64(2.0)}], 3, 2, ensemble=False)
    init = parse_single_init(7, body)
    assert init.molecule_id == 7 and init.dt_au == 0.5
    assert init.data["tag"] == 2.0 and init.data["molecule_id"] == 7
    assert init.resume == {"version": 1, "step": 3, "history": 2}


def test_single_bytes_are_stable():
    """The hub's INIT string keeps its key order (user keys, offer, molecule_id)."""
    body = build_init([4], [{"dt_au": 1}], 0, 0, ensemble=False)
    assert body == (
        b'{"dt_au": 1, "mxh_resume": {"version": 1, "step": 0, "history": 0}, "molecule_id": 4}'
    )


def test_ensemble_round_trip_range_and_payloads():
    """Consecutive ids become a range; differing payloads are listed per molecule."""
    body = build_init([5, 6], [{"dt_au": 0.5}, {"dt_au": 0.5, "x": 1}], 0, 0, ensemble=True)
    data = json.loads(body)
    assert data["molecule_id_range"] == [5, 2] and len(data["payloads"]) == 2
    init = parse_ensemble_init(body, 2)
    assert init.molecule_ids == [5, 6] and init.dt_au == 0.5
    assert init.payloads == [{"dt_au": 0.5}, {"dt_au": 0.5, "x": 1}]


def test_ensemble_ids_list_and_shared_payload():
    """Scattered ids are listed; one shared payload serves every molecule."""
    body = build_init([9, 3], [{"dt_au": 0.25}, {"dt_au": 0.25}], 1, 1, ensemble=True)
    init = parse_ensemble_init(body, 2)
    assert init.molecule_ids == [9, 3] and "payloads" not in init.data
    assert init.payloads == [{"dt_au": 0.25}] * 2
    assert init.resume is not None and init.resume["step"] == 1


def test_empty_string_is_an_empty_object():
    """An empty init string is {} (so a missing dt_au is what is reported)."""
    with pytest.raises(ProtocolError, match=r"INIT \(0 bytes\).*no 'dt_au'"):
        parse_single_init(0, b"")


@pytest.mark.parametrize(
    ("ident", "payload", "words"),
    [
        (0, b"\xff", r"INIT \(1 bytes\): the init string is not UTF-8 JSON"),
        (0, b"[1]", "JSON list, not an object"),
        (0, b'{"dt_au": Infinity}', "dt_au = inf is not allowed"),
        (0, b'{"dt_au": NaN}', "dt_au = nan is not allowed"),
        (0, b'{"dt_au": true}', "dt_au = True is not allowed"),
        (0, b'{"dt_au": "0.5"}', "dt_au = '0.5' is not allowed"),
        (0, b'{"dt_au": 0}', "dt_au = 0 is not allowed"),
        (True, b'{"dt_au": 1}', "molecule id True"),
        (-1, b'{"dt_au": 1}', "molecule id -1"),
        (
            0,
            b'{"dt_au": 1, "mxh_resume": {"version": 1, "step": true, "history": 0}}',
            "mxh_resume.step = True",
        ),
        (0, b'{"dt_au": 1, "mxh_resume": {"version": 9}}', "expected an object with version 1"),
    ],
)
def test_single_refuses(ident, payload, words):
    """A bad single INIT is a ProtocolError naming the key and the byte count."""
    with pytest.raises(ProtocolError, match=words) as info:
        parse_single_init(ident, payload)
    assert f"({len(payload)} bytes)" in str(info.value)


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (b'{"dt_au": 0.5}', "molecule_id_range or molecule_ids"),
        (b'{"molecule_id_range": [0, 3], "dt_au": 0.5}', "this driver hosts 2"),
        (b'{"molecule_ids": [1, 1], "dt_au": 0.5}', "1 distinct"),
        (b'{"molecule_ids": [true, 1], "dt_au": 0.5}', r"molecule_ids\[0\] = True"),
        (b'{"molecule_ids": [0, -1], "dt_au": 0.5}', r"molecule_ids\[1\] = -1"),
        (b'{"molecule_ids": [0, 1.0], "dt_au": 0.5}', r"molecule_ids\[1\] = 1.0"),
        (b'{"molecule_ids": "01", "dt_au": 0.5}', "molecule_ids is JSON str"),
        (b'{"molecule_id_range": [0, true], "dt_au": 0.5}', "molecule_id_range = "),
        (b'{"molecule_id_range": [0, 2]}', "molecule 0: dt_au = None"),
        (b'{"molecule_id_range": [0, 2], "dt_au": Infinity}', "molecule 0: dt_au = inf"),
        (
            b'{"molecule_id_range": [0, 2], "dt_au": 1, "payloads": [{"dt_au": 1}]}',
            "list of 2 JSON objects",
        ),
        (
            b'{"molecule_id_range": [0, 2], "dt_au": 1, "payloads": [{"dt_au": 1}, {"dt_au": -1}]}',
            "molecule 1: dt_au = -1",
        ),
    ],
)
def test_ensemble_refuses(payload, words):
    """A bad ensemble INIT is a ProtocolError naming the key, molecule and byte count."""
    with pytest.raises(ProtocolError, match=words) as info:
        parse_ensemble_init(payload, 2)
    assert f"{len(payload)} bytes)" in str(info.value)


def test_ensemble_keys_are_not_model_keys():
    """molecule_id, the offer and the id keys never reach a molecule's payload."""
    body = build_init([0, 1], [{"dt_au": 1, "k": 2}] * 2, 0, 0, ensemble=True)
    init = parse_ensemble_init(body, 2, "this relay")
    assert init.payloads == [{"dt_au": 1, "k": 2}] * 2
    assert RESUME_KEY in init.data
