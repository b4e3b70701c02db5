"""The TOML configuration of ``maxwellhub run``: parsing and validation, nothing else.

Every mistake is reported before anything starts, as a :class:`ConfigError` naming the
key (dotted, e.g. ``molecules[1].sigma``) and what is allowed. Example (the 2D default)::

    [simulation]
    dimensions = 2            # 1, 2 or 3
    cell = [8.0, 8.0]         # Meep length units, one per dimension
    resolution = 10
    pml = 3.0
    time_units_fs = 0.1
    until = 90                # Meep time units

    [transport]
    kind = "unix"             # unix (default), tcp or embedded
    molecules_per_driver = 1  # > 1: ensemble drivers hosting up to this many molecules
    drivers = "local"         # local: the run starts its drivers; external: you start them
                              # (another job, other nodes), they find the hub through
    address_file = "out/hub.json"   # the rendezvous file (maxwellhub-driver --address-file)
    secret_file = "hub.secret"      # optional: drivers must prove they hold this secret

    [[molecules]]
    model = "tls"
    position = [0.0, 0.0]     # or positions = [[x, y], ...]
    count = 1                 # copies at `position`
    sigma = 0.1               # Gaussian width; 0 = point kernel
    axis = "z"
    [molecules.params]        # the model's own parameters (a.u.); file paths are relative
    omega = 0.242             # to this file's directory
    mu12 = 187.0
    pe_initial = 1e-4

    [output]
    directory = "out/relax_2d"

    [em]                      # optional: the EM engine; "meep" (default), "cavity",
    engine = "meep"           # "multimode" or "laser"; non-Meep engines take
                              # [simulation] dt_au and until (a.u.) and their own table
                              # [em.cavity] / [em.multimode] / [em.laser]; Meep's keys
                              # may also sit in [em.meep] instead of [simulation]

    [checkpoint]              # optional: whole-run checkpoints (maxwellhub run --resume DIR)
    dir = "out/relax_2d/checkpoints"
    every = 200               # steps between checkpoints; 0 = only on SIGTERM/SIGINT
    driver_every = 10         # socket drivers checkpoint every K steps (every % K == 0)
    keep = 2                  # complete checkpoints kept (the newest ones)
    restart_drivers = 3       # a socket driver that dies is restarted from its checkpoint
                              # (at most this many times in the run; 0: the run ends)
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError

__all__ = [
    "EM",
    "ENGINES",
    "Checkpoint",
    "Config",
    "ConfigError",
    "MoleculeGroup",
    "Output",
    "ScheduledChange",
    "Simulation",
    "Transport",
    "load_config",
    "parse_config",
    "parse_config_text",
]


class ConfigError(UsageError):
    """A configuration value is missing, unknown or out of range."""


@dataclass(frozen=True)
class Simulation:
    """Meep's keys (``dimensions`` 0 and empty ``cell`` for the other engines), ``until``
    (Meep time units, or a.u. for the other engines) and ``dt_au`` (non-Meep engines)."""

    dimensions: int
    cell: tuple[float, ...]
    resolution: float
    pml: float
    time_units_fs: float
    until: float
    dt_au: float | None = None


ENGINES = ("meep", "cavity", "multimode", "laser")
_MEEP_KEYS = ("dimensions", "cell", "resolution", "pml", "time_units_fs")


@dataclass(frozen=True)
class EM:
    """The ``[em]`` table: the engine and its own table's keys (non-Meep engines; the
    engine's constructor validates them: :func:`maxwellhub.em.engines.build_engine`)."""

    engine: str = "meep"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Transport:
    kind: str = "unix"
    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    timeout: float | None = None  # None: no deadline; a dead driver is seen by its socket
    molecules_per_driver: int = 1
    secret_file: str | None = None  # shared secret: the hub requires it (HMAC challenge)
    drivers: str = "local"  # "external": started by the user, not by the run
    address_file: str | None = None  # where the hub publishes its address (rendezvous)


@dataclass(frozen=True)
class MoleculeGroup:
    model: str
    positions: tuple[tuple[float, ...], ...]
    sigma: float = 0.1
    axis: str = "z"
    rescaling: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Output:
    directory: Path
    record_every: int = 1
    plot: bool = True


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    every: int = 0  # steps between checkpoints; 0: only on SIGTERM/SIGINT
    driver_every: int = 1  # socket drivers' own checkpoint interval K
    keep: int = 2  # complete run checkpoints kept
    restart_drivers: int = 3  # dead socket drivers restarted from their checkpoints


@dataclass(frozen=True)
class ScheduledChange:
    """One ``[[schedule]]`` entry: before Meep step ``step`` the molecules ``molecules``
    (ids; None: all) get parameter ``changes`` or an impulsive ``kick`` (a.u.)."""

    step: int
    molecules: tuple[int, ...] | None
    changes: dict[str, Any] = field(default_factory=dict)
    kick: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Config:
    simulation: Simulation
    transport: Transport
    molecules: tuple[MoleculeGroup, ...]
    output: Output
    source: Path | None = None
    checkpoint: Checkpoint | None = None
    text: str = ""  # the TOML document as read (before --set overrides)
    overrides: dict[str, Any] = field(default_factory=dict)  # --set KEY=VALUE applied
    # where relative paths among the models' parameters are resolved: the config file's
    # directory (None: the current directory)
    base_dir: Path | None = None
    schedule: tuple[ScheduledChange, ...] = ()
    em: EM = EM()

    @property
    def steps_total(self) -> int:
        """Steps from 0 to ``simulation.until`` (Courant factor 0.5 for Meep, the one
        :func:`maxwellhub.runner.build_simulation` uses)."""
        s = self.simulation
        if self.em.engine == "meep":
            return round(s.until / (0.5 / s.resolution))
        assert s.dt_au is not None  # parse_config sets it for every non-Meep engine
        return round(s.until / s.dt_au)

    @property
    def molecule_count(self) -> int:
        return sum(len(g.positions) for g in self.molecules)


_TRANSPORTS = ("unix", "tcp", "embedded")
_AXES = ("x", "y", "z", "xy", "xz", "yz", "xyz")


class _Table:
    """A TOML table being validated: typed getters that name the key on error."""

    def __init__(self, data: Any, where: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where or 'the file'} must be a table, got {data!r}")
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown key {self._key(where, unknown[0])}; allowed keys "
                f"in {where or 'the top level'}: {', '.join(allowed)}"
            )
        self.data = data
        self.where = where

    @staticmethod
    def _key(where: str, key: str) -> str:
        return f"{where}.{key}" if where else key

    def key(self, key: str) -> str:
        return self._key(self.where, key)

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise ConfigError(f"missing key {self.key(key)}")
            return default
        return self.data[key]

    def number(
        self,
        key: str,
        default: Any = ...,
        *,
        low: float | None = None,
        low_open: bool = False,
        integer: bool = False,
    ) -> Any:
        value = self.get(key, default)
        kind = "an integer" if integer else "a number"
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            raise ConfigError(f"{self.key(key)} = {value!r}; expected {kind}")
        if low is not None and (value <= low if low_open else value < low):
            raise ConfigError(
                f"{self.key(key)} = {value!r}; expected {kind} {'>' if low_open else '>='} {low:g}"
            )
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: Any = ...) -> str:
        value = self.get(key, default)
        if value not in choices:
            raise ConfigError(f"{self.key(key)} = {value!r}; allowed: {', '.join(choices)}")
        return value

    def vector(self, key: str, length: int, value: Any = ...) -> tuple[float, ...]:
        value = self.get(key) if value is ... else value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and length == 1:
            value = [value]
        if (
            not isinstance(value, list)
            or len(value) != length
            or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                for x in value
            )
        ):
            raise ConfigError(
                f"{self.key(key)} = {value!r}; expected a list of {length} "
                "numbers (one per dimension)"
            )
        return tuple(float(x) for x in value)


def parse_config(data: dict, source: Path | None = None) -> Config:
    """Validate a parsed TOML document."""
    top = _Table(
        data,
        "",
        ("simulation", "transport", "molecules", "output", "checkpoint", "schedule", "em"),
    )
    em, meep_table = _em(top)
    simulation = _simulation(top, em.engine, meep_table)
    transport = _transport(top)
    groups = _molecule_groups(top, simulation.dimensions, em.engine)
    output = _output(top)
    checkpoint = _checkpoint(top.get("checkpoint")) if top.has("checkpoint") else None
    schedule = _schedule(top.get("schedule", []), transport)
    return Config(
        simulation, transport, groups, output, source, checkpoint, schedule=schedule, em=em
    )


def _em(top: _Table) -> tuple[EM, dict]:
    """``[em]``: the engine, its table, and Meep's keys given in ``[em.meep]``."""
    t = _Table(top.get("em", {}), "em", ("engine", *ENGINES))
    engine = t.choice("engine", ENGINES, "meep")
    for other in ENGINES:
        if other != engine and t.has(other):
            raise ConfigError(f"em.{other} is given but em.engine = {engine!r}")
    table = t.get(engine, {})
    if not isinstance(table, dict):
        raise ConfigError(f"em.{engine} must be a table")
    if engine == "meep":
        return EM("meep"), table
    return EM(engine, dict(table)), {}


def _schedule(raw: Any, transport: Transport) -> tuple[ScheduledChange, ...]:
    """``[[schedule]]``: parameter changes and kicks at given steps (the structure only;
    :func:`maxwellhub.runner.validate_models` checks them against the models)."""
    if not isinstance(raw, list):
        raise ConfigError("schedule must be an array of tables ([[schedule]])")
    del transport  # embedded and socket molecules alike (socket ones over the wire)
    entries = []
    for i, item in enumerate(raw):
        where = f"schedule[{i}]"
        t = _Table(item, where, ("step", "molecules", "changes", "kick"))
        step = t.number("step", low=1, integer=True)
        if t.has("changes") == t.has("kick"):
            raise ConfigError(f"{where}: give exactly one of changes (a table) or kick")
        molecules = t.get("molecules", "all")
        if molecules == "all":
            ids = None
        elif (
            isinstance(molecules, list)
            and molecules
            and all(isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in molecules)
        ):
            ids = tuple(molecules)
        else:
            raise ConfigError(
                f'{where}.molecules = {molecules!r}; expected "all" or a list of molecule ids'
            )
        changes = t.get("changes", {})
        if not isinstance(changes, dict) or (t.has("changes") and not changes):
            raise ConfigError(f"{where}.changes must be a table of parameter = value")
        kick = tuple(t.vector("kick", 3)) if t.has("kick") else None
        entries.append(ScheduledChange(int(step), ids, dict(changes), kick))
    return tuple(entries)


def _simulation(top: _Table, engine: str, meep_table: dict) -> Simulation:
    if engine != "meep":
        return _engine_simulation(top, engine)
    raw = top.get("simulation")
    if not isinstance(raw, dict):
        raise ConfigError(f"simulation must be a table, got {raw!r}")
    _Table(meep_table, "em.meep", _MEEP_KEYS)  # names an unknown key there
    both = sorted(set(raw) & set(meep_table))
    if both:
        raise ConfigError(f"simulation.{both[0]} and em.meep.{both[0]} are both given")
    sim_t = _Table({**raw, **meep_table}, "simulation", (*_MEEP_KEYS, "until"))
    dims = sim_t.number("dimensions", integer=True)
    if dims not in (1, 2, 3):
        raise ConfigError(f"simulation.dimensions = {dims}; allowed: 1, 2, 3")
    cell = sim_t.vector("cell", dims)
    if min(cell) <= 0:
        raise ConfigError(f"simulation.cell = {list(cell)}; every size must be > 0")
    pml = sim_t.number("pml", 0.0, low=0.0)
    if min(cell) <= 2 * pml:
        raise ConfigError(
            f"simulation.pml = {pml:g} leaves no interior in a cell of "
            f"{list(cell)}; need 2*pml < every cell size"
        )
    return Simulation(
        dimensions=dims,
        cell=cell,
        pml=float(pml),
        resolution=float(sim_t.number("resolution", low=0.0, low_open=True)),
        time_units_fs=float(sim_t.number("time_units_fs", 0.1, low=0.0, low_open=True)),
        until=float(sim_t.number("until", low=0.0, low_open=True)),
    )


def _engine_simulation(top: _Table, engine: str) -> Simulation:
    """``[simulation]`` of a non-Meep engine: ``dt_au`` and ``until`` (a.u.)."""
    raw = top.get("simulation")
    if isinstance(raw, dict):
        meep_only = sorted(set(raw) & set(_MEEP_KEYS))
        if meep_only:
            raise ConfigError(
                f"simulation.{meep_only[0]} is a Meep key; em.engine = {engine!r} takes "
                "simulation.dt_au and simulation.until (a.u.)"
            )
    sim_t = _Table(raw, "simulation", ("dt_au", "until"))
    dt = float(sim_t.number("dt_au", low=0.0, low_open=True))
    until = float(sim_t.number("until", low=0.0, low_open=True))
    if until < dt:
        raise ConfigError(f"simulation.until = {until:g} is shorter than one step (dt_au = {dt:g})")
    return Simulation(
        dimensions=0, cell=(), resolution=0.0, pml=0.0, time_units_fs=0.1, until=until, dt_au=dt
    )


def _transport(top: _Table) -> Transport:
    tr_t = _Table(
        top.get("transport", {}),
        "transport",
        (
            "kind",
            "name",
            "host",
            "port",
            "timeout",
            "molecules_per_driver",
            "secret_file",
            "drivers",
            "address_file",
        ),
    )
    kind = tr_t.choice("kind", _TRANSPORTS, "unix")
    name = tr_t.get("name", None)
    if name is not None and (not isinstance(name, str) or not name):
        raise ConfigError(f"transport.name = {name!r}; expected a non-empty string")
    host = tr_t.get("host", "127.0.0.1")
    if not isinstance(host, str):
        raise ConfigError(f"transport.host = {host!r}; expected a string")
    port = tr_t.number("port", 0, low=0, integer=True)
    if port > 65535:
        raise ConfigError(f"transport.port = {port}; expected 0..65535 (0 = any free port)")
    secret_file = tr_t.get("secret_file", None)
    if secret_file is not None and (not isinstance(secret_file, str) or not secret_file):
        raise ConfigError(
            f"transport.secret_file = {secret_file!r}; expected the path of an "
            "owner-only file holding the shared secret"
        )
    drivers = tr_t.choice("drivers", ("local", "external"), "local")
    address_file = tr_t.get("address_file", None)
    if address_file is not None and (not isinstance(address_file, str) or not address_file):
        raise ConfigError(f"transport.address_file = {address_file!r}; expected a file path")
    if kind == "embedded" and (drivers == "external" or address_file is not None):
        raise ConfigError(
            "transport.drivers/address_file need socket drivers; "
            "transport.kind = 'embedded' has none"
        )
    return Transport(
        kind=kind,
        name=name,
        host=host,
        port=port,
        secret_file=secret_file,
        drivers=drivers,
        address_file=address_file,
        timeout=(
            float(tr_t.number("timeout", low=0.0, low_open=True)) if tr_t.has("timeout") else None
        ),
        molecules_per_driver=tr_t.number("molecules_per_driver", 1, low=1, integer=True),
    )


def _engine_positions(g: _Table, where: str) -> tuple[tuple[float, ...], ...]:
    """Positions of a non-Meep engine's group: optional (count molecules without a
    position), 1 to 3 coordinates (a.u.; multimode reads the first)."""
    if g.has("sigma") or g.has("axis"):
        key = "sigma" if g.has("sigma") else "axis"
        raise ConfigError(f"{where}.{key} applies to the Meep engine only")
    if g.has("position") and g.has("positions"):
        raise ConfigError(f"{where}: give at most one of position (with count) or positions")
    if g.has("positions"):
        if g.has("count"):
            raise ConfigError(f"{where}.count goes with position, not positions")
        plist = g.get("positions")
        if not isinstance(plist, list) or not plist:
            raise ConfigError(f"{where}.positions must be a non-empty list of points")
        points = []
        for p in plist:
            n = len(p) if isinstance(p, list) else 1
            points.append(g.vector("positions", min(max(n, 1), 3), p))
        return tuple(points)
    count = g.number("count", 1, low=1, integer=True)
    if not g.has("position"):
        return ((),) * count
    p = g.get("position")
    return (g.vector("position", min(max(len(p) if isinstance(p, list) else 1, 1), 3)),) * count


def _molecule_groups(top: _Table, dims: int, engine: str = "meep") -> tuple[MoleculeGroup, ...]:
    groups_raw = top.get("molecules")
    if not isinstance(groups_raw, list) or not groups_raw:
        raise ConfigError("molecules must be a non-empty array of tables ([[molecules]])")
    groups = []
    for i, raw in enumerate(groups_raw):
        where = f"molecules[{i}]"
        g = _Table(
            raw,
            where,
            ("model", "position", "positions", "count", "sigma", "axis", "rescaling", "params"),
        )
        model = g.get("model")
        if not isinstance(model, str) or not model:
            raise ConfigError(
                f"{where}.model = {model!r}; expected a model name such as "
                "'tls' or 'sho', or 'package.module:Class'"
            )
        if engine != "meep":
            positions = _engine_positions(g, where)
        elif g.has("position") == g.has("positions"):
            raise ConfigError(f"{where}: give exactly one of position (with count) or positions")
        elif g.has("position"):
            count = g.number("count", 1, low=1, integer=True)
            positions = (g.vector("position", dims),) * count
        else:
            if g.has("count"):
                raise ConfigError(f"{where}.count goes with position, not positions")
            plist = g.get("positions")
            if not isinstance(plist, list) or not plist:
                raise ConfigError(f"{where}.positions must be a non-empty list of points")
            positions = tuple(g.vector("positions", dims, p) for p in plist)
        params = g.get("params", {})
        if not isinstance(params, dict):
            raise ConfigError(f"{where}.params must be a table of model parameters")
        groups.append(
            MoleculeGroup(
                model=model,
                positions=positions,
                sigma=float(g.number("sigma", 0.1, low=0.0)),
                axis=g.choice("axis", _AXES, "z"),
                rescaling=float(g.number("rescaling", 1.0)),
                params=dict(params),
            )
        )
    return tuple(groups)


def _output(top: _Table) -> Output:
    out_t = _Table(top.get("output", {}), "output", ("directory", "record_every", "plot"))
    directory = out_t.get("directory", "out")
    if not isinstance(directory, str) or not directory:
        raise ConfigError(f"output.directory = {directory!r}; expected a path")
    plot = out_t.get("plot", True)
    if not isinstance(plot, bool):
        raise ConfigError(f"output.plot = {plot!r}; expected true or false")
    return Output(
        directory=Path(directory),
        record_every=out_t.number("record_every", 1, low=1, integer=True),
        plot=plot,
    )


def _checkpoint(raw: Any) -> Checkpoint:
    t = _Table(raw, "checkpoint", ("dir", "every", "driver_every", "keep", "restart_drivers"))
    directory = t.get("dir")
    if not isinstance(directory, str) or not directory:
        raise ConfigError(f"checkpoint.dir = {directory!r}; expected a directory path")
    every = t.number("every", 0, low=0, integer=True)
    driver_every = t.number("driver_every", 1, low=1, integer=True)
    if every and every % driver_every:
        raise ConfigError(
            f"checkpoint.every = {every} is not a multiple of "
            f"checkpoint.driver_every = {driver_every}: a run checkpoint "
            "must find every socket driver's checkpoint at its step"
        )
    return Checkpoint(
        directory=Path(directory),
        every=every,
        driver_every=driver_every,
        keep=t.number("keep", 2, low=1, integer=True),
        restart_drivers=t.number("restart_drivers", 3, low=0, integer=True),
    )


def load_config(path: str | Path, overrides: dict | None = None) -> Config:
    """Read and validate a TOML file. ``overrides`` maps dotted keys (``simulation.until``)
    to values, applied before validation (used by tests and ``--set``)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    return parse_config_text(text, path, overrides)


def parse_config_text(
    text: str,
    source: Path | None = None,
    overrides: dict | None = None,
    base_dir: Path | None = None,
) -> Config:
    """:func:`load_config` of a TOML document already read (e.g. from a checkpoint).
    ``base_dir``: where relative parameter paths are resolved (default: the directory of
    ``source``, else the current directory)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source or 'the config'} is not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        *parents, last = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {p} is not a table")
        node[last] = value
    config = parse_config(data, source)
    if base_dir is None and source is not None:
        base_dir = source.resolve().parent
    return dataclasses.replace(
        config, text=text, overrides=dict(overrides or {}), base_dir=base_dir
    )
