"""A Sphinx directive that renders a command's ``--help`` text from its argparse parser.

    ```{cli-help} maxwellhub.cli:_parser
    :prog: maxwellhub
    ```

imports the module, calls the parser-building function and writes the top-level help
followed by every sub-command's help, each as a literal block under its own heading, so
the CLI reference can never drift from the code.
"""

from __future__ import annotations

import argparse
import importlib
import os
from typing import ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective
from sphinx.util.typing import OptionSpec


def _build(spec: str) -> argparse.ArgumentParser:
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse keeps sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(parser: argparse.ArgumentParser) -> str:
    # a fixed width, so the page does not depend on the terminal that built it
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "88"
    try:
        return parser.format_help()
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


class CliHelp(SphinxDirective):
    required_arguments = 1
    option_spec: ClassVar[OptionSpec] = {"prog": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        parser = _build(self.arguments[0])
        if "prog" in self.options:
            parser.prog = self.options["prog"]
        out: list[nodes.Node] = [nodes.literal_block(text=_help(parser), language="text")]
        for name, sub in _subcommands(parser).items():
            section = nodes.section(ids=[nodes.make_id(f"{parser.prog}-{name}")])
            section += nodes.title(text=f"{parser.prog} {name}")
            section += nodes.literal_block(text=_help(sub), language="text")
            out.append(section)
        return out


def setup(app):
    app.add_directive("cli-help", CliHelp)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
