"""``maxwellhub-driver --address-file PATH``: find the hub through its rendezvous file.

The file format, its atomic writing and the rules that reject a leftover of a dead run are
in :mod:`maxwellhub.net.rendezvous`; this module only waits, picks the secret and serves.

Secret: ``--secret-file`` wins; otherwise the file the address file names
(``secret_file``); otherwise ``MAXWELLHUB_SECRET``. With ``--reconnect`` a lost connection
sends the driver back to the address file, so a hub restarted by its job (which writes a
new file) is found again.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from maxwellhub.errors import UsageError
from maxwellhub.net.rendezvous import wait_and_connect
from maxwellhub.protocol.auth import Secret

from .client import EXIT_CONNECTION, EXIT_PROTOCOL, serve

if TYPE_CHECKING:
    from maxwellhub.models import Model

    from .checkpoint import Continuity

__all__ = ["run_via_address_file"]


def run_via_address_file(
    model: Model,
    path: str | os.PathLike,
    *,
    timeout: float | None,
    logger: logging.Logger,
    secret: Secret | None,
    secret_given: bool,
    continuity: Continuity | None = None,
    reconnect: bool = False,
) -> int:
    """Wait up to ``timeout`` s (None: no deadline) for a usable address file, connect,
    serve ``model``; return
    the exit status of :func:`maxwellhub_drivers.client.run_client`.

    ``secret_given``: ``secret`` came from --secret-file and overrides the address file's.
    """
    sessions = 0
    while True:
        try:
            sock, info = wait_and_connect(path, timeout, logger=logger)
        except OSError as exc:  # TimeoutError included
            logger.error("%s", exc)
            return EXIT_CONNECTION
        sessions += 1
        use = secret
        if not secret_given and info.secret_file is not None:
            try:
                use = Secret.from_file(info.secret_file)
            except UsageError as exc:
                sock.close()
                logger.error("address file %s: field 'secret_file': %s", path, exc)
                return EXIT_PROTOCOL
        with sock:
            kwargs = {} if continuity is None else {"continuity": continuity}
            status = serve(sock, model, logger=logger, secret=use, **kwargs)
        if status != EXIT_CONNECTION or not reconnect or getattr(continuity, "refused", False):
            return status
        logger.warning(
            "session %d lost; waiting for the hub's address file %s again", sessions, path
        )
