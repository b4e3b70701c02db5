"""A run's config checked against its models and its engine before anything starts.

:func:`validate_models` asks each group's model class to validate its parameters
(cheaply: no model is built, no SCF runs) and checks every ``[[schedule]]`` entry
against the models of the molecules it names; a non-Meep engine is built once to check
its table. Errors are :class:`~maxwellhub.run.config.ConfigError` naming the config key.
It never starts a process, opens a socket or writes a file.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ..errors import UsageError
from .config import Config, ConfigError, ScheduledChange

__all__ = ["validate_models"]


def validate_models(config: Config) -> Config:
    """Check every group's model parameters without building a model (a model such as
    rttddft would run its SCF here, in the EM process, before any driver starts): the
    config with each group's parameters as the model validated them (canonical spellings,
    paths made absolute against ``config.base_dir``), which drivers and embedded models
    then receive. A bad one is a ConfigError naming ``molecules[i].params.<key>``."""
    from maxwellhub.models import ParameterError, get_model_class

    base_dir = config.base_dir or Path.cwd()
    groups = []
    for i, g in enumerate(config.molecules):
        try:
            cls = get_model_class(g.model)
        except (ValueError, ImportError, LookupError) as exc:
            raise ConfigError(f"molecules[{i}].model: {exc}") from None
        try:
            params = cls.validate_params(len(g.positions), base_dir=base_dir, **g.params)
        except ParameterError as exc:
            where = f"molecules[{i}].params" + (f".{exc.key}" if exc.key else "")
            raise ConfigError(f"{where}: {exc}") from None
        except (ValueError, TypeError, OSError) as exc:  # a model's own cross check
            raise ConfigError(f"molecules[{i}].params: {exc}") from None
        groups.append(dataclasses.replace(g, params=params))
    if config.em.engine != "meep":
        from ..em.engines import build_engine

        try:  # cheap: an engine is a few arrays until the run sets it up
            build_engine(config.em.engine, config.em.params, base_dir)
        except UsageError as exc:
            raise ConfigError(_em_message(config.em.engine, str(exc))) from None
    classes = [get_model_class(g.model) for g in config.molecules]
    schedule = tuple(
        _checked_change(config, classes, i, entry) for i, entry in enumerate(config.schedule)
    )
    return dataclasses.replace(
        config, molecules=tuple(groups), base_dir=base_dir, schedule=schedule
    )


def _em_message(engine: str, message: str) -> str:
    """An engine's error as the config names its keys: ``laser.pulse`` -> ``em.laser.pulse``."""
    named = re.sub(rf"(?<![\w.]){engine}\.", f"em.{engine}.", message)
    return named if named != message else f"em.{engine}: {message}"


def _checked_change(config: Config, classes: list, i: int, entry: ScheduledChange):
    """``schedule[i]`` checked against the models of the molecules it names (ids, the
    step, mutability and values, kicks): the entry with canonical parameter values, or a
    ConfigError naming ``schedule[i]`` and the key."""
    from maxwellhub.models import ParameterError

    where = f"schedule[{i}]"
    total = config.molecule_count
    steps = config.steps_total
    if entry.step > steps:
        raise ConfigError(f"{where}.step = {entry.step}: the run ends at step {steps}")
    ids = range(total) if entry.molecules is None else entry.molecules
    bad = [m for m in ids if m >= total]
    if bad:
        raise ConfigError(
            f"{where}.molecules: no molecule with id {bad[0]} (the run has ids 0..{total - 1})"
        )
    first, changes = 0, {}
    for g, cls in zip(config.molecules, classes, strict=True):
        rows = [m - first for m in ids if first <= m < first + len(g.positions)]
        first += len(g.positions)
        if not rows:
            continue
        if entry.kick is not None and not cls.takes_kicks():
            raise ConfigError(f"{where}.kick: model {g.model!r} takes no kicks")
        try:
            changes = cls.check_changes(entry.changes, len(rows))
        except ParameterError as exc:
            raise ConfigError(f"{where}.changes.{exc.key}: {exc}") from None
    if entry.kick is not None:
        return entry
    return dataclasses.replace(entry, changes=changes)
