"""Command-line conventions shared by every entry point.

Option names use underscores, as the challenge's scripts do (``--input_path``, ``--batch_size``);
the hyphenated spelling of each (``--input-path``) is accepted too, and so are the names earlier
versions used (``parser.alias("--out", "--output_path")``), without cluttering ``--help``.
Entry points build their parser with ``cli.ArgumentParser`` and ``main(argv=None)`` parses it.
"""

from __future__ import annotations

import argparse


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that also accepts ``--a-b`` for every ``--a_b`` option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def alias(self, old: str, option: str) -> None:
        """Accept ``old`` as another spelling of ``option`` (not shown in --help)."""
        self._option_string_actions[old] = self._option_string_actions[option]

    def parse_known_args(self, args=None, namespace=None):
        for action in self._actions:
            for option in action.option_strings:
                if option.startswith("--") and "_" in option:
                    self._option_string_actions.setdefault(option.replace("_", "-"), action)
        return super().parse_known_args(args, namespace)
