"""Network runtime: sockets only (listening with admission control, the owner-only UNIX
socket lifecycle, socket and memory tuning for large frames). No protocol state, no hub
policy: this package never imports :mod:`maxwellhub.hub`.
"""
