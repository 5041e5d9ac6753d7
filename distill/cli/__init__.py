"""The `distill` command: the app (root options, failures as sentences), the stage commands, the tools."""

from distill.cli import stages, tools  # noqa: F401  (registers the commands, in the order `--help` lists them)
from distill.cli.app import _debug, app, main  # noqa: F401
