"""Shared-secret authentication of drivers (challenge-response with HMAC-SHA256).

The hub opens every connection with MXHAUTH (version 1, a fresh 32-byte random nonce)
instead of STATUS; the driver answers MXHPROOF with
``HMAC-SHA256(secret, b"maxwellhub-auth-v1" + nonce)``; the hub compares in constant
time and only then continues with STATUS. The frames are in
:mod:`~maxwellhub.protocol.frames`; a hub without a secret never sends them, so plain i-PI
and MaxwellLink peers never see them.

The secret comes from a file (owner-only: group or other permission bits are refused) or
from the environment variable ``MAXWELLHUB_SECRET``, never from a command line, where any
user of the machine could read it in the process list::

    from maxwellhub import SocketHub
    from maxwellhub.protocol.auth import load_secret

    hub = SocketHub(host="0.0.0.0", port=31415, auth=load_secret("~/.maxwellhub.secret"))

It opens no socket (the connection machine, :mod:`maxwellhub.protocol.connection`, checks
proofs with it, so it lives in the sans-I/O layer; its only I/O is reading the secret file
when asked). This module never logs, prints or reprs the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import stat
from typing import NoReturn

from ..errors import UsageError
from .frames import AUTH_NONCE_SIZE

__all__ = ["SECRET_ENV", "Secret", "is_loopback", "load_secret", "new_nonce"]

#: The environment variable a secret may come from (hub and drivers).
SECRET_ENV = "MAXWELLHUB_SECRET"

_CONTEXT = b"maxwellhub-auth-v1"  # binds a proof to this protocol and version
_MAX_FILE_BYTES = 1 << 16


class Secret:
    """A shared secret. Its value never appears in ``repr``, logs or argv."""

    __slots__ = ("_key", "source")

    def __init__(self, key: bytes, source: str = "memory") -> None:
        if not isinstance(key, bytes | bytearray):
            raise UsageError(f"a secret is bytes, not {type(key).__name__}")
        if not key:
            raise UsageError(f"the secret from {source} is empty")
        self._key = bytes(key)
        #: Where the secret came from (a path or ``$MAXWELLHUB_SECRET``), for messages.
        self.source = source

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Secret:
        """The contents of ``path`` minus trailing newlines; the file must be owner-only
        (no group or other permission bits, as ``chmod 600``)."""
        path = os.path.expanduser(os.fspath(path))
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode  # of the file actually opened
                if not stat.S_ISREG(mode):
                    raise UsageError(f"secret file {path} is not a regular file")
                if mode & 0o077:
                    raise UsageError(
                        f"secret file {path} has mode {stat.S_IMODE(mode):04o}: it must not "
                        f"be readable or writable by group or others; run chmod 600 {path}"
                    )
                key = f.read(_MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"cannot read secret file {path}: {exc.strerror or exc}") from None
        if len(key) > _MAX_FILE_BYTES:
            raise UsageError(f"secret file {path} is larger than {_MAX_FILE_BYTES} bytes")
        return cls(key.rstrip(b"\r\n"), source=path)

    @classmethod
    def from_env(cls, name: str = SECRET_ENV) -> Secret | None:
        """The secret in environment variable ``name``, or None when unset or empty."""
        value = os.environ.get(name)
        return cls(os.fsencode(value), source=f"${name}") if value else None

    def proof(self, nonce: bytes) -> bytes:
        """The 32-byte MXHPROOF answer to ``nonce``."""
        return hmac.new(self._key, _CONTEXT + bytes(nonce), hashlib.sha256).digest()

    def verify(self, nonce: bytes, proof: bytes) -> bool:
        """True when ``proof`` answers ``nonce`` (constant-time comparison)."""
        return hmac.compare_digest(self.proof(nonce), bytes(proof))

    def environ(self) -> dict[str, str]:
        """``{MAXWELLHUB_SECRET: value}`` to hand the secret to a driver subprocess."""
        return {SECRET_ENV: os.fsdecode(self._key)}

    def __repr__(self) -> str:
        return f"Secret(source={self.source!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret is not picklable")


def load_secret(
    secret_file: str | os.PathLike[str] | None = None, *, env: str | None = SECRET_ENV
) -> Secret | None:
    """The secret from ``secret_file`` if given, else from environment variable ``env``
    (default ``MAXWELLHUB_SECRET``; None to ignore the environment); None when neither
    holds one. A bad file raises :class:`~maxwellhub.errors.UsageError`."""
    if secret_file is not None:
        return Secret.from_file(secret_file)
    return Secret.from_env(env) if env else None


def new_nonce() -> bytes:
    """A fresh random challenge (32 bytes from the OS's CSPRNG)."""
    return secrets.token_bytes(AUTH_NONCE_SIZE)


def is_loopback(host: str | None) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if not host:
        return False  # "" binds every interface
    if host.lower() in ("localhost", "ip6-localhost", "ip6-loopback"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
