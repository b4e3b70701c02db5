"""Network runtime: sockets only (addresses and connecting, :mod:`~maxwellhub.net.addresses`;
listening with admission control; the owner-only UNIX socket lifecycle; the rendezvous
files drivers find a hub by, :mod:`~maxwellhub.net.rendezvous`; socket and memory tuning
for large frames; the steady step's I/O). No protocol state, no hub policy: this package
never imports :mod:`maxwellhub.hub`.
"""
