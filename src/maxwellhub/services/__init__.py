"""Services served next to a running hub: the control endpoint
(:mod:`~maxwellhub.services.control`), plain calls behind its own socket."""
