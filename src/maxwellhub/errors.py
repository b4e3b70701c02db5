"""The exceptions of maxwellhub: one root, local misuse kept apart from remote misbehaviour.

- :class:`ProtocolError` means a *peer* sent something wrong (bad bytes, a message out of
  turn, a value over a limit). It names the peer's field and the numbers involved.
- :class:`BarrierTimeout` and :class:`DriverLost` are what a caller of the hub sees when
  molecules do not answer in time.
- Misuse of the API by the local caller raises plain ``ValueError``/``RuntimeError``
  subclasses of :class:`MaxwellHubError` (:class:`UsageError`).
"""

from __future__ import annotations


class MaxwellHubError(Exception):
    """Root of every error raised by maxwellhub."""


class ProtocolError(MaxwellHubError, ValueError):
    """A peer broke the wire protocol (remote misbehaviour)."""


class UsageError(MaxwellHubError, ValueError):
    """The local caller used the API wrongly (local misuse)."""


class BarrierTimeout(MaxwellHubError, TimeoutError):
    """A barrier step did not complete before its deadline.

    ``missing`` lists the molecule ids whose sources never arrived.
    """

    def __init__(self, message: str, missing: list[int] | tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.missing = sorted(missing)


class DriverLost(MaxwellHubError, ConnectionError):
    """A driver connection was lost and the caller asked not to wait for a replacement.

    ``molecules`` lists the ids left without a driver.
    """

    def __init__(self, message: str, molecules: list[int] | tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.molecules = sorted(molecules)
