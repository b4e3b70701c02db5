"""The control endpoint of a running hub: line-delimited JSON on its own socket.

A client (``maxwellhub status|ping|stop CONTROL``, ``nc -U``, anything) sends one JSON
request per line and gets one JSON line back per request, many per connection:

=====================================  ==================================================
request                                answer
=====================================  ==================================================
``{"Ping": n}``                        ``{"Pong": n}`` (n any JSON number)
``{"Status": null}`` or ``"Status"``   ``{"Status": {...}}``: step, molecules, bound and
                                       missing ids (counts, first 100 ids), connections,
                                       per-step time ``{last, mean, p99}`` in ms over the
                                       last 10,000 steps, ``slowest_molecules`` (the ids
                                       most often last to answer a step, top 5)
``{"Stop": {"token": "..."}}``         ``{"Stopping": true}``; the current and every later
                                       barrier call ends (:meth:`Hub.request_stop`), the
                                       run writes its output and stops its drivers
``{"SetParams": {"token": "...",``     ``{"Queued": {"requested": k, "step": s}}``: a
``"molecules": [ids], "changes":``     parameter change (or a kick: ``"kick": [x, y, z]``
``{name: value}}}``                    in a.u. instead of ``"changes"``) of socket
                                       molecules, queued for the next step boundary, where
                                       the coupling (``maxwellhub run``) sends it to their
                                       drivers (:meth:`Hub.apply_requested_params`); a
                                       refusal is logged naming molecule and parameter
=====================================  ==================================================

Errors are ``{"type": "Error", "code": N, "message": "..."}``:

====  ============================================================================
1000  malformed request: not UTF-8, not JSON, or not an object / request name
1100  unknown request (the message names it)
1200  bad argument (the message names the request and the argument)
1300  authentication failed: the Stop token (also SetParams') is missing or wrong
1400  line longer than 64 KiB; the connection is closed after this answer
====  ============================================================================

Addresses: a bare name ``run1`` is the UNIX socket ``/tmp/maxwellhub_control_run1``, a
path (with a ``/``) is used as given, ``host:port`` is TCP. A UNIX socket is created 0600.
The Stop token is a random secret written (0600, temporary file + fsync + rename) to
``<socket path>.token`` (TCP: ``/tmp/maxwellhub_control_<host>_<port>.token``); the
``maxwellhub stop`` client reads it from there, never from the command line.

When it is served: on the hub's event loop. With the async :class:`~maxwellhub.Hub` that is
whenever the loop runs. With the synchronous :class:`~maxwellhub.SocketHub` the loop runs
only while one of its methods waits -- inside every barrier step and every bind -- so a
running Meep job answers within one time step; between steps requests wait in the kernel.

This module never lets a client disturb the hub: every bad request is answered or its
connection closed with one log line naming the peer; at most 64 connections are served at
once (more are refused), input is read no faster than answers are taken away, and nothing
a client sends is evaluated beyond ``json.loads``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from ..fsutil import atomic_write
from ..net.unix import bind_owner_only, remove_if_ours

__all__ = [
    "AUTH_FAILED",
    "BAD_ARGUMENT",
    "CONTROL_PREFIX",
    "LINE_TOO_LONG",
    "MALFORMED",
    "MAX_CONNECTIONS",
    "MAX_LINE",
    "UNKNOWN_REQUEST",
    "ControlError",
    "ControlServer",
    "control_address",
    "request",
    "token_path",
]

log = logging.getLogger("maxwellhub.control")

CONTROL_PREFIX = "/tmp/maxwellhub_control_"
MAX_LINE = 64 * 1024  # bytes per request line, newline excluded
MAX_CONNECTIONS = 64
IDLE_TIMEOUT = 120.0  # seconds a connection may stay without a complete request
STATUS_IDS = 100  # ids listed per bound/missing list in a Status answer

MALFORMED = 1000
UNKNOWN_REQUEST = 1100
BAD_ARGUMENT = 1200
AUTH_FAILED = 1300
LINE_TOO_LONG = 1400

_TCP = re.compile(r"(?P<host>\[[^\]]+\]|[^:/\[\]]+):(?P<port>\d{1,5})")


class ControlError(Exception):
    """A request the control endpoint refuses; becomes an ``Error`` answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code

    def answer(self) -> dict:
        return {"type": "Error", "code": self.code, "message": str(self)}


# ---------------------------------------------------------------- addresses


def control_address(spec: str | os.PathLike) -> str | tuple[str, int]:
    """A UNIX socket path for a bare name or a path, ``(host, port)`` for ``host:port``."""
    text = os.fspath(spec)
    if not text:
        raise ValueError("a control address must not be empty")
    if os.sep not in text and (m := _TCP.fullmatch(text)):
        port = int(m["port"])
        if port > 65535:
            raise ValueError(f"control address {text!r}: port {port} is out of range")
        return m["host"].strip("[]"), port
    path = str(Path(text).absolute()) if os.sep in text else CONTROL_PREFIX + text
    if len(os.fsencode(path)) > 107:  # sun_path holds 108 bytes with the terminating NUL
        raise ValueError(f"control socket path {path!r} is longer than 107 bytes")
    return path


def token_path(address: str | tuple[str, int]) -> Path:
    """Where the hub at ``address`` keeps its Stop token."""
    if isinstance(address, str):
        return Path(address + ".token")
    host, port = address
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", host)
    return Path(tempfile.gettempdir()) / f"maxwellhub_control_{safe}_{port}.token"


def _write_secret(path: Path, secret: str) -> tuple[int, int]:
    """Write ``secret`` owner-only and atomically; returns the file's (dev, inode)."""
    atomic_write(path, (secret + "\n").encode())  # mode 0600
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _unlink_if_same(path: str | Path, inode: tuple[int, int] | None) -> None:
    """Remove ``path`` only if it is still the file we made (a later hub may own it)."""
    if inode is None:
        return
    with contextlib.suppress(FileNotFoundError):
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)


# ---------------------------------------------------------------- requests (no I/O)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_request(line: bytes) -> tuple[str, Any]:
    """``(name, argument)`` of one request line; :class:`ControlError` 1000 if malformed."""
    try:
        obj = json.loads(line.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise ControlError(MALFORMED, "malformed request: not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise ControlError(MALFORMED, f"malformed request: {str(exc)[:200]}") from None
    if isinstance(obj, str):
        return obj, None
    if not isinstance(obj, dict):
        raise ControlError(
            MALFORMED, f"malformed request: expected a JSON object, got {type(obj).__name__}"
        )
    if len(obj) != 1:
        raise ControlError(
            MALFORMED,
            "malformed request: expected an object with exactly "
            f"one request name, got {len(obj)} keys",
        )
    ((name, argument),) = obj.items()
    return name, argument


class Handler:
    """Answers requests for one hub; holds its Stop token. Plain calls, no sockets."""

    def __init__(self, hub, token: str) -> None:
        self.hub = hub
        self._token = token.encode()

    def answer(self, line: bytes) -> dict:
        """The answer to one request line (errors included)."""
        try:
            name, argument = parse_request(line)
            method = _REQUESTS.get(name)
            if method is None:
                raise ControlError(
                    UNKNOWN_REQUEST,
                    f"unknown request {name[:100]!r}; known: " + ", ".join(sorted(_REQUESTS)),
                )
            return method(self, argument)
        except ControlError as exc:
            return exc.answer()

    def _ping(self, n: Any) -> dict:
        if not _number(n) or (isinstance(n, float) and not math.isfinite(n)):
            raise ControlError(
                BAD_ARGUMENT, f"Ping: argument must be a finite number, got {json.dumps(n)[:100]}"
            )
        return {"Pong": n}

    def _status(self, argument: Any) -> dict:
        if argument not in (None, {}):
            raise ControlError(BAD_ARGUMENT, "Status: takes no argument (null)")
        status = self.hub.status(most=STATUS_IDS)
        status["stop_requested"] = self.hub.stop_requested
        return {"Status": status}

    def _authenticate(self, name: str, argument: Any) -> dict:
        if not isinstance(argument, dict):
            raise ControlError(
                BAD_ARGUMENT, f'{name}: argument must be {{"token": "...", ...}} (an object)'
            )
        token = argument.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(
            token.encode("utf-8", "surrogatepass"), self._token
        ):
            raise ControlError(
                AUTH_FAILED, f"{name}: authentication failed (missing or wrong token)"
            )
        return argument

    def _stop(self, argument: Any) -> dict:
        self._authenticate("Stop", argument)
        self.hub.request_stop("by control request")
        return {"Stopping": True}

    def _set_params(self, argument: Any) -> dict:
        argument = self._authenticate("SetParams", argument)
        unknown = sorted(set(argument) - {"token", "molecules", "changes", "kick"})
        ids = argument.get("molecules")
        if unknown or ("changes" in argument) == ("kick" in argument):
            raise ControlError(
                BAD_ARGUMENT,
                'SetParams: give "token", "molecules" and exactly one of "changes" or "kick"'
                + (f"; unknown key {unknown[0][:50]!r}" if unknown else ""),
            )
        if not isinstance(ids, list) or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in ids
        ):
            raise ControlError(
                BAD_ARGUMENT, "SetParams: molecules must be a list of molecule ids (integers >= 0)"
            )
        params = self.hub.params
        try:
            if "kick" in argument:
                op = params.kick_op(ids, argument["kick"])
            else:
                op = params.set_params_op(ids, argument["changes"])
        except (ValueError, TypeError) as exc:  # UsageError naming the culprit
            raise ControlError(BAD_ARGUMENT, f"SetParams: {exc}"[:500]) from None
        queued = params.request(op)
        log.info("SetParams by control request queued for step %d: %s", self.hub.step_index, op)
        return {"Queued": {"requested": queued, "step": self.hub.step_index}}


_REQUESTS = {
    "Ping": Handler._ping,
    "Status": Handler._status,
    "Stop": Handler._stop,
    "SetParams": Handler._set_params,
}


# ---------------------------------------------------------------- the server


class _Connection(asyncio.Protocol):
    """One control client: split lines, answer each, never read faster than it reads."""

    #: Set by connection_made, which the event loop calls before any other method.
    transport: asyncio.Transport

    def __init__(self, server: ControlServer, number: int) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()  # made by the server, on its loop
        self.peer = f"control#{number}"
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf already searched for a newline
        self._write_paused = False
        self._closing = False
        self._errors = 0
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport (asyncio's or uvloop's) is an asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer and isinstance(peer, tuple):
            self.peer += f" ({peer[0]}:{peer[1]})"
        conns = self.server._connections
        if len(conns) >= MAX_CONNECTIONS:
            log.warning("refusing %s: %d control connections already open", self.peer, len(conns))
            self._closing = True
            self.transport.abort()
            return
        conns.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.server._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._closing:
            self.transport.resume_reading()
            self._answer_lines()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._buf += data
        self._answer_lines()

    def eof_received(self) -> bool:
        return False  # close our side too (answers already written are still sent)

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self.loop.call_later(IDLE_TIMEOUT, self._idle_expired)

    def _idle_expired(self) -> None:
        log.warning("closing %s: no complete request within %g s", self.peer, IDLE_TIMEOUT)
        self._close()

    def _close(self) -> None:
        self._closing = True
        self.transport.close()

    def _answer_lines(self) -> None:
        buf, pos = self._buf, 0
        while not self._write_paused and not self._closing:
            nl = buf.find(b"\n", self._scan)
            if nl < 0:
                self._scan = len(buf)
                if len(buf) - pos > MAX_LINE:
                    self._refuse_long_line()
                break
            if nl - pos > MAX_LINE:
                self._refuse_long_line()
                break
            line = bytes(buf[pos:nl]).rstrip(b"\r")
            pos = self._scan = nl + 1
            if line.strip():
                self._arm_idle()
                self._reply(self.server.handler.answer(line))
        del buf[:pos]
        self._scan = max(0, self._scan - pos)

    def _refuse_long_line(self) -> None:
        self._reply(
            ControlError(
                LINE_TOO_LONG, f"line longer than {MAX_LINE} bytes; closing the connection"
            ).answer()
        )
        self._buf.clear()
        self._scan = 0
        self._close()

    def _reply(self, answer: dict) -> None:
        if answer.get("type") == "Error":
            self._errors += 1
            # One line per bad peer at WARNING; repeats only at DEBUG (no log flood).
            level = logging.WARNING if self._errors == 1 else logging.DEBUG
            log.log(level, "%s: error %d: %s", self.peer, answer["code"], answer["message"])
        self.transport.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")


class ControlServer:
    """The control socket of one hub, on the hub's event loop (:meth:`Hub.start` starts it,
    :meth:`Hub.stop` closes it)."""

    def __init__(self, hub, spec: str | os.PathLike) -> None:
        self.address = control_address(spec)
        self.handler = Handler(hub, secrets.token_hex(32))
        self._connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepted = 0
        self._socket_inode: tuple[int, int] | None = None
        self._token_inode: tuple[int, int] | None = None
        self.token_file: Path | None = None

    def _new_connection(self) -> _Connection:
        self._accepted += 1
        return _Connection(self, self._accepted)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if isinstance(self.address, str):
            # the hub's owner-only lifecycle: a stale file cleared after a probe, born 0600
            sock, self._socket_inode = bind_owner_only(self.address, MAX_CONNECTIONS)
            try:
                self._server = await self._loop.create_unix_server(
                    self._new_connection, sock=sock, backlog=MAX_CONNECTIONS
                )
            except BaseException:
                sock.close()
                remove_if_ours(self.address, self._socket_inode)
                raise
        else:
            host, port = self.address
            self._server = await self._loop.create_server(
                self._new_connection,
                host=host,
                port=port,
                backlog=MAX_CONNECTIONS,
                reuse_address=True,
            )
            self.address = (host, self._server.sockets[0].getsockname()[1])
            if not _is_loopback(host):
                log.warning(
                    "control endpoint on non-loopback %s:%d: anyone who can reach "
                    "it can read the status (Stop still needs the token)",
                    *self.address,
                )
        self.token_file = token_path(self.address)
        try:
            self._token_inode = _write_secret(self.token_file, self.handler._token.decode())
        except BaseException:
            await self.close()
            raise
        log.info("control endpoint on %s (token in %s)", self.describe(), self.token_file)

    def describe(self) -> str:
        """The address as ``maxwellhub status`` takes it."""
        if isinstance(self.address, str):
            return self.address
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for conn in list(self._connections):
                if conn.transport is not None:
                    conn.transport.abort()
            await self._server.wait_closed()
            self._server = None
        if isinstance(self.address, str):
            remove_if_ours(self.address, self._socket_inode)
            self._socket_inode = None
        if self.token_file is not None:
            _unlink_if_same(self.token_file, self._token_inode)
            self._token_inode = None


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- the client


def read_token(address: str | tuple[str, int], path: str | os.PathLike | None = None) -> str:
    """The Stop token of the hub at ``address`` (from its token file, or ``path``)."""
    target = Path(path) if path is not None else token_path(address)
    st = os.stat(target)
    if stat.S_IMODE(st.st_mode) & 0o077:
        log.warning(
            "token file %s is readable by others (mode %o)", target, stat.S_IMODE(st.st_mode)
        )
    return target.read_text().strip()


def request(address: str | tuple[str, int], req: Any, timeout: float = 5.0) -> dict:
    """Send one request, return the answer. Raises ``OSError``/``TimeoutError`` when the
    hub cannot be reached or does not answer within ``timeout``, ``ValueError`` when the
    answer is not a JSON object."""
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection(address, timeout=timeout)
    deadline = _Deadline(timeout)
    with sock:
        sock.sendall(json.dumps(req).encode() + b"\n")
        data = bytearray()
        while b"\n" not in data:
            sock.settimeout(deadline.left())
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError(
                    "the hub closed the control connection without an answer"
                )
            data += chunk
            if len(data) > 64 * MAX_LINE:
                raise ValueError("answer too long")
    answer = json.loads(bytes(data[: data.index(b"\n")]))
    if not isinstance(answer, dict):
        raise ValueError(f"answer is not a JSON object: {answer!r}")
    return answer


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer from the control endpoint in time")
        return left
