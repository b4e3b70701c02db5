"""Narrowing decoded events for the type checker: ``Decoder.feed`` returns a list of the
event union, and a test that expects one kind says which, checked at run time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def as_kind(event: object, kind: type[T]) -> T:
    """Return ``event``, asserting it is a ``kind``."""
    assert isinstance(event, kind), f"expected {kind.__name__}, got {event!r}"
    return event


def one(events: Sequence[object], kind: type[T]) -> T:
    """Return the only event of ``events``, asserting there is one and it is a ``kind``."""
    assert len(events) == 1, f"expected one {kind.__name__}, got {events!r}"
    return as_kind(events[0], kind)
