"""Validation of `maxwellhub run` configs: every mistake names the key and what is allowed."""

from __future__ import annotations

import copy
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from _util import REPO_ROOT, scaled

from maxwellhub.run.config import ConfigError, load_config, parse_config

EXAMPLES = REPO_ROOT / "examples"
BASE = tomllib.loads((EXAMPLES / "relax_2d.toml").read_text())


def with_change(path: str, value):
    data = copy.deepcopy(BASE)
    node: Any = data  # a walk through the TOML tree: tables and arrays
    *parents, last = path.split(".")
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


def test_examples_parse():
    """Every example config parses."""
    paths = sorted([*EXAMPLES.glob("*.toml"), *EXAMPLES.glob("engines/*.toml")])
    assert len(paths) >= 10, paths  # an empty glob must not pass
    for path in paths:
        cfg = load_config(path)
        assert cfg.molecule_count >= 1, path


@pytest.mark.parametrize(
    "path,value,message",
    [
        ("simulation.dimensions", 4, "simulation.dimensions = 4; allowed: 1, 2, 3"),
        ("simulation.cell", [8.0], "simulation.cell = [8.0]; expected a list of 2 numbers"),
        ("simulation.resolution", 0, "simulation.resolution = 0; expected a number > 0"),
        ("simulation.resolution", "ten", "simulation.resolution = 'ten'; expected a number"),
        ("simulation.pml", 4.0, "simulation.pml = 4 leaves no interior"),
        ("simulation.until", ..., "missing key simulation.until"),
        ("simulation.colour", 1, "unknown key simulation.colour; allowed keys in simulation"),
        (
            "transport.kind",
            "carrier pigeon",
            "transport.kind = 'carrier pigeon'; allowed: unix, tcp, embedded",
        ),
        ("transport.port", 70000, "transport.port = 70000; expected 0..65535"),
        ("molecules.0.axis", "w", "molecules[0].axis = 'w'; allowed: x, y, z"),
        ("molecules.0.sigma", -1, "molecules[0].sigma = -1; expected a number >= 0"),
        ("molecules.0.position", [0.0], "molecules[0].position = [0.0]; expected a list of 2"),
        ("molecules.0.count", 0, "molecules[0].count = 0; expected an integer >= 1"),
        ("molecules.0.model", 3, "molecules[0].model = 3; expected a model name"),
        ("output.plot", "yes", "output.plot = 'yes'; expected true or false"),
    ],
)
def test_bad_values_name_the_key(path, value, message):
    """A bad value is refused with the dotted key and what is allowed."""
    with pytest.raises(ConfigError) as info:
        parse_config(with_change(path, value))
    assert message in str(info.value)


def test_position_and_positions_are_exclusive():
    """Exactly one of position/positions."""
    data = with_change("molecules.0.positions", [[0.0, 0.0]])
    with pytest.raises(ConfigError, match="exactly one of position"):
        parse_config(data)


def test_cli_refuses_bad_config_before_starting(tmp_path):
    """`maxwellhub run` exits 2 with the key named, without starting anything."""
    bad = tmp_path / "bad.toml"
    text = (EXAMPLES / "relax_2d.toml").read_text().replace("pe_initial = 1e-4", "pe_initial = 1.5")
    bad.write_text(text)
    exe = Path(sys.executable).with_name("maxwellhub")
    proc = subprocess.run(
        [str(exe), "run", str(bad)], capture_output=True, text=True, timeout=scaled(60)
    )
    assert proc.returncode == 2
    assert "molecules[0]" in proc.stderr and "pe_initial" in proc.stderr
    assert not (tmp_path / "out").exists()
